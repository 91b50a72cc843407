"""Accepting a job: resolve the exact model version, check parameters against it, insert.

The job records the version it resolved at submission (the prod alias, or a pinned number), so
a later promote or rollback changes what new jobs get, never what an accepted job runs.
"""

from __future__ import annotations

import datetime as dt
import secrets
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api.errors import field_error
from app.config import get_settings
from app.db.models import Job, JobEvent, JobKind, JobState, Model, ModelAlias, ModelVersion, Pool, Upload

PARAMS = ("width", "height", "num_frames", "fps")
FALLBACK_DEFAULTS = {"width": 128, "height": 128, "num_frames": 24, "fps": 12}


def resolve_version(session: Session, name: str, number: int | None) -> tuple[Model, ModelVersion]:
    model = session.scalar(select(Model).where(Model.name == name))
    if model is None:
        raise field_error("model", f"unknown model '{name}'")
    if number is not None:
        version = session.scalar(
            select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.number == number)
        )
        if version is None:
            raise field_error("model_version", f"model '{name}' has no version {number}")
        return model, version
    alias = session.get(ModelAlias, (model.id, "prod"))
    if alias is None:
        raise field_error("model", f"model '{name}' has no prod version yet")
    return model, session.get(ModelVersion, alias.version_id)


def check_params(manifest: dict[str, Any], requested: dict[str, int | None]) -> dict[str, int]:
    """Fill defaults from the version's manifest and enforce its limits, naming the field."""
    info = manifest.get("model", {})
    defaults = {**FALLBACK_DEFAULTS, **info.get("defaults", {})}
    limits = info.get("limits", {})
    params: dict[str, int] = {}
    for name in PARAMS:
        value = requested.get(name)
        value = int(defaults[name]) if value is None else value
        bound = limits.get(name, {})
        low, high = bound.get("min"), bound.get("max")
        if low is not None and value < low:
            raise field_error(name, f"must be at least {low} for this model (got {value})")
        if high is not None and value > high:
            raise field_error(name, f"must be at most {high} for this model (got {value})")
        multiple = bound.get("multiple_of")
        if multiple and value % multiple:
            raise field_error(name, f"must be a multiple of {multiple} (got {value})")
        params[name] = value
    seed = requested.get("seed")
    params["seed"] = secrets.randbelow(2**31) if seed is None else seed
    return params


def create_job(session: Session, principal, body, *, idempotency_key: str | None = None,
               request_hash: str | None = None) -> tuple[Job, Model, ModelVersion]:
    settings = get_settings()
    name = body.model or settings.default_model
    model, version = resolve_version(session, name, body.model_version)
    if session.scalar(select(Pool.id).where(Pool.model_id == model.id).limit(1)) is None:
        raise field_error("model", f"no pool serves model '{name}'")
    params = check_params(version.manifest, body.model_dump())

    upload_id = None
    if body.upload_id is not None:
        upload = session.get(Upload, body.upload_id)
        now = dt.datetime.now(dt.timezone.utc)
        # Another user's upload answers exactly like a missing one.
        if upload is None or upload.user_id != principal.user_id or upload.deleted_at is not None or upload.expires_at < now:
            raise field_error("upload_id", "no such upload (it may have expired)")
        upload_id = upload.id

    job = Job(
        id=uuid.uuid4(),
        user_id=principal.user_id,
        tier=principal.tier,
        kind=JobKind(body.type).value,
        state=JobState.queued.value,
        prompt=body.prompt,
        params=params,
        model_id=model.id,
        model_version_id=version.id,
        upload_id=upload_id,
        max_attempts=settings.max_attempts,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    session.add(job)
    session.add(JobEvent(job_id=job.id, from_state=None, to_state=JobState.queued.value,
                         detail={"model": name, "version": version.number}))
    session.flush()
    return job, model, version
