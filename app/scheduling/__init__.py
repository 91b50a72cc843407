"""Dispatch scheduling: which queued job goes to which GPU pool next.

`policy.plan_dispatch` is the one decision function the live dispatcher and the simulator both
call; `tiers` holds the tier specs and defaults; `simulator`, `traces` and `report` prove a
policy against synthetic or recorded workloads (`python -m app.scheduling.simulator`).
"""

from app.core.tiers import TIER_ORDER
from app.scheduling.policy import (
    POLICIES,
    Candidate,
    Decision,
    PoolRoom,
    ShareLedger,
    TierBacklog,
    plan_dispatch,
)
from app.scheduling.tiers import DEFAULT_TIERS, TierSpec, default_tiers

__all__ = [
    "POLICIES",
    "Candidate",
    "Decision",
    "PoolRoom",
    "ShareLedger",
    "TierBacklog",
    "plan_dispatch",
    "DEFAULT_TIERS",
    "TIER_ORDER",
    "TierSpec",
    "default_tiers",
]
