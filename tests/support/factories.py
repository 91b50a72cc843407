"""Factories for rows tests need: users with keys in a tier."""

from __future__ import annotations

import uuid


def create_user(
    tier: str = "api", scopes: tuple[str, ...] = ("user",), name: str | None = None
) -> tuple[uuid.UUID, str]:
    from app.admin.keys import create_key
    from app.db.models import User
    from app.db.session import transaction

    with transaction() as session:
        user = User(name=name or f"test-{tier}-{uuid.uuid4().hex[:10]}", tier=tier)
        session.add(user)
        session.flush()
        _, key = create_key(session, user, list(scopes))
        return user.id, key


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def create_tier(**overrides) -> str:
    """A tier of its own (ranked after every other), so tuning it changes nothing other tests see."""
    from sqlalchemy import func, select

    from app.db.models import Tier
    from app.db.session import transaction

    name = f"t-{uuid.uuid4().hex[:8]}"
    values = dict(
        slo_s=600,
        rate_per_min=600,
        burst=100,
        concurrency_cap=4,
        min_share=0.0,
        monthly_quota=None,
        retention_days=7,
        tier_rate_per_min=None,
        tier_burst=None,
    )
    values.update(overrides)
    with transaction() as session:
        rank = (session.scalar(select(func.max(Tier.rank))) or 0) + 1
        session.add(Tier(name=name, rank=rank, **values))
    return name
