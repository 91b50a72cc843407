"""The job object as clients see it (schema: app/api/schemas.py `Job`)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.core.storage import presign_get
from app.db.models import Job, Model, ModelVersion, Tier


def _seconds(start: dt.datetime | None, end: dt.datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)


def job_view(job: Job, model_name: str, version, slo_s: float, now: dt.datetime | None = None) -> dict[str, Any]:
    """`version`: anything with .number and .digest (a ModelVersion or a ResolvedVersion)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    waited_until = job.started_at or (job.finished_at if job.state in ("cancelled", "failed") else None) or now
    assets = None
    if job.state == "succeeded" and job.video_key:
        settings = get_settings()
        filename = f"dreamq-{job.id}.mp4"
        assets = {
            "video": presign_get(settings.media_bucket, job.video_key, filename=filename),
            "thumbnail": presign_get(settings.media_bucket, job.thumbnail_key) if job.thumbnail_key else None,
            "expires_at": (now + dt.timedelta(seconds=settings.presign_ttl_s)).isoformat(),
        }
    waited = (waited_until - job.created_at).total_seconds()
    return {
        "id": str(job.id),
        "object": "generation",
        "type": job.kind,
        "state": job.state,
        "tier": job.tier,
        "prompt": job.prompt,
        "model": {"name": model_name, "version": version.number, "digest": version.digest},
        "params": job.params,
        "upload_id": str(job.upload_id) if job.upload_id else None,
        "progress": round(job.progress, 4),
        "urgency": round(waited / slo_s, 4) if job.state == "queued" else None,
        "slo_s": slo_s,
        "attempts": job.attempts,
        "cancel_requested": job.cancel_requested,
        "timings": {
            "created_at": job.created_at.isoformat(),
            "dispatched_at": job.dispatched_at.isoformat() if job.dispatched_at else None,
            "started_at": job.started_at.isoformat() if job.started_at else None,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "wait_s": round(waited, 3),
            "run_s": _seconds(job.started_at, job.finished_at or (now if job.state == "running" else None)),
        },
        "assets": assets,
        "failure": {"code": job.failure_code, "message": job.failure_message or ""} if job.failure_code else None,
        "callback_url": job.callback_url,
        "webhook_events": job.webhook_events,
    }


def load_job_views(session: Session, jobs: list[Job]) -> list[dict[str, Any]]:
    """Views for several jobs with one query for their versions and tiers (no N+1)."""
    if not jobs:
        return []
    version_ids = {j.model_version_id for j in jobs}
    rows = session.execute(
        select(ModelVersion, Model.name)
        .join(Model, Model.id == ModelVersion.model_id)
        .where(ModelVersion.id.in_(version_ids))
    ).all()
    versions = {v.id: (v, name) for v, name in rows}
    slos = dict(session.execute(select(Tier.name, Tier.slo_s)).all())
    now = dt.datetime.now(dt.timezone.utc)
    out = []
    for job in jobs:
        version, name = versions[job.model_version_id]
        out.append(job_view(job, name, version, slos.get(job.tier, 1.0), now))
    return out


def encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), str(job.id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, uuid.UUID]:
    padded = cursor + "=" * (-len(cursor) % 4)
    created, job_id = json.loads(base64.urlsafe_b64decode(padded.encode()))
    return dt.datetime.fromisoformat(created), uuid.UUID(job_id)
