"""Running a claimed job on this GPU worker: the model between the job's moves, then its tail.

The moves themselves (claim, progress, cancel at a step, drain-requeue, complete, fail) are
app/jobs/execution.py. Encoding and upload run on the `cpu` queue (tasks/finalize.py) so the GPU
is free for the next job while the last one is being encoded; small clips are finished here
(_finish_inline). Either way, what follows the model (the job's tail: staging or finishing,
recording, the hand-off) runs on the worker's tail thread (workers/job_tail.py) while the task
returns and the next job starts on the GPU.
"""

from __future__ import annotations

import functools
import logging
import time

import numpy as np

import workers.runtime
from app.core.config import get_settings
from app.core.logging_setup import job_context
from app.core.media import decode_video
from app.core.storage import get_bytes, put_bytes
from app.jobs import execution
from app.jobs.lease import JobLease
from app.jobs.outputs import encode_outputs, staging_key
from workers import job_tail
from workers import phases as job_phases
from workers.cache import CacheFull
from workers.environments import ModelEnvironmentError
from workers.lifecycle import report_loaded
from workers.repository import IntegrityError as ModelIntegrityError
from workers.staging import npy_bytes

log = logging.getLogger(__name__)


def _gpu_out_of_memory(exc: BaseException) -> bool:
    import torch  # only once a job failed: the task module itself must not need torch

    return isinstance(exc, torch.OutOfMemoryError) or "CUDA out of memory" in str(exc)


def run_claimed(job: execution.ClaimedJob, worker_id: str) -> None:
    settings = get_settings()
    runtime = workers.runtime.get_runtime()
    params = job.params
    loads_before = runtime.loads
    # Per-phase times for bench/gpu_busy.py; a no-op unless DREAMQ_JOB_PHASES_FILE is set.
    timings = job_phases.for_job(job.id, execution.claimed_at())
    timings.mark("run")
    try:
        with runtime.using(job.model, job.version, job.digest) as loaded:
            if runtime.loads != loads_before:
                report_loaded()  # the dispatcher routes this version's next jobs here
            input_video = None
            if job.kind == "modify_video":
                data = get_bytes(settings.media_bucket, job.upload_key)  # type: ignore[arg-type]  # a modify_video job has an upload
                input_video = decode_video(
                    data, width=params["width"], height=params["height"], num_frames=params["num_frames"]
                )
            reporter = execution.ProgressReporter(job.id, job.dispatch_seq, worker_id)
            started = time.perf_counter()
            try:
                with timings.model(runtime.device):
                    frames = loaded.model.generate(
                        job.prompt,
                        width=params["width"],
                        height=params["height"],
                        num_frames=params["num_frames"],
                        seed=params["seed"],
                        input_video=input_video,
                        on_step=timings.timed_calls("progress", reporter),
                    )
                    gen_s = time.perf_counter() - started
            except loaded.cancelled_exc:
                if reporter.draining:
                    execution.requeue_for_drain(job, worker_id, reporter.steps)
                else:
                    execution.stop_at_step(job, worker_id, reporter.steps)
                return
    except ModelIntegrityError as exc:
        execution.fail(job, worker_id, "model_integrity", str(exc))
        return
    except ModelEnvironmentError as exc:
        # The version needs packages this worker cannot provide: fail the job, keep serving.
        execution.fail(job, worker_id, "model_environment", str(exc))
        return
    except CacheFull as exc:
        # Every cached version is in use by this host's workers: the job fails with the reason.
        execution.fail(job, worker_id, "model_cache_full", str(exc))
        return
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    timings.mark("tail_call")
    job_tail.run(
        functools.partial(_tail, job, worker_id, frames, gen_s, loaded.load_s, execution.claimed_at(), timings)
    )
    timings.mark("tail_returned")
    timings.write("loop")


def _tail(
    job: execution.ClaimedJob,
    worker_id: str,
    frames: np.ndarray,
    gen_s: float,
    load_s: float,
    claimed_at: float | None,
    timings: job_phases.Timings = job_phases.OFF,
) -> None:
    """Everything after the model, on the tail thread (workers/job_tail.py), under the job's own
    lease: if this process dies here, the lease runs out and the reaper requeues the job.

    The job time reported for the dispatcher's queue depth runs from this job's claim to the end
    of its tail, as when the tail ran in line: with the next job overlapping it that overstates
    the worker's time per job, which errs towards shallower queues (the safe side)."""
    timings.mark("tail_start")
    with job_context(job_id=str(job.id), user_id=str(job.user_id), tier=job.tier), JobLease(job.id, job.dispatch_seq):
        try:
            if frames.nbytes <= get_settings().inline_finalize_max_bytes:
                _finish_inline(job, worker_id, frames, gen_s, load_s, claimed_at, timings)
            else:
                key = staging_key(job.id, job.dispatch_seq)
                with timings.timed("staging"):
                    staged = npy_bytes(frames)
                with timings.timed("upload"):
                    put_bytes(get_settings().media_bucket, key, staged)  # type: ignore[arg-type]  # boto3 takes a bytearray; no copy of a large array
                del staged  # not held through the hand-off
                with timings.timed("hand_off"):
                    execution.hand_off(job, worker_id, key, int(frames.shape[0]), gen_s, load_s, claimed_at)
        except Exception as exc:  # as when it ran inside the task: the job fails with the reason
            log.exception("job failed after its model ran")
            execution.fail(
                job, worker_id, "model_error", f"{type(exc).__name__}: {exc}", execution.since_claim(claimed_at)
            )
    timings.mark("tail_end")
    timings.write("tail")


def _finish_inline(
    job: execution.ClaimedJob,
    worker_id: str,
    frames: np.ndarray,
    gen_s: float,
    load_s: float,
    claimed_at: float | None,
    timings: job_phases.Timings = job_phases.OFF,
) -> None:
    """A small output: encode, upload and complete here, in one transaction with going idle,
    under the job's lease (held by the caller), through the finalize task's completion."""
    started = time.perf_counter()
    with timings.timed("encode"):  # the MP4, the thumbnail and their uploads
        video_key, thumb_key, video_bytes = encode_outputs(
            str(job.id), job.dispatch_seq, frames, int(job.params["fps"])
        )
    encode_s = time.perf_counter() - started
    with timings.timed("complete"):
        succeeded = execution.complete(
            job.id,
            job.dispatch_seq,
            video_key,
            thumb_key,
            {
                "generate_s": round(gen_s, 3),
                "model_load_s": round(load_s, 3),
                "encode_s": round(encode_s, 3),
                "video_bytes": video_bytes,
                "finalized": "inline",
            },
            worker_id=worker_id,
            job_s=execution.since_claim(claimed_at),
        )
    log.info(
        "generated and finalized",
        extra={
            "job_id": str(job.id),
            "generate_s": round(gen_s, 3),
            "encode_s": round(encode_s, 3),
            "succeeded": succeeded,
        },
    )


def run(job: execution.ClaimedJob, worker_id: str, *, passthrough: tuple[type[BaseException], ...] = ()) -> None:
    """Run a claimed job on this worker (the caller holds its lease): the model, then the tail on
    its own thread. A crash in model code fails this job; the worker keeps serving. Exceptions in
    `passthrough` (the task's soft time limit) are the caller's to handle."""
    try:
        run_claimed(job, worker_id)
    except passthrough:
        raise
    except Exception as exc:
        if _gpu_out_of_memory(exc):
            # Free what the failed job held so the next one starts from a clean device;
            # the loaded models stay (they fit before this job).
            import gc

            import torch

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.error("job ran out of GPU memory", extra={"error": str(exc)[:500]})
            execution.fail(job, worker_id, "gpu_out_of_memory", f"{type(exc).__name__}: {exc}")
            return
        log.exception("job failed in model code")
        execution.fail(job, worker_id, "model_error", f"{type(exc).__name__}: {exc}")
