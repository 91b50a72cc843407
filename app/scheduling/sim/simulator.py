"""Discrete-event simulator of the dispatcher: traces in, per-tier SLO metrics out.

It drives the same `plan_dispatch` the live dispatcher calls, with inputs built the way the
database builds them, so a result here is a statement about the code that runs in production.

Model
-----
* **Jobs** arrive at their `submit_s` and are queued (state `queued`).
* **Dispatcher**: every DISPATCH_TICK_S (2 s) it reads, like the live one,
  - per tier the heads: users with queued jobs who are under the tier's concurrency cap, in
    order of their oldest queued job (the index (tier, user_id, created_at) WHERE queued, minus
    capped users); up to HEADS_USERS users and HEADS_PER_USER jobs each (never more than the
    user's remaining cap), and no more than total room + HEADS_SLACK jobs per tier (fetching
    more than can be dispatched is pointless);
  - backlog counts and oldest enqueue time per tier, pool rooms, in-flight counts of the head
    users and the share ledger of the current 10-minute window;
  then calls `plan_dispatch` and applies the decisions (state `dispatched`, ledger recorded).
* **Pools**: one per (cluster, model). Clusters hold up to 2,500 GPUs, split between models by
  the trace's GPU share; dispatch limit = max(1, 5% of the pool's GPUs), i.e. a prefetch queue
  of ~7.5 s of work. A dispatched job reaches its pool after DISPATCH_LATENCY_S (1 s, Celery
  publish + delivery) and waits in the pool's queue, FIFO, for a free GPU (state `running` at
  start). Room = limit - (in transit + waiting in the pool queue).
* **GPUs** pull from their pool's queue the moment they finish a job or come online.
* **Wait** = start - submit (what the user sees as "queued"). A job that has not started by the
  end of the trace counts as a miss whatever its wait so far, and its wait so far enters the
  percentiles and max (a job never run is a miss, not an absence).
* **Bursting** (`burst=True`): a "training" cluster of BURST_MAX_GPUS (4,000; x scale for a
  scaled generated trace) that starts empty. Every BURST_CONTROL_S (60 s) the simulator builds
  a `BurstObservation` the way the live burst task does (per tier the dispatchable backlog, the
  wait of its oldest dispatchable job and the rate at which jobs entered that backlog over the
  last ARRIVAL_WINDOW_S (dispatches + its growth, so capped users' bursts do not count); the
  standing GPUs busy and total; the burst cohorts by phase; the running mean of finished jobs'
  durations) and carries out `BurstController.decide` (app/scheduling/burst.py): a scale-up
  starts a cohort of N GPUs that count as capacity only after BURST_WARMUP_S (10 min: model
  load); a drain takes GPUs from cohorts (idle ones leave at once, busy ones after their job:
  the pool shrinks lazily); a release is carried out like a drain (reclaims are not simulated).
  Every action is recorded (time, kind, count, reason); the summary's `burst` block counts
  scale-ups, scale-downs and reversals (opposite actions less than REVERSAL_WINDOW_S apart),
  the peak of borrowed GPUs (warming + serving + draining) and the GPU-hours borrowed.
  Off by default.

Metrics are computed in app/scheduling/sim/report.py (including the exact definition of a starved
window, whose "backlog" is the dispatchable backlog tracked here: per user min(queued, cap -
in flight)). The timeline samples every minute, just after a dispatcher tick: per tier the wait
/ W of the oldest job the scheduler could dispatch (`oldest_over_slo`, what the PNG plots) and of
the oldest queued job including those held back by their own user's cap (`oldest_any_over_slo`).

Performance: per-job work is a handful of list/deque/heap operations; a dispatcher tick costs
O(heads + decisions), never O(backlog). `Candidate` objects are built once per job and reused
while the job stays in the heads. The 12 h launch-day trace (496,905 jobs, 500 -> 9,000 GPUs,
21,600 dispatcher ticks) takes ~16 s on an idle 2-core machine, ~9 s of it inside plan_dispatch.

CLI: `python -m app.scheduling.sim.simulator --trace launch-day --policy slo [--json]
[--plot out.png] [--csv FILE [--gpus N]] [--seed N] [--scale X] [--hours H]
[--burst [--burst-gpus N] [--burst-warmup S]]`
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Mapping, Sequence, cast

import numpy as np

from app.scheduling.burst import (
    DRAINING,
    SERVING,
    STARTING,
    Action,
    BurstController,
    BurstObservation,
    BurstParams,
    BurstWorker,
    TierPressure,
    count_reversals,
)
from app.scheduling.policy import (
    POLICIES,
    WINDOW_S,
    Candidate,
    PoolRoom,
    ShareLedger,
    TierBacklog,
    plan_dispatch,
)
from app.scheduling.sim import report
from app.scheduling.sim.traces import MEAN_DURATION_S, TRACES, Trace, get_trace, load_csv
from app.scheduling.tiers import DEFAULT_TIERS, TierSpec, validate_tiers

DISPATCH_TICK_S = 2.0
DISPATCH_LATENCY_S = 1.0
HEADS_USERS = 64
HEADS_PER_USER = 8
HEADS_SLACK = 16
POOL_LIMIT_FRACTION = 0.05
POOL_LIMIT_MIN = 1
SAMPLE_S = 60.0

BURST_MAX_GPUS = 4000
BURST_WARMUP_S = 600.0
BURST_CONTROL_S = 60.0
ARRIVAL_WINDOW_S = 300.0
REVERSAL_WINDOW_S = 1800.0

_QUEUED, _DISPATCHED, _RUNNING, _DONE = 1, 2, 3, 4


class _Pool:
    __slots__ = ("id", "cluster", "model", "gpus", "target", "busy", "pending", "limit", "queue")

    def __init__(self, pool_id: str, cluster: str, model: int):
        self.id = pool_id
        self.cluster = cluster
        self.model = model
        self.gpus = 0
        self.target = 0
        self.busy = 0
        self.pending = 0  # dispatched, not started (in transit + in queue)
        self.limit = 0
        self.queue: deque = deque()

    def set_gpus(self, gpus: int) -> None:
        """Grow at once; shrink lazily (busy GPUs, and those its queue still needs, retire when free)."""
        self.target = gpus
        self.limit = max(POOL_LIMIT_MIN, math.ceil(POOL_LIMIT_FRACTION * gpus)) if gpus > 0 else 0
        if gpus >= self.gpus:
            self.gpus = gpus
        else:
            self.gpus = max(gpus, min(self.gpus, self.busy + self.pending))


@dataclass
class SimResult:
    summary: dict
    timeline: dict = field(default_factory=dict)


class Simulator:
    def __init__(
        self,
        trace: Trace,
        policy: str,
        tiers: Mapping[str, TierSpec] | None = None,
        *,
        burst: bool = False,
        burst_gpus: int = BURST_MAX_GPUS,
        burst_warmup_s: float = BURST_WARMUP_S,
        burst_params: BurstParams | None = None,
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
        self.trace = trace
        self.policy = policy
        self.tiers = dict(tiers or DEFAULT_TIERS)
        validate_tiers(self.tiers)
        for name in trace.tier_names:
            if name not in self.tiers:
                raise ValueError(f"trace tier {name!r} has no TierSpec")
        self.burst = burst
        self.burst_gpus = int(burst_gpus)
        self.burst_warmup_s = float(burst_warmup_s)
        self.burst_params = burst_params or BurstParams()

    # ----------------------------------------------------------------------------------------
    def run(self) -> SimResult:
        wall0 = time.perf_counter()
        tr = self.trace
        tiers = self.tiers
        tnames = list(tr.tier_names)
        ntiers = len(tnames)
        mnames = list(tr.models)
        caps = [tiers[n].user_concurrency_cap for n in tnames]
        slo = [tiers[n].slo_s for n in tnames]

        submit = tr.submit_s.tolist()
        jtier = tr.tier.tolist()
        juser = tr.user.tolist()
        jdur = tr.duration_s.tolist()
        jmodel = tr.model.tolist()
        njobs = len(submit)
        nusers = tr.n_users
        horizon = tr.horizon_s

        state = bytearray(njobs)
        start = [math.nan] * njobs
        elig = [math.nan] * njobs  # when the job's user was first under the cap for it (see cap_wait)
        cand: list = [None] * njobs

        uq: list = [None] * nusers
        uqueued = [0] * nusers
        inflight = [0] * nusers
        ready: list[list] = [[] for _ in range(ntiers)]
        tfifo: list[deque] = [deque() for _ in range(ntiers)]
        tqueued = [0] * ntiers
        dispatchable = [0] * ntiers  # sum over users of min(queued, cap - inflight)

        # pools
        pools: list[_Pool] = []
        pool_index: dict[str, int] = {}

        def pool_for(cluster: str, m: int) -> _Pool:
            pid = f"{cluster}/{mnames[m]}"
            i = pool_index.get(pid)
            if i is None:
                i = pool_index[pid] = len(pools)
                pools.append(_Pool(pid, cluster, m))
            return pools[i]

        shares = list(tr.model_gpu_share)

        def split(total: int) -> list[int]:
            raw = [total * s for s in shares]
            out = [int(math.floor(x)) for x in raw]
            rest = total - sum(out)
            for i in sorted(range(len(raw)), key=lambda i: raw[i] - out[i], reverse=True)[:rest]:
                out[i] += 1
            return out

        events: list = []
        seq = itertools.count()
        push = heapq.heappush
        pop = heapq.heappop

        def start_job(j: int, p: _Pool, pi: int, t: float) -> None:
            state[j] = _RUNNING
            start[j] = t
            p.pending -= 1
            p.busy += 1
            push(events, (t + jdur[j], next(seq), pi, j))

        def resize(p: _Pool, pi: int, gpus: int, t: float) -> None:
            p.set_gpus(gpus)
            q = p.queue
            while q and p.busy < p.gpus:
                start_job(q.popleft(), p, pi, t)

        def apply_capacity(total: int, t: float, cluster_prefix: str = "c") -> None:
            size = tr.cluster_size
            nclusters = max(1, math.ceil(total / size))
            want: dict[str, int] = {p.id: 0 for p in pools if p.cluster.startswith(cluster_prefix)}
            left = total
            for c in range(nclusters):
                g = min(size, left)
                left -= g
                for m, gm in enumerate(split(g)):
                    want[pool_for(f"{cluster_prefix}{c}", m).id] = gm
            for pid, gm in want.items():
                p = pools[pool_index[pid]]
                if gm != p.target:
                    resize(p, pool_index[pid], gm, t)

        cap_steps = list(tr.capacity)
        cap_i = 0
        # bursting: cohorts [id, requested at, ready at, GPUs] on the "training" cluster
        controller = BurstController(self.burst_params) if self.burst else None
        cohorts: list[list] = []
        n_cohorts = 0
        serving_gpus = 0
        burst_actions: list[dict] = []
        burst_decisions = 0
        burst_gpu_s = 0.0
        burst_peak = 0
        tdisp = [0] * ntiers  # dispatches per tier, cumulative
        arrival_marks: deque = deque()  # (t, per tier dispatched + dispatchable) at each control tick
        done_n = 0
        done_s = 0.0
        control_every = max(1, int(round(BURST_CONTROL_S / DISPATCH_TICK_S)))
        warmup = self.burst_warmup_s

        ledger = ShareLedger()
        n_windows = int(math.ceil(horizon / WINDOW_S)) + 1
        win_disp = np.zeros((n_windows, ntiers), dtype=np.int64)
        win_start_backlog = np.zeros((n_windows, ntiers), dtype=np.int64)
        win_min_backlog = np.full((n_windows, ntiers), np.iinfo(np.int64).max, dtype=np.int64)
        cur_window = -1

        tl_t: list[float] = []
        tl_oldest: list[list[float]] = [[] for _ in range(ntiers)]
        tl_oldest_all: list[list[float]] = [[] for _ in range(ntiers)]
        tl_queued: list[list[int]] = [[] for _ in range(ntiers)]
        tl_busy: list[int] = []
        tl_gpus: list[int] = []
        tl_burst: list[int] = []
        next_sample = 0.0

        tier_specs = tiers
        policy = self.policy
        dt = DISPATCH_TICK_S
        latency = DISPATCH_LATENCY_S
        ai = 0
        total_queued = 0
        n_ticks = int(math.ceil(horizon / dt - 1e-9))  # the last tick is at or after the horizon
        gpu_seconds = 0.0
        last_t = 0.0
        cur_gpus = 0
        n_calls = 0
        plan_s = 0.0

        def contrib(u: int, cap: int) -> int:
            r = cap - inflight[u]
            q = uqueued[u]
            return q if q < r else (r if r > 0 else 0)

        def push_ready(u: int, t_i: int) -> None:
            q = uq[u]
            while state[q[0]] != _QUEUED:
                q.popleft()
            j = q[0]
            push(ready[t_i], (submit[j], j, u))

        def oldest_ready(ti: int) -> float | None:
            """Submit time of the tier's oldest job the scheduler could dispatch (top of the
            ready heap, cleaned of users now capped or emptied); None if there is none."""
            heap = ready[ti]
            cap = caps[ti]
            while heap:
                _key, j, u = heap[0]
                if uqueued[u] and inflight[u] < cap:
                    q = uq[u]
                    while state[q[0]] != _QUEUED:
                        q.popleft()
                    if q[0] == j:
                        return submit[j]
                pop(heap)
            return None

        def training_pools() -> list[_Pool]:
            return [p for p in pools if p.cluster.startswith("training")]

        def burst_control(now: float) -> None:
            nonlocal n_cohorts, serving_gpus, burst_decisions
            mark = tuple(tdisp[i] + dispatchable[i] for i in range(ntiers))
            arrival_marks.append((now, mark))
            while len(arrival_marks) > 1 and arrival_marks[1][0] <= now - ARRIVAL_WINDOW_S:
                arrival_marks.popleft()
            t0_, m0 = arrival_marks[0]
            span = now - t0_
            tiers_obs = []
            for ti in range(ntiers):
                o = oldest_ready(ti)
                rate = (mark[ti] - m0[ti]) / span if span > 0 else None
                tiers_obs.append(
                    TierPressure(tnames[ti], slo[ti], dispatchable[ti], now - o if o is not None else 0.0, rate)
                )
            tp = training_pools()
            tr_busy = sum(p.busy for p in tp)
            draining = sum(max(0, p.gpus - p.target) for p in tp)
            serving_busy = min(serving_gpus, max(0, tr_busy - draining))
            workers = []
            left = serving_busy
            for cid, req, ready_at, n in cohorts:
                if ready_at <= now:
                    b = min(n, left, math.ceil(serving_busy * n / serving_gpus) if serving_gpus else 0)
                    left -= b
                    workers.append(BurstWorker(cid, SERVING, req, n, b))
                else:
                    workers.append(BurstWorker(cid, STARTING, req, n, 0))
            if draining:
                workers.append(BurstWorker("draining", DRAINING, now, draining, draining))
            standing = [p for p in pools if not p.cluster.startswith("training")]
            obs = BurstObservation(
                now=now,
                tiers=tiers_obs,
                standing_busy=sum(p.busy for p in standing),
                standing_total=sum(p.gpus for p in standing),
                workers=workers,
                mean_job_s=done_s / done_n if done_n else MEAN_DURATION_S,
                warmup_s=warmup,
                max_workers=self.burst_gpus,
            )
            assert controller is not None  # burst ticks run only with a controller
            d = controller.decide(obs)
            burst_decisions += 1
            if d.action is Action.HOLD:
                return
            burst_actions.append({"t": now, "action": d.action.value, "count": d.count, "reason": d.reason})
            if d.action is Action.SCALE_UP:
                n_cohorts += 1
                cohorts.append([f"b{n_cohorts}", now, now + warmup, d.count])
                return
            # drain / release: the pool shrinks lazily, busy GPUs leave when their job ends
            take = dict(d.workers)
            for c in cohorts:
                k = min(take.get(c[0], 0), c[3])
                c[3] -= k
                if c[2] <= now:
                    serving_gpus -= k
            cohorts[:] = [c for c in cohorts if c[3] > 0]
            apply_capacity(serving_gpus, now, cluster_prefix="training")

        for k in range(n_ticks + 1):
            now = k * dt
            # ---- timeline sample: the state the previous tick's dispatch left (no events yet)
            if now >= next_sample:
                next_sample += SAMPLE_S
                tl_t.append(now)
                tl_busy.append(sum(p.busy for p in pools))
                tl_gpus.append(sum(p.gpus for p in pools))
                tl_burst.append(sum(p.gpus for p in training_pools()) + sum(c[3] for c in cohorts if c[2] > now))
                for ti in range(ntiers):
                    f = tfifo[ti]
                    while f and state[f[0]] != _QUEUED:
                        f.popleft()
                    tl_oldest_all[ti].append((now - submit[f[0]]) / slo[ti] if f else 0.0)
                    oldest = oldest_ready(ti)
                    tl_oldest[ti].append((now - oldest) / slo[ti] if oldest is not None else 0.0)
                    tl_queued[ti].append(tqueued[ti])

            # ---- GPU and pool events up to now
            while events and events[0][0] <= now:
                ev = pop(events)
                t_ev, _s, pi, payload = ev
                p = pools[pi]
                if isinstance(payload, list):  # dispatched jobs reach the pool
                    q = p.queue
                    for j in payload:
                        if p.busy < p.gpus:
                            start_job(j, p, pi, t_ev)
                        else:
                            q.append(j)
                    continue
                j = payload  # completion
                state[j] = _DONE
                done_n += 1
                done_s += jdur[j]
                u = juser[j]
                ti = jtier[j]
                cap = caps[ti]
                before = contrib(u, cap)
                inflight[u] -= 1
                after = contrib(u, cap)
                dispatchable[ti] += after - before
                if after > before:  # the user's next queued job is now under the cap
                    q = uq[u]
                    while state[q[0]] != _QUEUED:
                        q.popleft()
                    elig[q[after - 1]] = t_ev
                if inflight[u] == cap - 1 and uqueued[u] > 0:
                    push_ready(u, ti)
                p.busy -= 1
                if p.queue and p.busy < p.gpus:
                    start_job(p.queue.popleft(), p, pi, t_ev)
                elif p.gpus > p.target and p.gpus > p.busy + p.pending:
                    # a pool being shrunk retires GPUs once nothing dispatched to it needs them
                    p.gpus = max(p.target, p.busy + p.pending)

            # ---- arrivals up to now
            while ai < njobs and submit[ai] <= now:
                j = ai
                ai += 1
                u = juser[j]
                ti = jtier[j]
                q = uq[u]
                if q is None:
                    q = uq[u] = deque()
                was_empty = uqueued[u] == 0
                if was_empty:
                    q.clear()
                q.append(j)
                uqueued[u] += 1
                state[j] = _QUEUED
                tfifo[ti].append(j)
                tqueued[ti] += 1
                total_queued += 1
                if uqueued[u] <= caps[ti] - inflight[u]:
                    dispatchable[ti] += 1
                    elig[j] = submit[j]
                if was_empty and inflight[u] < caps[ti]:
                    push(ready[ti], (submit[j], j, u))

            # ---- capacity
            changed = False
            while cap_i < len(cap_steps) and cap_steps[cap_i][0] <= now:
                cur_gpus = cap_steps[cap_i][1]
                cap_i += 1
                changed = True
            if changed:
                apply_capacity(cur_gpus, now)
            if controller is not None:
                ready_now = sum(c[3] for c in cohorts if c[2] <= now)
                if ready_now != serving_gpus:  # cohorts whose warm-up ended come online
                    serving_gpus = ready_now
                    apply_capacity(serving_gpus, now, cluster_prefix="training")
                if k % control_every == 0:
                    burst_control(now)
                borrowed = sum(c[3] for c in cohorts if c[2] > now)
                for p in pools:
                    if p.cluster.startswith("training"):
                        borrowed += p.gpus
                if k:
                    burst_gpu_s += borrowed * (now - last_t)
                if borrowed > burst_peak:
                    burst_peak = borrowed
            total_gpus = 0
            for p in pools:
                total_gpus += p.gpus
            gpu_seconds += total_gpus * (now - last_t) if k else 0.0
            last_t = now

            # ---- window bookkeeping (backlog at window start, minimum during the window)
            w = int(now // WINDOW_S)
            if w != cur_window:
                cur_window = w
                win_start_backlog[w] = dispatchable
            row = win_min_backlog[w]
            for ti in range(ntiers):
                if dispatchable[ti] < row[ti]:
                    row[ti] = dispatchable[ti]

            # ---- dispatch
            if total_queued == 0:
                continue
            room = 0
            for p in pools:
                r = p.limit - p.pending
                if r > 0:
                    room += r
            if room <= 0:
                continue
            heads: dict[str, list[Candidate]] = {}
            backlog: dict[str, TierBacklog] = {}
            user_inf: dict[int, int] = {}
            per_tier_limit = min(room + HEADS_SLACK, HEADS_USERS * HEADS_PER_USER)
            for ti in range(ntiers):
                if tqueued[ti] == 0:
                    continue
                name = tnames[ti]
                f = tfifo[ti]
                while f and state[f[0]] != _QUEUED:
                    f.popleft()
                backlog[name] = TierBacklog(name, tqueued[ti], submit[f[0]] if f else None)
                heap = ready[ti]
                cap = caps[ti]
                taken: list = []
                seen_users = set()
                out: list[Candidate] = []
                n_out = 0
                while heap and len(taken) < HEADS_USERS and n_out < per_tier_limit:
                    e = pop(heap)
                    u = e[2]
                    if u in seen_users or uqueued[u] == 0 or inflight[u] >= cap:
                        continue
                    q = uq[u]
                    while state[q[0]] != _QUEUED:
                        q.popleft()
                    if q[0] != e[1]:
                        continue
                    seen_users.add(u)
                    taken.append(e)
                    user_inf[u] = inflight[u]
                    want = min(HEADS_PER_USER, cap - inflight[u], uqueued[u], per_tier_limit - n_out)
                    for j in q:
                        if state[j] == _QUEUED:
                            c = cand[j]
                            if c is None:
                                c = cand[j] = Candidate(j, name, u, mnames[jmodel[j]], submit[j])
                            out.append(c)
                            want -= 1
                            if want == 0:
                                break
                    n_out = len(out)
                for e in taken:
                    push(heap, e)
                if out:
                    heads[name] = out
            if not heads:
                continue
            rooms = [PoolRoom(p.id, mnames[p.model], p.limit - p.pending) for p in pools if p.limit > p.pending]
            t0 = time.perf_counter()
            decisions = plan_dispatch(now, tier_specs, heads, backlog, rooms, user_inf, ledger, policy=policy)  # type: ignore[arg-type]  # Mapping keys are invariant; int ids are Hashable
            plan_s += time.perf_counter() - t0
            n_calls += 1
            if not decisions:
                continue
            by_pool: dict[str, list[int]] = {}
            touched: dict[int, int] = {}
            tier_counts = [0] * ntiers
            for d in decisions:
                c = d.candidate
                j = cast(int, c.job_id)  # the simulator's job ids are ints
                if state[j] != _QUEUED:
                    raise RuntimeError(f"policy dispatched job {j} which is not queued")
                u = juser[j]
                ti = jtier[j]
                cap = caps[ti]
                if inflight[u] >= cap:
                    raise RuntimeError(f"policy exceeded user {u}'s concurrency cap")
                before = contrib(u, cap)
                state[j] = _DISPATCHED
                uqueued[u] -= 1
                inflight[u] += 1
                dispatchable[ti] += contrib(u, cap) - before
                tqueued[ti] -= 1
                total_queued -= 1
                tier_counts[ti] += 1
                touched[u] = ti
                lst = by_pool.get(d.pool_id)  # type: ignore[call-overload]  # the simulator's pool ids are str
                if lst is None:
                    lst = by_pool[d.pool_id] = []  # type: ignore[index]  # the simulator's pool ids are str
                lst.append(j)
            for pid, jobs in by_pool.items():
                pi = pool_index[pid]
                p = pools[pi]
                p.pending += len(jobs)
                if p.pending > p.limit:
                    raise RuntimeError(f"policy exceeded pool {pid}'s dispatch limit")
                push(events, (now + latency, next(seq), pi, jobs))
            for u, ti in touched.items():
                if uqueued[u] > 0 and inflight[u] < caps[ti]:
                    push_ready(u, ti)
            for ti in range(ntiers):
                if tier_counts[ti]:
                    tdisp[ti] += tier_counts[ti]
                    ledger.record(tnames[ti], tier_counts[ti], now)
                    win_disp[w, ti] += tier_counts[ti]

        end = n_ticks * dt
        wall = time.perf_counter() - wall0

        start_arr = np.array(start, dtype=np.float64)
        state_arr = np.frombuffer(bytes(state), dtype=np.uint8)
        dur = tr.duration_s
        started = ~np.isnan(start_arr)
        busy_seconds = float(np.sum(np.minimum(dur[started], end - start_arr[started])))
        util = busy_seconds / gpu_seconds if gpu_seconds > 0 else 0.0

        full = int(end // WINDOW_S)  # windows the trace covers entirely
        arrivals = np.zeros((n_windows, ntiers), dtype=np.int64)
        widx = np.minimum((tr.submit_s // WINDOW_S).astype(np.int64), n_windows - 1)
        np.add.at(arrivals, (widx, tr.tier), 1)
        summary = report.summarize(
            tiers=self.tiers,
            tier_names=tnames,
            submit=tr.submit_s,
            tier=tr.tier,
            start=start_arr,
            state=state_arr,
            end=end,
            win_disp=win_disp[:full],
            win_start_backlog=win_start_backlog[:full],
            win_min_backlog=win_min_backlog[:full],
            win_arrivals=arrivals[:full],
        )
        # within W counting the wait from when the job's own user was under its concurrency cap
        # for it: what the scheduler and the GPUs answer for (a user's 1,000-job burst against a
        # cap of 64 misses W by its own limit, whatever the capacity)
        elig_arr = np.array(elig, dtype=np.float64)
        for ti, name in enumerate(tnames):
            m = tr.tier == ti
            sched_wait = start_arr[m] - elig_arr[m]
            ok = np.count_nonzero(sched_wait <= slo[ti] + 1e-9)  # nan (never started) compares False
            n_elig = int(np.count_nonzero(~np.isnan(elig_arr[m])))  # jobs never under the cap are left out
            summary[name]["within_slo_uncapped"] = round(float(ok) / n_elig, 4) if n_elig else 1.0
            summary[name]["capped_jobs"] = int(np.count_nonzero(elig_arr[m] > tr.submit_s[m]))
        result = {
            "policy": self.policy,
            "trace": tr.name,
            "jobs": tr.jobs,
            "wall_s": round(wall, 3),
            "gpu_utilization": round(util, 4),
            "tiers": summary,
        }
        if controller is not None:
            kinds = [a["action"] for a in burst_actions]
            result["burst"] = {
                "max_gpus": self.burst_gpus,
                "warmup_s": warmup,
                "decisions": burst_decisions,
                "scale_ups": kinds.count(Action.SCALE_UP.value),
                "scale_downs": kinds.count(Action.DRAIN.value),
                "releases": kinds.count(Action.RELEASE.value),
                "reversal_window_s": REVERSAL_WINDOW_S,
                "reversals": count_reversals([(a["t"], a["action"]) for a in burst_actions], REVERSAL_WINDOW_S),
                "peak_gpus": burst_peak,
                "gpu_hours": round(burst_gpu_s / 3600.0, 1),
                "actions": burst_actions,
            }
        timeline = {
            "t": tl_t,
            "oldest_over_slo": {tnames[i]: tl_oldest[i] for i in range(ntiers)},
            "oldest_any_over_slo": {tnames[i]: tl_oldest_all[i] for i in range(ntiers)},
            "queued": {tnames[i]: tl_queued[i] for i in range(ntiers)},
            "busy": tl_busy,
            "gpus": tl_gpus,
            "burst_gpus": tl_burst,
            "plan_calls": n_calls,
            "plan_s": plan_s,
        }
        return SimResult(result, timeline)


def simulate(
    trace: Trace | str,
    policy: str,
    *,
    burst: bool = False,
    seed: int = 0,
    scale: float = 1.0,
    hours: float | None = None,
    tiers: Mapping[str, TierSpec] | None = None,
    burst_gpus: int | None = None,
    burst_warmup_s: float = BURST_WARMUP_S,
    burst_params: BurstParams | None = None,
) -> SimResult:
    """Run one policy on a trace. The burst cluster defaults to BURST_MAX_GPUS x `scale` (the
    scale of a generated trace named here; 1 for a Trace passed in)."""
    if isinstance(trace, str):
        trace = get_trace(trace, seed=seed, scale=scale, hours=hours)
    if burst_gpus is None:
        burst_gpus = max(1, round(BURST_MAX_GPUS * scale))
    return Simulator(
        trace,
        policy,
        tiers,
        burst=burst,
        burst_gpus=burst_gpus,
        burst_warmup_s=burst_warmup_s,
        burst_params=burst_params,
    ).run()


def format_burst(summary: dict) -> str:
    """Markdown lines for a run's `burst` block: the counts, then every action with its reason."""
    b = summary.get("burst")
    if not b:
        return ""
    lines = [
        f"burst: {b['max_gpus']} GPUs, warm-up {b['warmup_s']:g} s: {b['scale_ups']} scale-ups, "
        f"{b['scale_downs']} drains, {b['releases']} releases, {b['reversals']} reversals within "
        f"{b['reversal_window_s'] / 60:g} min; peak {b['peak_gpus']} GPUs, {b['gpu_hours']:g} GPU-hours borrowed",
        "",
    ]
    for a in b["actions"]:
        lines.append(f"- {a['t'] / 3600:5.2f} h: {a['reason']}")
    return "\n".join(lines)


def run_simulation(trace: Trace | str, policy: str, *, burst: bool = False, seed: int = 0, **kwargs) -> dict:
    """Run one policy on one trace (a name from TRACES or a Trace); the JSON summary dict."""
    return simulate(trace, policy, burst=burst, seed=seed, **kwargs).summary


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dreamq simulate", description="Simulate a dispatch policy on a trace.")
    ap.add_argument("--trace", default="launch-day", choices=TRACES)
    ap.add_argument("--csv", metavar="FILE", help="trace CSV: submit_s,tier,user,duration_s[,model]")
    ap.add_argument("--gpus", type=int, help="GPUs for a CSV trace (default: sized for 80%% load)")
    ap.add_argument("--policy", default="slo", choices=POLICIES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0, help="scale GPUs, rates and users (generated traces)")
    ap.add_argument("--hours", type=float, help="trace length (generated traces; default 12)")
    ap.add_argument("--burst", action="store_true", help="borrow GPUs from a training cluster (burst controller)")
    ap.add_argument("--burst-gpus", type=int, help=f"training cluster size (default {BURST_MAX_GPUS} x scale)")
    ap.add_argument(
        "--burst-warmup",
        type=float,
        default=BURST_WARMUP_S,
        metavar="S",
        help="seconds before a burst worker serves (model load)",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--plot", metavar="PNG", help="write each tier's oldest wait / W over time")
    args = ap.parse_args(argv)
    if args.csv:
        trace = load_csv(args.csv, gpus=args.gpus)
    else:
        trace = get_trace(args.trace, seed=args.seed, scale=args.scale, hours=args.hours)
    burst_gpus = args.burst_gpus or (BURST_MAX_GPUS if args.csv else max(1, round(BURST_MAX_GPUS * args.scale)))
    res = simulate(trace, args.policy, burst=args.burst, burst_gpus=burst_gpus, burst_warmup_s=args.burst_warmup)
    if args.plot:
        report.plot_timeline(
            res.timeline,
            DEFAULT_TIERS,
            args.plot,
            title=f"{res.summary['trace']} / {res.summary['policy']}: oldest wait / W",
        )
    if args.json:
        print(json.dumps(res.summary, sort_keys=False))
    else:
        print(report.format_run(res.summary, DEFAULT_TIERS))
        if args.burst:
            print()
            print(format_burst(res.summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
