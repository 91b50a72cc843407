"""The workers registry: statements on the `workers` table that the job's life makes.

A GPU worker's row says which pool it serves, whether it is idle, busy, draining, retiring or
stopped, what it holds loaded (affinity) and how long its jobs take (info.job_s). From those rows
come the rules the dispatcher, the reaper, the snapshot and the admin views share: when a worker
counts as live (WORKER_STALE_S), how many jobs each live worker may hold queued (worker_depth,
LIVE_DEPTH_SQL) and so what a pool may hold dispatched (effective_dispatch_limit, the dispatch
limit as applied).
"""

from __future__ import annotations

import json
import math
import os
import socket
import uuid
from typing import cast

from sqlalchemy import CursorResult, text
from sqlalchemy.orm import Session

from app.db.session import transaction
from app.jobs.transitions import unrelease
from app.messaging import get_publisher

# A worker's heartbeat older than this and the worker no longer counts as pool capacity.
WORKER_STALE_S = 30
# Jobs a pool may hold queued per live worker (on top of the one each is running), at least.
DISPATCH_PER_WORKER = 2
# ...and for short jobs as many as fill this much of the worker's time, measured from its own
# recent jobs (workers.info.job_s, an average the worker writes when it goes idle), capped.
# A fixed 2 starves a worker whose jobs take less than a dispatch round trip: with a no-op model
# one worker ran 12 jobs/s, one pass per job. Half a second of queued work keeps it busy between
# passes while a job still spends at most ~0.5 s committed to a worker's queue, where its
# priority can no longer change; a video job (seconds to minutes) still gets 2.
QUEUED_WORK_S = 0.5
MAX_PER_WORKER = 64


def worker_depth(job_s: float | None) -> int:
    """Jobs one live worker may hold queued: DISPATCH_PER_WORKER, or QUEUED_WORK_S of its
    measured job time when that is more (at most MAX_PER_WORKER). Mirrors LIVE_DEPTH_SQL."""
    if job_s is None:
        return DISPATCH_PER_WORKER
    return min(MAX_PER_WORKER, max(DISPATCH_PER_WORKER, math.ceil(QUEUED_WORK_S / max(job_s, 0.001))))


# The sum of worker_depth over pool p's live workers (heartbeat fresh, idle or busy); needs
# :stale. Constants from code, formatted in once.
LIVE_DEPTH_SQL = f"""
    (SELECT CAST(COALESCE(sum(CASE WHEN w.info ->> 'job_s' IS NULL THEN {DISPATCH_PER_WORKER}
                 ELSE LEAST({MAX_PER_WORKER}, GREATEST({DISPATCH_PER_WORKER},
                     ceil({QUEUED_WORK_S} / GREATEST(CAST(w.info ->> 'job_s' AS float8), 0.001)))) END), 0) AS int)
     FROM workers w WHERE w.pool_id = p.id AND w.state IN ('idle', 'busy')
          AND w.heartbeat_at > now() - make_interval(secs => :stale))"""


def effective_dispatch_limit(dispatch_limit: int, live_depth: int, enabled: bool = True) -> int:
    """What a pool may hold dispatched: its limit, capped at what its live workers may hold
    (LIVE_DEPTH_SQL: DISPATCH_PER_WORKER each, more for workers whose jobs are short; 0 with
    no live worker or while the pool or its cluster is drained). The dispatcher, the snapshot
    and the admin views all show this number."""
    return min(dispatch_limit if enabled else 0, live_depth)


# info.job_s: how long this worker's jobs take, for the dispatcher's per-worker depth
# (worker_depth above). It rises at once to a longer job and decays
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


def release_job(session: Session, job_id: uuid.UUID | str) -> None:
    """The job is no longer any worker's current job (the reaper took it back)."""
    session.execute(text("UPDATE workers SET current_job_id = NULL WHERE current_job_id = :j"), {"j": str(job_id)})


# --- drain and retire ---------------------------------------------------------------------------

# Live workers of some pools -> draining, remembering who drained them (for `enable`).
_DRAIN_WORKERS = text(
    """
    UPDATE workers SET state = 'draining', info = info || jsonb_build_object('drained_by', CAST(:actor AS text))
    WHERE pool_id = ANY(CAST(:pools AS uuid[])) AND state IN ('starting', 'idle', 'busy')
      AND heartbeat_at > now() - make_interval(secs => :stale)
    """
)

# Only workers an operator drained: one draining for a warm shutdown is on its way out.
_UNDRAIN_WORKERS = text(
    """
    UPDATE workers SET state = CASE WHEN current_job_id IS NULL THEN 'idle' ELSE 'busy' END, info = info - 'drained_by'
    WHERE pool_id = ANY(CAST(:pools AS uuid[])) AND state = 'draining' AND info ? 'drained_by'
    """
)


def drain_workers(session: Session, pool_ids: list, *, actor: str) -> int:
    if not pool_ids:
        return 0
    return cast(
        CursorResult,
        session.execute(_DRAIN_WORKERS, {"pools": [str(p) for p in pool_ids], "actor": actor, "stale": WORKER_STALE_S}),
    ).rowcount


def undrain_workers(session: Session, pool_ids: list) -> int:
    if not pool_ids:
        return 0
    return cast(CursorResult, session.execute(_UNDRAIN_WORKERS, {"pools": [str(p) for p in pool_ids]})).rowcount


def worker_nodes(prefix: str) -> list[str]:
    with transaction() as session:
        nodes = [r[0] for r in session.execute(text("SELECT id FROM workers WHERE id LIKE :p"), {"p": f"{prefix}%"})]
    return nodes or [f"{prefix}{socket.gethostname()}"]


def retire_worker_rows(prefix: str) -> int:
    """Mark the worker retiring and take back the jobs routed to its own queues (version
    affinity) that it has not started: it stops consuming, so nobody else would run them.
    Returns how many went back to the queue."""
    returned = 0
    with transaction() as session:
        session.execute(
            text("UPDATE workers SET state = 'retiring' WHERE id LIKE :p AND state IN ('idle', 'busy', 'starting')"),
            {"p": f"{prefix}%"},
        )
        routed = session.execute(
            text("SELECT id, dispatch_seq, worker_id FROM jobs WHERE state = 'dispatched' AND worker_id LIKE :p"),
            {"p": f"{prefix}%"},
        ).all()
        for job in routed:
            if unrelease(session, job.id, job.dispatch_seq, reason="routed_worker_retiring", worker=job.worker_id):
                returned += 1
    if returned:
        get_publisher().request_dispatch()
    return returned


def worker_rows(prefix: str) -> list[dict]:
    with transaction() as session:
        return [
            dict(r)
            for r in session.execute(
                text(
                    "SELECT id, state, current_job_id, EXTRACT(EPOCH FROM now() - heartbeat_at) AS age_s FROM workers "
                    "WHERE id LIKE :p"
                ),
                {"p": f"{prefix}%"},
            ).mappings()
        ]


def rows_by_prefix(prefixes: list[str]) -> dict[str, list[dict]]:
    """worker_rows for several node prefixes ("name@") in one query."""
    found: dict[str, list[dict]] = {p: [] for p in prefixes}
    with transaction() as session:
        for row in session.execute(
            text(
                "SELECT id, state, current_job_id, EXTRACT(EPOCH FROM now() - heartbeat_at) AS age_s FROM workers "
                "WHERE split_part(id, '@', 1) || '@' = ANY(:p)"
            ),
            {"p": prefixes},
        ).mappings():
            found[row["id"].split("@", 1)[0] + "@"].append(dict(row))
    return found
