"""Request and response schemas: they validate input and generate /v1/openapi.json.

Limits that depend on the model version (frame size, frame count) are checked against the
version's manifest at submission (app/jobs/submit.py), since different models allow different
ranges; the bounds here are the outer envelope every model shares.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.config import get_settings

# Postgres `integer` columns: a larger number must be a 422, not an overflow in the database.
INT32_MAX = 2**31 - 1

JobStateName = Literal["queued", "dispatched", "running", "succeeded", "failed", "cancelled"]
WebhookEvent = Literal["started", "progress", "completed"]


class Strict(BaseModel):
    # No inf/NaN: they would be stored, then break every JSON response that echoes them.
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, allow_inf_nan=False)


class GenerationCreate(Strict):
    prompt: str = Field(description="What the video should show.", examples=["a red circle moving right"])
    type: Literal["text_to_video", "modify_video"] = Field("text_to_video", description="modify_video needs upload_id")
    model: Optional[str] = Field(None, pattern=r"^[a-z0-9][a-z0-9._-]{0,99}$", description="Model name; default: the server's default model")
    model_version: Optional[int] = Field(None, ge=1, le=INT32_MAX, description="Pin an exact version number; default: the model's prod alias")
    upload_id: Optional[uuid.UUID] = Field(None, description="Input video (POST /v1/uploads) for modify_video")
    width: Optional[int] = Field(None, ge=16, le=4096)
    height: Optional[int] = Field(None, ge=16, le=4096)
    num_frames: Optional[int] = Field(None, ge=1, le=1000)
    fps: Optional[int] = Field(None, ge=1, le=120)
    seed: Optional[int] = Field(None, ge=0, le=2**31 - 1)
    callback_url: Optional[str] = Field(
        None, max_length=2048, description="Webhook: POSTed signed job events (see webhook_events). "
        "http(s) only, no credentials, and it must resolve to public addresses unless an admin allow-listed it",
    )
    webhook_events: Optional[list[WebhookEvent]] = Field(
        None, min_length=1, max_length=3, description="Events the callback receives; default [started, completed]. "
        "progress comes at most every DREAMQ_WEBHOOK_PROGRESS_INTERVAL_S; completed covers succeeded, failed, cancelled",
    )

    @field_validator("callback_url")
    @classmethod
    def _callback_url(cls, value: Optional[str]) -> Optional[str]:
        # Syntax here; where the host resolves (and the allow-list) is checked at submission.
        from app.webhooks.addresses import AddressRefused, parse_url

        if value is not None:
            try:
                parse_url(value)
            except AddressRefused as exc:
                raise ValueError(exc.reason) from None
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty")
        limit = get_settings().max_prompt_chars
        if len(value) > limit:
            raise ValueError(f"must be at most {limit} characters (got {len(value)})")
        if any(ord(c) < 32 and c not in "\t\n" for c in value):
            raise ValueError("must not contain control characters")
        return value

    @model_validator(mode="after")
    def _kind(self) -> "GenerationCreate":
        if self.type == "modify_video" and self.upload_id is None:
            raise ValueError("upload_id is required when type is modify_video")
        if self.type == "text_to_video" and self.upload_id is not None:
            raise ValueError("upload_id is only allowed when type is modify_video")
        if self.webhook_events is not None and self.callback_url is None:
            raise ValueError("webhook_events needs a callback_url")
        return self


class GenerationListQuery(Strict):
    limit: int = Field(20, ge=1, le=100)
    cursor: Optional[str] = Field(None, max_length=200, description="next_cursor of the previous page")
    state: Optional[JobStateName] = None


class ModelRef(BaseModel):
    name: str
    version: int
    digest: str


class Timings(BaseModel):
    created_at: dt.datetime
    dispatched_at: Optional[dt.datetime]
    started_at: Optional[dt.datetime]
    finished_at: Optional[dt.datetime]
    wait_s: Optional[float] = Field(description="created -> started (or so far, while queued)")
    run_s: Optional[float] = Field(description="started -> finished (or so far, while running)")


class Assets(BaseModel):
    video: Optional[str] = Field(description="Pre-signed MP4 URL; expires, re-read the job for a fresh one")
    thumbnail: Optional[str]
    expires_at: Optional[dt.datetime]


class Failure(BaseModel):
    code: str
    message: str


class Job(BaseModel):
    id: uuid.UUID
    object: Literal["generation"] = "generation"
    type: Literal["text_to_video", "modify_video"]
    state: JobStateName
    tier: str
    prompt: str
    model: ModelRef
    params: dict
    upload_id: Optional[uuid.UUID]
    progress: float
    urgency: Optional[float] = Field(description="waited / tier SLO while queued (1.0 = at the promised worst case)")
    slo_s: float
    attempts: int
    cancel_requested: bool
    timings: Timings
    assets: Optional[Assets]
    failure: Optional[Failure]
    callback_url: Optional[str] = None
    webhook_events: Optional[list[WebhookEvent]] = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    next_cursor: Optional[str]


class Upload(BaseModel):
    id: uuid.UUID
    object: Literal["upload"] = "upload"
    content_type: str
    size_bytes: int
    sha256: str
    duration_s: float
    width: int
    height: int
    frames: int
    created_at: dt.datetime
    expires_at: dt.datetime


class TierPatch(Strict):
    """Fields of a tier an admin may change at run time (rank and name are fixed)."""

    slo_s: Optional[float] = Field(None, gt=0, le=7 * 86400, description="W: the promised worst-case wait")
    rate_per_min: Optional[float] = Field(None, gt=0, description="Per-user submissions per minute")
    burst: Optional[int] = Field(None, ge=1, le=INT32_MAX, description="Per-user bucket size")
    tier_rate_per_min: Optional[float] = Field(None, gt=0, description="All users of the tier together; null = none")
    tier_burst: Optional[int] = Field(None, ge=1, le=INT32_MAX)
    concurrency_cap: Optional[int] = Field(None, ge=1, le=100000, description="Jobs dispatched or running per user")
    min_share: Optional[float] = Field(None, ge=0, le=1, description="Starvation guard: floor on the tier's dispatch share")
    monthly_quota: Optional[int] = Field(None, ge=1, le=INT32_MAX, description="Jobs per user per calendar month; null = unlimited")
    retention_days: Optional[int] = Field(None, ge=1, le=3650)

    def changes(self) -> dict:
        # Only what the client sent: an explicit null clears a nullable limit.
        return {k: getattr(self, k) for k in self.model_fields_set}

    @model_validator(mode="after")
    def _not_null(self) -> "TierPatch":
        for name in ("slo_s", "rate_per_min", "burst", "concurrency_cap", "min_share", "retention_days"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        if not self.model_fields_set:
            raise ValueError("no field to change")
        return self


class TierOut(BaseModel):
    name: str
    rank: int
    slo_s: float
    rate_per_min: float
    burst: int
    tier_rate_per_min: Optional[float]
    tier_burst: Optional[int]
    concurrency_cap: int
    min_share: float
    monthly_quota: Optional[int]
    retention_days: int
    updated_at: dt.datetime


class TierList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TierOut]


class PromoteBody(Strict):
    version: int = Field(ge=1, le=INT32_MAX, description="Version number to make prod")


class CanaryBody(Strict):
    version: int = Field(ge=1, le=INT32_MAX, description="Version number that takes a share of new jobs")
    percent: float = Field(gt=0, le=100, description="Share of new jobs (that pin no version) it gets")


class AliasOut(BaseModel):
    version: Optional[int]
    percent: Optional[float]
    updated_by: str
    updated_at: dt.datetime


class VersionOut(BaseModel):
    version: int
    digest: str
    size_bytes: int
    files: int
    environment: dict
    created_by: str
    created_at: dt.datetime


class AliasEventOut(BaseModel):
    alias: str
    action: str
    from_version: Optional[int]
    to_version: Optional[int]
    percent: Optional[float]
    actor: str
    at: dt.datetime


class ModelOut(BaseModel):
    name: str
    description: str
    aliases: dict[str, AliasOut]
    versions: list[VersionOut]
    history: list[AliasEventOut]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


class VerifyOut(BaseModel):
    name: str
    version: int
    digest: str
    ok: bool
    problems: list[str]


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}


class ErrorField(BaseModel):
    field: str
    reason: str


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: Optional[str]
    fields: Optional[list[ErrorField]] = None


class Error(BaseModel):
    error: ErrorBody


class WebhookSecret(BaseModel):
    object: Literal["webhook_secret"] = "webhook_secret"
    secret: str = Field(description="HMAC-SHA256 key of your webhook signatures")
    signature_header: str = "X-Dreamq-Signature"
    signed_payload: str = Field("<X-Dreamq-Timestamp>.<raw request body>", description="What the HMAC covers")


class AllowEntryIn(Strict):
    network: Optional[str] = Field(None, max_length=64, description="IP network or address, e.g. 10.1.0.0/16 or 127.0.0.1")
    host: Optional[str] = Field(None, max_length=253, pattern=r"^[A-Za-z0-9.-]+$", description="Exact host name")
    port: Optional[int] = Field(None, ge=1, le=65535, description="Only this port; default every port")
    note: str = Field("", max_length=500)

    @model_validator(mode="after")
    def _one(self) -> "AllowEntryIn":
        if (self.network is None) == (self.host is None):
            raise ValueError("give exactly one of network or host")
        return self


class AllowEntryOut(BaseModel):
    id: uuid.UUID
    network: Optional[str]
    host: Optional[str]
    port: Optional[int]
    note: str
    created_by: str
    created_at: dt.datetime


class AllowEntryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AllowEntryOut]


class WebhookDeliveryOut(BaseModel):
    id: uuid.UUID
    event: WebhookEvent
    url: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_status_code: Optional[int]
    last_error: Optional[str]
    next_attempt_at: Optional[dt.datetime] = Field(description="When the next attempt is due (pending only)")
    created_at: dt.datetime
    delivered_at: Optional[dt.datetime]


class WebhookDeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookDeliveryOut]
