"""Seed data for a fresh stack: the five tiers, the local cluster and pool, users and keys.

Idempotent: `dreamq up` runs it on every start. Existing rows (an admin may have edited a tier's
SLO) are left alone; only missing ones are created.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.admin.keys import create_key
from app.db.models import Cluster, Model, ModelVersion, Pool, Tier, User
from app.scheduling.tiers import DEFAULT_TIERS
from workers.repository import bundle_fingerprint, push_version

log = logging.getLogger(__name__)

DEMO_BUNDLE = Path(__file__).resolve().parents[1] / "workers" / "demo_models" / "shapes"


@dataclass(frozen=True)
class TierLimits:
    """What the API enforces per tier; the scheduler's part (W, floors, caps) is in tiers.py."""

    rate_per_min: float
    burst: int
    tier_rate_per_min: float | None
    tier_burst: int | None
    monthly_quota: int | None
    retention_days: int


# Per-user submission buckets, tier-wide buckets, monthly quotas and output retention.
TIER_LIMITS = {
    "api": TierLimits(600, 200, None, None, None, 30),
    "enterprise": TierLimits(300, 100, None, None, None, 30),
    "unlimited": TierLimits(60, 30, 6000, 1000, None, 14),
    "light": TierLimits(20, 10, 3000, 500, 300, 7),
    "free": TierLimits(6, 5, 1200, 200, 30, 3),
}


def seed_tiers(session: Session) -> None:
    existing = set(session.scalars(select(Tier.name)))
    for name, spec in DEFAULT_TIERS.items():
        if name in existing:
            continue
        limits = TIER_LIMITS[name]
        session.add(
            Tier(
                name=name,
                rank=spec.rank,
                slo_s=spec.slo_s,
                min_share=spec.min_share,
                concurrency_cap=spec.user_concurrency_cap,
                rate_per_min=limits.rate_per_min,
                burst=limits.burst,
                tier_rate_per_min=limits.tier_rate_per_min,
                tier_burst=limits.tier_burst,
                monthly_quota=limits.monthly_quota,
                retention_days=limits.retention_days,
            )
        )
    session.flush()


def ensure_cluster(session: Session, name: str, kind: str = "inference") -> Cluster:
    cluster = session.scalar(select(Cluster).where(Cluster.name == name))
    if cluster is None:
        cluster = Cluster(name=name, kind=kind)
        session.add(cluster)
        session.flush()
    return cluster


def ensure_pool(session: Session, cluster_name: str, model_name: str, dispatch_limit: int) -> Pool:
    cluster = ensure_cluster(session, cluster_name)
    model = session.scalar(select(Model).where(Model.name == model_name))
    if model is None:
        raise LookupError(f"model {model_name!r} does not exist; push a version first")
    pool = session.scalar(select(Pool).where(Pool.cluster_id == cluster.id, Pool.model_id == model.id))
    if pool is None:
        pool = Pool(cluster_id=cluster.id, model_id=model.id, dispatch_limit=dispatch_limit)
        session.add(pool)
        session.flush()
    return pool


def ensure_user(session: Session, name: str, tier: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        user = User(name=name, tier=tier)
        session.add(user)
        session.flush()
    return user


def new_user_key(session: Session, name: str, tier: str, scopes: list[str]) -> str:
    user = ensure_user(session, name, tier)
    _, plaintext = create_key(session, user, scopes, name=f"{name} key")
    return plaintext


def ensure_demo_model(session: Session, model_name: str, bundle: Path = DEMO_BUNDLE) -> ModelVersion | None:
    """Push the demo bundle through the model repository when no version has its content yet."""
    fingerprint = bundle_fingerprint(bundle)
    model = session.scalar(select(Model).where(Model.name == model_name))
    if model is not None:
        for version in session.scalars(select(ModelVersion).where(ModelVersion.model_id == model.id)):
            if version.manifest.get("content_digest") == fingerprint:
                return None
    pushed = push_version(
        session, bundle, model_name, created_by="dreamq up", description="demo: coloured shapes in motion"
    )
    log.info("demo model pushed", extra={"version": pushed.number, "digest": pushed.digest})
    return session.scalar(select(ModelVersion).where(ModelVersion.digest == pushed.digest))
