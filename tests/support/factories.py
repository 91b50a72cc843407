"""Factories for rows tests need: users with keys in a tier."""

from __future__ import annotations

import uuid


def create_user(tier: str = "api", scopes: tuple[str, ...] = ("user",), name: str | None = None) -> tuple[uuid.UUID, str]:
    from app.api.auth import create_key
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
