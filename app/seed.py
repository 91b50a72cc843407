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

from app.api.auth import create_key
from app.db.models import Cluster, Model, ModelVersion, Pool, Tier, User

log = logging.getLogger(__name__)

DEMO_BUNDLE = Path(__file__).resolve().parents[1] / "workers" / "demo_models" / "shapes"


@dataclass(frozen=True)
class TierDefaults:
    name: str
    rank: int
    slo_s: float
    rate_per_min: float
    burst: int
    concurrency_cap: int
    min_share: float
    monthly_quota: int | None
    retention_days: int


# W (the promised worst-case wait) per tier, from the design: 1 min for api up to 2 h for free.
# min_share is the starvation guard: the share of dispatches a backlogged tier always gets.
TIER_DEFAULTS = (
    TierDefaults("api", 0, 60, 600, 200, 64, 0.0, None, 30),
    TierDefaults("enterprise", 1, 120, 300, 100, 32, 0.0, None, 30),
    TierDefaults("unlimited", 2, 600, 60, 30, 4, 0.08, None, 14),
    TierDefaults("light", 3, 1800, 20, 10, 2, 0.05, 300, 7),
    TierDefaults("free", 4, 7200, 6, 5, 1, 0.03, 30, 3),
)


def seed_tiers(session: Session) -> None:
    existing = set(session.scalars(select(Tier.name)))
    for t in TIER_DEFAULTS:
        if t.name not in existing:
            session.add(Tier(name=t.name, rank=t.rank, slo_s=t.slo_s, rate_per_min=t.rate_per_min, burst=t.burst,
                             concurrency_cap=t.concurrency_cap, min_share=t.min_share, monthly_quota=t.monthly_quota,
                             retention_days=t.retention_days))
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
    from workers.repository import bundle_fingerprint, push_version

    fingerprint = bundle_fingerprint(bundle)
    model = session.scalar(select(Model).where(Model.name == model_name))
    if model is not None:
        for version in session.scalars(select(ModelVersion).where(ModelVersion.model_id == model.id)):
            if version.manifest.get("content_digest") == fingerprint:
                return None
    pushed = push_version(session, bundle, model_name, created_by="dreamq up", description="demo: coloured shapes in motion")
    log.info("demo model pushed", extra={"version": pushed.number, "digest": pushed.digest})
    return session.scalar(select(ModelVersion).where(ModelVersion.digest == pushed.digest))
