"""CPU task: encode the frames to H.264 MP4 and a JPEG thumbnail, upload both, finish the job.

Small outputs skip this task: the GPU worker encodes and completes them itself
(workers/executor.py, DREAMQ_INLINE_FINALIZE_BYTES), through the same encode_outputs
(app/jobs/outputs.py) and the same complete() (app/jobs/execution.py).
"""

from __future__ import annotations

import io
import logging
import time

import numpy as np
from sqlalchemy import text

from app.core.config import get_settings
from app.core.logging_setup import bind, job_context
from app.core.storage import get_bytes, s3_client
from app.db.session import transaction
from app.jobs.execution import complete
from app.jobs.lease import JobLease
from app.jobs.outputs import encode_outputs
from tasks.celery_app import celery_app

log = logging.getLogger(__name__)


@celery_app.task(
    name="dreamq.finalize",
    bind=True,
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(OSError,),
    retry_backoff=2,
    retry_backoff_max=60,
    max_retries=8,
)
def finalize(self, job_id: str, dispatch_seq: int, staging_key: str) -> None:
    settings = get_settings()
    # Renew the job's lease while encoding: the reaper leaves a job alone while someone works on it.
    with job_context(job_id=job_id), JobLease(job_id, dispatch_seq):
        started = time.perf_counter()
        with transaction() as session:
            fps, user_id, tier = session.execute(
                text("SELECT params->>'fps', user_id, tier FROM jobs WHERE id = :id"), {"id": job_id}
            ).one()
        bind(user_id=str(user_id), tier=tier)  # dropped with the job_context above
        frames = np.load(io.BytesIO(get_bytes(settings.media_bucket, staging_key)), allow_pickle=False)
        video_key, thumb_key, video_bytes = encode_outputs(job_id, dispatch_seq, frames, int(fps))
        # Cancelled or requeued while encoding: complete() deletes the outputs instead.
        succeeded = complete(
            job_id,
            dispatch_seq,
            video_key,
            thumb_key,
            {"encode_s": round(time.perf_counter() - started, 3), "video_bytes": video_bytes},
        )
        s3_client().delete_object(Bucket=settings.media_bucket, Key=staging_key)
        log.info("finalized", extra={"succeeded": succeeded, "encode_s": round(time.perf_counter() - started, 3)})
