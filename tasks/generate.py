"""The GPU task: claim the job, run the model with per-step progress, hand the frames on.

The GPU task only runs the model. Encoding and upload run on the `cpu` queue (tasks/finalize.py)
so the GPU is free for the next job while the last one is being encoded; small clips are
finished here (_finish_inline). Either way, what follows the model (the job's tail: staging or
finishing, recording, the hand-off) runs on the worker's tail thread (tasks/job_tail.py) while
the task returns and the next job starts on the GPU.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from billiard.exceptions import SoftTimeLimitExceeded
from sqlalchemy import text

from app.config import get_settings
from app.db.models import JobState
from app.db.session import transaction
from app.jobs.lease import JobLease, lease_expired_where
from app.jobs.transitions import INCREMENT, NOW, transition
from app.logging_setup import bind, job_context
from app.observability.metrics import observe_wait
from app.webhooks.events import ProgressWebhooks
from app.storage import get_bytes, put_bytes
from tasks import job_tail
from tasks.celery_app import CPU_QUEUE, celery_app
from tasks.dispatch import request_dispatch
from workers.cache import CacheFull
from workers.environments import ModelEnvironmentError
from workers.repository import IntegrityError as ModelIntegrityError
from workers.staging import npy_bytes

log = logging.getLogger(__name__)

_settings = get_settings()
# How often progress is written to Postgres: often enough for a progress bar, rare enough that
# a 1,000-step job does not write 1,000 rows.
PROGRESS_INTERVAL_S = 0.25


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
    lease_sql, lease_params = lease_expired_where()
    with transaction() as session:
        left = transition(
            session, job_id, {JobState.dispatched, JobState.running}, JobState.running,
            worker_id=worker_id, guard={"dispatch_seq": dispatch_seq},
            # A running job is taken over only from a dead process: its own worker's (the child
            # died and Celery requeued the message) or one whose lease ran out. A message that
            # Redis redelivers while the job still runs elsewhere claims nothing.
            where=(f"state = 'dispatched' OR worker_id = :me OR {lease_sql}", {"me": worker_id, **lease_params}),
            attempts=INCREMENT, started_at=NOW, progress=0.0,
        )
        if left is None:
            log.info("message does not match the job's state; acknowledged without running",
                     extra={"job_id": job_id, "dispatch_seq": dispatch_seq})
            return None
        row = session.execute(_CLAIMED_SQL, {"id": job_id, "w": worker_id}).mappings().one()
        # Inside the task's job_context, which drops these at its end.
        bind(user_id=str(row["user_id"]), tier=row["tier"])
        if row["attempts"] > row["max_attempts"]:
            transition(
                session, job_id, JobState.running, JobState.failed, worker_id=worker_id,
                failure_code="max_attempts_exceeded",
                failure_message=f"the job was started {row['attempts'] - 1} times and its worker was lost each time",
                finished_at=NOW,
            )
            _worker_idle(session, worker_id, job_id)  # _CLAIMED_SQL marked it busy
            log.warning("job failed: worker lost on every attempt", extra={"job_id": job_id, "attempts": row["attempts"]})
            return None
        if left == JobState.running.value:
            log.warning("job redelivered after its worker was lost", extra={"job_id": job_id, "attempt": row["attempts"]})
    # After the commit: the wait from submission to this start, against the tier's W.
    observe_wait(row["tier"], float(row["wait_s"] or 0.0))
    return ClaimedJob(
        id=row["id"], user_id=row["user_id"], tier=row["tier"], kind=row["kind"], prompt=row["prompt"],
        params=row["params"], model=row["model"], version=row["version"], digest=row["digest"],
        upload_key=row["upload_key"], attempts=row["attempts"], dispatch_seq=row["dispatch_seq"],
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
        self.webhooks = ProgressWebhooks(job_id)  # `progress` events, throttled per job

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
                {"p": round(0.9 * done / max(total, 1), 4), "id": str(self.job_id), "seq": self.dispatch_seq,
                 "w": self.worker_id},
            ).first()
            if row is not None:
                self.webhooks.report(session)
        # No row: the job left `running` under us (cancelled, or requeued by the reaper). Stop.
        if row is not None and row[1]:
            self.draining = True
            return False
        return row is not None and not row[0]


def _fail(job: ClaimedJob, worker_id: str, code: str, message: str, job_s: float | None = None) -> None:
    with transaction() as session:
        transition(
            session, job.id, JobState.running, JobState.failed, worker_id=worker_id,
            guard={"dispatch_seq": job.dispatch_seq},
            failure_code=code, failure_message=message[:2000], finished_at=NOW,
        )
        _worker_idle(session, worker_id, job.id, job_s)
    request_dispatch()


def _requeue_for_drain(job: ClaimedJob, worker_id: str, steps: int) -> None:
    """This worker is shutting down: the job goes back to the queue now, its attempt not counted."""
    with transaction() as session:
        transition(
            session, job.id, JobState.running, JobState.queued, worker_id=worker_id,
            guard={"dispatch_seq": job.dispatch_seq}, attempts=job.attempts - 1, progress=0.0,
            detail={"reason": "worker_draining", "at_step": steps},
        )
        _worker_idle(session, worker_id, job.id)
    log.info("worker draining: job requeued", extra={"job_id": str(job.id), "at_step": steps})
    request_dispatch()


def _gpu_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "CUDA out of memory" in str(exc)


# When this process claimed its current job (time.monotonic()); see _worker_idle.
_job_started: float | None = None

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


def _worker_idle(session, worker_id: str, job_id: uuid.UUID | str, job_s: float | None = None) -> None:
    """The worker is done with `job_id` (idle unless it has moved on to another job already).
    job_s: the job's time on this worker; by default, since this process's last claim."""
    job_s = _since(_job_started) if job_s is None else job_s
    session.execute(_WORKER_IDLE_SQL, {"w": worker_id, "job": str(job_id), "s": job_s})


def staging_key(job_id: uuid.UUID, dispatch_seq: int) -> str:
    return f"staging/{job_id}/{dispatch_seq}/frames.npy"


def run_claimed(job: ClaimedJob, worker_id: str) -> None:
    from app.media import decode_video
    from tasks.signals import report_loaded
    from workers.runtime import get_runtime

    settings = get_settings()
    runtime = get_runtime()
    params = job.params
    loads_before = runtime.loads
    try:
        with runtime.using(job.model, job.version, job.digest) as loaded:
            if runtime.loads != loads_before:
                report_loaded()  # the dispatcher routes this version's next jobs here
            input_video = None
            if job.kind == "modify_video":
                data = get_bytes(settings.media_bucket, job.upload_key)
                input_video = decode_video(data, width=params["width"], height=params["height"],
                                           num_frames=params["num_frames"])
            reporter = ProgressReporter(job.id, job.dispatch_seq, worker_id)
            started = time.perf_counter()
            try:
                frames = loaded.model.generate(
                    job.prompt, width=params["width"], height=params["height"], num_frames=params["num_frames"],
                    seed=params["seed"], input_video=input_video, on_step=reporter,
                )
            except loaded.cancelled_exc:
                if reporter.draining:
                    _requeue_for_drain(job, worker_id, reporter.steps)
                    return
                with transaction() as session:
                    left = transition(
                        session, job.id, JobState.running, JobState.cancelled, worker_id=worker_id,
                        guard={"dispatch_seq": job.dispatch_seq}, finished_at=NOW,
                        detail={"at_step": reporter.steps},
                    )
                    _worker_idle(session, worker_id, job.id)
                log.info("job stopped at a step boundary", extra={"job_id": str(job.id), "cancelled": bool(left)})
                request_dispatch()
                return
    except ModelIntegrityError as exc:
        _fail(job, worker_id, "model_integrity", str(exc))
        return
    except ModelEnvironmentError as exc:
        # The version needs packages this worker cannot provide: fail the job, keep serving.
        _fail(job, worker_id, "model_environment", str(exc))
        return
    except CacheFull as exc:
        # Every cached version is in use by this host's workers: the job fails with the reason.
        _fail(job, worker_id, "model_cache_full", str(exc))
        return
    gen_s = time.perf_counter() - started
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    job_tail.run(functools.partial(_tail, job, worker_id, frames, gen_s, loaded.load_s, _job_started))


def _tail(job: ClaimedJob, worker_id: str, frames: np.ndarray, gen_s: float, load_s: float,
          claimed_at: float | None) -> None:
    """Everything after the model, on the tail thread (tasks/job_tail.py), under the job's own
    lease: if this process dies here, the lease runs out and the reaper requeues the job.

    The job time reported for the dispatcher's queue depth runs from this job's claim to the end
    of its tail, as when the tail ran in line: with the next job overlapping it that overstates
    the worker's time per job, which errs towards shallower queues (the safe side)."""
    with job_context(job_id=str(job.id), user_id=str(job.user_id), tier=job.tier), JobLease(job.id, job.dispatch_seq):
        try:
            if frames.nbytes <= get_settings().inline_finalize_max_bytes:
                _finish_inline(job, worker_id, frames, gen_s, load_s, claimed_at)
            else:
                _stage_for_finalize(job, worker_id, frames, gen_s, load_s, claimed_at)
        except Exception as exc:  # as when it ran inside the task: the job fails with the reason
            log.exception("job failed after its model ran")
            _fail(job, worker_id, "model_error", f"{type(exc).__name__}: {exc}", _since(claimed_at))


def _since(claimed_at: float | None) -> float | None:
    return None if claimed_at is None else time.monotonic() - claimed_at


def _stage_for_finalize(job: ClaimedJob, worker_id: str, frames: np.ndarray, gen_s: float, load_s: float,
                        claimed_at: float | None) -> None:
    """Frames to object storage, `generated` recorded, the job handed to the cpu queue."""
    key = staging_key(job.id, job.dispatch_seq)
    put_bytes(get_settings().media_bucket, key, npy_bytes(frames))
    with transaction() as session:
        session.execute(
            text(
                "UPDATE jobs SET progress = 0.95, updated_at = now() WHERE id = :id AND state = 'running' AND dispatch_seq = :seq"
            ),
            {"id": str(job.id), "seq": job.dispatch_seq},
        )
        session.execute(
            text(
                "INSERT INTO job_events (job_id, from_state, to_state, worker_id, detail) "
                "VALUES (:id, 'running', 'running', :w, CAST(:d AS jsonb))"
            ),
            {"id": str(job.id), "w": worker_id,
             "d": f'{{"step": "generated", "generate_s": {gen_s:.3f}, "model_load_s": {load_s:.3f}}}'},
        )
        _worker_idle(session, worker_id, job.id, _since(claimed_at))
    celery_app.send_task(
        "dreamq.finalize", args=[str(job.id), job.dispatch_seq, key], queue=CPU_QUEUE,
        task_id=f"{job.id}-{job.dispatch_seq}-finalize",
    )
    log.info("generated", extra={"job_id": str(job.id), "generate_s": round(gen_s, 3), "frames": int(frames.shape[0])})


def _finish_inline(job: ClaimedJob, worker_id: str, frames: np.ndarray, gen_s: float, load_s: float,
                   claimed_at: float | None) -> None:
    """A small output: encode, upload and complete here, in one transaction with going idle.

    The same compare-and-set as the finalize task (running -> succeeded for this dispatch_seq),
    under the same lease (held by the caller), so a job cancelled or requeued meanwhile is not
    completed and its outputs are deleted.
    """
    from tasks.finalize import discard_outputs, encode_outputs

    started = time.perf_counter()
    video_key, thumb_key, video_bytes = encode_outputs(str(job.id), job.dispatch_seq, frames, int(job.params["fps"]))
    encode_s = time.perf_counter() - started
    with transaction() as session:
        left = transition(
            session, job.id, JobState.running, JobState.succeeded, worker_id=worker_id,
            guard={"dispatch_seq": job.dispatch_seq}, video_key=video_key, thumbnail_key=thumb_key,
            progress=1.0, finished_at=NOW,
            detail={"generate_s": round(gen_s, 3), "model_load_s": round(load_s, 3), "encode_s": round(encode_s, 3),
                    "video_bytes": video_bytes, "finalized": "inline"},
        )
        _worker_idle(session, worker_id, job.id, _since(claimed_at))
    if left is None:
        log.info("finalize lost the race; outputs discarded", extra={"job_id": str(job.id), "dispatch_seq": job.dispatch_seq})
        discard_outputs(video_key, thumb_key)
    request_dispatch()
    log.info("generated and finalized", extra={"job_id": str(job.id), "generate_s": round(gen_s, 3),
                                               "encode_s": round(encode_s, 3), "succeeded": left is not None})


@celery_app.task(
    name="dreamq.generate", bind=True, ignore_result=True, acks_late=True, reject_on_worker_lost=True,
    soft_time_limit=_settings.job_soft_time_limit_s, time_limit=_settings.job_hard_time_limit_s,
)
def generate(self, job_id: str, dispatch_seq: int) -> None:
    global _job_started
    worker_id = self.request.hostname or "unknown"
    _job_started = time.monotonic()
    with job_context(job_id=job_id):
        job = claim(job_id, dispatch_seq, worker_id)
        if job is None:
            return
        # A slot under the dispatch limit just freed up (dispatched -> running).
        request_dispatch()
        with job_context(job_id=job_id, user_id=str(job.user_id), tier=job.tier), JobLease(job.id, job.dispatch_seq):
            try:
                run_claimed(job, worker_id)
            except SoftTimeLimitExceeded:
                _fail(job, worker_id, "timeout", f"the job exceeded its time limit of {_settings.job_soft_time_limit_s} s")
            except Exception as exc:  # a crash in model code fails this job; the worker keeps serving
                if _gpu_out_of_memory(exc):
                    # Free what the failed job held so the next one starts from a clean device;
                    # the loaded models stay (they fit before this job).
                    import gc

                    import torch

                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    log.error("job ran out of GPU memory", extra={"error": str(exc)[:500]})
                    _fail(job, worker_id, "gpu_out_of_memory", f"{type(exc).__name__}: {exc}")
                    return
                log.exception("job failed in model code")
                _fail(job, worker_id, "model_error", f"{type(exc).__name__}: {exc}")
