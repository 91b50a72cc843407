"""Workload traces for the scheduling simulator: three seeded generators and a CSV loader.

Every trace is deterministic for a given (name, seed, scale, hours). `scale` multiplies GPUs,
arrival rates, user counts and burst sizes together, so a scaled-down trace has the same load
shape (tests use scale 0.05-0.1). Shared assumptions:

* GPU time per job: lognormal, median 150 s, sigma 0.35 (mean ~160 s, p99 ~340 s), clipped to
  [30 s, 900 s]: a 5-10 s clip of Ray2 at 540p-1080p on one GPU.
* Two models: `ray2` (80% of jobs) and `ray2-flash` (20%); every cluster splits its GPUs 80/20
  between the two pools. Clusters hold up to 2,500 GPUs and are filled in order as capacity grows.
* Users: per tier a population whose request rates are lognormal (sigma 0.8), so the busiest
  ordinary user stays under its tier's concurrency cap, plus a few *heavy users* that submit
  bursts of thousands of jobs at once (each burst spread over 2 minutes). Burst jobs count like
  any other job in the metrics, so a burst that its own user's cap cannot drain within W shows
  up as misses for every policy alike.

launch-day
    500 GPUs at t=0, linear to 5,000 at 6 h and to 9,000 at 8 h (steps every 5 min), 12 h.
    Arrivals ramp 6 -> 22 jobs/s in the first hour, hold 22/s to 3.5 h, then decay to ~6/s:
    ~480k ordinary jobs + 15.3k burst jobs (496,905 with seed 0). Demand exceeds capacity for the
    first ~3.5 h; the backlog peaks at ~93k around 3.5 h and is drained by ~6 h, except for the
    heavy users' bursts, which their own concurrency caps drain over many hours.
    Tier mix (of ordinary jobs): api 5%, enterprise 10%, unlimited 25%, light 20%, free 40%.
    Users: api 40, enterprise 150, unlimited 8,000, light 15,000, free 60,000.
    Heavy users: free 10,000 jobs at 1 h; unlimited 2,000 at 2 h and 2,000 at 6 h (two users);
    enterprise 1,000 at 5 h; api 300 at 7 h.
steady
    2,000 GPUs fixed, 12 h, arrivals at 80% of capacity with a +-10% wave (period 6 h), same
    mix as launch-day. Users: api 30, enterprise 100, unlimited 3,000, light 5,000, free 20,000.
    Heavy users: enterprise 100 jobs at 4 h, unlimited 40 at 8 h (bursts their caps absorb).
starve
    1,000 GPUs fixed, 12 h. Demand in fractions of capacity: api 0.06, enterprise 0.12,
    unlimited 0.42, light 0.30 (paid 0.90 on average, modulated +-20% with a 3 h period, so paid
    alone exceeds capacity for ~1 h in every 3 h) and free 0.40 flat: ~130% of capacity overall.
    Users: api 20, enterprise 60, unlimited 1,500, light 3,000, free 10,000.
    Heavy users: free 3,000 jobs at 1 h; unlimited 1,000 at 3 h.
CSV (`load_csv`)
    Columns submit_s, tier, user, duration_s[, model] (header required). GPUs fixed, given or
    sized for 80% load; horizon = last (submit + duration) + 600 s.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from app.core.tiers import TIER_ORDER

TRACES: tuple[str, ...] = ("launch-day", "steady", "starve")
MODELS: tuple[str, ...] = ("ray2", "ray2-flash")
MODEL_SHARE: tuple[float, ...] = (0.8, 0.2)
CLUSTER_SIZE = 2500

DURATION_MEDIAN_S = 150.0
DURATION_SIGMA = 0.35
MEAN_DURATION_S = DURATION_MEDIAN_S * math.exp(DURATION_SIGMA**2 / 2)
STANDARD_MIX = {"api": 0.05, "enterprise": 0.10, "unlimited": 0.25, "light": 0.20, "free": 0.40}


@dataclass
class Trace:
    name: str
    submit_s: np.ndarray  # float64, sorted ascending
    tier: np.ndarray  # int, index into tier_names
    user: np.ndarray  # int, global user index
    duration_s: np.ndarray  # float64, GPU seconds
    model: np.ndarray  # int, index into models
    tier_names: tuple[str, ...]
    models: tuple[str, ...]
    model_gpu_share: tuple[float, ...]
    capacity: tuple[tuple[float, int], ...]  # (from time, total GPUs), ascending times
    horizon_s: float
    cluster_size: int = CLUSTER_SIZE
    description: str = ""

    @property
    def jobs(self) -> int:
        return int(self.submit_s.size)

    @property
    def n_users(self) -> int:
        return int(self.user.max()) + 1 if self.user.size else 0

    def gpus_at(self, t: float) -> int:
        gpus = 0
        for start, n in self.capacity:
            if start <= t:
                gpus = n
        return gpus

    @classmethod
    def from_rows(
        cls,
        name: str,
        rows: Sequence[tuple],
        *,
        gpus: int | Sequence[tuple[float, int]],
        horizon_s: float | None = None,
        models: Sequence[str] = MODELS,
        model_gpu_share: Sequence[float] = MODEL_SHARE,
        tier_names: Sequence[str] = TIER_ORDER,
        cluster_size: int = CLUSTER_SIZE,
        description: str = "",
    ) -> "Trace":
        """Rows of (submit_s, tier, user, duration_s[, model]); users are any hashable labels.

        A user label seen in two tiers becomes two simulated users (one queue per tier); the
        concurrency cap then applies per tier.
        """
        tier_index = {t: i for i, t in enumerate(tier_names)}
        model_list = list(models)
        model_index = {m: i for i, m in enumerate(model_list)}
        users: dict = {}
        data = []
        for row in rows:
            submit, tier, user, duration = row[:4]
            model = row[4] if len(row) > 4 and row[4] not in (None, "") else model_list[0]
            if tier not in tier_index:
                raise ValueError(f"unknown tier {tier!r}; expected one of {', '.join(tier_names)}")
            if model not in model_index:
                raise ValueError(f"unknown model {model!r}; expected one of {', '.join(model_list)}")
            # a user's jobs in two tiers (a tier change) are two queues, as in the index
            uid = users.setdefault((user, tier), len(users))
            data.append((float(submit), tier_index[tier], uid, float(duration), model_index[model]))
        data.sort(key=lambda r: r[0])
        arr = np.array(data, dtype=np.float64).reshape(-1, 5)
        if isinstance(gpus, (int, np.integer)):
            capacity: tuple[tuple[float, int], ...] = ((0.0, int(gpus)),)
        else:
            capacity = tuple((float(a), int(b)) for a, b in gpus)
        if horizon_s is None:
            end = float(np.max(arr[:, 0] + arr[:, 3])) if len(arr) else 0.0
            horizon_s = end + 600.0
        return cls(
            name=name,
            submit_s=arr[:, 0].copy(),
            tier=arr[:, 1].astype(np.int64),
            user=arr[:, 2].astype(np.int64),
            duration_s=arr[:, 3].copy(),
            model=arr[:, 4].astype(np.int64),
            tier_names=tuple(tier_names),
            models=tuple(model_list),
            model_gpu_share=tuple(model_gpu_share),
            capacity=capacity,
            horizon_s=float(horizon_s),
            cluster_size=cluster_size,
            description=description,
        )


def load_csv(path: str | Path, *, gpus: int | None = None, name: str | None = None) -> Trace:
    """Load a CSV trace (submit_s, tier, user, duration_s[, model])."""
    path = Path(path)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"submit_s", "tier", "user", "duration_s"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        rows = [
            (r["submit_s"], r["tier"].strip(), r["user"].strip(), r["duration_s"], (r.get("model") or "").strip())
            for r in reader
        ]
    if not rows:
        raise ValueError(f"{path}: no jobs")
    if gpus is None:
        submits = [float(r[0]) for r in rows]
        work = sum(float(r[3]) for r in rows)
        span = max(max(submits) - min(submits), 1.0)
        gpus = max(1, math.ceil(work / span / 0.8))
    models = list(MODELS)
    for r in rows:
        if r[4] and r[4] not in models:
            models.append(r[4])
    share = tuple(1.0 / len(models) for _ in models) if len(models) != len(MODELS) else MODEL_SHARE
    return Trace.from_rows(
        name or path.stem, rows, gpus=int(gpus), models=models, model_gpu_share=share, description=f"CSV trace {path}"
    )


# --------------------------------------------------------------------------------------------
# generators


def _durations(rng: np.random.Generator, n: int) -> np.ndarray:
    d = rng.lognormal(math.log(DURATION_MEDIAN_S), DURATION_SIGMA, n)
    return np.clip(d, 30.0, 900.0)


def _poisson_times(rng: np.random.Generator, grid: np.ndarray, rate: np.ndarray) -> np.ndarray:
    """Inhomogeneous Poisson arrivals for a piecewise-linear rate on `grid` (by inversion)."""
    cum = np.concatenate(([0.0], np.cumsum(0.5 * (rate[1:] + rate[:-1]) * np.diff(grid))))
    n = rng.poisson(cum[-1])
    u = np.sort(rng.uniform(0.0, cum[-1], n))
    return np.interp(u, cum, grid)


def _users(rng: np.random.Generator, n_users: int, n_jobs: int, offset: int) -> np.ndarray:
    w = rng.lognormal(0.0, 0.8, n_users)
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    return offset + np.minimum(np.searchsorted(cdf, rng.uniform(size=n_jobs)), n_users - 1)


class _Builder:
    def __init__(self, seed: int, scale: float):
        self.rng = np.random.default_rng(seed)
        self.scale = scale
        self.parts: list[tuple[np.ndarray, int, np.ndarray]] = []
        self.next_user = 0

    def tier_stream(self, tier: str, grid: np.ndarray, rate: np.ndarray, n_users: int) -> None:
        times = _poisson_times(self.rng, grid, rate)
        n_users = max(1, int(round(n_users * self.scale)))
        users = _users(self.rng, n_users, times.size, self.next_user)
        self.next_user += n_users
        self.parts.append((times, TIER_ORDER.index(tier), users))

    def burst(self, tier: str, at_s: float, n_jobs: int) -> None:
        n = max(1, int(round(n_jobs * self.scale)))
        times = np.sort(at_s + self.rng.uniform(0.0, 120.0, n))
        self.parts.append((times, TIER_ORDER.index(tier), np.full(n, self.next_user)))
        self.next_user += 1

    def build(self, name: str, capacity, horizon_s: float, description: str) -> Trace:
        times = np.concatenate([p[0] for p in self.parts])
        tiers = np.concatenate([np.full(p[0].size, p[1]) for p in self.parts])
        users = np.concatenate([p[2] for p in self.parts])
        keep = times < horizon_s
        times, tiers, users = times[keep], tiers[keep], users[keep]
        order = np.argsort(times, kind="stable")
        n = times.size
        model = (self.rng.uniform(size=n) >= MODEL_SHARE[0]).astype(np.int64)
        return Trace(
            name=name,
            submit_s=times[order],
            tier=tiers[order].astype(np.int64),
            user=users[order].astype(np.int64),
            duration_s=_durations(self.rng, n),
            model=model,
            tier_names=TIER_ORDER,
            models=MODELS,
            model_gpu_share=MODEL_SHARE,
            capacity=tuple(capacity),
            horizon_s=horizon_s,
            description=description,
        )


def _scaled_gpus(gpus: float, scale: float) -> int:
    return max(1, int(round(gpus * scale)))


def launch_day(seed: int = 0, scale: float = 1.0, hours: float = 12.0) -> Trace:
    horizon = hours * 3600.0
    step = 300.0
    capacity = []
    for t in np.arange(0.0, horizon, step):
        h = t / 3600.0
        g = 500 + 4500 * h / 6 if h < 6 else (5000 + 4000 * (h - 6) / 2 if h < 8 else 9000)
        capacity.append((float(t), _scaled_gpus(g, scale)))
    # jobs/s at hour marks, piecewise linear, normalised so ordinary jobs total ~480k over 12 h
    knots_h = np.array([0.0, 1.0, 3.5, 5.0, 8.0, 12.0])
    knots_r = np.array([6.0, 22.0, 22.0, 12.0, 7.0, 6.0])
    grid = np.arange(0.0, horizon + 60.0, 60.0)
    rate = np.interp(grid / 3600.0, knots_h, knots_r)
    full_grid = np.arange(0.0, 12 * 3600.0 + 60.0, 60.0)
    full_rate = np.interp(full_grid / 3600.0, knots_h, knots_r)
    norm = 480_000 / float(np.sum(0.5 * (full_rate[1:] + full_rate[:-1]) * 60.0))
    rate = rate * norm * scale
    b = _Builder(seed, scale)
    users = {"api": 40, "enterprise": 150, "unlimited": 8000, "light": 15000, "free": 60000}
    for tier in TIER_ORDER:
        b.tier_stream(tier, grid, rate * STANDARD_MIX[tier], users[tier])
    b.burst("free", 1.0 * 3600, 10_000)
    b.burst("unlimited", 2.0 * 3600, 2_000)
    b.burst("unlimited", 6.0 * 3600, 2_000)
    b.burst("enterprise", 5.0 * 3600, 1_000)
    b.burst("api", 7.0 * 3600, 300)
    return b.build("launch-day", capacity, horizon, "500 -> 5,000 (6 h) -> 9,000 (8 h) GPUs, ~495k jobs")


def steady(seed: int = 0, scale: float = 1.0, hours: float = 12.0) -> Trace:
    horizon = hours * 3600.0
    gpus = _scaled_gpus(2000, scale)
    grid = np.arange(0.0, horizon + 60.0, 60.0)
    mu = gpus / MEAN_DURATION_S
    rate = 0.8 * mu * (1.0 + 0.1 * np.sin(2 * math.pi * grid / (6 * 3600.0)))
    b = _Builder(seed, scale)
    users = {"api": 30, "enterprise": 100, "unlimited": 3000, "light": 5000, "free": 20000}
    for tier in TIER_ORDER:
        b.tier_stream(tier, grid, rate * STANDARD_MIX[tier], users[tier])
    b.burst("enterprise", 4.0 * 3600, 100)
    b.burst("unlimited", 8.0 * 3600, 40)
    return b.build("steady", [(0.0, gpus)], horizon, f"{gpus} GPUs, 80% load +-10%")


def starve(seed: int = 0, scale: float = 1.0, hours: float = 12.0) -> Trace:
    horizon = hours * 3600.0
    gpus = _scaled_gpus(1000, scale)
    grid = np.arange(0.0, horizon + 60.0, 60.0)
    mu = gpus / MEAN_DURATION_S
    wave = 1.0 + 0.2 * np.sin(2 * math.pi * grid / (3 * 3600.0))
    demand = {"api": 0.06, "enterprise": 0.12, "unlimited": 0.42, "light": 0.30}
    b = _Builder(seed, scale)
    users = {"api": 20, "enterprise": 60, "unlimited": 1500, "light": 3000, "free": 10000}
    for tier, frac in demand.items():
        b.tier_stream(tier, grid, mu * frac * wave, users[tier])
    b.tier_stream("free", grid, np.full(grid.shape, mu * 0.40), users["free"])
    b.burst("free", 1.0 * 3600, 3_000)
    b.burst("unlimited", 3.0 * 3600, 1_000)
    return b.build("starve", [(0.0, gpus)], horizon, f"{gpus} GPUs, paid ~90% +-20%, all ~130%")


GENERATORS = {"launch-day": launch_day, "steady": steady, "starve": starve}


def get_trace(name: str, *, seed: int = 0, scale: float = 1.0, hours: float | None = None) -> Trace:
    try:
        gen = GENERATORS[name]
    except KeyError:
        raise ValueError(f"unknown trace {name!r}; expected one of {', '.join(TRACES)} or --csv FILE") from None
    kwargs: dict[str, Any] = {"seed": seed, "scale": scale}
    if hours is not None:
        kwargs["hours"] = hours
    return gen(**kwargs)
