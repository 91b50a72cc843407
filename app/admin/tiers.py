"""Editing tiers at run time: the API's limits and the scheduler's W, floors and caps.

Changes take effect without restarts: the API reads the tier row on every submission and the
dispatcher re-reads tiers every couple of seconds (app/scheduling/dispatcher.py).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Tier
from app.scheduling.tiers import MAX_TOTAL_MIN_SHARE

log = logging.getLogger(__name__)


class TierChangeError(ValueError):
    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def tier_view(tier: Tier) -> dict[str, Any]:
    return {
        "name": tier.name,
        "rank": tier.rank,
        "slo_s": tier.slo_s,
        "rate_per_min": tier.rate_per_min,
        "burst": tier.burst,
        "tier_rate_per_min": tier.tier_rate_per_min,
        "tier_burst": tier.tier_burst,
        "concurrency_cap": tier.concurrency_cap,
        "min_share": tier.min_share,
        "monthly_quota": tier.monthly_quota,
        "retention_days": tier.retention_days,
        "updated_at": tier.updated_at.isoformat(),
    }


def list_tiers(session: Session) -> list[Tier]:
    return list(session.scalars(select(Tier).order_by(Tier.rank)))


def update_tier(session: Session, name: str, changes: dict[str, Any], *, actor: str) -> Tier:
    """Apply already type-checked `changes` (schemas.TierPatch) after the cross-tier checks."""
    tiers = {t.name: t for t in session.scalars(select(Tier).with_for_update())}
    tier = tiers.get(name)
    if tier is None:
        raise LookupError(name)
    if "min_share" in changes:
        total = sum(changes["min_share"] if t.name == name else t.min_share for t in tiers.values())
        if total > MAX_TOTAL_MIN_SHARE + 1e-9:
            raise TierChangeError(
                "min_share",
                f"floors of all tiers would sum to {total:.3f}, above "
                f"{MAX_TOTAL_MIN_SHARE}: rank order must keep most of the capacity",
            )
    if ("tier_rate_per_min" in changes) != ("tier_burst" in changes):
        rate = changes.get("tier_rate_per_min", tier.tier_rate_per_min)
        burst = changes.get("tier_burst", tier.tier_burst)
        if (rate is None) != (burst is None):
            raise TierChangeError("tier_burst", "tier_rate_per_min and tier_burst are set (or cleared) together")
    before = tier_view(tier)
    for key, value in changes.items():
        setattr(tier, key, value)
    tier.updated_at = dt.datetime.now(dt.timezone.utc)
    session.flush()
    log.info(
        "tier changed",
        extra={"tier": name, "actor": actor, "changes": changes, "before": {k: before[k] for k in changes}},
    )
    return tier
