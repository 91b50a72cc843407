"""The workers registry: statements on the `workers` table that the job's life makes.

A GPU worker's row says which pool it serves, whether it is idle, busy, draining, retiring or
stopped, what it holds loaded (affinity) and how long its jobs take (info.job_s, the
dispatcher's per-worker depth). Staleness and the effective dispatch limit are read by the
dispatcher (app/scheduling/dispatcher.py: WORKER_STALE_S, effective_dispatch_limit).
"""

from __future__ import annotations

import json
import os
import socket
import uuid

from sqlalchemy import text
from sqlalchemy.orm import Session

# info.job_s: how long this worker's jobs take, for the dispatcher's per-worker depth
# (app/scheduling/dispatcher.py worker_depth). It rises at once to a longer job and decays
# slowly after it, so a worker that starts getting long jobs is given few jobs at once.
#
# Only the job's own ending makes the worker idle: with the tail on its own thread, the worker
# may already have claimed its next job (current_job_id moved on, state busy) when a tail
# commits; that row is then left as it is, apart from job_s.
_WORKER_IDLE_SQL = text(
    # A draining or retiring worker stays so: the dispatcher must not count it as capacity again.
    "UPDATE workers SET state = CASE WHEN state IN ('draining', 'retiring') THEN state "
    "WHEN current_job_id IS DISTINCT FROM CAST(:job AS uuid) AND current_job_id IS NOT NULL THEN state ELSE 'idle' END, "
    "current_job_id = CASE WHEN current_job_id IS DISTINCT FROM CAST(:job AS uuid) THEN current_job_id END, "
    "heartbeat_at = now(), "
    "info = CASE WHEN CAST(:s AS float8) IS NULL THEN info ELSE jsonb_set(COALESCE(info, '{}'::jsonb), '{job_s}', "
    "to_jsonb(round(CAST(GREATEST(CAST(:s AS float8), 0.8 * COALESCE(CAST(info ->> 'job_s' AS float8), CAST(:s AS float8)) "
    "+ 0.2 * CAST(:s AS float8)) AS numeric), 4))) END "
    "WHERE id = :w"
)


def worker_idle(session: Session, worker_id: str, job_id: uuid.UUID | str, job_s: float | None) -> None:
    """The worker is done with `job_id` (idle unless it has moved on to another job already).
    job_s: the job's time on this worker (None leaves info.job_s as it is)."""
    session.execute(_WORKER_IDLE_SQL, {"w": worker_id, "job": str(job_id), "s": job_s})


_UPSERT = text(
    """
    INSERT INTO workers (id, pool_id, hostname, pid, device, state, info, heartbeat_at)
    VALUES (:id, (SELECT p.id FROM pools p JOIN clusters c ON c.id = p.cluster_id JOIN models m ON m.id = p.model_id
                  WHERE c.name = :cluster AND m.name = :model),
            :host, :pid, :device, :state, CAST(:info AS jsonb), now())
    ON CONFLICT (id) DO UPDATE SET
        pool_id = EXCLUDED.pool_id, pid = EXCLUDED.pid, device = EXCLUDED.device, heartbeat_at = now(),
        -- merge: the child running jobs keeps its own keys (loaded versions) in the same object
        info = workers.info || EXCLUDED.info,
        -- busy/idle are set by the child that runs jobs; the heartbeat only revives a stopped row
        state = CASE WHEN workers.state IN ('stopped', 'starting') OR :state IN ('stopped', 'draining') OR :fresh
                     THEN :state ELSE workers.state END,
        started_at = CASE WHEN workers.state = 'stopped' THEN now() ELSE workers.started_at END
    """
)


def heartbeat(session: Session, worker_id: str, cluster: str, model: str, state: str, *, fresh: bool) -> None:
    """Register or refresh a GPU worker's row; `fresh` (a (re)started worker) holds no model yet."""
    info: dict[str, object] = {
        "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "device": os.environ.get("DREAMQ_DEVICE_LABEL", ""),
    }
    if fresh:
        # A (re)started worker holds no model yet, whatever its previous run reported.
        info["loaded"] = []
    session.execute(
        _UPSERT,
        {
            "id": worker_id,
            "cluster": cluster,
            "model": model,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": os.environ.get("DREAMQ_DEVICE_LABEL", "cpu"),
            "state": state,
            "info": json.dumps(info),
            "fresh": fresh,
        },
    )


def report_loaded(session: Session, worker_id: str, loaded_digests: list[str], loads: int) -> None:
    """Which versions the worker holds in memory (the dispatcher's affinity reads it)."""
    session.execute(
        text(
            "UPDATE workers SET info = info || jsonb_build_object('loaded', CAST(:loaded AS jsonb), "
            "'loads', CAST(:loads AS int)) WHERE id = :id"
        ),
        {"loaded": json.dumps(loaded_digests), "loads": loads, "id": worker_id},
    )
