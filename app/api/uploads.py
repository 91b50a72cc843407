"""/v1/uploads: input videos for modify-video jobs.

The body is the video itself (Content-Type video/mp4, video/webm, ...) or a multipart form with a
`file` part. Size is capped before reading (413), the type is checked (415), and the bytes are
decoded end to end with PyAV before anything is stored: a file that only claims to be a video is
refused (415) and leaves nothing behind.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid

from flask import Blueprint, request

from app.api import schemas
from app.api.routing import Context, endpoint
from app.core.config import get_settings
from app.core.errors import PayloadTooLarge, Unprocessable, UnsupportedMediaType
from app.core.media import ACCEPTED_CONTENT_TYPES, InvalidMedia, VideoInfo, probe_video
from app.core.storage import put_bytes
from app.db.models import Tier, Upload

bp = Blueprint("uploads", __name__, url_prefix="/v1")


def _read_video() -> tuple[bytes, str]:
    settings = get_settings()
    if request.content_length is not None and request.content_length > settings.max_upload_bytes:
        raise PayloadTooLarge(
            f"upload is larger than {settings.max_upload_bytes} bytes",
            fields=[{"field": "file", "reason": f"at most {settings.max_upload_bytes} bytes"}],
        )
    if request.mimetype == "multipart/form-data":
        part = request.files.get("file")
        if part is None:
            raise Unprocessable(
                "multipart upload needs a 'file' part", fields=[{"field": "file", "reason": "field required"}]
            )
        content_type = part.mimetype or "application/octet-stream"
        data = part.read(settings.max_upload_bytes + 1)
    else:
        content_type = request.mimetype
        data = request.get_data(cache=False)
    if len(data) > settings.max_upload_bytes:
        raise PayloadTooLarge(
            f"upload is larger than {settings.max_upload_bytes} bytes",
            fields=[{"field": "file", "reason": f"at most {settings.max_upload_bytes} bytes"}],
        )
    if content_type not in ACCEPTED_CONTENT_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {content_type or 'none'} is not an accepted video type ({', '.join(sorted(ACCEPTED_CONTENT_TYPES))})",
            fields=[{"field": "Content-Type", "reason": "must be a video type"}],
        )
    if not data:
        raise Unprocessable("upload is empty", fields=[{"field": "file", "reason": "empty"}])
    return data, content_type


@endpoint(
    bp,
    "/uploads",
    methods=["POST"],
    auth="user",
    response=schemas.Upload,
    status=201,
    content_types=sorted(ACCEPTED_CONTENT_TYPES) + ["multipart/form-data"],
    summary="Upload an input video for modify-video (checked with PyAV)",
    errors=[401, 413, 415, 422],
)
def create_upload(ctx: Context):
    data, content_type = _read_video()
    upload, _ = store_upload(ctx.session, ctx.user, data, content_type)
    return upload_view(upload), 201, {"Location": f"/v1/uploads/{upload.id}"}


# FFmpeg's container names -> the type we record, for bytes that came without a usable one.
_FORMAT_TYPES = {
    "mov,mp4,m4a,3gp,3g2,mj2": "video/mp4",
    "matroska,webm": "video/webm",
    "avi": "video/x-msvideo",
    "mpegts": "video/mp2t",
}


def store_upload(session, principal, data: bytes, content_type: str | None) -> tuple[Upload, VideoInfo]:
    """Probe `data` end to end with PyAV, store it and its row; the same rules wherever the
    bytes come from (a request body here, a fetched media URL on /dream-machine/v1).

    `content_type` None: the type is taken from the container PyAV found."""
    settings = get_settings()
    if len(data) > settings.max_upload_bytes:
        raise PayloadTooLarge(
            f"upload is larger than {settings.max_upload_bytes} bytes",
            fields=[{"field": "file", "reason": f"at most {settings.max_upload_bytes} bytes"}],
        )
    try:
        info = probe_video(data, max_duration_s=settings.max_upload_duration_s)
    except InvalidMedia as exc:
        if "longer than" in str(exc):
            raise Unprocessable(str(exc), fields=[{"field": "file", "reason": str(exc)}]) from None
        raise UnsupportedMediaType(
            str(exc), code="invalid_media", fields=[{"field": "file", "reason": str(exc)}]
        ) from None
    content_type = content_type or _FORMAT_TYPES.get(info.format, "application/octet-stream")
    upload_id = uuid.uuid4()
    key = f"uploads/{principal.user_id}/{upload_id}/input"
    put_bytes(settings.media_bucket, key, data, content_type)
    retention = session.get(Tier, principal.tier).retention_days
    now = dt.datetime.now(dt.timezone.utc)
    upload = Upload(
        id=upload_id,
        user_id=principal.user_id,
        object_key=key,
        content_type=content_type,
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        duration_s=info.duration_s,
        width=info.width,
        height=info.height,
        frames=info.frames,
        created_at=now,
        expires_at=now + dt.timedelta(days=retention),
    )
    session.add(upload)
    session.flush()
    return upload, info


def upload_view(upload: Upload) -> dict:
    return {
        "id": str(upload.id),
        "object": "upload",
        "content_type": upload.content_type,
        "size_bytes": upload.size_bytes,
        "sha256": upload.sha256,
        "duration_s": upload.duration_s,
        "width": upload.width,
        "height": upload.height,
        "frames": upload.frames,
        "created_at": upload.created_at.isoformat(),
        "expires_at": upload.expires_at.isoformat(),
    }
