"""The generation object Luma's clients parse, rendered from dreamq's own job object.

    {"id", "generation_type": "video", "state", "failure_reason", "created_at", "model",
     "request": <the request as the client sent it>, "assets": {"video", "image", "progress_video"}}

It is a translation of `job_view()` (app/jobs/views.py), so assets are the same pre-signed,
expiring URLs (re-read the generation for fresh ones) and nothing is computed twice. States:

    queued, dispatched -> queued      running -> dreaming      succeeded -> completed
    failed -> failed (failure_reason: the job's failure message)
    cancelled -> failed (failure_reason "cancelled"): Luma has no cancelled state
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import DreamMachineGeneration, Job
from app.jobs.views import load_job_views

STATES = {
    "queued": "queued",
    "dispatched": "queued",
    "running": "dreaming",
    "succeeded": "completed",
    "failed": "failed",
    "cancelled": "failed",
}
# Luma's generation_type of the object; the request keeps its own (video, modify_video).
OBJECT_TYPES = {"video": "video", "modify_video": "video"}


def generation_object(view: dict[str, Any], row: DreamMachineGeneration) -> dict[str, Any]:
    state = view["state"]
    failure_reason = None
    if state == "failed":
        failure = view.get("failure") or {}
        failure_reason = failure.get("message") or failure.get("code") or "failed"
    elif state == "cancelled":
        failure_reason = "cancelled"
    assets = None
    if state == "succeeded" and view.get("assets"):
        assets = {"video": view["assets"]["video"], "image": view["assets"]["thumbnail"], "progress_video": None}
    return {
        "id": view["id"],
        "generation_type": OBJECT_TYPES[row.generation_type],
        "state": STATES[state],
        "failure_reason": failure_reason,
        "created_at": view["timings"]["created_at"],
        "model": row.model_name,
        "request": row.request,
        "assets": assets,
    }


def render(session: Session, pairs: list[tuple[Job, DreamMachineGeneration]]) -> list[dict[str, Any]]:
    """Generation objects for (job, row) pairs, with one query for all their versions and tiers."""
    views = load_job_views(session, [job for job, _ in pairs])
    return [generation_object(view, row) for view, (_, row) in zip(views, pairs)]


def callback_payload(session: Session, job: Job) -> dict[str, Any] | None:
    """The body of a callback for a job made through /dream-machine/v1 (the generation object,
    as Luma posts it), or None for any other job."""
    row = session.get(DreamMachineGeneration, job.id)
    if row is None:
        return None
    return render(session, [(job, row)])[0]


def find(
    session: Session, user_id: uuid.UUID, generation_id: str, *, lock: bool = False
) -> tuple[Job, DreamMachineGeneration] | None:
    """The caller's live (not deleted) generation; another user's id is the same as a missing one."""
    try:
        parsed = uuid.UUID(generation_id)
    except ValueError:
        return None
    query = (
        select(Job, DreamMachineGeneration)
        .join(DreamMachineGeneration, DreamMachineGeneration.job_id == Job.id)
        .where(Job.id == parsed, DreamMachineGeneration.user_id == user_id, DreamMachineGeneration.deleted_at.is_(None))
    )
    if lock:
        query = query.with_for_update(of=Job)
    found = session.execute(query).first()
    return (found[0], found[1]) if found else None
