"""The live dispatcher: Postgres backlog -> plan_dispatch (policy.py) -> pool tier queues.

One pass, in one transaction:

1. Pools, locked `FOR UPDATE SKIP LOCKED`, then counted in a second statement (see
   _LOCK_POOLS_SQL for why the count must come after the lock). A pool's room = its effective dispatch limit minus
   the jobs it holds dispatched-but-not-started. The effective limit is the configured
   `dispatch_limit`, capped at what its live workers (heartbeat fresh, not draining) may
   hold: DISPATCH_PER_WORKER each, more for a worker whose jobs are short (worker_depth). A
   pool whose workers are gone has room 0 and receives nothing, and a pool with one live
   worker out of fifty does not fill its queue for fifty. Holding the pool rows locked
   for the pass is what makes the limit exact with several dispatchers: a second dispatcher
   skips a locked pool (another pass is already filling it) instead of counting the same room.
2. Heads, one statement for every lane (a model with room x a tier), from the partial indexes
   on queued jobs (never a scan of the backlog): the lane's K oldest jobs (ix_jobs_queued_oldest)
   plus the N oldest jobs of each of up to M users (ix_jobs_queued_heads, walked as a loose
   index scan from a per-lane user cursor). The cursor moves on every pass, so across passes
   every user with queued work is visited even when a tier has more users than one pass looks
   at; the K oldest keep the tier's true oldest job (its pressure) in view. Cost depends on K,
   M, N and the number of lanes, not on how many jobs are queued.
3. In-flight jobs per user of those heads (ix_jobs_user_inflight), for the concurrency caps,
   in the same statement.
4. `plan_dispatch(...)` decides (pure; the same function the simulator proves).
5. One statement applies the decisions: rows still queued are locked `FOR UPDATE SKIP LOCKED`,
   moved to dispatched with dispatch_seq+1, and get a job_events row each. A job taken by a
   concurrent dispatcher is skipped, so no job is ever released twice.

The caller commits, then publishes one message per release (tasks/dispatch.py) and records the
dispatches in the share ledger (Redis), which the starvation guard reads on the next pass.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.core.queues import worker_queue
from app.jobs.workers import (  # the live-worker rules the pass applies
    DISPATCH_PER_WORKER,
    LIVE_DEPTH_SQL,
    WORKER_STALE_S,
    effective_dispatch_limit,
)
from app.messaging import Release
from app.scheduling.policy import Candidate, PoolRoom, ShareLedger, TierBacklog, plan_dispatch
from app.scheduling.tiers import TierSpec

# Most decisions in one pass; a full batch makes the task run another pass at once.
MAX_BATCH = 512
# Jobs that may wait in one worker's own queue for its version (besides the one it runs): as
# many as the dispatch limit gives each worker, so affinity never holds more work than the pool
# would have released anyway. Deeper, a job waits behind its holder while another worker idles;
# shallower (1, on an earlier form of the mixed-version e2e test), half the jobs went to the
# shared queue, where a worker that takes the other version's job reloads.
AFFINITY_DEPTH = DISPATCH_PER_WORKER
# Users looked at per lane and pass, and jobs per user (the policy rotates between them; the
# cursor moves on, so the next pass looks at the next users). Measured: 64 x 4 added ~1,000
# head rows a pass for the same decisions as 32 x 2.
USERS_PER_TIER = 32
JOBS_PER_USER = 2


ZERO_UUID = str(uuid.UUID(int=0))  # the user cursor before the first user


@dataclass
class PassResult:
    releases: list[Release]
    room: int
    candidates: int
    reasons: dict[str, int]
    planned: int
    ms: float
    now: float = 0.0

    def per_tier(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for release in self.releases:
            counts[release.tier] = counts.get(release.tier, 0) + 1
        return counts


# Two statements on purpose. Under READ COMMITTED a statement's snapshot is taken before it
# waits for or takes row locks: counting in-flight jobs in the same statement that locks the
# pool could miss the dispatches a concurrent dispatcher committed just before releasing that
# lock, and overfill the pool. A second statement, issued once the lock is held, sees them.
#
# The pass commits without waiting for its WAL flush (synchronous_commit off for this
# transaction only; set here to save a round trip): it is on every job's path from accept to
# running, and the flush was the slowest part of a one-job pass on a busy host. What a Postgres
# crash could lose is only a pass's last few hundred ms: those jobs are back to `queued` with the
# dispatch_seq they had, so a message already published for them claims nothing until they are
# dispatched again (then it is an ordinary duplicate delivery, see app/jobs/execution.py claim).
_LOCK_POOLS_SQL = text(
    """
    WITH async_commit AS (SELECT set_config('synchronous_commit', 'off', true))
    SELECT p.id FROM async_commit, pools p JOIN clusters c ON c.id = p.cluster_id
    WHERE p.enabled AND c.enabled AND (CAST(:clusters AS text[]) IS NULL OR c.name = ANY(CAST(:clusters AS text[])))
    ORDER BY p.id
    FOR UPDATE OF p SKIP LOCKED
    """
)

_POOLS_SQL = text(
    f"""
    SELECT p.id, c.name AS cluster, m.name AS model, p.model_id, p.dispatch_limit,
           (SELECT count(*) FROM jobs j WHERE j.pool_id = p.id AND j.state = 'dispatched') AS in_flight,
           {LIVE_DEPTH_SQL} AS live_depth,
           extract(epoch FROM now()) AS db_now
    FROM pools p
    JOIN clusters c ON c.id = p.cluster_id
    JOIN models m ON m.id = p.model_id
    WHERE p.id = ANY(CAST(:ids AS uuid[]))
    ORDER BY p.id
    """
)

_TIERS_SQL = text("SELECT name, rank, slo_s, min_share, concurrency_cap FROM tiers ORDER BY rank")

_HEADS_SQL = text(
    """
    WITH RECURSIVE lanes AS (
        SELECT * FROM unnest(CAST(:models AS uuid[]), CAST(:tiers AS text[]), CAST(:afters AS uuid[]))
            AS l(model_id, tier, after)
    ), walk(model_id, tier, user_id, depth) AS (
        SELECT l.model_id, l.tier,
               (SELECT j.user_id FROM jobs j
                WHERE j.state = 'queued' AND j.model_id = l.model_id AND j.tier = l.tier AND j.user_id > l.after
                ORDER BY j.user_id LIMIT 1),
               1
        FROM lanes l
        UNION ALL
        SELECT w.model_id, w.tier,
               (SELECT j.user_id FROM jobs j
                WHERE j.state = 'queued' AND j.model_id = w.model_id AND j.tier = w.tier AND j.user_id > w.user_id
                ORDER BY j.user_id LIMIT 1),
               w.depth + 1
        FROM walk w WHERE w.user_id IS NOT NULL AND w.depth < :users
    ), per_user AS (
        SELECT h.id, h.tier, h.user_id, h.model_id, h.created_at, w.depth
        FROM walk w
        CROSS JOIN LATERAL (
            SELECT j.id, j.tier, j.user_id, j.model_id, j.created_at FROM jobs j
            WHERE j.state = 'queued' AND j.model_id = w.model_id AND j.tier = w.tier AND j.user_id = w.user_id
            ORDER BY j.created_at LIMIT :per_user
        ) h
        WHERE w.user_id IS NOT NULL
    ), oldest AS (
        SELECT o.id, o.tier, o.user_id, o.model_id, o.created_at, NULL::int AS depth
        FROM lanes l
        CROSS JOIN LATERAL (
            SELECT j.id, j.tier, j.user_id, j.model_id, j.created_at FROM jobs j
            WHERE j.state = 'queued' AND j.model_id = l.model_id AND j.tier = l.tier
            ORDER BY j.created_at LIMIT :oldest
        ) o
    ), heads AS (
        SELECT id, tier, user_id, model_id, created_at, max(depth) AS depth
        FROM (SELECT * FROM per_user UNION ALL SELECT * FROM oldest) c
        GROUP BY id, tier, user_id, model_id, created_at
    ), inflight AS (
        -- Jobs dispatched or running per user of these heads (ix_jobs_user_inflight), for the
        -- concurrency caps: in this statement rather than a second one, a round trip less a pass.
        SELECT u.user_id, (SELECT count(*) FROM jobs j
                           WHERE j.user_id = u.user_id AND j.state IN ('dispatched', 'running')) AS n
        FROM (SELECT DISTINCT user_id FROM heads) u
    )
    -- ids as text: the policy hashes them thousands of times a pass, and a str caches its hash
    -- where uuid.UUID recomputes it in Python (measured ~10% of a pass).
    SELECT CAST(h.id AS text) AS id, h.tier, CAST(h.user_id AS text) AS user_id, CAST(h.model_id AS text) AS model,
           CAST(extract(epoch FROM h.created_at) AS float8) AS enqueued_at, h.depth, i.n AS inflight
    FROM heads h JOIN inflight i ON i.user_id = h.user_id
    """
)

_APPLY_SQL = text(
    """
    WITH d AS (
        SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:pools AS uuid[]), CAST(:reasons AS text[]))
            AS d(id, pool_id, reason)
    ), locked AS (
        SELECT j.id, d.pool_id, d.reason FROM jobs j JOIN d ON d.id = j.id
        WHERE j.state = 'queued'
        FOR UPDATE OF j SKIP LOCKED
    ), upd AS (
        UPDATE jobs SET state = 'dispatched', pool_id = locked.pool_id, dispatched_at = now(), updated_at = now(),
                        dispatch_seq = jobs.dispatch_seq + 1, worker_id = NULL
        FROM locked WHERE jobs.id = locked.id
        RETURNING jobs.id, jobs.tier, jobs.dispatch_seq, jobs.pool_id, jobs.model_version_id, locked.reason, jobs.user_id
    ), ev AS (
        INSERT INTO job_events (job_id, from_state, to_state, detail)
        SELECT upd.id, 'queued', 'dispatched',
               jsonb_build_object('pool', CAST(:pool_names AS jsonb) ->> CAST(upd.pool_id AS text), 'reason', upd.reason)
        FROM upd
    )
    SELECT upd.id, upd.tier, upd.dispatch_seq, upd.pool_id, v.digest, upd.user_id
    FROM upd JOIN model_versions v ON v.id = upd.model_version_id
    """
)

# Live workers of the pools a pass dispatched to: the versions each holds in memory, how many
# jobs already wait in its own queue (dispatched, routed to it, not yet started), and the versions
# of the jobs it will run before any job routed now (its latest claimed job, then its queue, in
# order). The counts and versions come from one grouped scan of the pools' in-flight jobs
# (ix_jobs_pool_inflight): a count(*) per worker re-read every dispatched job of the pool for each
# worker (170 ms a pass with 2,000 dispatched jobs in bench/dispatch_scale.py, against 1.6 ms).
_POOL_WORKERS_SQL = text(
    """
    SELECT w.id, w.pool_id, w.state, w.info -> 'loaded' AS loaded, COALESCE(d.waiting, 0) AS waiting,
           d.running_digest, d.waiting_digests
    FROM workers w
    LEFT JOIN (SELECT j.worker_id, count(*) FILTER (WHERE j.state = 'dispatched') AS waiting,
                      (array_agg(v.digest ORDER BY j.started_at DESC) FILTER (WHERE j.state = 'running'))[1]
                          AS running_digest,
                      array_agg(v.digest ORDER BY j.dispatched_at, j.dispatch_seq) FILTER (WHERE j.state = 'dispatched')
                          AS waiting_digests
               FROM jobs j JOIN model_versions v ON v.id = j.model_version_id
               WHERE j.state IN ('dispatched', 'running') AND j.pool_id = ANY(CAST(:pools AS uuid[]))
                 AND j.worker_id IS NOT NULL
               GROUP BY j.worker_id) d ON d.worker_id = w.id
    WHERE w.pool_id = ANY(CAST(:pools AS uuid[])) AND w.state IN ('idle', 'busy')
      AND w.heartbeat_at > now() - make_interval(secs => :stale)
      -- only workers that hold a version or have been given a job can be holders
      AND (CASE WHEN jsonb_typeof(w.info -> 'loaded') = 'array' THEN jsonb_array_length(w.info -> 'loaded') END > 0
           OR d.worker_id IS NOT NULL)
    """
)

_ROUTE_SQL = text(
    """
    UPDATE jobs SET worker_id = r.worker_id
    FROM unnest(CAST(:ids AS uuid[]), CAST(:workers AS text[])) AS r(id, worker_id)
    WHERE jobs.id = r.id AND jobs.state = 'dispatched'
    """
)


def load_tier_specs(session: Session) -> dict[str, TierSpec]:
    return {
        row.name: TierSpec(row.name, row.rank, float(row.slo_s), float(row.min_share), int(row.concurrency_cap))
        for row in session.execute(_TIERS_SQL)
    }


class Dispatcher:
    """Stateful only in its per-tier user cursors (rotation); safe to run several at once."""

    def __init__(
        self,
        *,
        policy: str = "slo",
        max_batch: int = MAX_BATCH,
        ledger_store: "LedgerStore | None" = None,
        tier_cache_s: float = 2.0,
        clusters: list[str] | None = None,
        affinity: bool = True,
    ):
        self.policy = policy
        self.affinity = affinity
        # Dispatch for these clusters only (None = all): shards dispatch per cluster region.
        self.clusters = clusters
        self.max_batch = max_batch
        self.ledger_store = ledger_store or LedgerStore(None)
        self.cursors: dict[tuple[str, str], str] = {}
        self.tier_cache_s = tier_cache_s
        self._tiers: tuple[float, dict[str, TierSpec]] | None = None

    def tiers(self, session: Session) -> dict[str, TierSpec]:
        # Admins edit tiers at run time; a couple of seconds of staleness saves a query per pass.
        now = time.monotonic()
        if self._tiers is None or now - self._tiers[0] > self.tier_cache_s:
            self._tiers = (now, load_tier_specs(session))
        return self._tiers[1]

    def run_pass(self, session: Session) -> PassResult:
        started = time.perf_counter()
        locked = list(session.execute(_LOCK_POOLS_SQL, {"clusters": self.clusters}).scalars())
        pools = session.execute(_POOLS_SQL, {"stale": WORKER_STALE_S, "ids": locked}).mappings().all() if locked else []
        rooms: list[PoolRoom] = []
        names: dict[str, str] = {}
        db_now = time.time()
        for pool in pools:
            db_now = float(pool["db_now"])
            limit = effective_dispatch_limit(pool["dispatch_limit"], pool["live_depth"])
            room = max(limit - pool["in_flight"], 0)
            names[str(pool["id"])] = f"{pool['cluster']}.{pool['model']}"
            if room:
                rooms.append(PoolRoom(pool["id"], str(pool["model_id"]), room))
        total_room = min(sum(r.room for r in rooms), self.max_batch)
        if total_room == 0:
            return PassResult([], 0, 0, {}, 0, (time.perf_counter() - started) * 1000, db_now)

        tiers = self.tiers(session)
        tier_names = list(tiers)
        # Lanes: every (model with room, tier). Heads come per lane, so a model without
        # capacity never fills the heads of one that has it.
        lanes = [(model, tier) for model in sorted({r.model for r in rooms}) for tier in tier_names]
        walk_users = min(USERS_PER_TIER, max(total_room, 4))
        heads_rows = session.execute(
            _HEADS_SQL,
            {
                "models": [m for m, _ in lanes],
                "tiers": [t for _, t in lanes],
                "afters": [self.cursors.get(lane, ZERO_UUID) for lane in lanes],
                "users": walk_users,
                "per_user": min(JOBS_PER_USER, total_room),
                "oldest": total_room,
            },
        ).all()
        heads: dict[str, list[Candidate]] = {t: [] for t in tier_names}
        last_user: dict[tuple[str, str], tuple[int, str]] = {}
        for row in sorted(heads_rows, key=lambda r: r.enqueued_at):
            heads[row.tier].append(Candidate(row.id, row.tier, row.user_id, row.model, row.enqueued_at))
            lane = (row.model, row.tier)
            if row.depth is not None and row.depth >= last_user.get(lane, (0, ZERO_UUID))[0]:
                last_user[lane] = (row.depth, row.user_id)
        self._advance_cursors(lanes, last_user, walk_users)
        inflight = {row.user_id: row.inflight for row in heads_rows if row.inflight}
        backlog = {t: TierBacklog(t, len(c), c[0].enqueued_at if c else None) for t, c in heads.items()}
        ledger = self.ledger_store.load(db_now)
        decisions = plan_dispatch(
            db_now, tiers, heads, backlog, rooms, inflight, ledger, policy=self.policy, max_decisions=total_room
        )
        reasons: dict[str, int] = {}
        for decision in decisions:
            reasons[decision.reason] = reasons.get(decision.reason, 0) + 1
        releases: list[Release] = []
        if decisions:
            rows = session.execute(
                _APPLY_SQL,
                {
                    "ids": [d.candidate.job_id for d in decisions],
                    "pools": [d.pool_id for d in decisions],
                    "reasons": [d.reason for d in decisions],
                    "pool_names": json.dumps(names),
                },
            ).all()
            routes = self._affinity_routes(session, rows, names) if self.affinity else {}
            releases = [
                Release(
                    r.id, routes.get(r.id) or f"{names[str(r.pool_id)]}.{r.tier}", r.dispatch_seq, r.tier, r.user_id
                )
                for r in rows
            ]
            if routes:
                reasons["affinity"] = len(routes)
        return PassResult(
            releases,
            total_room,
            sum(len(c) for c in heads.values()),
            reasons,
            len(decisions),
            (time.perf_counter() - started) * 1000,
            db_now,
        )

    def _affinity_routes(self, session: Session, rows, names: dict[str, str]) -> dict[Any, str]:
        """Send a job to the queue of a worker that already holds its version in memory.

        Loading a video model takes far longer than a job waits for a free worker, so placement
        by version saves most loads on a mixed-version workload. A holder is used when at most
        AFFINITY_DEPTH jobs already wait in its own queue (idle holders first, then the least
        loaded): deeper, and the job would wait behind that worker while another could run it.
        Everything else goes to the pool's tier queue as usual. The policy has already decided
        *which* jobs run now; affinity only decides *where*. A routed job records the worker in
        jobs.worker_id while dispatched, which is how the next pass counts that queue's depth.

        A holder is judged by what it will hold when it reaches the job, not by what it holds now
        (_holds_when_free): routing by the present made a worker that had just taken the other
        version's job from the pool's queue receive jobs of the version it was about to evict, and
        the two workers then swapped versions on nearly every job (21 loads for 32 jobs in the
        mixed-version e2e test, against 18 without affinity).
        """
        pools = list({str(r.pool_id) for r in rows})
        holders: dict[tuple[str, str], list[list]] = {}
        for worker in session.execute(_POOL_WORKERS_SQL, {"pools": pools, "stale": WORKER_STALE_S}):
            slot = [worker.state != "idle", int(worker.waiting), worker.id]
            for digest in _holds_when_free(worker.loaded, worker.running_digest, worker.waiting_digests):
                holders.setdefault((str(worker.pool_id), digest), []).append(slot)
        routes: dict[Any, str] = {}
        routed_to: dict[Any, str] = {}
        for row in rows:
            candidates = [slot for slot in holders.get((str(row.pool_id), row.digest), ()) if slot[1] < AFFINITY_DEPTH]
            if not candidates:
                continue
            best = min(candidates)
            best[1] += 1  # the slot lists are shared across versions: depth counts every route
            routes[row.id] = worker_queue(names[str(row.pool_id)], best[2], row.tier)
            routed_to[row.id] = best[2]
        if routed_to:
            session.execute(_ROUTE_SQL, {"ids": list(routed_to), "workers": list(routed_to.values())})
        return routes

    def _advance_cursors(
        self, lanes: list[tuple[str, str]], last_user: dict[tuple[str, str], tuple[int, str]], users: int
    ) -> None:
        for lane in lanes:
            depth, user = last_user.get(lane, (0, ZERO_UUID))
            # A full walk continues after its last user next time; a short one wrapped around.
            self.cursors[lane] = user if depth >= users else ZERO_UUID


def _holds_when_free(loaded: Any, running_digest: str | None, waiting_digests: list[str] | None) -> set[str]:
    """The versions a worker will hold once it has run the jobs already given to it (the one it
    claimed last, then its own queue, in order): what it holds now if none of them needs a load,
    else only the last one's version, which the loads on the way may leave as the only one."""
    held = set(loaded) if isinstance(loaded, list) else set()
    ahead = ([running_digest] if running_digest else []) + list(waiting_digests or ())
    if all(digest in held for digest in ahead):
        return held
    return {ahead[-1]}


class LedgerStore:
    """Dispatches per tier in the current 10-minute window, in Redis (one hash per window).

    Redis rather than a COUNT over jobs: at launch-day rates a window holds a million dispatches,
    and the guard is read on every pass. Without Redis the ledger is kept in process memory,
    which is exact for a single dispatcher and conservative (under-counts) for several.
    """

    def __init__(self, redis_client, *, key_prefix: str = "dreamq:ledger:", window_s: float = 600.0):
        self.redis = redis_client
        self.prefix = key_prefix
        self.window_s = window_s
        self._local = ShareLedger(window_s=window_s)

    def _key(self, window_start: float) -> str:
        return f"{self.prefix}{int(window_start)}"

    def load(self, now: float) -> ShareLedger:
        if self.redis is None:
            return self._local
        window = math.floor(now / self.window_s) * self.window_s
        raw: Mapping[Any, Any] = self.redis.hgetall(self._key(window))
        counts = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
        return ShareLedger.from_counts(now, counts, window_s=self.window_s)

    def record(self, now: float, per_tier: Mapping[str, int]) -> None:
        if not per_tier:
            return
        if self.redis is None:
            for tier, n in per_tier.items():
                self._local.record(tier, n, now)
            return
        window = math.floor(now / self.window_s) * self.window_s
        key = self._key(window)
        pipe = self.redis.pipeline(transaction=False)
        for tier, n in per_tier.items():
            pipe.hincrby(key, tier, n)
        pipe.expire(key, int(self.window_s * 2))
        pipe.execute()
