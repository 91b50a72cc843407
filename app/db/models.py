"""SQLAlchemy 2 typed models. Postgres is the source of truth for every job.

Alembic migrations under migrations/versions/ are the only way the schema changes; `alembic
check` in CI proves these models and the migrations agree.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Annotated, Any, Optional

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import CIDR, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Every constraint gets a predictable name, so migrations can drop or alter it by name.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

uuid_pk = Annotated[uuid.UUID, mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)]
created_at = Annotated[
    dt.datetime,
    mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now()),
]
timestamp = Annotated[Optional[dt.datetime], mapped_column(DateTime(timezone=True))]
jsonb = Annotated[dict[str, Any], mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))]


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class JobState(str, enum.Enum):
    queued = "queued"
    dispatched = "dispatched"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})


class JobKind(str, enum.Enum):
    text_to_video = "text_to_video"
    modify_video = "modify_video"


class Tier(Base):
    """A customer tier and its promise: the worst-case wait `slo_s` (W) and the limits around it."""

    __tablename__ = "tiers"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    # 0 = most important (api). Ties are not allowed: rank orders GPU queues.
    rank: Mapped[int] = mapped_column(Integer, nullable=False, unique=True)
    slo_s: Mapped[float] = mapped_column(Float, nullable=False)
    # Token bucket per user: `rate_per_min` refill, `burst` capacity.
    rate_per_min: Mapped[float] = mapped_column(Float, nullable=False)
    burst: Mapped[int] = mapped_column(Integer, nullable=False)
    # Token bucket for the whole tier (all its users together); NULL = no tier-wide limit.
    tier_rate_per_min: Mapped[Optional[float]] = mapped_column(Float)
    tier_burst: Mapped[Optional[int]] = mapped_column(Integer)
    # Jobs dispatched or running per user at once.
    concurrency_cap: Mapped[int] = mapped_column(Integer, nullable=False)
    # Minimum share of dispatches while the tier has a backlog (the starvation guard).
    min_share: Mapped[float] = mapped_column(Float, nullable=False, server_default=text("0"))
    # Jobs per calendar month per user; NULL = unlimited.
    monthly_quota: Mapped[Optional[int]] = mapped_column(Integer)
    retention_days: Mapped[int] = mapped_column(Integer, nullable=False)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())

    __table_args__ = (
        CheckConstraint("slo_s > 0", name="slo_positive"),
        CheckConstraint("min_share >= 0 AND min_share <= 1", name="min_share_range"),
    )


WEBHOOK_SECRET_DEFAULT = text("replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '')")


class User(Base):
    __tablename__ = "users"

    id: Mapped[uuid_pk]
    name: Mapped[str] = mapped_column(String(200), nullable=False, unique=True)
    tier: Mapped[str] = mapped_column(ForeignKey("tiers.name", onupdate="CASCADE"), nullable=False)
    disabled: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    # HMAC-SHA256 key that signs this user's webhook deliveries (GET /v1/webhooks/secret). Made by
    # the database so every way of creating a user gets one: two v4 UUIDs from the OS CSPRNG.
    webhook_secret: Mapped[str] = mapped_column(String(64), nullable=False, server_default=WEBHOOK_SECRET_DEFAULT)
    created_at: Mapped[created_at]

    keys: Mapped[list["ApiKey"]] = relationship(back_populates="user")


class ApiKey(Base):
    """A bearer key, stored only as its sha256: the plaintext is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[uuid_pk]
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    # Keys are 256-bit random, so a fast hash is safe (no dictionary to attack) and lets the
    # lookup be one indexed equality.
    key_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    # First characters of the key, safe to show in listings and logs.
    prefix: Mapped[str] = mapped_column(String(16), nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False, server_default="")
    scopes: Mapped[list[str]] = mapped_column(JSONB, nullable=False)
    created_at: Mapped[created_at]
    revoked_at: Mapped[timestamp]
    last_used_at: Mapped[timestamp]

    user: Mapped[User] = relationship(back_populates="keys")


class Model(Base):
    __tablename__ = "models"

    id: Mapped[uuid_pk]
    name: Mapped[str] = mapped_column(String(100), nullable=False, unique=True)
    description: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    created_at: Mapped[created_at]


class ModelVersion(Base):
    """An immutable version: its identity is the sha256 of its manifest (`digest`)."""

    __tablename__ = "model_versions"

    id: Mapped[uuid_pk]
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id"), nullable=False)
    # Human-readable, monotonic per model.
    number: Mapped[int] = mapped_column(Integer, nullable=False)
    digest: Mapped[str] = mapped_column(String(71), nullable=False, unique=True)
    manifest: Mapped[jsonb]
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_by: Mapped[str] = mapped_column(String(200), nullable=False, server_default="")
    created_at: Mapped[created_at]

    model: Mapped[Model] = relationship()

    __table_args__ = (UniqueConstraint("model_id", "number"),)


class ModelAlias(Base):
    """`prod` / `canary` pointers at versions; a job records the exact version it resolved."""

    __tablename__ = "model_aliases"

    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(32), primary_key=True)
    version_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("model_versions.id"), nullable=False)
    # Share of new jobs a canary alias receives (0-100); unused for prod.
    percent: Mapped[float] = mapped_column(Float, nullable=False, server_default=text("100"))
    updated_by: Mapped[str] = mapped_column(String(200), nullable=False, server_default="")
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class ModelAliasEvent(Base):
    """Audit of alias moves: who pointed which alias where, when (promote, canary, rollback)."""

    __tablename__ = "model_alias_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id"), nullable=False)
    alias: Mapped[str] = mapped_column(String(32), nullable=False)
    action: Mapped[str] = mapped_column(String(16), nullable=False)
    from_version_id: Mapped[Optional[uuid.UUID]] = mapped_column(ForeignKey("model_versions.id"))
    to_version_id: Mapped[Optional[uuid.UUID]] = mapped_column(ForeignKey("model_versions.id"))
    percent: Mapped[Optional[float]] = mapped_column(Float)
    actor: Mapped[str] = mapped_column(String(200), nullable=False)
    at: Mapped[created_at]

    __table_args__ = (
        Index("ix_model_alias_events_model_alias_at", "model_id", "alias", "at"),
        CheckConstraint("action IN ('promote', 'canary', 'clear', 'rollback', 'push')", name="action"),
    )


class Cluster(Base):
    __tablename__ = "clusters"

    id: Mapped[uuid_pk]
    name: Mapped[str] = mapped_column(String(100), nullable=False, unique=True)
    # inference: standing workers. burst: borrowed GPUs (training cluster), none standing.
    kind: Mapped[str] = mapped_column(String(16), nullable=False, server_default="inference")
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("true"))
    max_workers: Mapped[Optional[int]] = mapped_column(Integer)
    created_at: Mapped[created_at]

    __table_args__ = (CheckConstraint("kind IN ('inference', 'burst')", name="kind"),)


class Pool(Base):
    """The GPU workers of one cluster that serve one model; queues `<cluster>.<model>.<tier>`."""

    __tablename__ = "pools"

    id: Mapped[uuid_pk]
    cluster_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("clusters.id"), nullable=False)
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id"), nullable=False)
    # Most jobs this pool may hold dispatched-but-not-started (messages in its queues).
    dispatch_limit: Mapped[int] = mapped_column(Integer, nullable=False)
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("true"))
    created_at: Mapped[created_at]

    cluster: Mapped[Cluster] = relationship()
    model: Mapped[Model] = relationship()

    __table_args__ = (
        UniqueConstraint("cluster_id", "model_id"),
        CheckConstraint("dispatch_limit >= 0", name="dispatch_limit_nonneg"),
    )


class Worker(Base):
    """A GPU worker's last heartbeat: what it holds and what it is doing."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # Celery hostname
    pool_id: Mapped[Optional[uuid.UUID]] = mapped_column(ForeignKey("pools.id", ondelete="SET NULL"), index=True)
    hostname: Mapped[str] = mapped_column(String(200), nullable=False)
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    device: Mapped[str] = mapped_column(String(100), nullable=False)
    # starting | idle | busy | draining (leaving now: its job is requeued at the next step) |
    # retiring (finishing its job, taking nothing new: burst scale-down) | stopped
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    current_job_id: Mapped[Optional[uuid.UUID]] = mapped_column(UUID(as_uuid=True))
    info: Mapped[jsonb]
    started_at: Mapped[created_at]
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class Upload(Base):
    """An input video for modify-video jobs, probed with PyAV before it is accepted."""

    __tablename__ = "uploads"

    id: Mapped[uuid_pk]
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    object_key: Mapped[str] = mapped_column(String(300), nullable=False)
    content_type: Mapped[str] = mapped_column(String(100), nullable=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    duration_s: Mapped[float] = mapped_column(Float, nullable=False)
    width: Mapped[int] = mapped_column(Integer, nullable=False)
    height: Mapped[int] = mapped_column(Integer, nullable=False)
    frames: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[created_at]
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False, index=True)
    deleted_at: Mapped[timestamp]


class Job(Base):
    __tablename__ = "jobs"
    # Server defaults (created_at, state, progress...) come back in the INSERT's RETURNING: the
    # 202 needs them, and a refresh would cost another round trip per submission.
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[uuid_pk]
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    # The tier at submission: a later tier change does not reorder work already promised.
    tier: Mapped[str] = mapped_column(String(32), nullable=False)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False, server_default=JobState.queued.value)
    prompt: Mapped[str] = mapped_column(Text, nullable=False)
    params: Mapped[jsonb]
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id"), nullable=False)
    model_version_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("model_versions.id"), nullable=False)
    upload_id: Mapped[Optional[uuid.UUID]] = mapped_column(ForeignKey("uploads.id", ondelete="SET NULL"))
    pool_id: Mapped[Optional[uuid.UUID]] = mapped_column(ForeignKey("pools.id", ondelete="SET NULL"))
    worker_id: Mapped[Optional[str]] = mapped_column(String(200))
    # Runs started (a redelivery after a lost worker counts too); fails the job past max_attempts.
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    # Incremented by every dispatch and carried in the message: a claim must present the current
    # value, so a stale message from an earlier dispatch can never claim the job.
    dispatch_seq: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer, nullable=False)
    progress: Mapped[float] = mapped_column(Float, nullable=False, server_default=text("0"))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    callback_url: Mapped[Optional[str]] = mapped_column(Text)
    # Which webhook events the callback receives (started, progress, completed); NULL without one.
    webhook_events: Mapped[Optional[list[str]]] = mapped_column(JSONB)
    idempotency_key: Mapped[Optional[str]] = mapped_column(String(200))
    request_hash: Mapped[Optional[str]] = mapped_column(String(64))
    video_key: Mapped[Optional[str]] = mapped_column(String(300))
    thumbnail_key: Mapped[Optional[str]] = mapped_column(String(300))
    failure_code: Mapped[Optional[str]] = mapped_column(String(64))
    failure_message: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[created_at]
    dispatched_at: Mapped[timestamp]
    started_at: Mapped[timestamp]
    finished_at: Mapped[timestamp]
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())

    __table_args__ = (
        CheckConstraint("state IN ('queued','dispatched','running','succeeded','failed','cancelled')", name="state"),
        CheckConstraint("kind IN ('text_to_video','modify_video')", name="kind"),
        # Heads of the backlog per model and tier (and per user) in created_at order without a
        # scan: the dispatcher reads the oldest queued jobs of each (model, tier) that has pool
        # room from these partial indexes, so its cost does not grow with millions of queued rows,
        # and a model without capacity never crowds the heads of one that has it.
        Index(
            "ix_jobs_queued_heads",
            "model_id",
            "tier",
            "user_id",
            "created_at",
            postgresql_where=text("state = 'queued'"),
        ),
        Index("ix_jobs_queued_oldest", "model_id", "tier", "created_at", postgresql_where=text("state = 'queued'")),
        # In-flight per pool (dispatch limit) and per user (concurrency cap).
        Index("ix_jobs_pool_inflight", "pool_id", "state", postgresql_where=text("state IN ('dispatched','running')")),
        Index("ix_jobs_user_inflight", "user_id", postgresql_where=text("state IN ('dispatched','running')")),
        # The reaper and the reconciler read in-flight jobs by lease age (tasks/maintenance.py).
        Index("ix_jobs_in_flight_updated", "updated_at", postgresql_where=text("state IN ('dispatched','running')")),
        # Retention: finished jobs that still hold outputs, oldest first.
        Index("ix_jobs_outputs_finished", "finished_at", postgresql_where=text("video_key IS NOT NULL")),
        # Listing a user's jobs newest first with a (created_at, id) cursor.
        Index("ix_jobs_user_created", "user_id", "created_at", "id"),
        Index(
            "uq_jobs_user_idempotency",
            "user_id",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )


class JobEvent(Base):
    """Append-only history: one row per state change (and notable steps) of a job."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True)
    at: Mapped[created_at]
    from_state: Mapped[Optional[str]] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16), nullable=False)
    worker_id: Mapped[Optional[str]] = mapped_column(String(200))
    detail: Mapped[jsonb]


class WebhookDelivery(Base):
    """The delivery log: one row per webhook event of a job, updated by each attempt.

    The row is written in the transaction that changes the job (an outbox), and the delivery task
    is published after that commit, so an event exists exactly when its state change does.
    """

    __tablename__ = "webhook_deliveries"

    id: Mapped[uuid_pk]
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True)
    event: Mapped[str] = mapped_column(String(16), nullable=False)
    url: Mapped[str] = mapped_column(Text, nullable=False)
    # The JSON body (event, job snapshot at the event); sent_at is added per attempt.
    payload: Mapped[jsonb]
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    last_status_code: Mapped[Optional[int]] = mapped_column(Integer)
    last_error: Mapped[Optional[str]] = mapped_column(Text)
    # When the next attempt may start; also a lease while an attempt is in flight.
    next_attempt_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    created_at: Mapped[created_at]
    delivered_at: Mapped[timestamp]

    __table_args__ = (
        CheckConstraint("status IN ('pending','delivered','failed')", name="status"),
        CheckConstraint("event IN ('started','progress','completed')", name="event"),
        # The sweep that re-publishes overdue deliveries reads only pending rows.
        Index("ix_webhook_deliveries_pending", "next_attempt_at", postgresql_where=text("status = 'pending'")),
    )


class WebhookAllowEntry(Base):
    """Admin allow-list: callback URLs may reach this network or host name (optionally one port)
    even though it is not public (see app/outbound/addresses.py)."""

    __tablename__ = "webhook_allowlist"

    id: Mapped[uuid_pk]
    network: Mapped[Optional[str]] = mapped_column(CIDR)
    host: Mapped[Optional[str]] = mapped_column(String(253))
    port: Mapped[Optional[int]] = mapped_column(Integer)
    note: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    created_by: Mapped[str] = mapped_column(String(200), nullable=False, server_default="")
    created_at: Mapped[created_at]

    __table_args__ = (
        CheckConstraint("(network IS NULL) <> (host IS NULL)", name="network_or_host"),
        CheckConstraint("port IS NULL OR (port BETWEEN 1 AND 65535)", name="port_range"),
    )


class DreamMachineModel(Base):
    """Luma Dream Machine model names (`ray-2`, ...) -> the dreamq model that serves them.

    Edited by admins (`dreamq dream-machine models`, /v1/admin/dream-machine/models); a name
    that is not here is refused at submission (400), never guessed.
    """

    __tablename__ = "dream_machine_models"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id"), nullable=False)
    note: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    updated_by: Mapped[str] = mapped_column(String(200), nullable=False, server_default="")
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())

    model: Mapped[Model] = relationship()


class DreamMachineGeneration(Base):
    """A job submitted through /dream-machine/v1: the client's own request and model name, which
    the generation object echoes, and the DELETE mark (the job row stays, for quotas and audit)."""

    __tablename__ = "dream_machine_generations"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    generation_type: Mapped[str] = mapped_column(String(32), nullable=False)
    # The name the client sent (`ray-2`), as it asked: the generation object reports it back.
    model_name: Mapped[str] = mapped_column(String(100), nullable=False)
    request: Mapped[jsonb]
    created_at: Mapped[created_at]
    deleted_at: Mapped[timestamp]

    __table_args__ = (
        # GET /generations: a user's live generations newest first, limit/offset.
        Index(
            "ix_dream_machine_generations_user_created",
            "user_id",
            "created_at",
            "job_id",
            postgresql_where=text("deleted_at IS NULL"),
        ),
    )
