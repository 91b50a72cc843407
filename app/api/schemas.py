"""Request and response schemas: they validate input and generate /v1/openapi.json.

Limits that depend on the model version (frame size, frame count) are checked against the
version's manifest at submission (app/jobs/submit.py), since different models allow different
ranges; the bounds here are the outer envelope every model shares.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing
import uuid
from typing import ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from app.core.config import get_settings
from app.observability.snapshot import Snapshot
from app.outbound.addresses import url_syntax

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
    model: Optional[str] = Field(
        None, pattern=r"^[a-z0-9][a-z0-9._-]{0,99}$", description="Model name; default: the server's default model"
    )
    model_version: Optional[int] = Field(
        None, ge=1, le=INT32_MAX, description="Pin an exact version number; default: the model's prod alias"
    )
    upload_id: Optional[uuid.UUID] = Field(None, description="Input video (POST /v1/uploads) for modify_video")
    width: Optional[int] = Field(None, ge=16, le=4096)
    height: Optional[int] = Field(None, ge=16, le=4096)
    num_frames: Optional[int] = Field(None, ge=1, le=1000)
    fps: Optional[int] = Field(None, ge=1, le=120)
    seed: Optional[int] = Field(None, ge=0, le=2**31 - 1)
    callback_url: Optional[str] = Field(
        None,
        max_length=2048,
        description="Webhook: POSTed signed job events (see webhook_events). "
        "http(s) only, no credentials, and it must resolve to public addresses unless an admin allow-listed it",
    )
    webhook_events: Optional[list[WebhookEvent]] = Field(
        None,
        min_length=1,
        max_length=3,
        description="Events the callback receives; default [started, completed]. "
        "progress comes at most every DREAMQ_WEBHOOK_PROGRESS_INTERVAL_S; completed covers succeeded, failed, cancelled",
    )

    @field_validator("callback_url")
    @classmethod
    def _callback_url(cls, value: Optional[str]) -> Optional[str]:
        return url_syntax(value)

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
    min_share: Optional[float] = Field(
        None, ge=0, le=1, description="Starvation guard: floor on the tier's dispatch share"
    )
    monthly_quota: Optional[int] = Field(
        None, ge=1, le=INT32_MAX, description="Jobs per user per calendar month; null = unlimited"
    )
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


# GET /v1/admin/status returns take_snapshot() as it is: its schema is built from the Snapshot
# dataclass itself, so a field added there is documented (and checked by the fuzz test) at once.
StatusOut = create_model(  # type: ignore[call-overload]  # fields built from the Snapshot dataclass
    "StatusOut",
    __doc__="The operator's picture (app/observability/snapshot.py): the numbers behind /dashboard, "
    "`dreamq status` and /metrics.",
    **{f.name: (typing.get_type_hints(Snapshot)[f.name], ...) for f in dataclasses.fields(Snapshot)},
)


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
    network: Optional[str] = Field(
        None, max_length=64, description="IP network or address, e.g. 10.1.0.0/16 or 127.0.0.1"
    )
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


# --- admin: users and keys, clusters and pools (app/admin/users.py, clusters.py, pools.py) -------

UserName = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,199}$", description="Unique user name")
TierName = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$", description="A tier's name (GET /v1/admin/tiers)")
# No dots: queue names are `<cluster>.<model>.<tier>`.
ClusterName = Field(
    pattern=r"^[a-z0-9][a-z0-9_-]{0,99}$", description="Cluster name (no dots: it prefixes queue names)"
)
ModelName = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,99}$", description="Model name")
Scope = Literal["user", "admin"]


class Patch(Strict):
    """A PATCH body: only the fields sent change; `not_null` fields may not be sent as null."""

    not_null: ClassVar[tuple[str, ...]] = ()

    def changes(self) -> dict:
        return {k: getattr(self, k) for k in self.model_fields_set}

    @model_validator(mode="after")
    def _some_change(self) -> "Patch":
        for name in self.not_null:
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        if not self.model_fields_set:
            raise ValueError("no field to change")
        return self


class UserCreate(Strict):
    name: str = UserName
    tier: str = TierName
    admin: bool = Field(False, description="The first key also gets the admin scope")
    key_name: str = Field("", max_length=200, description="A label for the first key")


class UserPatch(Patch):
    not_null = ("tier", "disabled")
    tier: Optional[str] = Field(
        None, pattern=r"^[a-z][a-z0-9_-]{0,31}$", description="New tier; applies to the user's next submission"
    )
    disabled: Optional[bool] = Field(None, description="A disabled user's keys all answer 403")


class KeyCreate(Strict):
    scopes: list[Scope] = Field(["user"], min_length=1, max_length=2, description="`user` is always included")
    name: str = Field("", max_length=200, description="A label for the key")


class KeyOut(BaseModel):
    prefix: str = Field(description="The first characters of the key: all that is ever shown after creation")
    user: str
    name: str
    scopes: list[Scope]
    created_at: dt.datetime
    revoked_at: Optional[dt.datetime]
    last_used_at: Optional[dt.datetime]


class KeyCreated(KeyOut):
    key: str = Field(description="The key itself: shown this once, stored only as a hash")


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyOut]


class UserOut(BaseModel):
    id: uuid.UUID
    name: str
    tier: str
    disabled: bool
    created_at: dt.datetime
    keys: list[KeyOut] = Field(description="Keys by prefix; never the key itself")


class UserCreated(UserOut):
    key: str = Field(description="The first key: shown this once, stored only as a hash")
    key_prefix: str


class UserListQuery(Strict):
    tier: Optional[str] = Field(None, pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    limit: int = Field(100, ge=1, le=1000)


class UserList(BaseModel):
    object: Literal["list"] = "list"
    data: list[UserOut]


class ClusterCreate(Strict):
    name: str = ClusterName
    kind: Literal["inference", "burst"] = Field(
        description="inference: standing workers; burst: borrowed GPUs, none standing"
    )
    max_workers: Optional[int] = Field(None, ge=0, le=1_000_000, description="Capacity limit (workers); null = none")
    enabled: bool = True


class ClusterPatch(Patch):
    max_workers: Optional[int] = Field(None, ge=0, le=1_000_000, description="null clears the limit")


class ClusterOut(BaseModel):
    name: str
    kind: Literal["inference", "burst"]
    enabled: bool = Field(description="false: drained, the dispatcher releases nothing to its pools")
    max_workers: Optional[int]
    pools: int
    live_workers: int
    draining_workers: int
    created_at: dt.datetime


class ClusterDrained(ClusterOut):
    workers_marked_draining: int = Field(
        description="Live workers marked draining (now=true): their jobs requeue at the next step"
    )


class ClusterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ClusterOut]


class DrainQuery(Strict):
    now: bool = Field(
        False,
        description="Also mark live workers draining: running jobs go back to the queue at "
        "their next step. Default: stop new work and let running jobs finish",
    )


class PoolCreate(Strict):
    cluster: str = ClusterName
    model: str = ModelName
    dispatch_limit: int = Field(ge=0, le=100_000, description="Most jobs dispatched-but-not-started at once")
    enabled: bool = True


class PoolPatch(Patch):
    not_null = ("dispatch_limit",)
    dispatch_limit: Optional[int] = Field(None, ge=0, le=100_000)


class PoolOut(BaseModel):
    name: str = Field(description="<cluster>.<model>, the prefix of its queues")
    cluster: str
    cluster_kind: Literal["inference", "burst"]
    model: str
    enabled: bool = Field(description="false: drained")
    cluster_enabled: bool
    dispatch_limit: int
    effective_limit: int = Field(description="What the dispatcher uses: min(limit, 2 x live workers); 0 while drained")
    live_workers: int
    draining_workers: int
    dispatched: int
    running: int
    queues: list[str] = Field(description="Its Celery queues, one per tier in rank order")
    created_at: dt.datetime


class PoolDrained(PoolOut):
    workers_marked_draining: int


class PoolList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PoolOut]


# --- admin: the Dream Machine model table (app/admin/dream_machine.py) ----------------------------


class DreamMachineModelIn(Strict):
    model: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,99}$", description="The dreamq model that serves this name")
    note: str = Field("", max_length=500)


class DreamMachineModelOut(BaseModel):
    name: str = Field(description="The model name Luma's clients send, e.g. ray-2")
    model: str = Field(description="The dreamq model that serves it")
    note: str
    updated_by: str
    updated_at: dt.datetime


class DreamMachineModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DreamMachineModelOut]
