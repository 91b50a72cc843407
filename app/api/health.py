"""/healthz (the process answers) and /readyz (its dependencies answer)."""

from __future__ import annotations

from flask import Blueprint
from sqlalchemy import text

from app.api import schemas
from app.api.routing import endpoint
from app.core.config import get_settings
from app.core.redis_client import get_redis
from app.core.storage import s3_client
from app.db.session import get_engine

bp = Blueprint("health", __name__)


@endpoint(
    bp,
    "/healthz",
    methods=["GET"],
    auth="public",
    response=schemas.Health,
    transactional=False,
    summary="Liveness: the API process is serving",
)
def healthz(_ctx):
    return {"status": "ok", "checks": {}}


@endpoint(
    bp,
    "/readyz",
    methods=["GET"],
    auth="public",
    response=schemas.Health,
    transactional=False,
    summary="Readiness: Postgres, the broker's Redis and object storage answer",
    also=[503],
)
def readyz(_ctx):
    checks: dict[str, str] = {}
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    redis = get_redis()
    if redis is not None:
        try:
            redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"error: {type(exc).__name__}"
    try:
        s3_client().head_bucket(Bucket=get_settings().media_bucket)
        checks["object_storage"] = "ok"
    except Exception as exc:
        checks["object_storage"] = f"error: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return {"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503
