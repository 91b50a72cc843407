"""Webhook routes: the caller's signing secret, a job's delivery log, and the admin allow-list."""

from __future__ import annotations

import datetime as dt
import secrets
import uuid

from flask import Blueprint, Response
from sqlalchemy import select, update

from app.api import schemas
from app.api.generations import _job_for
from app.api.routing import Context, endpoint
from app.core.errors import NotFound, field_error
from app.db.models import User, WebhookDelivery
from app.outbound import allowlist

bp = Blueprint("webhooks", __name__, url_prefix="/v1")


def _secret_view(secret: str) -> dict:
    return {
        "object": "webhook_secret",
        "secret": secret,
        "signature_header": "X-Dreamq-Signature",
        "signed_payload": "<X-Dreamq-Timestamp>.<raw request body>",
    }


@endpoint(
    bp,
    "/webhooks/secret",
    methods=["GET"],
    auth="user",
    response=schemas.WebhookSecret,
    summary="Your webhook signing secret (HMAC-SHA256 over '<timestamp>.<body>')",
    errors=[401, 403],
)
def get_webhook_secret(ctx: Context):
    return _secret_view(ctx.session.scalar(select(User.webhook_secret).where(User.id == ctx.user.user_id)))  # type: ignore[arg-type]  # the caller's own row exists


@endpoint(
    bp,
    "/webhooks/secret/rotate",
    methods=["POST"],
    auth="user",
    response=schemas.WebhookSecret,
    summary="Replace your webhook signing secret; deliveries from now on use the new one",
    errors=[401, 403],
)
def rotate_webhook_secret(ctx: Context):
    secret = secrets.token_hex(32)
    ctx.session.execute(update(User).where(User.id == ctx.user.user_id).values(webhook_secret=secret))
    return _secret_view(secret)


@endpoint(
    bp,
    "/generations/<job_id>/webhooks",
    methods=["GET"],
    auth="user",
    response=schemas.WebhookDeliveryList,
    summary="The webhook delivery log of a job: each event, its attempts and outcome",
    errors=[401, 404],
)
def list_job_webhooks(ctx: Context, job_id: str):
    job = _job_for(ctx, job_id)
    rows = ctx.session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.job_id == job.id)
        .order_by(WebhookDelivery.created_at, WebhookDelivery.id)
    )
    return {"object": "list", "data": [_delivery_view(r) for r in rows]}


def _delivery_view(row: WebhookDelivery) -> dict:
    return {
        "id": str(row.id),
        "event": row.event,
        "url": row.url,
        "status": row.status,
        "attempts": row.attempts,
        "last_status_code": row.last_status_code,
        "last_error": row.last_error,
        "next_attempt_at": _iso(row.next_attempt_at) if row.status == "pending" else None,
        "created_at": _iso(row.created_at),
        "delivered_at": _iso(row.delivered_at),
    }


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def _entry_out(row) -> dict:
    view = allowlist.entry_view(row)
    view["created_at"] = _iso(view["created_at"])
    return view


@endpoint(
    bp,
    "/admin/webhooks/allowlist",
    methods=["GET"],
    auth="admin",
    response=schemas.AllowEntryList,
    summary="Networks and hosts callback URLs may reach although they are not public",
    errors=[401, 403],
)
def get_webhook_allowlist(ctx: Context):
    return {"object": "list", "data": [_entry_out(r) for r in allowlist.list_entries(ctx.session)]}


@endpoint(
    bp,
    "/admin/webhooks/allowlist",
    methods=["POST"],
    auth="admin",
    body=schemas.AllowEntryIn,
    response=schemas.AllowEntryOut,
    status=201,
    summary="Allow callbacks to a network or host name (optionally one port)",
    errors=[401, 403, 422],
)
def add_webhook_allowlist(ctx: Context):
    body: schemas.AllowEntryIn = ctx.body
    try:
        row = allowlist.add_entry(
            ctx.session,
            network=body.network,
            host=body.host,
            port=body.port,
            note=body.note,
            actor=f"{ctx.user.user_name} ({ctx.user.key_prefix})",
        )
    except allowlist.AllowEntryError as exc:
        raise field_error(exc.field, exc.reason) from None
    return _entry_out(row)


@endpoint(
    bp,
    "/admin/webhooks/allowlist/<entry_id>",
    methods=["DELETE"],
    auth="admin",
    summary="Remove an allow-list entry",
    status=204,
    errors=[401, 403, 404],
)
def delete_webhook_allowlist(ctx: Context, entry_id: str):
    try:
        parsed = uuid.UUID(entry_id)
    except ValueError:
        raise NotFound("no such allow-list entry") from None
    if not allowlist.remove_entry(ctx.session, parsed):
        raise NotFound("no such allow-list entry")
    return Response(status=204)
