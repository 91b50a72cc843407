"""Dispatch scheduling: which queued job goes to which GPU pool next.

`policy.plan_dispatch` is the one decision function the live dispatcher and the simulator both
call; `tiers` holds the tier specs and defaults; `burst` the pure burst controller; `dispatcher`
the pass over the database. `sim/` (simulator, traces, report) proves a policy against synthetic
or recorded workloads offline (`python -m app.scheduling.sim.simulator`).
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
