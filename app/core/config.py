"""Typed settings, each read from the environment with a converter.

Every setting is one line: its variable, its converter, its default and why. A malformed value
fails fast with the variable's name, at import of the first component that reads settings,
instead of surfacing later as a confusing error deep in Celery or SQLAlchemy.

`dreamq up` exports the URLs of the services it started, so every process it supervises reads
the same values from here; in production the operator sets them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable


class ConfigError(RuntimeError):
    """A required setting is missing or malformed; the message names the variable."""


def _str(value: str) -> str:
    return value


def _int(value: str) -> int:
    return int(value)


def _float(value: str) -> float:
    return float(value)


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected a boolean (1/0, true/false), got {value!r}")


def _env(name: str, default, convert: Callable[[str], object] = _str):
    """Declare a setting read from `name`; the default applies when it is unset or empty."""

    def factory():
        raw = os.environ.get(name)
        if raw is None or raw == "":
            return default() if callable(default) else default
        try:
            return convert(raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name}={raw!r} is malformed: {exc}") from None

    return field(default_factory=factory, metadata={"env": name})


def _default_home() -> str:
    return str(Path.cwd() / ".dreamq")


@dataclass(frozen=True)
class Settings:
    # Where `dreamq up` keeps data (embedded Postgres, Redis AOF, SeaweedFS volumes, model cache,
    # credentials.json). Relative to the working directory so each checkout has its own.
    home: str = _env("DREAMQ_HOME", _default_home)

    # Postgres is the source of truth for jobs. Empty means "not configured": `dreamq up` starts
    # the embedded one and exports the URL; other commands refuse to run without it.
    database_url: str = _env("DATABASE_URL", "")
    # Pool per process. gunicorn workers and Celery children each hold their own pool.
    db_pool_size: int = _env("DREAMQ_DB_POOL_SIZE", 5, _int)
    db_statement_timeout_ms: int = _env("DREAMQ_DB_STATEMENT_TIMEOUT_MS", 30_000, _int)

    # Celery transport. Redis (appendonly, noeviction) or RabbitMQ both work.
    broker_url: str = _env("CELERY_BROKER_URL", "")
    # The messaging adapter (app/messaging): module:class, loaded when a process installed none.
    publisher: str = _env("DREAMQ_PUBLISHER", "tasks.publisher:CeleryPublisher")
    # Redis for rate-limit buckets, dispatch coalescing and worker heartbeats. Defaults to the
    # broker URL when that is Redis.
    redis_url: str = _env("DREAMQ_REDIS_URL", "")

    # Object storage (S3 API). Empty endpoint means AWS S3 itself.
    s3_endpoint_url: str = _env("S3_ENDPOINT_URL", "")
    s3_region: str = _env("S3_REGION", "us-east-1")
    s3_access_key: str = _env("AWS_ACCESS_KEY_ID", "")
    s3_secret_key: str = _env("AWS_SECRET_ACCESS_KEY", "")
    # Models (immutable versions) and outputs live in separate buckets so retention policies can
    # differ and a bad lifecycle rule on outputs can never touch a model.
    models_bucket: str = _env("DREAMQ_MODELS_BUCKET", "dreamq-models")
    media_bucket: str = _env("DREAMQ_MEDIA_BUCKET", "dreamq-media")
    # Pre-signed asset URLs expire; a client re-reads the job to get a fresh one.
    presign_ttl_s: int = _env("DREAMQ_PRESIGN_TTL_S", 3600, _int)
    # URL clients use to reach S3 when it differs from the one services use (NAT, CDN).
    s3_public_endpoint_url: str = _env("S3_PUBLIC_ENDPOINT_URL", "")

    # Longest a model may run for one job. Soft < hard < visibility timeout, always: if Redis
    # redelivered a job still running it would run twice (see tasks/celery_app.py).
    job_soft_time_limit_s: int = _env("DREAMQ_JOB_SOFT_TIME_LIMIT_S", 1800, _int)
    job_hard_time_limit_s: int = _env("DREAMQ_JOB_HARD_TIME_LIMIT_S", 1900, _int)
    broker_visibility_timeout_s: int = _env("DREAMQ_VISIBILITY_TIMEOUT_S", 7200, _int)
    max_attempts: int = _env("DREAMQ_MAX_ATTEMPTS", 3, _int)
    # Outputs up to this many bytes of raw frames are encoded and completed by the GPU worker
    # itself: for them the hand-off to the cpu queue (stage the frames in S3, a message, read
    # them back, delete them) costs more than the encode. Measured with a 16x16 one-frame clip:
    # encode 4 ms, hand-off ~60 ms across processes. 0 sends everything to the cpu queue.
    inline_finalize_max_bytes: int = _env("DREAMQ_INLINE_FINALIZE_BYTES", 64 * 1024, _int)
    # A running job's lease: the process running it (GPU child, then the cpu finalize) renews it
    # every lease/3 s. A job whose lease ran out has lost its process; the reaper requeues it.
    job_lease_s: float = _env("DREAMQ_JOB_LEASE_S", 60.0, _float)
    # celery beat maintenance (tasks/maintenance.py): how often each task runs, and how long a
    # job may sit `dispatched` before the reconciler asks the broker whether it still holds it.
    maintenance_interval_s: float = _env("DREAMQ_MAINTENANCE_INTERVAL_S", 15.0, _float)
    reconcile_after_s: float = _env("DREAMQ_RECONCILE_AFTER_S", 30.0, _float)
    # Retention sweeps are heavier and nothing is urgent about them.
    retention_interval_s: float = _env("DREAMQ_RETENTION_INTERVAL_S", 3600.0, _float)

    # Burst controller (tasks/burst.py): how it starts workers (local | slurm), how often it
    # decides, what it assumes before it has measured anything, and policy overrides (JSON of
    # app.scheduling.burst.BurstParams fields, e.g. '{"sustain_s": 120}').
    burst_provisioner: str = _env("DREAMQ_BURST_PROVISIONER", "local")
    burst_interval_s: float = _env("DREAMQ_BURST_INTERVAL_S", 60.0, _float)
    burst_warmup_s: float = _env("DREAMQ_BURST_WARMUP_S", 600.0, _float)
    burst_default_job_s: float = _env("DREAMQ_BURST_DEFAULT_JOB_S", 60.0, _float)
    burst_max_workers: int = _env("DREAMQ_BURST_MAX_WORKERS", 4, _int)
    burst_stop_grace_s: float = _env("DREAMQ_BURST_STOP_GRACE_S", 60.0, _float)
    burst_params: str = _env("DREAMQ_BURST_PARAMS", "")

    # Input limits for POST /v1/uploads and generation parameters.
    max_upload_bytes: int = _env("DREAMQ_MAX_UPLOAD_BYTES", 50 * 1024 * 1024, _int)
    max_upload_duration_s: float = _env("DREAMQ_MAX_UPLOAD_DURATION_S", 30.0, _float)
    max_prompt_chars: int = _env("DREAMQ_MAX_PROMPT_CHARS", 2000, _int)

    # The pool a local `dreamq up` serves: cluster name and the model its GPU workers load.
    default_cluster: str = _env("DREAMQ_CLUSTER", "local")
    default_model: str = _env("DREAMQ_DEFAULT_MODEL", "demo")
    # Jobs dispatched but not yet started that one pool may hold (back pressure).
    default_dispatch_limit: int = _env("DREAMQ_DISPATCH_LIMIT", 8, _int)

    # Flower basic auth; `dreamq up` generates a password when unset.
    flower_user: str = _env("FLOWER_USER", "admin")
    flower_password: str = _env("FLOWER_PASSWORD", "")

    # Signs the /dashboard login cookie. Every API process must hold the same value, or a login
    # made on one gunicorn worker is unknown to the next; empty disables dashboard login (Bearer
    # admin keys still open it). `dreamq up` generates one and keeps it in credentials.json.
    secret_key: str = _env("DREAMQ_SECRET_KEY", "")
    # Send that cookie over HTTPS only. Turn on behind TLS; off by default for http://127.0.0.1.
    secure_cookies: bool = _env("DREAMQ_SECURE_COOKIES", False, _bool)
    # A dashboard login lasts this long; the key it was made with is re-checked on every request,
    # so revoking the key (or its admin scope) ends the session at once.
    dashboard_session_s: int = _env("DREAMQ_DASHBOARD_SESSION_S", 12 * 3600, _int)

    # Worker-local model cache (content addressed, size bounded).
    model_cache_dir: str = _env("DREAMQ_MODEL_CACHE", "")
    model_cache_max_bytes: int = _env("DREAMQ_MODEL_CACHE_MAX_BYTES", 20 * 1024**3, _int)

    # Webhooks (app/webhooks/): progress events at most this often per job; a delivery is tried
    # `max_attempts` times, waiting base, 2*base, 4*base... (capped) between attempts; each POST
    # has its own connect and read timeouts so a slow receiver cannot hold a cpu worker.
    webhook_progress_interval_s: float = _env("DREAMQ_WEBHOOK_PROGRESS_INTERVAL_S", 5.0, _float)
    webhook_max_attempts: int = _env("DREAMQ_WEBHOOK_MAX_ATTEMPTS", 5, _int)
    webhook_backoff_base_s: float = _env("DREAMQ_WEBHOOK_BACKOFF_BASE_S", 2.0, _float)
    webhook_backoff_max_s: float = _env("DREAMQ_WEBHOOK_BACKOFF_MAX_S", 600.0, _float)
    webhook_connect_timeout_s: float = _env("DREAMQ_WEBHOOK_CONNECT_TIMEOUT_S", 5.0, _float)
    webhook_read_timeout_s: float = _env("DREAMQ_WEBHOOK_READ_TIMEOUT_S", 5.0, _float)

    log_level: str = _env("DREAMQ_LOG_LEVEL", "INFO")
    log_json: bool = _env("DREAMQ_LOG_JSON", True, _bool)

    @property
    def effective_redis_url(self) -> str:
        if self.redis_url:
            return self.redis_url
        if self.broker_url.startswith("redis"):
            return self.broker_url
        return ""

    @property
    def cache_dir(self) -> Path:
        return Path(self.model_cache_dir or Path(self.home) / "cache")

    def require(self, *names: str) -> None:
        """Fail fast, naming the variable, when a setting this component needs is empty."""
        by_name = {f.name: f.metadata.get("env", f.name) for f in fields(self)}
        missing = [by_name[n] for n in names if not getattr(self, n)]
        if missing:
            raise ConfigError(
                "missing required setting(s): "
                + ", ".join(missing)
                + " (export them, or run `dreamq up` which starts embedded services)"
            )


_settings: Settings | None = None


def get_settings() -> Settings:
    """Settings of this process, read once. Tests call `reload_settings()` after changing env."""
    global _settings
    if _settings is None:
        _settings = Settings()
    return _settings


def reload_settings() -> Settings:
    global _settings
    _settings = Settings()
    return _settings
