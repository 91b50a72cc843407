"""/v1/generations: submit, read, list and cancel jobs."""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid

from flask import Blueprint, request, url_for
from sqlalchemy import and_, or_, select
from sqlalchemy.exc import IntegrityError

from app.admin.keys import hash_key
from app.api import schemas
from app.api.auth import PRINCIPAL_BY_KEY_SQL, PRINCIPAL_COLUMNS, bearer_token, principal_from_row
from app.api.routing import Context, Deferred, endpoint, parse_json_body
from app.core.config import get_settings
from app.core.errors import Conflict, NotFound, field_error
from app.core.logging_setup import bind
from app.db.models import Job, JobState
from app.db.session import driver_connection, transaction
from app.jobs.cancel import request_cancel
from app.jobs.submit import RESOLVE_SQL, resolve_params, submit, submit_on_connection
from app.jobs.views import decode_cursor, encode_cursor, job_view, load_job_views

bp = Blueprint("generations", __name__, url_prefix="/v1")

# `Prefer: wait=N` holds the request at most this long; a longer wait should poll or use a webhook.
MAX_PREFER_WAIT_S = 60
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait=(\d+(?:\.\d+)?)")


def _prefer_wait() -> float:
    match = _PREFER_WAIT.search(request.headers.get("Prefer", ""))
    return min(float(match.group(1)), MAX_PREFER_WAIT_S) if match else 0.0


def _job_for(ctx: Context, job_id: str, *, lock: bool = False) -> Job:
    """The caller's job; another tenant's id answers exactly like a missing one (404)."""
    try:
        parsed = uuid.UUID(job_id)
    except ValueError:
        raise NotFound("no such generation") from None
    query = select(Job).where(Job.id == parsed)
    if not ctx.user.is_admin:
        query = query.where(Job.user_id == ctx.user.user_id)
    if lock:
        query = query.with_for_update()
    job = ctx.session.scalar(query)
    if job is None:
        raise NotFound("no such generation")
    bind(job_id=str(job.id), user_id=str(job.user_id), tier=job.tier)  # the job's owner, for an admin too
    return job


def _wait_until_terminal(job_id: uuid.UUID, seconds: float) -> dict:
    """Poll the row until it is terminal or time is up; each read is its own short transaction."""
    deadline = time.monotonic() + seconds
    delay = 0.05
    while True:
        with transaction() as session:
            job = session.get(Job, job_id)
            assert job is not None  # the job this request created
            terminal = JobState(job.state).terminal
            if terminal or time.monotonic() >= deadline:
                return load_job_views(session, [job])[0]
        time.sleep(min(delay, max(deadline - time.monotonic(), 0.01)))
        delay = min(delay * 1.5, 0.5)


def _request_hash(body: schemas.GenerationCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# The caller's key (user, tier) and the model's candidate versions in one statement: no row for an
# unknown key; one row per candidate, or one with NULL model columns for an unknown model.
_KEY_AND_MODEL_SQL = f"SELECT * FROM ({PRINCIPAL_BY_KEY_SQL}) AS k LEFT JOIN ({RESOLVE_SQL}) AS r ON true"


def _create_generation_fast():
    """POST /v1/generations in its common case, without an ORM Session: no Idempotency-Key, no
    Prefer, a valid body without upload or callback. Anything else (errors in the body included)
    returns None before any side effect, and create_generation() answers it as it always did.

    The same checks, answers and order of refusals as create_generation(): the key (401/403),
    then app.jobs.submit.submit_on_connection(). Postgres is reached in two round trips instead
    of five (bench/intake.py): the key and the model in one statement, then the job and its
    event in one autocommit statement.
    """
    if "Idempotency-Key" in request.headers or "Prefer" in request.headers:
        return None
    token = bearer_token()  # a missing or malformed header: the same 401, before any work
    try:
        body: schemas.GenerationCreate = parse_json_body(schemas.GenerationCreate)
    except Exception:  # 4xx for the body: answered after the key check, as always, by the general path
        return None
    if body.upload_id is not None or body.callback_url is not None:
        return None
    name = body.model or get_settings().default_model
    with driver_connection() as conn:
        rows = conn.execute(
            _KEY_AND_MODEL_SQL, {"which": hash_key(token), **resolve_params(name, body.model_version)}
        ).fetchall()
        principal = principal_from_row(rows[0] if rows else None, "user")
        bind(user_id=str(principal.user_id), tier=principal.tier)
        tier = principal.tier_row
        candidates = [r[PRINCIPAL_COLUMNS:] for r in rows if r[PRINCIPAL_COLUMNS] is not None]
        job, version = submit_on_connection(conn, principal, body, name, candidates)
    bind(job_id=str(job.id))
    location = url_for("generations.get_generation", job_id=job.id)
    return job_view(job, version.model, version, tier.slo_s), 202, {"Location": location}


# The unique index on (user, Idempotency-Key) (app/db/models.py).
_IDEMPOTENCY_INDEX = "uq_jobs_user_idempotency"


def _replay(ctx: Context, key: str, digest: str | None):
    """The answer to a request whose key this user already used: its job (200), or 409 for
    another body; None when the key is new."""
    existing = ctx.session.scalar(select(Job).where(Job.user_id == ctx.user.user_id, Job.idempotency_key == key))
    if existing is None:
        return None
    if existing.request_hash != digest:
        raise Conflict("Idempotency-Key was already used with a different request body", code="idempotency_conflict")
    bind(job_id=str(existing.id))
    return (
        load_job_views(ctx.session, [existing])[0],
        200,
        {"Location": url_for("generations.get_generation", job_id=existing.id)},
    )


@endpoint(
    bp,
    "/generations",
    methods=["POST"],
    auth="user",
    body=schemas.GenerationCreate,
    response=schemas.Job,
    status=202,
    summary="Submit a text-to-video or modify-video job",
    errors=[400, 401, 403, 409, 415, 422, 429],
    also=[200],
    headers={
        "Idempotency-Key": (
            {"type": "string", "minLength": 1, "maxLength": 200},
            "Same key and body: the same job (200); same key, other body: 409",
        )
    },
    fast=_create_generation_fast,
)
def create_generation(ctx: Context):
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (1 <= len(key) <= 200):
        raise field_error("Idempotency-Key", "must be 1-200 characters")
    # Only a keyed request is ever compared with another, so only it pays for the digest.
    digest = _request_hash(ctx.body) if key else None
    if key:
        replay = _replay(ctx, key, digest)
        if replay is not None:
            return replay
    tier = ctx.user.tier_row
    assert tier is not None  # loaded with the key
    if key:
        # Another request with this key (a client's retry while its first attempt is still held,
        # by a stalled database say) may commit between the lookup above and this insert: the
        # unique index refuses this one, and the answer is that request's job, not a 500.
        try:
            with ctx.session.begin_nested():
                job, version = submit(ctx.session, ctx.user, ctx.body, idempotency_key=key, request_hash=digest)
        except IntegrityError as exc:
            replay = _replay(ctx, key, digest) if _IDEMPOTENCY_INDEX in str(exc.orig) else None
            if replay is None:
                raise
            return replay
    else:
        job, version = submit(ctx.session, ctx.user, ctx.body)
    bind(job_id=str(job.id))  # the access line of this request names the job it created
    location = url_for("generations.get_generation", job_id=job.id)
    wait = _prefer_wait()
    if wait:
        return Deferred(lambda: (_wait_until_terminal(job.id, wait), 202, {"Location": location}))
    return job_view(job, version.model, version, tier.slo_s), 202, {"Location": location}


@endpoint(
    bp,
    "/generations/<job_id>",
    methods=["GET"],
    auth="user",
    response=schemas.Job,
    summary="Read a job (Prefer: wait=N holds until it is done or N seconds pass)",
    errors=[401, 404],
)
def get_generation(ctx: Context, job_id: str):
    job = _job_for(ctx, job_id)
    wait = _prefer_wait()
    if wait and not JobState(job.state).terminal:
        return Deferred(lambda: _wait_until_terminal(job.id, wait))
    return load_job_views(ctx.session, [job])[0]


@endpoint(
    bp,
    "/generations",
    methods=["GET"],
    auth="user",
    query=schemas.GenerationListQuery,
    response=schemas.JobList,
    summary="List your jobs, newest first (cursor pagination, optional state filter)",
    errors=[401, 422],
)
def list_generations(ctx: Context):
    q: schemas.GenerationListQuery = ctx.query
    query = select(Job).where(Job.user_id == ctx.user.user_id)
    if q.state:
        query = query.where(Job.state == q.state)
    if q.cursor:
        try:
            created, last_id = decode_cursor(q.cursor)
        except (ValueError, TypeError):
            raise field_error("cursor", "is not a cursor returned by this API") from None
        query = query.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < last_id)))
    jobs = list(ctx.session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(q.limit + 1)))
    more = len(jobs) > q.limit
    jobs = jobs[: q.limit]
    return {
        "object": "list",
        "data": load_job_views(ctx.session, jobs),
        "next_cursor": encode_cursor(jobs[-1]) if more else None,
    }


@endpoint(
    bp,
    "/generations/<job_id>/cancel",
    methods=["POST"],
    auth="user",
    response=schemas.Job,
    status=202,
    summary="Cancel a job: queued or dispatched ones at once, running ones at the next model step",
    errors=[401, 404, 409],
)
def cancel_generation(ctx: Context, job_id: str):
    job = _job_for(ctx, job_id, lock=True)
    if not request_cancel(ctx.session, job, by=ctx.user.key_prefix):
        raise Conflict(f"job is already {job.state}", code="job_finished")
    ctx.session.refresh(job)
    return load_job_views(ctx.session, [job])[0], 202
