"""Which queued jobs to dispatch next: the `slo` policy and the three anchors it is measured against.

Pure code: no I/O, no database, no clock. The live dispatcher and the simulator call the same
`plan_dispatch(now, ...)` with the same inputs, so what is proven in simulation is what runs.

Inputs (all per call)
---------------------
* `heads[tier]`: that tier's queued jobs as the database returns them cheaply, from the index
  (tier, user_id, created_at) WHERE state = 'queued': up to N oldest jobs of each of up to M
  users, users taken in order of their oldest queued job, skipping users already at their
  tier's concurrency cap. The function never needs more than the heads.
* `backlog`: whole-backlog counts and oldest enqueue time per tier. Part of the interface (the
  dispatcher logs it with the plan) but deliberately not used by the rule: the oldest queued
  job may belong to a user held back by their own cap, and letting it set the tier's urgency
  would push the tier ahead for a job it cannot dispatch.
* `pools`: room per (cluster, model) pool = dispatch_limit - dispatched-not-started, >= 0.
* `user_inflight`: jobs dispatched or running per user (only users in `heads` are looked up).
* `ledger`: dispatches per tier in the current 10-minute window (see ShareLedger).

A job is eligible only if its user is under the tier's concurrency cap (counting the jobs this
plan already gave that user) and some pool serving its model still has room (counting this
plan's own decisions). Ineligible jobs are skipped; the others are still dispatched. At most
`sum(room)` (and `max_decisions`) decisions are returned; the pool chosen for a job is the
one serving its model with the most room left (first in `pools` order on ties).

The anchors
-----------
* `fifo`: global oldest first.
* `strict`: tier rank order, oldest first within a tier, no aging.
* `urgency` (what Luma ran): urgency = waited / W, highest first.
Ties (equal key) break by tier rank, then by the order of `heads`, so plans are deterministic.

The `slo` rule
--------------
A tier's *urgency* is waited / W of its oldest remaining head candidate. With the line at
PRESSURE_LINE = 0.5 a tier is *comfortable* (u < 0.5), *pressed* (0.5 <= u < 1: it must go soon)
or *late* (u >= 1: its oldest job has missed W whatever we do now). Every decision goes to:

1. **Floor** (starvation guard). A tier with candidates whose dispatches in the current window
   (ledger + this plan) are below `min_share x (window dispatches + 1)` gets the slot. Several:
   the one furthest below its floor (relative), then rank.
2. Otherwise **urgency while everyone is comfortable, rank as soon as anyone is not**. Walk the
   tiers with candidates in rank order up to and including the first one that is pressed or
   late; among the walked tiers the most urgent wins (rank on ties). So if the top tier is
   pressed or late it simply wins (strict); if all tiers are comfortable this is plain urgency
   order; in between, comfortable tiers above the first pressed one share by urgency and the
   pressed one goes before everything ranked below it.

In words: below the line order by urgency, at the line order by rank, floors always.

Why it beats both anchors
-------------------------
Urgency is the right order while everyone is comfortably inside W: equalising waited / W keeps
the worst one lowest, so small bursts are spread over every tier's slack instead of being
dumped on the lowest tier. But under sustained overload it is wrong twice: tiers that have
already missed keep growing their ratio and keep taking slots from tiers that could still make
it, and equalising waited / W at a value > 1 means api misses as often as free ("equalises
misery"). Strict is right when someone must miss: rank decides who absorbs the overload, so
api/enterprise keep their SLO; but it has no limit, so whenever paid demand fills the GPUs the
lowest tiers get nothing at all.

`slo` uses each order only where it is right:

* Urgency can delay a tier only while that tier is comfortable: once its oldest job has waited
  0.5 W nothing ranked below it can go first, so aging of lower tiers delays api/enterprise by
  at most ~0.5 W (30 s / 60 s), and the other half of W absorbs the dispatch tick, Celery
  latency and the pool's prefetch queue (valid while those stay under 0.5 W). Under sustained
  overload some lower tier is always pressed or late, so the order is strict's and
  api/enterprise fare as under strict, minus the floors' share.
* Pressed and late tiers never overtake a higher one. Overtaking spends the overtaken tier's
  slack, which is what lets it ride out the next surge; once someone is at risk, who gets saved
  is a question of rank, not of ratios (this is how urgency order turns one tier's overload
  into everyone's, and why strict keeps paid tiers whole on the `starve` trace).
* The floors bound what rank may take: while a tier has candidates it gets at least `min_share`
  of each window's dispatches, so no backlogged tier is starved; the default floors sum to 0.16,
  so rank order still controls >= 84% of dispatches when every lower tier is backlogged.

Starvation guard, precisely: the ledger counts dispatches per tier in fixed windows
[k*600 s, (k+1)*600 s). Before each decision, a tier with candidates is below its floor when
dispatched_t < min_share_t x (dispatched_all + 1), both counting this plan's decisions. Serving
that eagerly keeps dispatched_t >= floor(min_share_t x dispatched_all) at every instant of the
window whenever the tier has an eligible candidate, which is exactly the complement of a starved
window as the simulator counts it (app/scheduling/sim/report.py): a 10-minute window in which the
tier had enough dispatchable backlog to use its share (at window start, or throughout the window)
but got fewer than floor(min_share x all dispatches in the window).

Per-user rotation within a tier (slo only)
------------------------------------------
Inside the chosen tier jobs are taken round-robin over users: users in order of their oldest
queued job, one job each per round (a user's own jobs oldest first), so in one plan a user gets
its k-th job only after every other head user with >= k jobs got its (k-1)-th. A user with a
10k-job burst therefore gets one job, then every other user of the tier gets one before its
second; the tier's oldest job is still the first one served, so rotation never delays the job
that sets the tier's urgency. Across plans the order restarts from the oldest jobs, and the
tier's per-user concurrency cap bounds how much of the pool one user can hold (a user at its
cap is skipped). The anchors keep their textbook order (oldest first within a tier).

Cost
----
O(H log H + D x T) for H head candidates, D decisions and T tiers; nothing depends on the size
of the backlog. A tier's urgency is computed from its heads, which contain its oldest
dispatchable job because users are fetched by oldest job.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Hashable, Mapping, NamedTuple, Sequence

from app.scheduling.tiers import TierSpec

POLICIES: tuple[str, ...] = ("fifo", "strict", "urgency", "slo")

# A tier stops yielding to lower tiers' aging once its oldest job has waited this fraction of W.
PRESSURE_LINE = 0.5

WINDOW_S = 600.0


class Candidate(NamedTuple):
    """A queued job as the policy sees it. A NamedTuple, not a dataclass: the dispatcher builds
    thousands per pass, and a frozen dataclass costs ~3x more to construct."""

    job_id: Hashable
    tier: str
    user_id: Hashable
    model: str
    enqueued_at: float


@dataclass(frozen=True)
class PoolRoom:
    pool_id: Hashable
    model: str
    room: int  # dispatch_limit - in_flight (dispatched, not started), clipped at 0


@dataclass
class TierBacklog:
    tier: str
    queued: int  # whole backlog of the tier, not just heads
    oldest_enqueued_at: float | None = None


@dataclass(frozen=True)
class Decision:
    candidate: Candidate
    pool_id: Hashable
    reason: str  # floor | rank | urgency (slo); fifo | rank | urgency (anchors)


@dataclass
class ShareLedger:
    """Dispatches per tier in the current fixed window [k*window_s, (k+1)*window_s).

    The caller owns it and carries it between calls: the simulator records every applied
    decision; the live dispatcher rebuilds it with
    `SELECT tier, count(*) FROM jobs WHERE dispatched_at >= :window_start GROUP BY tier`
    (`ShareLedger.from_counts`). Reads never mutate: a `now` in a later window reads as empty.
    plan_dispatch only reads it; record what you actually dispatched.
    """

    window_s: float = WINDOW_S
    window_start: float | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def window_of(self, now: float) -> float:
        return math.floor(now / self.window_s) * self.window_s

    @classmethod
    def from_counts(cls, now: float, counts: Mapping[str, int], window_s: float = WINDOW_S) -> "ShareLedger":
        ledger = cls(window_s=window_s)
        ledger.window_start = ledger.window_of(now)
        ledger.counts = {k: int(v) for k, v in counts.items() if v}
        return ledger

    def _current(self, now: float) -> bool:
        return self.window_start is not None and self.window_of(now) == self.window_start

    def record(self, tier: str, n: int, now: float) -> None:
        start = self.window_of(now)
        if self.window_start != start:
            if self.window_start is not None and start < self.window_start:
                raise ValueError("ShareLedger.record: time went backwards across a window")
            self.window_start = start
            self.counts = {}
        if n:
            self.counts[tier] = self.counts.get(tier, 0) + n

    def count(self, tier: str, now: float) -> int:
        return self.counts.get(tier, 0) if self._current(now) else 0

    def total(self, now: float) -> int:
        return sum(self.counts.values()) if self._current(now) else 0

    def share(self, tier: str, now: float) -> float:
        total = self.total(now)
        return self.count(tier, now) / total if total else 0.0


class _Rooms:
    """Remaining room per model; picks the pool with the most room (first on ties)."""

    __slots__ = ("by_model", "total")

    def __init__(self, pools: Sequence[PoolRoom]):
        self.by_model: dict[str, list[list]] = {}
        self.total = 0
        for p in pools:
            room = int(p.room)
            if room > 0:
                self.by_model.setdefault(p.model, []).append([room, p.pool_id])
                self.total += room

    def take(self, model: str) -> Hashable | None:
        slots = self.by_model.get(model)
        if not slots:
            return None
        best = slots[0]
        if len(slots) > 1:
            for s in slots:
                if s[0] > best[0]:
                    best = s
        best[0] -= 1
        self.total -= 1
        if best[0] == 0:
            slots.remove(best)
        return best[1]


def plan_dispatch(
    now: float,
    tiers: Mapping[str, TierSpec],
    heads: Mapping[str, Sequence[Candidate]],
    backlog: Mapping[str, TierBacklog],
    pools: Sequence[PoolRoom],
    user_inflight: Mapping[Hashable, int],
    ledger: ShareLedger,
    *,
    policy: str = "slo",
    max_decisions: int | None = None,
) -> list[Decision]:
    """Decide which head candidates to dispatch now and to which pool. See the module docstring."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
    for name in heads:
        if name not in tiers:
            raise ValueError(f"heads contain unknown tier {name!r}")
    rooms = _Rooms(pools)
    limit = rooms.total if max_decisions is None else min(rooms.total, max_decisions)
    if limit <= 0:
        return []
    if policy == "slo":
        return _plan_slo(now, tiers, heads, rooms, user_inflight, ledger, limit)
    return _plan_sorted(now, tiers, heads, rooms, user_inflight, limit, policy)


def _plan_sorted(now, tiers, heads, rooms, user_inflight, limit, policy) -> list[Decision]:
    keyed = []
    seq = 0
    for name in sorted(heads, key=lambda n: tiers[n].rank):
        spec = tiers[name]
        rank = spec.rank
        if policy == "fifo":
            for c in heads[name]:
                keyed.append((c.enqueued_at, rank, seq, c))
                seq += 1
        elif policy == "strict":
            for c in heads[name]:
                keyed.append((rank, c.enqueued_at, seq, c))
                seq += 1
        else:  # urgency
            inv_w = 1.0 / spec.slo_s
            for c in heads[name]:
                keyed.append(((c.enqueued_at - now) * inv_w, rank, seq, c))  # = -urgency
                seq += 1
    keyed.sort(key=_first3)
    reason = "rank" if policy == "strict" else policy
    out: list[Decision] = []
    picked: dict[Hashable, int] = {}
    seen: set = set()
    caps = {name: spec.user_concurrency_cap for name, spec in tiers.items()}
    for item in keyed:
        c = item[3]
        u = c.user_id
        n_user = picked.get(u, 0)
        if user_inflight.get(u, 0) + n_user >= caps[c.tier] or c.job_id in seen:
            continue
        pool_id = rooms.take(c.model)
        if pool_id is None:
            if rooms.total <= 0:
                break
            continue
        seen.add(c.job_id)
        picked[u] = n_user + 1
        out.append(Decision(c, pool_id, reason))
        if len(out) >= limit:
            break
    return out


def _first3(item):
    return (item[0], item[1], item[2])


class _TierStream:
    """One tier's candidates in per-user rotation order, plus its oldest remaining job."""

    __slots__ = (
        "name",
        "rank",
        "slo_s",
        "cap",
        "floor",
        "dispatched",
        "planned",
        "jobs",
        "ptr",
        "users",
        "oldest",
        "active",
    )

    def __init__(self, name, spec: TierSpec, cands: Sequence[Candidate], user_inflight, dispatched: int):
        self.name = name
        self.rank = spec.rank
        self.slo_s = spec.slo_s
        self.cap = spec.user_concurrency_cap
        self.floor = spec.min_share
        self.dispatched = dispatched
        self.planned = 0
        # Group by user, keeping heads order for first appearance; each user's jobs oldest first.
        jobs: dict[Hashable, list[Candidate]] = {}
        order: dict[Hashable, int] = {}
        for c in cands:
            lst = jobs.get(c.user_id)
            if lst is None:
                jobs[c.user_id] = [c]
                order[c.user_id] = len(order)
            else:
                lst.append(c)
        users = []
        oldest = []
        for u, lst in jobs.items():
            if user_inflight.get(u, 0) >= self.cap:
                continue  # at its cap: none of its jobs is eligible, nor sets the tier's pressure
            if len(lst) > 1:
                lst.sort(key=_enq)
            seq = order[u]
            users.append((0, lst[0].enqueued_at, seq, u))
            oldest.append((lst[0].enqueued_at, seq, u, 0))
        heapq.heapify(users)
        heapq.heapify(oldest)
        self.jobs = jobs
        self.ptr = {u: 0 for _r, _e, _s, u in users}
        self.users = users  # (round = jobs this plan gave the user, next job's enqueued_at, seq, user)
        self.oldest = oldest  # (enqueued_at, seq, user, index) lazy: valid iff ptr[user] == index
        self.active = bool(users)

    def oldest_enqueued(self) -> float | None:
        oldest = self.oldest
        ptr = self.ptr
        while oldest:
            enq, _seq, u, idx = oldest[0]
            if ptr.get(u, -1) == idx:
                return enq
            heapq.heappop(oldest)
        return None

    def _advance(self, u, seq) -> bool:
        """Move user u past its current job; True if it has another one."""
        idx = self.ptr[u] + 1
        lst = self.jobs[u]
        if idx < len(lst):
            self.ptr[u] = idx
            heapq.heappush(self.oldest, (lst[idx].enqueued_at, seq, u, idx))
            return True
        self.ptr[u] = -1
        return False

    def take(self, rooms: _Rooms, user_inflight, picked, seen):
        """Next eligible (candidate, pool_id) in rotation order, or None when the tier is spent."""
        users = self.users
        while users:
            level, _enq, seq, u = users[0]
            n_user = picked.get(u, 0)
            if user_inflight.get(u, 0) + n_user >= self.cap:
                heapq.heappop(users)
                self.ptr[u] = -1
                continue
            c = self.jobs[u][self.ptr[u]]
            pool_id = None if c.job_id in seen else rooms.take(c.model)
            if pool_id is None:
                if self._advance(u, seq):
                    heapq.heapreplace(users, (level, self.jobs[u][self.ptr[u]].enqueued_at, seq, u))
                else:
                    heapq.heappop(users)
                continue
            picked[u] = n_user + 1
            if user_inflight.get(u, 0) + n_user + 1 >= self.cap:
                heapq.heappop(users)
                self.ptr[u] = -1
            elif self._advance(u, seq):
                heapq.heapreplace(users, (level + 1, self.jobs[u][self.ptr[u]].enqueued_at, seq, u))
            else:
                heapq.heappop(users)
            return c, pool_id
        self.active = False
        return None


def _enq(c: Candidate) -> float:
    return c.enqueued_at


def _plan_slo(now, tiers, heads, rooms, user_inflight, ledger, limit) -> list[Decision]:
    streams = [
        _TierStream(name, tiers[name], cands, user_inflight, ledger.count(name, now))
        for name, cands in heads.items()
        if cands
    ]
    streams.sort(key=lambda s: s.rank)
    streams = [s for s in streams if s.active]
    total = ledger.total(now)
    line = PRESSURE_LINE
    out: list[Decision] = []
    picked: dict[Hashable, int] = {}
    seen: set = set()
    while streams and len(out) < limit and rooms.total > 0:
        # Pick the tier: floors first, then the rank walk (see module docstring).
        best = None
        floor_key = None
        after = total + len(out) + 1
        for s in streams:
            if s.floor > 0.0:
                have = s.dispatched + s.planned
                want = s.floor * after
                if have < want:
                    key = (have / want, s.rank)
                    if floor_key is None or key < floor_key:
                        best, floor_key = s, key
        if best is not None:
            reason = "floor"
        else:
            reason = "rank"
            max_u = -1.0  # highest urgency walked so far (all of them below the line)
            for s in streams:
                enq = s.oldest_enqueued()
                u = (now - enq) / s.slo_s if enq is not None else 0.0
                if best is None:
                    best = s
                elif max_u < u < line:
                    best, reason = s, "urgency"
                if u >= line:
                    break  # pressed or late: rank from here on, nothing below may overtake
                if u > max_u:
                    max_u = u
        assert best is not None  # streams is not empty
        got = best.take(rooms, user_inflight, picked, seen)
        if got is None:
            streams.remove(best)
            continue
        c, pool_id = got
        seen.add(c.job_id)
        best.planned += 1
        out.append(Decision(c, pool_id, reason))
        if not best.users:
            best.active = False
            streams.remove(best)
    return out
