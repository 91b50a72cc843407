"""CPU task: encode the frames to H.264 MP4 and a JPEG thumbnail, upload both, finish the job.

Small outputs skip this task: the GPU worker encodes and completes them itself
(tasks/generate.py, DREAMQ_INLINE_FINALIZE_BYTES), through the same encode_outputs.
"""

from __future__ import annotations

import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from sqlalchemy import text

from app.config import get_settings
from app.db.models import JobState
from app.db.session import transaction
from app.jobs.lease import JobLease
from app.jobs.transitions import NOW, transition
from app.logging_setup import bind, job_context
from app.media import encode_mp4, thumbnail_jpeg
from app.storage import get_bytes, put_bytes, s3_client
from tasks.celery_app import celery_app
from tasks.dispatch import request_dispatch

log = logging.getLogger(__name__)


def output_keys(job_id: str, dispatch_seq: int) -> tuple[str, str]:
    # Per dispatch: a late finalize of an earlier run can then never overwrite or delete the
    # outputs of the run that actually completed the job.
    return f"outputs/{job_id}/{dispatch_seq}/video.mp4", f"outputs/{job_id}/{dispatch_seq}/thumbnail.jpg"


def encode_outputs(job_id: str, dispatch_seq: int, frames: np.ndarray, fps: int) -> tuple[str, str, int]:
    """Encode the MP4 and the thumbnail and upload both; returns their keys and the video's size.

    Uploads are idempotent (same key, same bytes), so a retried finalize is harmless.
    """
    settings = get_settings()
    video_key, thumb_key = output_keys(job_id, dispatch_seq)
    # The thumbnail uploads while the video encodes: one upload's latency instead of two.
    thumb = _uploads().submit(put_bytes, settings.media_bucket, thumb_key, thumbnail_jpeg(frames), "image/jpeg")
    try:
        video = encode_mp4(frames, int(fps))
        put_bytes(settings.media_bucket, video_key, video, "video/mp4")
    finally:
        thumb.result()
    return video_key, thumb_key, len(video)


_uploader: tuple[int, ThreadPoolExecutor] | None = None


def _uploads() -> ThreadPoolExecutor:
    # Per process: a prefork child must not use a pool (and its thread) created before the fork.
    global _uploader
    if _uploader is None or _uploader[0] != os.getpid():
        _uploader = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="dreamq-upload"))
    return _uploader[1]


def discard_outputs(video_key: str, thumb_key: str) -> None:
    """Outputs of a run that did not complete its job (cancelled or requeued meanwhile)."""
    s3_client().delete_objects(
        Bucket=get_settings().media_bucket,
        Delete={"Objects": [{"Key": video_key}, {"Key": thumb_key}], "Quiet": True},
    )


@celery_app.task(name="dreamq.finalize", bind=True, ignore_result=True, acks_late=True, reject_on_worker_lost=True,
                 autoretry_for=(OSError,), retry_backoff=2, retry_backoff_max=60, max_retries=8)
def finalize(self, job_id: str, dispatch_seq: int, staging_key: str) -> None:
    settings = get_settings()
    # Renew the job's lease while encoding: the reaper leaves a job alone while someone works on it.
    with job_context(job_id=job_id), JobLease(job_id, dispatch_seq):
        started = time.perf_counter()
        with transaction() as session:
            fps, user_id, tier = session.execute(
                text("SELECT params->>'fps', user_id, tier FROM jobs WHERE id = :id"), {"id": job_id}).one()
        bind(user_id=str(user_id), tier=tier)  # dropped with the job_context above
        frames = np.load(io.BytesIO(get_bytes(settings.media_bucket, staging_key)), allow_pickle=False)
        video_key, thumb_key, video_bytes = encode_outputs(job_id, dispatch_seq, frames, int(fps))
        with transaction() as session:
            left = transition(
                session, job_id, JobState.running, JobState.succeeded, guard={"dispatch_seq": dispatch_seq},
                video_key=video_key, thumbnail_key=thumb_key, progress=1.0, finished_at=NOW,
                detail={"encode_s": round(time.perf_counter() - started, 3), "video_bytes": video_bytes},
            )
        if left is None:
            # Cancelled or requeued while encoding: the outputs belong to no finished job.
            log.info("finalize lost the race; outputs discarded", extra={"dispatch_seq": dispatch_seq})
            discard_outputs(video_key, thumb_key)
        s3_client().delete_object(Bucket=settings.media_bucket, Key=staging_key)
        request_dispatch()
        log.info("finalized", extra={"succeeded": left is not None, "encode_s": round(time.perf_counter() - started, 3)})
