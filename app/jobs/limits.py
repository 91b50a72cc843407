"""Submission limits: the tier's monthly quota and its token buckets (per user, per tier).

Checked in this order so a refused request changes nothing: body validation (422) first, then
the quota (429 quota_exceeded; counting takes no token), then the job is inserted and only then
a token is taken: a refusal there raises inside the transaction, which rolls the insert back.
"""

from __future__ import annotations

import calendar
import datetime as dt
import logging
import math

from sqlalchemy.orm import Session

from app.core.errors import TooManyRequests
from app.core.ratelimit import RateLimiter, RateLimiterUnavailable
from app.core.redis_client import get_redis
from app.core.signals import limiter_unavailable, submission_refused
from app.db.models import Tier
from app.db.session import driver_execute

log = logging.getLogger(__name__)


def _month_bounds(now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    days = calendar.monthrange(now.year, now.month)[1]
    return start, start + dt.timedelta(days=days)


# One lock and one count for every caller, on a Session (through driver_execute) or on a bare
# psycopg connection in a transaction (app.db.session.driver_connection).
_QUOTA_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtext('dreamq.quota.' || %(u)s))"
_MONTH_COUNT_SQL = "SELECT count(*) FROM jobs WHERE user_id = %(user_id)s AND created_at >= %(start)s"


def _month_count(execute, user_id) -> tuple[int, dt.datetime]:
    start, end = _month_bounds(dt.datetime.now(dt.timezone.utc))
    return execute(_MONTH_COUNT_SQL, {"user_id": user_id, "start": start}).fetchone()[0], end


def month_usage(session: Session, user_id) -> tuple[int, dt.datetime]:
    """Jobs the user submitted this calendar month (what the quota counts), and when it renews."""
    return _month_count(lambda sql, params: driver_execute(session, sql, params), user_id)


def enforce_quota(session: Session, principal, tier: Tier) -> None:
    _enforce_quota(lambda sql, params: driver_execute(session, sql, params), principal, tier)


def enforce_quota_driver(connection, principal, tier) -> None:
    """enforce_quota() on a bare psycopg connection in a transaction."""
    _enforce_quota(connection.execute, principal, tier)


def _enforce_quota(execute, principal, tier) -> None:
    if tier.monthly_quota is None:
        return
    # Two concurrent submissions of one user must not both see "one left".
    execute(_QUOTA_LOCK_SQL, {"u": str(principal.user_id)})
    # Its own statement, after the lock: its snapshot must include what the last holder committed.
    used, end = _month_count(execute, principal.user_id)
    _refuse_over_quota(tier, used, end)


def _refuse_over_quota(tier, used: int, end: dt.datetime) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    if used >= tier.monthly_quota:
        submission_refused.send(None, tier=tier.name, reason="quota_exceeded")
        raise TooManyRequests(
            f"monthly quota of {tier.monthly_quota} jobs for tier {tier.name} is used up; it renews {end.date()}",
            code="quota_exceeded",
            headers={"Retry-After": str(math.ceil((end - now).total_seconds()))},
        )


def enforce_rate(principal, tier: Tier) -> list | None:
    """Take the submission's token (429 when refused). Returns the buckets it was taken from, for
    give_back_rate(), or None when none was taken (no Redis, or the limiter failed open)."""
    redis = get_redis()
    if redis is None:
        return None
    limiter = RateLimiter(redis)
    buckets = limiter.submission_buckets(
        user_id=str(principal.user_id),
        tier=tier.name,
        user_rate_per_min=tier.rate_per_min,
        user_burst=tier.burst,
        tier_rate_per_min=tier.tier_rate_per_min,
        tier_burst=tier.tier_burst,
    )
    try:
        verdict = limiter.take(buckets)
    except RateLimiterUnavailable:
        # Fail open: Postgres is the source of truth and losing Redis must not stop intake.
        log.warning("rate limiter unavailable; submission accepted without a token")
        limiter_unavailable.send(None)
        return None
    if not verdict.allowed:
        scope = "tier" if verdict.limited_by and ":tier:" in verdict.limited_by else "user"
        submission_refused.send(None, tier=tier.name, reason=f"rate_limited_{scope}")
        retry = max(1, math.ceil(verdict.retry_after_s))
        raise TooManyRequests(
            f"submission rate limit of the {tier.name} tier ({scope} bucket) reached; retry in {retry} s",
            code="rate_limited",
            headers={"Retry-After": str(retry)},
        )
    return buckets


def give_back_rate(buckets: list | None) -> None:
    """Return the token enforce_rate() took, for a submission that then stored no job."""
    redis = get_redis()
    if not buckets or redis is None:
        return
    try:
        RateLimiter(redis).give_back(buckets)
    except RateLimiterUnavailable:
        log.warning("rate limiter unavailable; a token of a failed submission was not given back")
