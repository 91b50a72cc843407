"""A job's outputs in object storage: staged frames, the MP4 and its thumbnail.

    staging/<job>/<dispatch_seq>/frames.npy      frames a GPU worker handed to the cpu queue
    outputs/<job>/<dispatch_seq>/video.mp4       the delivered video (H.264)
    outputs/<job>/<dispatch_seq>/thumbnail.jpg

Keys are per dispatch, so a late run of an earlier dispatch can never overwrite or delete the
outputs of the run that completed the job.
"""

from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from app.core.config import get_settings
from app.core.media import encode_mp4, thumbnail_jpeg
from app.core.storage import put_bytes, s3_client


def staging_key(job_id: uuid.UUID | str, dispatch_seq: int) -> str:
    return f"staging/{job_id}/{dispatch_seq}/frames.npy"


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
