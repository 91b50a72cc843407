"""/dream-machine/v1: Luma's public Dream Machine API, on dreamq's jobs.

Luma's official clients work against dreamq by changing the base URL and the key:

    client = LumaAI(base_url="http://dreamq:18000/dream-machine/v1", auth_token=DREAMQ_KEY)

Same keys (Bearer), same jobs, scheduler, workers, limits and webhooks as /v1: a submission goes
through `app.jobs.submit.submit()`, a DELETE through the cancel path, a media URL through the rules of
uploads, a callback through the webhook machinery (signed, address-checked, retried).

Errors have the shape Luma's API gives, `{"detail": "<message>"}`, plus dreamq's own `error`
object (code, fields, request_id); the clients raise by status: 400 BadRequestError (a request
this server cannot honour: unknown model name, unsupported option, size beyond the model's
limits, a media URL refused), 401, 403, 404, 413 (media too large), 422
UnprocessableEntityError (the body has the wrong shape), 429 RateLimitError (Retry-After).

These routes are left out of /v1/openapi.json on purpose: the surface is Luma's, described by
Luma's own OpenAPI document (the one its clients are generated from); ours would only drift.
The admin routes for the model table (/v1/admin/dream-machine/models, app/api/admin.py) are
dreamq's own and are in it.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from flask import Blueprint, Response
from pydantic import ValidationError
from sqlalchemy import func, select, update
from werkzeug.exceptions import HTTPException

from app.api import schemas
from app.api.errors import error_response, pydantic_fields
from app.api.routing import Context, endpoint
from app.api.uploads import store_upload
from app.core.config import get_settings
from app.core.errors import ApiError, BadRequest, NotFound, Unprocessable
from app.core.logging_setup import bind
from app.core.storage import s3_client
from app.db.models import DreamMachineGeneration, Job
from app.db.session import after_commit
from app.dream_machine import generations, requests
from app.dream_machine.models import known_names, served_by
from app.fetch import FetchRefused, fetch
from app.jobs.cancel import request_cancel
from app.jobs.limits import month_usage
from app.jobs.submit import ResolvedVersion, resolve_version, submit

log = logging.getLogger(__name__)
bp = Blueprint("dream_machine", __name__, url_prefix="/dream-machine/v1")

# An unlimited tier's credit balance: the largest integer a JavaScript number holds exactly.
UNLIMITED_BALANCE = float(2**53 - 1)


@bp.errorhandler(ApiError)
def _luma_error(exc: ApiError):
    return error_response(exc, detail=exc.message)


@bp.errorhandler(HTTPException)
def _luma_http_error(exc: HTTPException):
    message = "request body is too large" if exc.code == 413 else (exc.description or exc.name)
    return _luma_error(ApiError(message, status=exc.code or 500, code=(exc.name or "error").lower().replace(" ", "_")))


def _bad(field: str, reason: str) -> BadRequest:
    return BadRequest(f"{field}: {reason}", fields=[{"field": field, "reason": reason}])


def _route(rule: str, **kwargs):
    return endpoint(bp, rule, auth="user", in_openapi=False, **kwargs)


@_route("/ping", methods=["GET"], summary="Check the API and the key")
def ping(ctx: Context):
    return {"message": "pong"}


@_route("/credits", methods=["GET"], summary="Your remaining quota this month, in jobs")
def credits(ctx: Context):
    tier = ctx.user.tier_row
    assert tier is not None  # loaded with the key
    used, renews = month_usage(ctx.session, ctx.user.user_id)
    quota = tier.monthly_quota
    balance = UNLIMITED_BALANCE if quota is None else float(max(quota - used, 0))
    # credit_balance is what the clients read; the rest says what the number means here.
    return {
        "credit_balance": balance,
        "unit": "jobs",
        "tier": tier.name,
        "monthly_quota": quota,
        "used_this_month": used,
        "renews_at": renews.isoformat(),
    }


# --- submissions ---------------------------------------------------------------------------------


def _accept(
    ctx: Context, body: requests.VideoCreate | requests.VideoModify
) -> tuple[str, ResolvedVersion, dict[str, Any]]:
    """The checks before any work: a model name the table knows, options the model can honour,
    a version with a pool. Returns the model as the client named it, the version
    (its manifest gives sizes and frame rates) and the job fields every submission has."""
    model = served_by(ctx.session, body.model)
    if model is None:
        names = ", ".join(known_names(ctx.session)) or "none yet"
        raise _bad("model", f"'{body.model}' is not a model this server serves (it serves: {names})")
    served = f"model '{body.model}' (dreamq model '{model}')"
    try:
        requests.unsupported_options(body, served)
    except requests.Unsupported as exc:
        raise _bad(exc.field, exc.reason) from None
    try:
        version, has_pool = resolve_version(ctx.session, model, None)
    except ApiError as exc:
        raise _bad("model", f"{served}: {exc.fields[0]['reason'] if exc.fields else exc.message}") from None
    if not has_pool:
        raise _bad("model", f"{served} has no GPU pool serving it")
    # The version pinned: the job runs on the one whose manifest sized it (a canary draw is made once).
    return (
        served,
        version,
        {
            "prompt": body.prompt,
            "model": version.model,
            "model_version": version.number,
            "callback_url": body.callback_url,
        },
    )


def _explain(exc: ApiError, served: str, asked: dict[str, str]) -> BadRequest:
    """A submit() refusal in the client's vocabulary: which of its options led to which value."""
    field = exc.fields[0]["field"] if exc.fields else "request"
    reason = exc.fields[0]["reason"] if exc.fields else exc.message
    if field in ("width", "height") and asked.get("size"):
        return _bad(asked["size_field"], f"{asked['size']}; {served} needs {field} {reason}")
    if field in ("num_frames", "fps") and asked.get("frames"):
        return _bad(asked["frames_field"], f"{asked['frames']}; {served} needs {field} {reason}")
    if field in ("width", "height", "num_frames", "fps"):
        return _bad("media", f"the input video gives {field} {reason.replace('(got', '(it has')} for {served}")
    return _bad(field, reason)


def _submit(
    ctx: Context,
    body: requests.VideoCreate | requests.VideoModify,
    fields: dict[str, Any],
    served: str,
    asked: dict[str, str],
):
    """submit() with the mapped fields, then the record of the client's own request."""
    try:
        create = schemas.GenerationCreate.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        found = pydantic_fields(exc)
        raise _bad(found[0]["field"], found[0]["reason"]) from None
    try:
        job, _ = submit(ctx.session, ctx.user, create)
    except Unprocessable as exc:  # the version's refusals, in the client's vocabulary; a 429 as it is
        raise _explain(exc, served, asked) from None
    bind(job_id=str(job.id))
    request = body.model_dump(mode="json", exclude_none=True)
    request.setdefault("generation_type", "video")
    row = DreamMachineGeneration(
        job_id=job.id,
        user_id=ctx.user.user_id,
        generation_type=request["generation_type"],
        model_name=body.model,
        request=request,
    )
    ctx.session.add(row)
    ctx.session.flush()
    return generations.render(ctx.session, [(job, row)])[0], 201


@_route("/generations/video", methods=["POST"], body=requests.VideoCreate, status=201, summary="Text to video")
def create_video(ctx: Context):
    body: requests.VideoCreate = ctx.body
    served, version, fields = _accept(ctx, body)
    asked: dict[str, str] = {}
    size = requests.size_for(version.manifest, body.resolution, body.aspect_ratio)
    if size is not None:
        fields["width"], fields["height"] = size
        what = " at ".join(v for v in (body.resolution, body.aspect_ratio) if v)
        asked.update(
            size=f"{what} is {size[0]}x{size[1]} pixels", size_field="resolution" if body.resolution else "aspect_ratio"
        )
    frames = requests.frames_for(version.manifest, body.duration)
    if frames is not None:
        fields["num_frames"], fields["fps"] = frames
        asked.update(frames=f"{body.duration} at {frames[1]} fps is {frames[0]} frames", frames_field="duration")
    return _submit(ctx, body, fields, served, asked)


@_route(
    "/generations",
    methods=["POST"],
    body=requests.VideoCreate,
    status=201,
    summary="Text to video (the path of older client versions)",
)
def create_generation(ctx: Context):
    return create_video.__wrapped__(ctx)


@_route(
    "/generations/video/modify",
    methods=["POST"],
    body=requests.VideoModify,
    status=201,
    summary="Modify a video fetched from media.url (mapped onto a modify-video job)",
)
def modify_video(ctx: Context):
    body: requests.VideoModify = ctx.body
    served, version, fields = _accept(ctx, body)
    try:
        fetched = fetch(ctx.session, body.media.url)
    except FetchRefused as exc:
        error = _bad("media.url", exc.reason)
        error.status = exc.status
        raise error from None
    try:
        upload, info = store_upload(ctx.session, ctx.user, fetched.data, fetched.content_type or None)
    except ApiError as exc:
        error = _bad("media.url", exc.message)
        error.status = 413 if exc.status == 413 else 400
        raise error from None
    try:
        # submit() takes the quota after the download: its lock (per user) is not held for a slow
        # media host.
        fields.update(type="modify_video", upload_id=upload.id, **requests.modify_params(version.manifest, info))
        return _submit(ctx, body, fields, served, {})
    except Exception:
        # Refused after the input was stored: its row rolls back, the object must go too (a
        # failure to delete it must not hide the refusal the client is owed).
        try:
            s3_client().delete_object(Bucket=get_settings().media_bucket, Key=upload.object_key)
        except Exception:
            log.warning("orphaned modify input not deleted", extra={"key": upload.object_key}, exc_info=True)
        raise


# Luma features dreamq has no model for: a clear 400 rather than a 404 the client would read as
# "no such generation" (or a 5xx it would retry).
_NOT_OFFERED = {
    "/generations/image": "image generation",
    "/generations/image/reframe": "image reframing",
    "/generations/video/reframe": "video reframing",
    "/generations/<generation_id>/upscale": "upscaling",
    "/generations/<generation_id>/audio": "adding audio",
}


def _not_offered(feature: str):
    def handler(ctx: Context, **_ids):
        raise _bad(
            "generation_type",
            f"{feature} is not offered by this server (dreamq serves video generations and modify-video)",
        )

    return handler


for _rule, _feature in _NOT_OFFERED.items():
    _handler = _not_offered(_feature)
    _handler.__name__ = "not_offered_" + _rule.strip("/").replace("/", "_").replace("<", "").replace(">", "")
    _route(_rule, methods=["POST"], summary=f"{_feature}: not offered")(_handler)


@_route("/generations/concepts/list", methods=["GET"], summary="Camera concepts: none here")
def list_concepts(ctx: Context):
    return []


# --- reading and deleting ---------------------------------------------------------------------


def _found(ctx: Context, generation_id: str, *, lock: bool = False):
    found = generations.find(ctx.session, ctx.user.user_id, generation_id, lock=lock)
    if found is None:
        raise NotFound("generation not found")
    bind(job_id=str(found[0].id))
    return found


@_route("/generations/<generation_id>", methods=["GET"], summary="One generation")
def get_generation(ctx: Context, generation_id: str):
    return generations.render(ctx.session, [_found(ctx, generation_id)])[0]


@_route("/generations", methods=["GET"], query=requests.ListQuery, summary="Your generations, newest first")
def list_generations(ctx: Context):
    q: requests.ListQuery = ctx.query
    rows = ctx.session.execute(
        select(Job, DreamMachineGeneration)
        .join(DreamMachineGeneration, DreamMachineGeneration.job_id == Job.id)
        .where(DreamMachineGeneration.user_id == ctx.user.user_id, DreamMachineGeneration.deleted_at.is_(None))
        .order_by(DreamMachineGeneration.created_at.desc(), DreamMachineGeneration.job_id.desc())
        .offset(q.offset)
        .limit(q.limit + 1)
    ).all()
    page = [(job, row) for job, row in rows[: q.limit]]
    return {
        "generations": generations.render(ctx.session, page),
        "count": len(page),
        "has_more": len(rows) > q.limit,
        "limit": q.limit,
        "offset": q.offset,
    }


@_route(
    "/generations/<generation_id>",
    methods=["DELETE"],
    status=204,
    summary="Delete a generation: cancel it if unfinished, delete its outputs; it is gone from this API",
)
def delete_generation(ctx: Context, generation_id: str):
    job, row = _found(ctx, generation_id, lock=True)
    request_cancel(ctx.session, job, by=ctx.user.key_prefix)
    keys = [k for k in (job.video_key, job.thumbnail_key) if k]
    if keys:
        # The job row stays (quotas, audit, /v1 shows it without assets, as after retention).
        ctx.session.execute(
            update(Job).where(Job.id == job.id).values(video_key=None, thumbnail_key=None, updated_at=func.now())
        )
        bucket = get_settings().media_bucket
        after_commit(
            ctx.session,
            lambda: s3_client().delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
            ),
        )
    row.deleted_at = dt.datetime.now(dt.timezone.utc)
    ctx.session.flush()
    return Response(status=204)
