"""Recovery: every failure of a worker, the broker or the dispatcher becomes a job that is
queued again (or failed with a reason). The bodies of the periodic tasks in tasks/maintenance.py
(which add the schedule and the advisory lock):

    reap_expired_leases   running jobs whose process stopped renewing the lease (app/jobs/lease.py),
                          and dispatched jobs routed to a worker that stopped heartbeating or
                          waiting in a pool no live worker serves -> queued, or failed
                          `worker_lost` after max attempts
    reconcile_broker      dispatched jobs (and finalize hand-offs) the broker no longer holds,
                          e.g. after a wiped Redis -> queued (finalize: the message is sent again)
    time_out_overdue      running past the hard time limit -> failed `timeout` (a hard kill
                          acknowledges the message and says nothing to Postgres)

Every change is a guarded compare-and-set transition, so running one twice (or concurrently
with a worker finishing the same job) changes nothing the second time.
"""

from __future__ import annotations

import time
from typing import Callable

from sqlalchemy import text

from app.core.config import get_settings
from app.core.queues import CPU_QUEUE
from app.db.models import JobState
from app.db.session import transaction
from app.jobs.lease import lease_expired_where
from app.jobs.outputs import staging_key
from app.jobs.transitions import NOW, transition, unrelease
from app.jobs.workers import WORKER_STALE_S, release_job
from app.messaging import get_publisher

# A job that has been generated and waits for the cpu queue's finalize has no process renewing
# its lease while the cpu queue is backed up: it gets this many leases before it is re-run.
FINALIZE_LEASES = 10
# Rows handled per run (per kind): a backlog of stuck jobs is worked off over several runs.
BATCH = 500


# --- reaper ------------------------------------------------------------------------------------

_EXPIRED_RUNNING = text(
    """
    SELECT id, dispatch_seq, attempts, max_attempts, worker_id, progress FROM jobs
    WHERE state = 'running'
      AND updated_at < now() - make_interval(secs => CASE WHEN progress >= 0.95
                                                        THEN :lease_s * :finalize_leases ELSE :lease_s END)
    ORDER BY updated_at LIMIT :limit
    """
)

# Dispatched to a worker's own queue (version affinity) by a worker that has since gone quiet
# or is leaving: nobody else reads that queue.
_ROUTED_TO_LOST_WORKER = text(
    """
    SELECT j.id, j.dispatch_seq, j.worker_id FROM jobs j
    LEFT JOIN workers w ON w.id = j.worker_id
    WHERE j.state = 'dispatched' AND j.worker_id IS NOT NULL
      AND (w.id IS NULL OR w.state IN ('stopped', 'draining', 'retiring')
           OR w.heartbeat_at < now() - make_interval(secs => :stale))
    LIMIT :limit
    """
)


# Dispatched into the queues of a pool that no live worker serves any more (its workers were
# stopped, reclaimed, or died together): the messages wait in the broker for nobody.
_DISPATCHED_TO_EMPTY_POOL = text(
    """
    SELECT j.id, j.dispatch_seq, j.worker_id FROM jobs j
    WHERE j.state = 'dispatched' AND j.dispatched_at < now() - make_interval(secs => :after)
      AND NOT EXISTS (SELECT 1 FROM workers w WHERE w.pool_id = j.pool_id AND w.state IN ('idle', 'busy')
                      AND w.heartbeat_at > now() - make_interval(secs => :stale))
    LIMIT :limit
    """
)


def requeue_or_fail(session, job, reason: str, expected: JobState, where=None) -> str | None:
    """Put a lost job back in the queue, or fail it when it has used up its attempts."""
    if job.attempts >= job.max_attempts:
        left = transition(
            session,
            job.id,
            expected,
            JobState.failed,
            guard={"dispatch_seq": job.dispatch_seq},
            where=where,
            failure_code="worker_lost",
            finished_at=NOW,
            failure_message=f"the job was started {job.attempts} times and lost its worker each time ({reason})",
            detail={"reason": reason, "by": "reaper"},
        )
        return "failed" if left else None
    left = transition(
        session,
        job.id,
        expected,
        JobState.queued,
        guard={"dispatch_seq": job.dispatch_seq},
        where=where,
        progress=0.0,
        detail={"reason": reason, "by": "reaper", "worker": job.worker_id},
    )
    return "requeued" if left else None


def reap_expired_leases() -> dict[str, int]:
    """Requeue (or fail after max attempts) jobs whose worker is gone."""
    settings = get_settings()
    counts = {"requeued": 0, "failed": 0, "unrouted": 0}
    lease_sql, lease_params = lease_expired_where()
    with transaction() as session:
        rows = session.execute(
            _EXPIRED_RUNNING, {"lease_s": settings.job_lease_s, "finalize_leases": FINALIZE_LEASES, "limit": BATCH}
        ).all()
        for job in rows:
            # The same condition again inside the compare-and-set: a renewal that lands between
            # the SELECT and here keeps the job where it is.
            where = (f"{lease_sql} OR (progress >= 0.95)", lease_params)
            outcome = requeue_or_fail(session, job, "lease_expired", JobState.running, where=where)
            if outcome:
                counts[outcome] += 1
                release_job(session, job.id)
        stranded = [
            (job, "routed_worker_lost")
            for job in session.execute(_ROUTED_TO_LOST_WORKER, {"stale": WORKER_STALE_S, "limit": BATCH}).all()
        ]
        stranded += [
            (job, "pool_has_no_live_worker")
            for job in session.execute(
                _DISPATCHED_TO_EMPTY_POOL,
                {"after": settings.reconcile_after_s, "stale": WORKER_STALE_S, "limit": BATCH},
            ).all()
        ]
        for job, reason in stranded:
            # Not started, so no attempt was used: straight back to the queue. A stale message
            # that a returning worker finds later carries the old dispatch_seq and claims nothing.
            if unrelease(session, job.id, job.dispatch_seq, reason=reason, by="reaper", worker=job.worker_id):
                counts["unrouted"] += 1
        if any(counts.values()):
            get_publisher().request_dispatch(session)
    return counts


# --- broker reconciliation ---------------------------------------------------------------------

_STALE_DISPATCHED = text(
    """
    SELECT id, dispatch_seq FROM jobs
    WHERE state = 'dispatched' AND dispatched_at < now() - make_interval(secs => :after)
    LIMIT :limit
    """
)
# Generated, handed to the cpu queue, and nobody has touched the job since.
_STALE_HANDOFF = text(
    """
    SELECT id, dispatch_seq FROM jobs
    WHERE state = 'running' AND progress >= 0.95 AND updated_at < now() - make_interval(secs => :after)
    LIMIT :limit
    """
)


def reconcile_broker(broker_task_ids: Callable[..., set[str] | None]) -> dict[str, int]:
    """Requeue dispatched jobs (and resend finalize hand-offs) that the broker no longer holds.

    `broker_task_ids(prefixes, unacked_within_s=...)` reads the task ids the broker holds for
    these queues (None: the broker cannot be read this way); the transport provides it."""
    settings = get_settings()
    counts = {"requeued": 0, "finalize_resent": 0}
    params = {"after": settings.reconcile_after_s, "limit": BATCH}
    with transaction() as session:
        dispatched = session.execute(_STALE_DISPATCHED, params).all()
        handoffs = session.execute(_STALE_HANDOFF, params).all()
        pools = [
            r[0]
            for r in session.execute(
                text(
                    "SELECT c.name || '.' || m.name FROM pools p JOIN clusters c ON c.id = p.cluster_id "
                    "JOIN models m ON m.id = p.model_id"
                )
            )
        ]
    if not dispatched and not handoffs:
        return counts
    held = broker_task_ids([*pools, CPU_QUEUE], unacked_within_s=settings.reconcile_after_s)
    if held is None:
        return counts  # not a Redis broker: the reaper's lease still catches what runs nowhere
    # A message is off the list and not yet in `unacked` for an instant while a worker takes it:
    # only what is missing from two looks a moment apart counts as lost.
    missing = [j for j in dispatched if f"{j.id}-{j.dispatch_seq}" not in held]
    missing_handoffs = [j for j in handoffs if f"{j.id}-{j.dispatch_seq}-finalize" not in held]
    if missing or missing_handoffs:
        time.sleep(0.5)
        held = broker_task_ids([*pools, CPU_QUEUE], unacked_within_s=settings.reconcile_after_s) or set()
    with transaction() as session:
        for job in missing:
            if f"{job.id}-{job.dispatch_seq}" in held:
                continue
            if unrelease(session, job.id, job.dispatch_seq, reason="broker_lost_message", by="reconciler"):
                counts["requeued"] += 1
    for job in missing_handoffs:
        task_id = f"{job.id}-{job.dispatch_seq}-finalize"
        if task_id in held:
            continue
        with transaction() as session:
            touched = session.execute(
                text(
                    "UPDATE jobs SET updated_at = now() WHERE id = :id AND state = 'running' AND dispatch_seq = :seq "
                    "RETURNING id"
                ),
                {"id": str(job.id), "seq": job.dispatch_seq},
            ).first()
        if touched:
            # finalize is idempotent per (job, dispatch_seq): a duplicate finds the job done.
            get_publisher().send(
                "dreamq.finalize",
                [str(job.id), job.dispatch_seq, staging_key(job.id, job.dispatch_seq)],
                queue=CPU_QUEUE,
                task_id=task_id,
            )
            counts["finalize_resent"] += 1
    if counts["requeued"]:
        get_publisher().request_dispatch()
    return counts


# --- hard time limit ---------------------------------------------------------------------------

_OVERDUE = text(
    """
    SELECT id, dispatch_seq FROM jobs
    WHERE state = 'running' AND started_at < now() - make_interval(secs => :limit_s)
    LIMIT :limit
    """
)


def time_out_overdue() -> dict[str, int]:
    """Fail jobs running past the hard time limit (plus one lease for the worker to say so itself)."""
    settings = get_settings()
    limit_s = settings.job_hard_time_limit_s + settings.job_lease_s
    counts = {"timed_out": 0}
    with transaction() as session:
        for job in session.execute(_OVERDUE, {"limit_s": limit_s, "limit": BATCH}).all():
            if transition(
                session,
                job.id,
                JobState.running,
                JobState.failed,
                guard={"dispatch_seq": job.dispatch_seq},
                failure_code="timeout",
                finished_at=NOW,
                failure_message=f"the job ran longer than its hard limit of {settings.job_hard_time_limit_s} s",
                detail={"by": "maintenance"},
            ):
                counts["timed_out"] += 1
    if counts["timed_out"]:
        get_publisher().request_dispatch()
    return counts
