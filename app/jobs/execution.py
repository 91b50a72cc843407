"""A claimed job's life on its worker: claim, progress, and each way it can end.

    claim()            dispatched -> running (or running -> running for a redelivery after its
                       worker died), attempts counted, the worker marked busy
    ProgressReporter   throttled progress writes (at most every PROGRESS_INTERVAL_S), which
                       double as the check for a cancel or a drain at a step boundary
    stop_at_step()     running -> cancelled at a step boundary (the user cancelled)
    requeue_for_drain()  running -> queued, its attempt not counted (the worker is shutting down)
    hand_off()         frames staged in object storage, `generated` recorded, the finalize task
                       sent (a large output: encoded on the cpu queue)
    complete()         running -> succeeded: the one completion path, for the finalize task and
                       for a small output finished on the GPU worker
    fail()             running -> failed with a code and a message

Every move is a compare-and-set naming the dispatch_seq the worker claimed (app/jobs/transitions.py),
so a job cancelled or requeued meanwhile is never completed by a late run. Each ends with the
worker idle again (app/jobs/workers.py) and a dispatch request, since room just opened.
"""

from __future__ import annotations

import collections
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from app.core.logging_setup import bind
from app.core.queues import CPU_QUEUE
from app.core.signals import job_progressed, job_started
from app.db.models import JobState
from app.db.session import transaction
from app.jobs.lease import lease_expired_where
from app.jobs.outputs import discard_outputs
from app.jobs.transitions import INCREMENT, NOW, record_event, transition
from app.jobs.workers import worker_idle
from app.messaging import get_publisher

log = logging.getLogger(__name__)

# How often progress is written to Postgres: often enough for a progress bar, rare enough that
# a 1,000-step job does not write 1,000 rows.
PROGRESS_INTERVAL_S = 0.25

# When this process claimed its current job (time.monotonic()): a job's time on this worker,
# for the dispatcher's per-worker depth (app/jobs/workers.py).
_claimed_at: float | None = None

# The (job, dispatch_seq) pairs this process claimed lately. The same message again is a duplicate
# (a manual restore, a message published twice), never the redelivery after this process died:
# Celery requeues that one to a new child, which has no record of it. Without this, a duplicate
# that reaches this worker after its task returned (the job still running in the tail or waiting
# for finalize, lease live) would be taken for that redelivery and run the job again.
_recent_claims: collections.deque[tuple[str, int]] = collections.deque(maxlen=16)


def since_claim(claimed_at: float | None = None) -> float | None:
    """Seconds since `claimed_at` (by default this process's last claim); None before any."""
    at = _claimed_at if claimed_at is None else claimed_at
    return None if at is None else time.monotonic() - at


def claimed_at() -> float | None:
    return _claimed_at


@dataclass(frozen=True)
class ClaimedJob:
    id: uuid.UUID
    user_id: uuid.UUID
    tier: str
    kind: str
    prompt: str
    params: dict[str, Any]
    model: str
    version: int
    digest: str
    upload_key: str | None
    attempts: int
    dispatch_seq: int


# The claimed job's row, and the worker marked busy with it, in one round trip.
#
# The claim commits without waiting for its WAL flush (synchronous_commit off, this transaction
# only): one fsync less on every job's way to the model. A Postgres crash could lose a claim made
# in its last few hundred ms; the job is then `dispatched` again while this worker runs it, so
# the completing compare-and-set (running -> succeeded) matches nothing and the outputs are
# discarded, and the broker reconciler requeues the job: run again, never completed twice.
# Completions (succeeded, failed) keep the synchronous commit: a client may already have seen them
# (the one exception, max_attempts_exceeded decided inside the claim, is simply decided again).
_CLAIMED_SQL = text(
    """
    WITH async_commit AS (SELECT set_config('synchronous_commit', 'off', true)),
    busy AS (
        UPDATE workers SET state = CASE WHEN state IN ('draining', 'retiring') THEN state ELSE 'busy' END,
                           current_job_id = :id, heartbeat_at = now()
        WHERE id = :w
    )
    SELECT j.id, j.user_id, j.tier, j.kind, j.prompt, j.params, j.attempts, j.max_attempts, j.dispatch_seq,
           EXTRACT(EPOCH FROM j.started_at - j.created_at) AS wait_s,
           m.name AS model, v.number AS version, v.digest, u.object_key AS upload_key
    FROM async_commit, jobs j
    JOIN model_versions v ON v.id = j.model_version_id
    JOIN models m ON m.id = v.model_id
    LEFT JOIN uploads u ON u.id = j.upload_id
    WHERE j.id = :id
    """
)


def claim(job_id: str, dispatch_seq: int, worker_id: str) -> ClaimedJob | None:
    """dispatched -> running, or running -> running for a message redelivered after its worker died.

    The message's dispatch_seq must match the row's: a stale message from an earlier dispatch, or
    one for a job cancelled meanwhile, claims nothing and is simply acknowledged.
    """
    global _claimed_at
    _claimed_at = time.monotonic()
    lease_sql, lease_params = lease_expired_where()
    with transaction() as session:
        left = transition(
            session,
            job_id,
            {JobState.dispatched, JobState.running},
            JobState.running,
            worker_id=worker_id,
            guard={"dispatch_seq": dispatch_seq},
            # A running job is taken over only from a dead process: its own worker's (the child
            # died and Celery requeued the message: a new child, which never claimed it) or one
            # whose lease ran out. A message that Redis redelivers while the job still runs
            # elsewhere, or a duplicate this process already claimed, claims nothing.
            where=(
                f"state = 'dispatched' OR (worker_id = :me AND NOT :claimed_here) OR {lease_sql}",
                {"me": worker_id, "claimed_here": (str(job_id), dispatch_seq) in _recent_claims, **lease_params},
            ),
            attempts=INCREMENT,
            started_at=NOW,
            progress=0.0,
        )
        if left is None:
            log.info(
                "message does not match the job's state; acknowledged without running",
                extra={"job_id": job_id, "dispatch_seq": dispatch_seq},
            )
            return None
        _recent_claims.append((str(job_id), dispatch_seq))
        row = session.execute(_CLAIMED_SQL, {"id": job_id, "w": worker_id}).mappings().one()
        # Inside the task's job_context, which drops these at its end.
        bind(user_id=str(row["user_id"]), tier=row["tier"])
        if row["attempts"] > row["max_attempts"]:
            transition(
                session,
                job_id,
                JobState.running,
                JobState.failed,
                worker_id=worker_id,
                failure_code="max_attempts_exceeded",
                failure_message=f"the job was started {row['attempts'] - 1} times and its worker was lost each time",
                finished_at=NOW,
            )
            worker_idle(session, worker_id, job_id, since_claim())  # _CLAIMED_SQL marked it busy
            log.warning(
                "job failed: worker lost on every attempt", extra={"job_id": job_id, "attempts": row["attempts"]}
            )
            return None
        if left == JobState.running.value:
            log.warning(
                "job redelivered after its worker was lost", extra={"job_id": job_id, "attempt": row["attempts"]}
            )
    job_started.send(None, tier=row["tier"], wait_s=float(row["wait_s"] or 0.0))  # after the commit
    return ClaimedJob(
        id=row["id"],
        user_id=row["user_id"],
        tier=row["tier"],
        kind=row["kind"],
        prompt=row["prompt"],
        params=row["params"],
        model=row["model"],
        version=row["version"],
        digest=row["digest"],
        upload_key=row["upload_key"],
        attempts=row["attempts"],
        dispatch_seq=row["dispatch_seq"],
    )


class ProgressReporter:
    """on_step callback: throttled progress writes that double as the cancellation check.

    It also stops the model when this worker is draining (warm shutdown, scale-down): the job
    then goes back to the queue at once instead of holding the shutdown for minutes.
    """

    def __init__(self, job_id: uuid.UUID, dispatch_seq: int, worker_id: str | None = None):
        self.job_id = job_id
        self.dispatch_seq = dispatch_seq
        self.worker_id = worker_id
        self._last = 0.0
        self.steps = 0
        self.draining = False

    def __call__(self, done: int, total: int) -> bool:
        self.steps += 1
        now = time.monotonic()
        if done < total and now - self._last < PROGRESS_INTERVAL_S:
            return True
        self._last = now
        with transaction() as session:
            row = session.execute(
                text(
                    "UPDATE jobs SET progress = :p, updated_at = now() "
                    "WHERE id = :id AND state = 'running' AND dispatch_seq = :seq RETURNING cancel_requested, "
                    "EXISTS (SELECT 1 FROM workers WHERE id = :w AND state = 'draining')"
                ),
                # Steps report up to 0.9: progress >= 0.95 means "frames staged, handed to the cpu
                # queue", which the reconciler and the reaper treat as a finalize hand-off. A job
                # lost after its last step but before staging (or while finishing inline) must
                # not look like one: it would get finalize resends for frames that do not exist.
                {
                    "p": round(0.9 * done / max(total, 1), 4),
                    "id": str(self.job_id),
                    "seq": self.dispatch_seq,
                    "w": self.worker_id,
                },
            ).first()
            if row is not None:
                job_progressed.send(None, session=session, job_id=self.job_id)  # progress webhooks
        # No row: the job left `running` under us (cancelled, or requeued by the reaper). Stop.
        if row is not None and row[1]:
            self.draining = True
            return False
        return row is not None and not row[0]


def _leave_running(job: ClaimedJob, worker_id: str, to: JobState, job_s: float | None = None, **values: Any) -> bool:
    """running -> `to` for the dispatch this worker claimed, the worker idle again, and (after the
    commit) a dispatch request: room opened. False: the job had left running already."""
    with transaction() as session:
        left = transition(
            session,
            job.id,
            JobState.running,
            to,
            worker_id=worker_id,
            guard={"dispatch_seq": job.dispatch_seq},
            **values,
        )
        worker_idle(session, worker_id, job.id, since_claim() if job_s is None else job_s)
        get_publisher().request_dispatch(session)
    return left is not None


def fail(job: ClaimedJob, worker_id: str, code: str, message: str, job_s: float | None = None) -> None:
    _leave_running(
        job, worker_id, JobState.failed, job_s, failure_code=code, failure_message=message[:2000], finished_at=NOW
    )


def requeue_for_drain(job: ClaimedJob, worker_id: str, steps: int) -> None:
    """This worker is shutting down: the job goes back to the queue now, its attempt not counted."""
    _leave_running(
        job,
        worker_id,
        JobState.queued,
        attempts=job.attempts - 1,
        progress=0.0,
        detail={"reason": "worker_draining", "at_step": steps},
    )
    log.info("worker draining: job requeued", extra={"job_id": str(job.id), "at_step": steps})


def stop_at_step(job: ClaimedJob, worker_id: str, steps: int) -> bool:
    """The user cancelled: the model stopped at a step boundary, nothing decoded. False: the job
    had left running already (requeued by the reaper), so nothing changed."""
    left = _leave_running(job, worker_id, JobState.cancelled, finished_at=NOW, detail={"at_step": steps})
    log.info("job stopped at a step boundary", extra={"job_id": str(job.id), "cancelled": left})
    return left


def hand_off(
    job: ClaimedJob, worker_id: str, key: str, frames: int, gen_s: float, load_s: float, claimed_at: float | None
) -> None:
    """The frames are staged at `key` (app/jobs/outputs.py): `generated` recorded, the job handed
    to the cpu queue.

    Progress 0.95 marks the hand-off: the reconciler and the reaper resend the finalize task for
    a job lost after it (steps report at most 0.9, see ProgressReporter)."""
    with transaction() as session:
        session.execute(
            text(
                "UPDATE jobs SET progress = 0.95, updated_at = now() WHERE id = :id AND state = 'running' AND dispatch_seq = :seq"
            ),
            {"id": str(job.id), "seq": job.dispatch_seq},
        )
        record_event(
            session,
            job.id,
            JobState.running,
            worker_id=worker_id,
            detail={"step": "generated", "generate_s": round(gen_s, 3), "model_load_s": round(load_s, 3)},
        )
        worker_idle(session, worker_id, job.id, since_claim(claimed_at))
        get_publisher().send(
            "dreamq.finalize",
            [str(job.id), job.dispatch_seq, key],
            queue=CPU_QUEUE,
            task_id=f"{job.id}-{job.dispatch_seq}-finalize",
            session=session,
        )
    log.info("generated", extra={"job_id": str(job.id), "generate_s": round(gen_s, 3), "frames": frames})


def complete(
    job_id: uuid.UUID | str,
    dispatch_seq: int,
    video_key: str,
    thumbnail_key: str,
    detail: dict[str, Any],
    *,
    worker_id: str | None = None,
    job_s: float | None = None,
) -> bool:
    """running -> succeeded for this dispatch_seq, with the outputs; the worker (if named) idle.

    False when the job was cancelled or requeued meanwhile: the outputs belong to no finished
    job and are deleted."""
    with transaction() as session:
        left = transition(
            session,
            job_id,
            JobState.running,
            JobState.succeeded,
            worker_id=worker_id,
            guard={"dispatch_seq": dispatch_seq},
            video_key=video_key,
            thumbnail_key=thumbnail_key,
            progress=1.0,
            finished_at=NOW,
            detail=detail,
        )
        if worker_id is not None:
            worker_idle(session, worker_id, job_id, job_s)
    if left is None:
        log.info(
            "finalize lost the race; outputs discarded", extra={"job_id": str(job_id), "dispatch_seq": dispatch_seq}
        )
        discard_outputs(video_key, thumbnail_key)
    get_publisher().request_dispatch()
    return left is not None
