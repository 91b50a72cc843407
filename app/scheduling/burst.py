"""When to borrow GPUs from the training cluster, how many, and when to give them back.

Pure code: no I/O, no clock, no randomness. The burst beat task and the simulator build the
same `BurstObservation` every control tick, call `BurstController.decide(obs)` and carry out
the `BurstDecision` it returns (start N workers through the provisioner, drain the ones named,
release everything). The controller keeps a little state between ticks (`BurstState`: when the
current pressure or calm streak began, when it last scaled up); a live task that runs in a
different process every tick stores `state.as_dict()` (Redis, a row) and passes
`BurstState.from_dict(...)` back in.

One controller per burst pool (a burst cluster and the model it serves). Its observation:

* per tier, in rank order (most important first): W, the *dispatchable* backlog (queued jobs
  whose user is under the tier's concurrency cap: a 10k-job burst from one capped user is not
  drained any faster by more GPUs), the wait of its oldest dispatchable job, and the arrival
  rate over the last few minutes (jobs/s, optional);
* the standing capacity (inference workers of the pool's model, busy and total);
* the burst workers by phase (starting = requested and warming up, serving, draining), each
  with the time it was requested; a group of identical workers started together (one Slurm
  array job, one simulator cohort) may be one entry with `count` and `busy` > 1;
* the mean job duration, the warm-up time (allocation + model load) and the cluster's limit;
* whether the cluster has been reclaimed (operator `dreamq clusters reclaim`, or training).

The rule
--------
*Pressure* of tier t = the larger of

* drain_t / W_t, where drain_t = B_t x mean / (C - L_t): B_t and L_t the backlog and the
  arrival load (arrivals/s x mean, GPUs) of t and every tier ranked above it (the dispatcher
  serves those first), C the serving capacity (standing + ready burst workers); infinite when
  L_t >= C and B_t > 0: the backlog only grows;
* the oldest dispatchable job's wait / W_t (its urgency), but only while the GPUs are saturated
  (busy >= `saturation` x C): jobs waiting next to idle GPUs are held by caps or routing, and
  more GPUs would not start them sooner.

P = the largest tier pressure. Each tick is *high* (P >= `up_pressure`), *calm* (P <=
`calm_pressure`) or in between (which ends both streaks).

1. Reclaimed: release every worker at once (the live side requeues what the draining and
   serving ones were running); hold everything afterwards until the flag clears.
2. More workers than the cluster limit (the training side shrank it): release the excess,
   starting ones first (they hold no job), then idle, then draining, then busy.
3. Scale up when P has been high for `sustain_s` (a one-tick spike never starts a worker), and
   only if the backlog would still be there when new workers are ready: the pressed tiers'
   projected drain time with the capacity already serving or starting must exceed warm-up +
   `min_useful_s`. Size: the capacity at which every tier's drain time is at most
   `target_fraction` x W, with the backlog projected to the moment the workers are ready
   (it keeps growing during warm-up if L > C), minus what is serving or starting; capped by
   the cluster's room and `max_step_fraction` of its limit. After a step the streak starts
   again, so steps are at least `sustain_s` apart.
4. Scale down only after `calm_s` of calm (short dips keep their workers: warm-up is the
   expensive part), never within `min_lifetime_s` of the last scale-up, and only workers older
   than `min_lifetime_s`. It keeps enough burst workers that the total capacity carries the
   arrival load at `target_utilization` (so draining never recreates the backlog it was
   started for) and drains the rest: idle first, oldest first. Draining = finish the current
   job, take nothing new; the controller never kills a worker that has a job (except on reclaim).

Arrival rates are optional (`arrivals_per_s=None` on any tier): drain times then fall back to
backlog x mean / capacity, which is optimistic while arrivals exceed capacity (steps come out
smaller and more of them), and the load kept at scale-down is the busy GPUs, exact while idle
GPUs exist. The live task should pass rates (jobs created per tier over the last 5 minutes).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Mapping, Sequence, cast

STARTING = "starting"
SERVING = "serving"
DRAINING = "draining"
PHASES = (STARTING, SERVING, DRAINING)

_BIG = 1e9  # stands for "never drains" in exported numbers (JSON and metrics want finite values)


class Action(str, Enum):
    HOLD = "hold"
    SCALE_UP = "scale_up"
    DRAIN = "drain"
    RELEASE = "release"


@dataclass(frozen=True)
class TierPressure:
    """One tier's backlog as the scheduler sees it (see the module docstring)."""

    name: str
    slo_s: float  # W
    queued: int  # dispatchable backlog
    oldest_wait_s: float = 0.0  # now - enqueue time of the oldest dispatchable job; 0 if none
    # Jobs/s entering the dispatchable backlog over the last few minutes: (dispatched + backlog
    # now - backlog then) / span. Raw submissions would count a capped user's 10k-job burst as
    # load that more GPUs could serve. None = unknown.
    arrivals_per_s: float | None = None

    @property
    def urgency(self) -> float:
        return self.oldest_wait_s / self.slo_s if self.queued else 0.0


@dataclass(frozen=True)
class BurstWorker:
    """A burst worker, or `count` identical ones requested together (one Slurm array job).

    Live heartbeat states map as: starting -> STARTING; idle / busy -> SERVING with busy 0 / 1;
    draining -> DRAINING. `started_at` is when it was requested (the min lifetime counts from it).
    """

    id: str
    phase: str
    started_at: float
    count: int = 1
    busy: int = 0  # how many of `count` are running a job

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"burst worker {self.id}: phase must be one of {PHASES}, not {self.phase!r}")
        if self.count < 0 or not 0 <= self.busy <= self.count:
            raise ValueError(f"burst worker {self.id}: need 0 <= busy <= count")


@dataclass(frozen=True)
class BurstObservation:
    now: float
    tiers: Sequence[TierPressure]  # rank order, most important first
    standing_busy: int
    standing_total: int
    workers: Sequence[BurstWorker]
    mean_job_s: float
    warmup_s: float
    max_workers: int  # the burst cluster's limit (GPUs it may lend)
    reclaimed: bool = False
    reclaim_reason: str = ""  # who reclaimed (operator, training) for the log

    def count(self, phase: str) -> int:
        return sum(w.count for w in self.workers if w.phase == phase)


@dataclass(frozen=True)
class BurstDecision:
    """What to do this tick. `count` workers to start (scale_up) or taken from `workers`
    (drain, release: (worker id, how many of that entry)); `reason` is one line for the log;
    `numbers` the inputs behind it, for the log and for metrics."""

    action: Action
    reason: str
    count: int = 0
    workers: tuple[tuple[str, int], ...] = ()
    numbers: Mapping[str, float | str] = field(default_factory=dict)

    @property
    def worker_ids(self) -> tuple[str, ...]:
        return tuple(w for w, _n in self.workers)


@dataclass(frozen=True)
class BurstParams:
    # Scale up at half of W: the dispatcher switches to strict rank order at the same line
    # (policy.PRESSURE_LINE), i.e. this is where some tier starts to be at risk.
    up_pressure: float = 0.5
    # High for 5 control ticks of 60 s: a spike (one heavy user's burst landing, a standing
    # worker restarting) never starts a worker, and it spaces steps 5 min apart. Tuned on
    # launch-day: 180 s took 14 steps to follow the first hour's ramp, 300 s takes 7 with the
    # same SLO results and fewer GPU-hours; 600 s (= warm-up) doubles the reaction time.
    sustain_s: float = 300.0
    # Urgency is GPU pressure only when the GPUs are (nearly) all busy.
    saturation: float = 0.9
    # Size for drain time <= W/2 per tier: the same line as up_pressure, so a step that lands
    # does not leave the pool at the threshold.
    target_fraction: float = 0.5
    # A worker must be useful for at least ~2 mean jobs after warm-up, or its model load is wasted.
    min_useful_s: float = 300.0
    # At most half the cluster per step: a wrong estimate (mean duration, arrivals) cannot take
    # the whole training cluster in one tick, and the second half follows sustain_s later.
    max_step_fraction: float = 0.5
    # Calm means every tier's drain time <= W/10 (the backlog is essentially gone)...
    calm_pressure: float = 0.1
    # ...for 15 min: longer than the dips a launch-day arrival curve shows between waves.
    calm_s: float = 900.0
    # 3 warm-ups (10 min model load): a worker serves at least twice as long as it loaded.
    min_lifetime_s: float = 1800.0
    # Capacity is sized (up) and kept (down) for the arrival load at <= 85% busy, so the queue
    # stays short and a scale-up is not undone by the next drain.
    target_utilization: float = 0.85
    # Drains at most every 20 min, each at least 5% of the borrowed workers (or the whole rest):
    # the surplus is given back in a few batches instead of a trickle of small actions (launch-day:
    # 50 drains with neither, 14 at 10 min, 8 at 20 min for ~2% more GPU-hours).
    drain_interval_s: float = 1200.0
    min_drain_fraction: float = 0.05

    def __post_init__(self) -> None:
        if not 0 <= self.calm_pressure < self.up_pressure:
            raise ValueError("need 0 <= calm_pressure < up_pressure (hysteresis band)")
        if not 0 < self.target_fraction <= 1 or not 0 < self.max_step_fraction <= 1:
            raise ValueError("target_fraction and max_step_fraction must be in (0, 1]")
        if not 0 < self.saturation <= 1 or not 0 < self.target_utilization <= 1:
            raise ValueError("saturation and target_utilization must be in (0, 1]")
        if min(self.sustain_s, self.calm_s, self.min_lifetime_s, self.min_useful_s, self.drain_interval_s) < 0:
            raise ValueError("durations must be >= 0")


@dataclass
class BurstState:
    pressure_since: float | None = None  # start of the current high streak
    calm_since: float | None = None  # start of the current calm streak
    last_up_at: float | None = None
    last_drain_at: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping | None) -> "BurstState":
        d = d or {}
        return cls(**{k: d.get(k) for k in ("pressure_since", "calm_since", "last_up_at", "last_drain_at")})


def _fmt_s(x: float) -> str:
    return "never" if x >= _BIG else f"{x:.0f}s"


class BurstController:
    """The burst policy. `BurstController(calm_s=600)` overrides one default; `state` resumes."""

    def __init__(self, params: BurstParams | None = None, *, state: BurstState | None = None, **overrides):
        self.params = replace(params or BurstParams(), **overrides)
        self.state = state or BurstState()

    # ------------------------------------------------------------------------------------
    def decide(self, obs: BurstObservation) -> BurstDecision:
        p, st, now = self.params, self.state, obs.now
        starting, serving, draining = (obs.count(ph) for ph in PHASES)
        active = starting + serving + draining
        burst_busy = sum(w.busy for w in obs.workers)
        capacity = obs.standing_total + serving
        planned = capacity + starting
        busy = obs.standing_busy + burst_busy
        mean = obs.mean_job_s
        load = self._load(obs, busy)
        tiers = self._pressures(obs, capacity, busy)
        worst = max(tiers, key=lambda t: t["pressure"], default=None)
        pressure = worst["pressure"] if worst else 0.0
        nums: dict[str, float | str] = {
            "pressure": round(min(pressure, _BIG), 3),
            "worst_tier": worst["name"] if worst else "",
            "backlog": sum(t.queued for t in obs.tiers),
            "load_gpus": round(load, 1),
            "standing": obs.standing_total,
            "starting": starting,
            "serving": serving,
            "draining": draining,
            "busy": busy,
            "max_workers": obs.max_workers,
        }

        # 1. reclaim
        if obs.reclaimed:
            st.pressure_since = st.calm_since = None
            who = obs.reclaim_reason or "reclaimed"
            if not active:
                return BurstDecision(Action.HOLD, f"cluster reclaimed ({who}); nothing borrowed", numbers=nums)
            picks = tuple((w.id, w.count) for w in obs.workers if w.count)
            return BurstDecision(
                Action.RELEASE,
                f"cluster reclaimed ({who}): releasing all {active} workers now "
                f"({starting} starting, {serving} serving, {draining} draining; running jobs are requeued)",
                count=active,
                workers=picks,
                numbers=nums,
            )

        # 2. over the cluster's limit
        if active > obs.max_workers:
            excess = active - obs.max_workers
            picks = self._pick(obs.workers, excess, release=True)
            return BurstDecision(
                Action.RELEASE,
                f"{active} burst workers over the cluster limit {obs.max_workers}: releasing {excess}",
                count=excess,
                workers=picks,
                numbers=nums,
            )

        # streaks
        if pressure >= p.up_pressure:
            st.calm_since = None
            if st.pressure_since is None:
                st.pressure_since = now
        elif pressure <= p.calm_pressure:
            st.pressure_since = None
            if st.calm_since is None:
                st.calm_since = now
        else:
            st.pressure_since = st.calm_since = None
        why = self._why(worst, p)

        # 3. scale up
        if st.pressure_since is not None:
            held = now - st.pressure_since
            nums["high_for_s"] = held
            if held < p.sustain_s:
                return BurstDecision(
                    Action.HOLD,
                    f"pressure {pressure:.2f} ({why}) high for {held:.0f}s, needs {p.sustain_s:.0f}s before scaling up",
                    numbers=nums,
                )
            pressed = [t for t in tiers if t["pressure"] >= p.up_pressure]
            drain_planned = max(self._drain(t, planned, mean) for t in pressed)
            nums["drain_planned_s"] = round(min(drain_planned, _BIG), 1)
            if drain_planned <= obs.warmup_s + p.min_useful_s:
                return BurstDecision(
                    Action.HOLD,
                    f"pressure {pressure:.2f} ({why}) but the backlog drains in {_fmt_s(drain_planned)} with "
                    f"{planned} GPUs serving or starting, before new workers would be useful "
                    f"(warm-up {obs.warmup_s:.0f}s + {p.min_useful_s:.0f}s)",
                    numbers=nums,
                )
            want = self._target_capacity(tiers, planned, mean, obs.warmup_s, load)
            room = obs.max_workers - active
            step = max(1, math.ceil(p.max_step_fraction * obs.max_workers))
            need = math.ceil(want - planned - 1e-9)
            add = max(0, min(need, room, step))
            nums.update(target_capacity=round(want, 1), need=max(need, 0), room=room, max_step=step)
            if add <= 0:
                if room <= 0:
                    msg = f"pressure {pressure:.2f} ({why}) but the burst cluster is full ({active}/{obs.max_workers})"
                else:
                    msg = (
                        f"pressure {pressure:.2f} ({why}); the {planned} GPUs serving or starting already "
                        f"meet the target ({want:.0f})"
                    )
                return BurstDecision(Action.HOLD, msg, numbers=nums)
            caps = []
            if add < need:
                caps.append("cluster room" if add == room else f"max step {step}")
            st.pressure_since = now  # the next step needs a new sustained streak
            st.last_up_at = now
            return BurstDecision(
                Action.SCALE_UP,
                f"scale up {add}: pressure {pressure:.2f} ({why}) for {held:.0f}s; drain {_fmt_s(drain_planned)} "
                f"> warm-up {obs.warmup_s:.0f}s; target {want:.0f} GPUs for drain <= {p.target_fraction:g} W "
                f"(have {planned})" + (f", capped by {', '.join(caps)}" if caps else ""),
                count=add,
                numbers=nums,
            )

        # 4. scale down
        if st.calm_since is not None and starting + serving > 0:
            calm_for = now - st.calm_since
            nums["calm_for_s"] = calm_for
            if calm_for < p.calm_s:
                return BurstDecision(
                    Action.HOLD,
                    f"calm (pressure {pressure:.2f}) for {calm_for:.0f}s, keeping "
                    f"{starting + serving} workers until {p.calm_s:.0f}s",
                    numbers=nums,
                )
            if st.last_up_at is not None and now - st.last_up_at < p.min_lifetime_s:
                return BurstDecision(
                    Action.HOLD,
                    f"calm, but the last scale-up was {now - st.last_up_at:.0f}s "
                    f"ago (< min lifetime {p.min_lifetime_s:.0f}s)",
                    numbers=nums,
                )
            if st.last_drain_at is not None and now - st.last_drain_at < p.drain_interval_s:
                return BurstDecision(
                    Action.HOLD,
                    f"calm; last drain {now - st.last_drain_at:.0f}s ago (< {p.drain_interval_s:.0f}s between drains)",
                    numbers=nums,
                )
            keep_total = math.ceil(load / p.target_utilization - 1e-9)
            keep = max(0, keep_total - obs.standing_total)
            surplus = starting + serving - keep
            nums.update(keep=keep, surplus=max(surplus, 0))
            if surplus <= 0:
                return BurstDecision(
                    Action.HOLD,
                    f"calm, but load {load:.0f} GPUs needs {keep_total} at "
                    f"{p.target_utilization:.0%} busy: standing {obs.standing_total} "
                    f"+ all {starting + serving} burst workers",
                    numbers=nums,
                )
            old = [w for w in obs.workers if w.phase == SERVING and now - w.started_at >= p.min_lifetime_s]
            eligible = sum(w.count for w in old)
            n = min(surplus, eligible)
            nums["eligible"] = eligible
            if n <= 0:
                return BurstDecision(
                    Action.HOLD,
                    f"calm with {surplus} surplus workers, none older than the min lifetime {p.min_lifetime_s:.0f}s",
                    numbers=nums,
                )
            batch = math.ceil(p.min_drain_fraction * (starting + serving) - 1e-9)
            if n < batch and keep > 0:
                return BurstDecision(
                    Action.HOLD,
                    f"calm with {n} drainable surplus workers, fewer than a batch "
                    f"({batch} = {p.min_drain_fraction:.0%} of {starting + serving})",
                    numbers=nums,
                )
            st.last_drain_at = now
            picks = self._pick(old, n, release=False)
            return BurstDecision(
                Action.DRAIN,
                f"drain {n}: calm for {calm_for:.0f}s (pressure {pressure:.2f} <= {p.calm_pressure:g}); load "
                f"{load:.0f} GPUs needs {keep} burst workers beside {obs.standing_total} standing; "
                f"{eligible} past min lifetime",
                count=n,
                workers=picks,
                numbers=nums,
            )

        if not active:
            return BurstDecision(Action.HOLD, f"pressure {pressure:.2f} ({why}); nothing borrowed", numbers=nums)
        band = "calm" if st.calm_since is not None else f"between {p.calm_pressure:g} and {p.up_pressure:g}"
        return BurstDecision(
            Action.HOLD,
            f"pressure {pressure:.2f} ({why}) {band}: keeping {starting + serving} workers ({draining} draining)",
            numbers=nums,
        )

    # ------------------------------------------------------------------------------------
    @staticmethod
    def _load(obs: BurstObservation, busy: int) -> float:
        rates = [t.arrivals_per_s for t in obs.tiers]
        if rates and all(r is not None for r in rates):
            return sum(cast("list[float]", rates)) * obs.mean_job_s
        return float(busy)

    def _pressures(self, obs: BurstObservation, capacity: int, busy: int) -> list[dict]:
        """Per tier: cumulative backlog and load (this tier and those ranked above), pressure."""
        p = self.params
        saturated = capacity > 0 and busy >= p.saturation * capacity
        unknown = any(t.arrivals_per_s is None for t in obs.tiers)
        out = []
        b = 0
        lam = 0.0
        for t in obs.tiers:
            b += t.queued
            if not unknown:
                assert t.arrivals_per_s is not None  # none is unknown
                lam += t.arrivals_per_s
            # without rates: the plain backlog x mean / capacity (no arrival load)
            row = {"name": t.name, "slo_s": t.slo_s, "backlog": b, "load": lam * obs.mean_job_s}
            drain = self._drain(row, capacity, obs.mean_job_s)
            urgency = t.urgency if saturated else 0.0
            row.update(drain_s=drain, urgency=urgency, pressure=max(drain / t.slo_s, urgency))
            out.append(row)
        return out

    @staticmethod
    def _drain(row: dict, capacity: float, mean: float) -> float:
        if row["backlog"] <= 0:
            return 0.0
        net = capacity - row["load"]
        return math.inf if net <= 0 else row["backlog"] * mean / net

    def _target_capacity(self, tiers: list[dict], planned: int, mean: float, warmup_s: float, load: float) -> float:
        """Capacity that carries the whole load at target_utilization and brings every tier's
        drain time under target_fraction x W once the new workers are ready (the backlog
        projected over the warm-up at the planned capacity)."""
        p = self.params
        want = load / p.target_utilization
        for t in tiers:
            growth = (t["load"] - planned) / mean * warmup_s if mean > 0 else 0.0
            backlog = max(0.0, t["backlog"] + growth)
            want = max(want, t["load"] / p.target_utilization + backlog * mean / (p.target_fraction * t["slo_s"]))
        return want

    @staticmethod
    def _why(worst: dict | None, p: BurstParams) -> str:
        if worst is None:
            return "no tiers"
        drain = worst["drain_s"]
        return (
            f"{worst['name']}: {worst['backlog']} queued at or above it, drain {_fmt_s(min(drain, _BIG))} "
            f"vs W {worst['slo_s']:g}s, oldest {worst['urgency']:.2f} W"
        )

    @staticmethod
    def _pick(workers: Sequence[BurstWorker], n: int, *, release: bool) -> tuple[tuple[str, int], ...]:
        """Take n workers: idle before busy, oldest first (they have paid off their warm-up);
        for a release, starting ones come first (they hold no job) and busy ones last."""

        def idle(w: BurstWorker) -> int:
            return w.count - w.busy

        order = {STARTING: 0, SERVING: 1, DRAINING: 2}
        pools: list[tuple[tuple, str, int]] = []
        for w in workers:
            if release:
                if idle(w):
                    rank = 0 if w.phase == STARTING else (1 if w.phase == SERVING else 2)
                    pools.append(((rank, w.started_at, w.id), w.id, idle(w)))
                if w.busy:
                    pools.append(((3 + order[w.phase], w.started_at, w.id), w.id, w.busy))
            else:
                if idle(w):
                    pools.append(((0, w.started_at, w.id), w.id, idle(w)))
                if w.busy:
                    pools.append(((1, w.started_at, w.id), w.id, w.busy))
        pools.sort()
        taken: dict[str, int] = {}
        for _key, wid, k in pools:
            if n <= 0:
                break
            m = min(k, n)
            taken[wid] = taken.get(wid, 0) + m
            n -= m
        return tuple(taken.items())


def count_reversals(actions: Sequence[tuple[float, str]], window_s: float) -> int:
    """Flapping: consecutive actions (time, Action value) of opposite direction (a scale-up
    after a drain or release, or the other way round) less than `window_s` apart."""
    direction = {Action.SCALE_UP.value: 1, Action.DRAIN.value: -1, Action.RELEASE.value: -1}
    n = 0
    prev: tuple[float, int] | None = None
    for t, kind in actions:
        d = direction.get(str(getattr(kind, "value", kind)), 0)
        if not d:
            continue
        if prev is not None and prev[1] != d and t - prev[0] < window_s:
            n += 1
        prev = (t, d)
    return n
