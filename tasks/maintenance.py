"""celery beat maintenance: each periodic task is declared here, next to its code.

Postgres is the source of truth and the broker is only transport, so these tasks turn every
failure of a worker, the broker or the dispatcher into a job that is queued again (or failed with
a reason):

    dreamq.maintenance.reap_expired_leases   running jobs whose process stopped renewing the lease
                                             (app/jobs/lease.py), and dispatched jobs routed to a
                                             worker that stopped heartbeating or waiting in a pool
                                             no live worker serves -> queued, or failed
                                             `worker_lost` after max attempts
    dreamq.maintenance.reconcile_broker      dispatched jobs (and finalize hand-offs) the broker
                                             no longer holds, e.g. after a wiped Redis -> queued
                                             (finalize: the message is sent again)
    dreamq.maintenance.time_out_overdue      running past the hard time limit -> failed `timeout`
                                             (a hard kill acknowledges the message and says
                                             nothing to Postgres)
    dreamq.maintenance.expire_retention      outputs and uploads past their tier's retention:
                                             S3 objects deleted, rows updated/deleted
    dreamq.dispatch (every 5 s)              the dispatch safety tick, declared in celery_app

Each task runs under a Postgres advisory lock of its own, taken with try-lock on a dedicated
connection: a second beat, a manual run or a slow previous run makes the new run skip, never
overlap, and the lock dies with the connection if the process does. Every change is a guarded
compare-and-set transition, so running a task twice (or concurrently with a worker finishing the
same job) changes nothing the second time. They run on the `control` queue and show in Flower
under their names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import zlib
from typing import Any, Callable, Iterator, cast

from sqlalchemy import CursorResult, text

from app.core.config import get_settings
from app.core.queues import CONTROL_QUEUE, CPU_QUEUE
from app.core.storage import s3_client
from app.db.models import JobState
from app.db.session import get_engine, transaction
from app.jobs.lease import lease_expired_where
from app.jobs.outputs import staging_key
from app.jobs.transitions import NOW, transition
from app.messaging import get_publisher
from app.scheduling.dispatcher import WORKER_STALE_S
from tasks.celery_app import celery_app

log = logging.getLogger(__name__)

# A job that has been generated and waits for the cpu queue's finalize has no process renewing
# its lease while the cpu queue is backed up: it gets this many leases before it is re-run.
FINALIZE_LEASES = 10
# Rows handled per run (per kind): a backlog of stuck jobs is worked off over several runs.
BATCH = 500


@contextlib.contextmanager
def maintenance_lock(name: str) -> Iterator[bool]:
    """Try-lock `name` for as long as the block runs; yields False when another run holds it."""
    key = zlib.crc32(f"dreamq.maintenance.{name}".encode())
    with get_engine().connect() as conn:
        got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
        conn.commit()
        try:
            yield got
        finally:
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()


def periodic(name: str, every_s: Callable[[], float]):
    """Register `fn` as task dreamq.maintenance.<name>, lock-guarded, scheduled by celery beat."""

    def wrap(fn: Callable[[], dict[str, int]]):
        def run() -> dict[str, Any]:
            with maintenance_lock(name) as got:
                if not got:
                    log.info("maintenance run skipped: another run holds the lock", extra={"task": name})
                    return {"skipped": 1}
                started = time.perf_counter()
                counts = fn()
            if any(counts.values()):
                log.info(
                    "maintenance",
                    extra={"task": name, **counts, "ms": round((time.perf_counter() - started) * 1000, 1)},
                )
            return counts

        run.__name__ = run.__qualname__ = fn.__name__
        run.__doc__ = fn.__doc__
        task = celery_app.task(
            name=f"dreamq.maintenance.{name}", ignore_result=True, acks_late=False, soft_time_limit=120, time_limit=150
        )(run)
        interval = every_s()
        # expires: a tick that waited longer than one interval is dropped, the next one follows.
        celery_app.conf.beat_schedule[f"maintenance-{name}"] = {
            "task": task.name,
            "schedule": interval,
            "options": {"queue": CONTROL_QUEUE, "expires": interval},
        }
        return task

    return wrap


def _interval() -> float:
    return get_settings().maintenance_interval_s


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


@periodic("reap_expired_leases", _interval)
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
                session.execute(
                    text("UPDATE workers SET current_job_id = NULL WHERE current_job_id = :j"), {"j": str(job.id)}
                )
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
            if transition(
                session,
                job.id,
                JobState.dispatched,
                JobState.queued,
                guard={"dispatch_seq": job.dispatch_seq},
                detail={"reason": reason, "by": "reaper", "worker": job.worker_id},
            ):
                counts["unrouted"] += 1
    if any(counts.values()):
        _request_dispatch()
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


def broker_task_ids(prefixes: list[str], *, unacked_within_s: float | None = None) -> set[str] | None:
    """Task ids of the messages the Redis broker holds for these queue prefixes (None: not Redis).

    Ready messages are in one list per queue (kombu adds a suffix per priority level); delivered,
    unacknowledged ones are in the `unacked` hash, with their delivery time in `unacked_index`.
    With `unacked_within_s`, a message delivered longer ago than that does not count: a worker
    claims a job within milliseconds of receiving it (and then renews its lease), so a delivery
    that old whose job is still `dispatched` went to a consumer that died holding it (it would
    sit there until the visibility timeout, hours). The lists are short: the dispatch limit
    bounds how many jobs are in the broker at once.
    """
    import redis

    url = get_settings().broker_url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    client = redis.Redis.from_url(url)
    try:
        ids: set[str] = set()
        keys = {key for prefix in prefixes for key in client.scan_iter(match=f"{prefix}*", count=1000)}
        for key in keys:
            if client.type(key) != b"list":
                continue
            for raw in client.lrange(key, 0, -1):
                ids.add(_task_id(raw))
        delivered_at = dict(client.zrange("unacked_index", 0, -1, withscores=True))  # type: ignore[arg-type]  # withscores=True: (member, score) pairs
        oldest = time.time() - unacked_within_s if unacked_within_s is not None else None
        for tag, raw in client.hgetall("unacked").items():
            if oldest is not None and delivered_at.get(tag, 0.0) < oldest:
                continue
            try:
                ids.add(_task_id(json.loads(raw)[0]))
            except (ValueError, IndexError, TypeError):
                continue
        ids.discard("")
        return ids
    finally:
        client.close()


def _task_id(message: Any) -> str:
    try:
        if isinstance(message, (bytes, str)):
            message = json.loads(message)
        return str(message.get("headers", {}).get("id", ""))
    except (ValueError, AttributeError):
        return ""


@periodic("reconcile_broker", _interval)
def reconcile_broker() -> dict[str, int]:
    """Requeue dispatched jobs (and resend finalize hand-offs) that the broker no longer holds."""
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
            if transition(
                session,
                job.id,
                JobState.dispatched,
                JobState.queued,
                guard={"dispatch_seq": job.dispatch_seq},
                detail={"reason": "broker_lost_message", "by": "reconciler"},
            ):
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
            celery_app.send_task(
                "dreamq.finalize",
                args=[str(job.id), job.dispatch_seq, staging_key(job.id, job.dispatch_seq)],
                queue=CPU_QUEUE,
                task_id=task_id,
            )
            counts["finalize_resent"] += 1
    if counts["requeued"]:
        _request_dispatch()
    return counts


# --- hard time limit ---------------------------------------------------------------------------

_OVERDUE = text(
    """
    SELECT id, dispatch_seq FROM jobs
    WHERE state = 'running' AND started_at < now() - make_interval(secs => :limit_s)
    LIMIT :limit
    """
)


@periodic("time_out_overdue", _interval)
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
        _request_dispatch()
    return counts


# --- retention ---------------------------------------------------------------------------------

# Outputs of finished jobs past their tier's retention. The job row stays (monthly quotas and
# the audit trail count it); its assets are gone and the API stops offering URLs.
_EXPIRED_OUTPUTS = text(
    """
    SELECT j.id, j.video_key, j.thumbnail_key FROM jobs j JOIN tiers t ON t.name = j.tier
    WHERE j.video_key IS NOT NULL AND j.finished_at < now() - make_interval(days => t.retention_days)
    LIMIT :limit
    """
)
# Uploads past expires_at (set from the tier's retention at upload) that no unfinished job needs.
_EXPIRED_UPLOADS = text(
    """
    SELECT u.id, u.object_key FROM uploads u
    WHERE u.expires_at < now()
      AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.upload_id = u.id
                      AND j.state IN ('queued', 'dispatched', 'running'))
    LIMIT :limit
    """
)


def _retention_interval() -> float:
    return get_settings().retention_interval_s


@periodic("expire_retention", _retention_interval)
def expire_retention() -> dict[str, int]:
    """Delete outputs and uploads past their tier's retention (S3 objects first, then rows)."""
    settings = get_settings()
    counts = {"outputs": 0, "uploads": 0}
    with transaction() as session:
        outputs = session.execute(_EXPIRED_OUTPUTS, {"limit": BATCH}).all()
        uploads = session.execute(_EXPIRED_UPLOADS, {"limit": BATCH}).all()
    keys = [k for row in outputs for k in (row.video_key, row.thumbnail_key) if k] + [u.object_key for u in uploads]
    # Objects first: a crash after this leaves rows pointing at nothing, which the next run
    # finishes; the other order could leave objects no row knows about.
    s3 = s3_client()
    for start in range(0, len(keys), 1000):
        s3.delete_objects(
            Bucket=settings.media_bucket,
            Delete={"Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True},
        )
    with transaction() as session:
        if outputs:
            counts["outputs"] = cast(
                CursorResult,
                session.execute(
                    text(
                        "UPDATE jobs SET video_key = NULL, thumbnail_key = NULL, updated_at = now() WHERE id = ANY(:ids)"
                    ),
                    {"ids": [r.id for r in outputs]},
                ),
            ).rowcount
            session.execute(
                text(
                    "INSERT INTO job_events (job_id, from_state, to_state, detail) "
                    'SELECT id, state, state, \'{"step": "outputs_expired"}\'::jsonb FROM jobs WHERE id = ANY(:ids)'
                ),
                {"ids": [r.id for r in outputs]},
            )
        if uploads:
            counts["uploads"] = cast(
                CursorResult,
                session.execute(text("DELETE FROM uploads WHERE id = ANY(:ids)"), {"ids": [u.id for u in uploads]}),
            ).rowcount
    return counts


def _request_dispatch() -> None:
    get_publisher().request_dispatch()
