"""The burst controller, live: a beat task that borrows workers for burst pools and gives them back.

Every DREAMQ_BURST_INTERVAL_S (60 s), for each pool of each cluster of kind `burst`:

    observe  Postgres: the model's backlog per tier (count, oldest wait, inflow over 5 min),
             the standing inference workers of the model (busy / live), the mean job duration;
             the provisioner: the burst workers it runs, mapped to starting / serving / draining
             by their heartbeat rows
    decide   app/scheduling/burst.py `BurstController` (the same policy the simulator runs),
             its streak state kept in Redis between ticks
    act      scale_up -> provisioner.start; drain -> provisioner.retire (finish the job, take
             nothing new); release -> provisioner.stop (reclaim: warm shutdown, running jobs are
             requeued at their next step). Retiring workers that went idle are stopped, and a
             stopped worker still alive after DREAMQ_BURST_STOP_GRACE_S is killed.

A cluster is reclaimed (by `dreamq clusters reclaim NAME`, or by the training side through the
admin API) when it is disabled: every worker is released at once. Every decision is logged with
its reason and numbers, kept in a short Redis list per pool (`dreamq:burst:<pool>:decisions`)
and counted in the dreamq_burst_* metrics.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from sqlalchemy import text

from app.core.config import get_settings
from app.core.redis_client import get_redis
from app.db.session import transaction
from app.jobs.workers import WORKER_STALE_S
from app.observability.metrics import BURST_DECISIONS
from app.provisioning import ProvisionedWorker, get_provisioner
from app.provisioning.base import worker_rows_by_name
from app.scheduling.burst import (
    DRAINING,
    SERVING,
    STARTING,
    Action,
    BurstController,
    BurstObservation,
    BurstParams,
    BurstState,
    BurstWorker,
    TierPressure,
)
from tasks.maintenance import periodic

log = logging.getLogger(__name__)

ARRIVAL_WINDOW_S = 300
DECISIONS_KEPT = 50

_BURST_POOLS = text(
    """
    SELECT p.id, c.name AS cluster, c.enabled AS cluster_enabled, c.max_workers, m.id AS model_id, m.name AS model
    FROM pools p JOIN clusters c ON c.id = p.cluster_id JOIN models m ON m.id = p.model_id
    WHERE c.kind = 'burst'
    ORDER BY c.name, m.name
    """
)

# Per tier of the model: the backlog, its oldest wait, and the inflow into the backlog over the
# window = jobs that left it (dispatched) + how much it grew. Raw submissions would count a
# capped user's 10k-job burst, which more GPUs cannot start sooner, as load.
_BACKLOG = text(
    """
    SELECT t.name, t.slo_s,
           count(j.id) FILTER (WHERE j.state = 'queued') AS queued,
           COALESCE(EXTRACT(EPOCH FROM now() - min(j.created_at) FILTER (WHERE j.state = 'queued')), 0) AS oldest_wait_s,
           count(j.id) FILTER (WHERE j.dispatched_at > now() - make_interval(secs => :window)) AS left_backlog,
           count(j.id) FILTER (WHERE j.created_at <= now() - make_interval(secs => :window)
                               AND (j.state = 'queued' OR j.dispatched_at > now() - make_interval(secs => :window)))
               AS queued_then
    FROM tiers t
    LEFT JOIN jobs j ON j.tier = t.name AND j.model_id = :model
         AND (j.state = 'queued' OR j.dispatched_at > now() - make_interval(secs => :window))
    GROUP BY t.name, t.slo_s, t.rank
    ORDER BY t.rank
    """
)

_STANDING = text(
    """
    SELECT count(*) FILTER (WHERE w.state = 'busy') AS busy, count(*) AS total
    FROM workers w JOIN pools p ON p.id = w.pool_id JOIN clusters c ON c.id = p.cluster_id
    WHERE p.model_id = :model AND c.kind = 'inference' AND w.state IN ('idle', 'busy')
      AND w.heartbeat_at > now() - make_interval(secs => :stale)
    """
)

_MEAN_JOB = text(
    """
    SELECT avg(EXTRACT(EPOCH FROM finished_at - started_at)) FROM (
        SELECT finished_at, started_at FROM jobs
        WHERE model_id = :model AND state = 'succeeded' AND finished_at > now() - interval '1 hour'
        ORDER BY finished_at DESC LIMIT 200) recent
    """
)


def burst_params() -> BurstParams:
    """Policy defaults (tuned on the launch-day simulation), overridden by DREAMQ_BURST_PARAMS (JSON)."""
    overrides = json.loads(get_settings().burst_params or "{}")
    return BurstParams(**overrides)


def _phase(rows: list[dict]) -> tuple[str, int]:
    """A burst worker's lifecycle phase and whether it runs a job, from its heartbeat rows."""
    fresh = [r for r in rows if r["age_s"] <= WORKER_STALE_S]
    if not fresh:
        return STARTING, 0
    row = fresh[0]
    busy = 1 if row["current_job_id"] is not None else 0
    if row["state"] in ("retiring", "draining", "stopped"):
        return DRAINING, busy
    if row["state"] in ("idle", "busy"):
        return SERVING, 1 if row["state"] == "busy" else busy
    return STARTING, 0


class BurstPool:
    """One burst pool's tick: observe, decide, act."""

    def __init__(self, pool: Any, provisioner, redis=None):
        self.pool = pool
        self.name = f"{pool.cluster}.{pool.model}"
        self.provisioner = provisioner
        self.redis = redis if redis is not None else get_redis()

    def _state_key(self) -> str:
        return f"dreamq:burst:{self.name}:state"

    def _load_state(self) -> BurstState:
        raw = self.redis.get(self._state_key()) if self.redis is not None else None
        return BurstState.from_dict(json.loads(raw) if raw else None)

    def _save_state(self, state: BurstState) -> None:
        if self.redis is not None:
            self.redis.set(self._state_key(), json.dumps(state.as_dict()))

    def observe(self, workers: list[ProvisionedWorker], rows: dict[str, list[dict]]) -> BurstObservation:
        settings = get_settings()
        with transaction() as session:
            backlog = session.execute(_BACKLOG, {"model": self.pool.model_id, "window": ARRIVAL_WINDOW_S}).all()
            standing = session.execute(_STANDING, {"model": self.pool.model_id, "stale": WORKER_STALE_S}).one()
            mean = session.execute(_MEAN_JOB, {"model": self.pool.model_id}).scalar()
        tiers = [
            TierPressure(
                name=r.name,
                slo_s=float(r.slo_s),
                queued=int(r.queued),
                oldest_wait_s=float(r.oldest_wait_s),
                arrivals_per_s=max(0, r.left_backlog + r.queued - r.queued_then) / ARRIVAL_WINDOW_S,
            )
            for r in backlog
        ]
        burst = []
        for worker in workers:
            phase, busy = _phase(rows[worker.name])
            burst.append(BurstWorker(id=worker.name, phase=phase, started_at=worker.started_at, busy=busy))
        return BurstObservation(
            now=time.time(),
            tiers=tiers,
            standing_busy=int(standing.busy),
            standing_total=int(standing.total),
            workers=burst,
            mean_job_s=float(mean) if mean else settings.burst_default_job_s,
            warmup_s=settings.burst_warmup_s,
            max_workers=self.pool.max_workers if self.pool.max_workers is not None else settings.burst_max_workers,
            reclaimed=not self.pool.cluster_enabled,
            reclaim_reason="cluster disabled (reclaimed)" if not self.pool.cluster_enabled else "",
        )

    def tick(self) -> dict[str, Any]:
        # One listing and one heartbeat query per tick: a worker stopped by the housekeeping is
        # still alive for a moment and shows as draining, which is what it is.
        workers = self.provisioner.list(self.pool.cluster, self.pool.model)
        rows = worker_rows_by_name(workers)
        self._housekeeping(workers, rows)
        obs = self.observe(workers, rows)
        controller = BurstController(burst_params(), state=self._load_state())
        decision = controller.decide(obs)
        self._save_state(controller.state)
        by_name = {w.name: w for w in workers}
        if decision.action is Action.SCALE_UP and decision.count:
            self.provisioner.start(self.pool.cluster, self.pool.model, decision.count)
        elif decision.action is Action.DRAIN:
            for name in decision.worker_ids:
                if name in by_name:
                    self.provisioner.retire(by_name[name])
        elif decision.action is Action.RELEASE:
            for name in decision.worker_ids:
                if name in by_name:
                    self._stop(by_name[name])
        record = {
            "at": obs.now,
            "pool": self.name,
            "action": decision.action.value,
            "count": decision.count,
            "workers": list(decision.worker_ids),
            "reason": decision.reason,
            "numbers": dict(decision.numbers),
        }
        if decision.action is not Action.HOLD:
            log.info(
                "burst decision",
                extra={
                    "pool": self.name,
                    "action": decision.action.value,
                    "count": decision.count or len(decision.worker_ids),
                    "reason": decision.reason,
                },
            )
            if self.redis is not None:
                key = f"dreamq:burst:{self.name}:decisions"
                self.redis.lpush(key, json.dumps(record, default=str))
                self.redis.ltrim(key, 0, DECISIONS_KEPT - 1)
        _count_decision(self.name, decision.action.value)
        return record

    def _stop(self, worker: ProvisionedWorker) -> None:
        self.provisioner.stop(worker)
        if self.redis is not None:
            self.redis.hsetnx(f"dreamq:burst:{self.name}:stopping", worker.name, str(time.time()))

    def _housekeeping(self, workers: list[ProvisionedWorker], rows: dict[str, list[dict]]) -> None:
        """Stop retiring workers once idle; kill stopped ones that outlived the grace period."""
        grace = get_settings().burst_stop_grace_s
        stopping = {
            k.decode() if isinstance(k, bytes) else k: float(v)
            for k, v in (self.redis.hgetall(f"dreamq:burst:{self.name}:stopping") if self.redis else {}).items()
        }
        alive = {w.name for w in workers}
        for worker in workers:
            if worker.name in stopping:
                if time.time() - stopping[worker.name] > grace:
                    log.warning("burst worker ignored its stop; killing it", extra={"worker": worker.name})
                    self.provisioner.kill(worker)
                continue
            mine = rows[worker.name]
            if mine and all(r["state"] == "retiring" and r["current_job_id"] is None for r in mine):
                log.info("retired burst worker is idle; stopping it", extra={"worker": worker.name})
                self._stop(worker)
        gone = [name for name in stopping if name not in alive]
        if gone and self.redis is not None:
            self.redis.hdel(f"dreamq:burst:{self.name}:stopping", *gone)


def _count_decision(pool: str, action: str) -> None:
    BURST_DECISIONS.labels(pool=pool, action=action).inc()


def control_burst_pools(provisioner=None) -> dict[str, int]:
    counts: dict[str, int] = {}
    with transaction() as session:
        pools = session.execute(_BURST_POOLS).all()
    if not pools:
        return counts  # no burst cluster: no provisioner needed (a Slurm one would call sbatch's tools)
    provisioner = provisioner or get_provisioner(get_settings().burst_provisioner)
    for pool in pools:
        try:
            record = BurstPool(pool, provisioner).tick()
        except Exception:  # one pool's provisioner failing must not stop the others
            log.exception("burst control failed", extra={"pool": f"{pool.cluster}.{pool.model}"})
            counts["errors"] = counts.get("errors", 0) + 1
            continue
        counts[record["action"]] = counts.get(record["action"], 0) + 1
    return counts


@periodic("burst_control", lambda: get_settings().burst_interval_s)
def burst_control() -> dict[str, int]:
    """Scale burst pools up and down (see tasks/burst.py)."""
    return control_burst_pools()
