"""Customer tiers as the scheduler sees them, and their defaults.

A tier's promise is its worst-case wait `slo_s` (W): a queued job should start within W of
being submitted. `min_share` is the starvation guard: while the tier has a backlog it gets at
least this fraction of all dispatches in every 10-minute window. `user_concurrency_cap` bounds
the jobs one user may have dispatched or running at once, so a single user's burst queues
behind itself instead of occupying the pool.

The live dispatcher reads the `tiers` table (app/db/models.py: slo_s, concurrency_cap,
min_share); the simulator and tests use these defaults, which are also what the table should be
seeded with. The floors are tuned, not arbitrary:

* api and enterprise have no floor: rank protects them (see policy.py); a floor would only let
  them take capacity ahead of rank, which they already have.
* unlimited 0.08, light 0.05, free 0.03 sum to 0.16, so whatever the lower tiers' backlog, at
  least 84% of dispatches remain for rank order. On our traces api + enterprise never need
  more than ~40% of the GPUs, so the floors never cost them their SLO (they do cost light ~1.5
  points of within-W on launch-day: the price of free never being starved). A floor of 3% of
  ~4-60 dispatches/s is still dozens to a thousand jobs per window, so a backlogged tier moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterable, Mapping, cast

# Sum of all floors may not exceed this: a floor is a promise taken from rank order, and rank
# order must keep most of the capacity or the top tiers' SLO is no longer protected.
MAX_TOTAL_MIN_SHARE = 0.5


@dataclass(frozen=True)
class TierSpec:
    name: str
    rank: int  # 0 = most important; unique
    slo_s: float  # W, the worst-case wait promised
    min_share: float  # floor on the tier's share of dispatches while it has a backlog
    user_concurrency_cap: int  # jobs dispatched + running per user

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("tier name must not be empty")
        if self.slo_s <= 0:
            raise ValueError(f"tier {self.name}: slo_s must be > 0, got {self.slo_s}")
        if not 0.0 <= self.min_share <= 1.0:
            raise ValueError(f"tier {self.name}: min_share must be in [0, 1], got {self.min_share}")
        if self.user_concurrency_cap < 1:
            raise ValueError(f"tier {self.name}: user_concurrency_cap must be >= 1")


_DEFAULTS = (
    TierSpec("api", 0, 60.0, 0.00, 200),
    TierSpec("enterprise", 1, 120.0, 0.00, 64),
    TierSpec("unlimited", 2, 600.0, 0.08, 8),
    TierSpec("light", 3, 1800.0, 0.05, 4),
    TierSpec("free", 4, 7200.0, 0.03, 2),
)

DEFAULT_TIERS: Mapping[str, TierSpec] = MappingProxyType({t.name: t for t in _DEFAULTS})


def validate_tiers(tiers: Mapping[str, TierSpec]) -> None:
    """Raise ValueError unless names match keys, ranks are unique and the floors leave room."""
    ranks: set[int] = set()
    for key, spec in tiers.items():
        if key != spec.name:
            raise ValueError(f"tier key {key!r} does not match its spec name {spec.name!r}")
        if spec.rank in ranks:
            raise ValueError(f"tier rank {spec.rank} is used twice")
        ranks.add(spec.rank)
    total = sum(spec.min_share for spec in tiers.values())
    if total > MAX_TOTAL_MIN_SHARE:
        raise ValueError(
            f"min_share floors sum to {total:.3f} > {MAX_TOTAL_MIN_SHARE}: rank order would no "
            "longer control most of the capacity"
        )


def default_tiers(**overrides: Mapping[str, object]) -> dict[str, TierSpec]:
    """A mutable copy of the defaults; `overrides` maps a tier name to field replacements."""
    from dataclasses import replace

    out = dict(DEFAULT_TIERS)
    for name, changes in overrides.items():
        out[name] = replace(out[name], **cast("Mapping[str, Any]", changes))
    validate_tiers(out)
    return out


def by_rank(tiers: Mapping[str, TierSpec], names: Iterable[str] | None = None) -> list[str]:
    """Tier names in rank order (most important first)."""
    pool = tiers.keys() if names is None else names
    return sorted(pool, key=lambda n: tiers[n].rank)
