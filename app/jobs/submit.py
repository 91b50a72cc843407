"""Accepting a job: resolve the exact model version, check parameters against it, insert.

`submit()` is the one order every surface (/v1, /dream-machine/v1) follows: the monthly quota
(429), the version and parameters (422), the job and its `queued` event, the rate token (429,
inside the transaction: a refusal rolls the job back), and a dispatch request once it commits.
`submit_on_connection()` is the same order on a bare psycopg connection, for the /v1 fast path
(two round trips instead of five, bench/intake.py).

The job records the version it resolved at submission (the prod alias, or a pinned number), so
a later promote or rollback changes what new jobs get, never what an accepted job runs.
"""

from __future__ import annotations

import datetime as dt
import secrets
import uuid
from collections import namedtuple
from dataclasses import dataclass
from typing import Any, Sequence

from psycopg.types.json import Jsonb
from sqlalchemy.orm import Session, make_transient_to_detached

from app.core.config import get_settings
from app.core.errors import field_error
from app.db.models import Job, JobKind, JobState, Upload
from app.db.session import driver_execute, run_callbacks
from app.jobs.limits import enforce_quota, enforce_quota_driver, enforce_rate, give_back_rate
from app.messaging import get_publisher
from app.outbound.addresses import AddressRefused
from app.outbound.allowlist import check_with_allowlist

PARAMS = ("width", "height", "num_frames", "fps")
FALLBACK_DEFAULTS = {"width": 128, "height": 128, "num_frames": 24, "fps": 12}


@dataclass(frozen=True)
class _Candidate:
    model_id: uuid.UUID
    has_pool: bool
    version_id: uuid.UUID
    number: int
    digest: str
    manifest: dict[str, Any]
    alias: str | None
    percent: float | None


@dataclass(frozen=True)
class ResolvedVersion:
    model_id: uuid.UUID
    model: str
    id: uuid.UUID
    number: int
    digest: str
    manifest: dict[str, Any]


# One round trip: the model, whether a pool serves it, and the candidate versions (the pinned
# number, or the versions its aliases point at).
RESOLVE_SQL = """
    SELECT m.id AS model_id, EXISTS (SELECT 1 FROM pools p WHERE p.model_id = m.id) AS has_pool,
           v.id AS version_id, v.number, v.digest, v.manifest, a.alias, a.percent
    FROM models m
    LEFT JOIN model_aliases a ON a.model_id = m.id AND CAST(%(number)s AS int) IS NULL
    LEFT JOIN model_versions v ON v.model_id = m.id
         AND (v.number = CAST(%(number)s AS int) OR (CAST(%(number)s AS int) IS NULL AND v.id = a.version_id))
    WHERE m.name = %(name)s
"""

# The job row and its first event in one statement, one round trip, through the driver. Through
# the ORM's unit of work the same two INSERTs cost two round trips and ~2 ms of CPU, most of a
# submission's (bench/intake.py). The row comes back whole (server defaults included) and is
# attached to the session as a persistent Job, the object a flush would have left there.
_JOB_COLUMNS = [c.name for c in Job.__table__.columns]
INSERT_JOB_SQL = f"""
    WITH job AS (
        INSERT INTO jobs (id, user_id, tier, kind, state, prompt, params, model_id, model_version_id, upload_id,
                          max_attempts, idempotency_key, request_hash, callback_url, webhook_events)
        VALUES (%(id)s, %(user_id)s, %(tier)s, %(kind)s, %(state)s, %(prompt)s, %(params)s, %(model_id)s,
                %(model_version_id)s, %(upload_id)s, %(max_attempts)s, %(idempotency_key)s, %(request_hash)s,
                %(callback_url)s, %(webhook_events)s)
        RETURNING {", ".join(_JOB_COLUMNS)}
    ), event AS (
        INSERT INTO job_events (job_id, from_state, to_state, detail)
        SELECT id, NULL, state, %(detail)s FROM job
    )
    SELECT {", ".join(_JOB_COLUMNS)} FROM job
"""


# Webhook events a callback can subscribe to (app/webhooks/events.py says what each means).
EVENTS = ("started", "progress", "completed")
DEFAULT_EVENTS = ("started", "completed")


def subscription(
    session: Session, callback_url: str | None, events: Sequence[str] | None
) -> tuple[str | None, list[str] | None]:
    """At submission: the URL passes the address rule (or the allow-list) and the events it gets.

    Raises a 422 naming `callback_url` with the reason; nothing is stored.
    """
    if callback_url is None:
        return None, None
    try:
        check_with_allowlist(session, callback_url)
    except AddressRefused as exc:
        raise field_error("callback_url", exc.reason) from None
    chosen = set(events or DEFAULT_EVENTS)
    return callback_url, [e for e in EVENTS if e in chosen]


def resolve_version(session: Session, name: str, number: int | None) -> tuple[ResolvedVersion, bool]:
    """The exact version a new job runs on, and whether any pool serves the model."""
    return version_from_rows(
        driver_execute(session, RESOLVE_SQL, resolve_params(name, number)).fetchall(), name, number
    )


def resolve_params(name: str, number: int | None) -> dict[str, Any]:
    return {"name": name, "number": number}


def version_from_rows(rows: list[tuple], name: str, number: int | None) -> tuple[ResolvedVersion, bool]:
    """resolve_version() on the rows of RESOLVE_SQL, for a caller that ran it itself."""
    if not rows:
        raise field_error("model", f"unknown model '{name}'")
    has_pool = rows[0][1]
    found = [_Candidate(*r) for r in rows if r[2] is not None]
    if number is not None:
        if not found:
            raise field_error("model_version", f"model '{name}' has no version {number}")
        chosen = found[0]
    else:
        by_alias = {r.alias: r for r in found}
        if "prod" not in by_alias:
            raise field_error("model", f"model '{name}' has no prod version yet")
        chosen = by_alias["prod"]
        canary = by_alias.get("canary")
        # An independent draw per job: over N jobs the canary's share is within a few
        # sqrt(N)/N of its percentage, with no shared counter to contend on.
        if canary is not None and secrets.randbelow(10_000) < canary.percent * 100:  # type: ignore[operator]  # a canary has a percent
            chosen = canary
    return ResolvedVersion(
        chosen.model_id, name, chosen.version_id, chosen.number, chosen.digest, chosen.manifest
    ), has_pool


def check_params(manifest: dict[str, Any], requested: dict[str, int | None]) -> dict[str, int]:
    """Fill defaults from the version's manifest and enforce its limits, naming the field."""
    info = manifest.get("model", {})
    defaults = {**FALLBACK_DEFAULTS, **info.get("defaults", {})}
    limits = info.get("limits", {})
    params: dict[str, int] = {}
    for name in PARAMS:
        value = requested.get(name)
        value = int(defaults[name]) if value is None else value
        bound = limits.get(name, {})
        low, high = bound.get("min"), bound.get("max")
        if low is not None and value < low:
            raise field_error(name, f"must be at least {low} for this model (got {value})")
        if high is not None and value > high:
            raise field_error(name, f"must be at most {high} for this model (got {value})")
        multiple = bound.get("multiple_of")
        if multiple and value % multiple:
            raise field_error(name, f"must be a multiple of {multiple} (got {value})")
        params[name] = value
    seed = requested.get("seed")
    params["seed"] = secrets.randbelow(2**31) if seed is None else seed
    return params


def accept_version(rows: list[tuple], name: str, body) -> tuple[ResolvedVersion, dict[str, int]]:
    """The version a new job runs on and its checked parameters, from RESOLVE_SQL's rows: 422
    for an unknown model or version, a model no pool serves, or parameters out of range."""
    version, has_pool = version_from_rows(rows, name, body.model_version)
    if not has_pool:
        raise field_error("model", f"no pool serves model '{name}'")
    return version, check_params(version.manifest, body.model_dump())


def create_job(
    session: Session, principal, body, *, idempotency_key: str | None = None, request_hash: str | None = None
) -> tuple[Job, ResolvedVersion]:
    settings = get_settings()
    name = body.model or settings.default_model
    rows = driver_execute(session, RESOLVE_SQL, resolve_params(name, body.model_version)).fetchall()
    version, params = accept_version(rows, name, body)
    # getattr: other request surfaces (e.g. a Luma-compatible one) may have no webhook fields.
    callback_url, webhook_events = subscription(
        session, getattr(body, "callback_url", None), getattr(body, "webhook_events", None)
    )

    upload_id = None
    if body.upload_id is not None:
        upload = session.get(Upload, body.upload_id)
        now = dt.datetime.now(dt.timezone.utc)
        # Another user's upload answers exactly like a missing one.
        if (
            upload is None
            or upload.user_id != principal.user_id
            or upload.deleted_at is not None
            or upload.expires_at < now
        ):
            raise field_error("upload_id", "no such upload (it may have expired)")
        upload_id = upload.id

    row = driver_execute(
        session,
        INSERT_JOB_SQL,
        insert_params(
            principal,
            body,
            name,
            version,
            params,
            upload_id=upload_id,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            callback_url=callback_url,
            webhook_events=webhook_events,
        ),
    ).fetchone()
    job = Job(**dict(zip(_JOB_COLUMNS, row)))
    make_transient_to_detached(job)
    session.add(job)
    return job, version


def insert_params(
    principal,
    body,
    name: str,
    version: ResolvedVersion,
    params: dict[str, int],
    *,
    upload_id: uuid.UUID | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    callback_url: str | None = None,
    webhook_events: list[str] | None = None,
) -> dict[str, Any]:
    """The parameters of INSERT_JOB_SQL: the job row and its 'queued' event."""
    return {
        "id": uuid.uuid4(),
        "user_id": principal.user_id,
        "tier": principal.tier,
        "kind": JobKind(body.type).value,
        "state": JobState.queued.value,
        "prompt": body.prompt,
        "params": Jsonb(params),
        "model_id": version.model_id,
        "model_version_id": version.id,
        "upload_id": upload_id,
        "max_attempts": get_settings().max_attempts,
        "idempotency_key": idempotency_key,
        "request_hash": request_hash,
        "callback_url": callback_url,
        "webhook_events": None if webhook_events is None else Jsonb(webhook_events),
        "detail": Jsonb({"model": name, "version": version.number}),
    }


# A job as INSERT_JOB_SQL returns it, for a caller without a Session: what job_view() reads.
JobRow = namedtuple("JobRow", _JOB_COLUMNS)  # type: ignore[misc]  # the columns of the jobs table


def submit(
    session: Session, principal, body, *, idempotency_key: str | None = None, request_hash: str | None = None
) -> tuple[Job, ResolvedVersion]:
    """Accept `body` for `principal` in the caller's transaction (see the module docstring)."""
    tier = principal.tier_row
    assert tier is not None  # loaded with the key
    enforce_quota(session, principal, tier)
    job, version = create_job(session, principal, body, idempotency_key=idempotency_key, request_hash=request_hash)
    enforce_rate(principal, tier)  # after the insert: a refusal raises inside the transaction
    get_publisher().request_dispatch(session)
    return job, version


def submit_on_connection(
    connection, principal, body, name: str, candidates: list[tuple]
) -> tuple[Any, ResolvedVersion]:
    """submit() for a body without upload or callback, on a bare psycopg connection in autocommit,
    from RESOLVE_SQL's `candidates` (read with the key). Returns the JobRow and its version.

    Without a quota the token is taken before the insert rather than inside its transaction (a
    refusal still stores nothing), and given back if the insert fails, so a request that stores
    no job still costs none. A tier with a monthly quota keeps the transaction the quota's lock
    needs: lock, count, insert, token, commit. The dispatch request follows the commit."""
    tier = principal.tier_row
    assert tier is not None  # loaded with the key
    if tier.monthly_quota is not None:
        with connection.transaction():
            enforce_quota_driver(connection, principal, tier)
            version, params = accept_version(candidates, name, body)
            job = JobRow(
                *connection.execute(INSERT_JOB_SQL, insert_params(principal, body, name, version, params)).fetchone()
            )
            enforce_rate(principal, tier)  # inside the transaction: a refusal rolls the job back
    else:
        version, params = accept_version(candidates, name, body)
        taken = enforce_rate(principal, tier)
        try:
            job = JobRow(
                *connection.execute(INSERT_JOB_SQL, insert_params(principal, body, name, version, params)).fetchone()
            )
        except BaseException:
            give_back_rate(taken)
            raise
    # As an after-commit callback would: a failed publish is logged, never fails the accepted job
    # (the beat's dispatch tick is the safety net).
    run_callbacks([get_publisher().request_dispatch])
    return job, version
