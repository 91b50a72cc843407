"""Users and API keys: create (the key is shown once), list (prefixes only), change tier, revoke.

A revoked key fails at once: every request looks its key up in Postgres (app/api/auth.py keeps
no cache), so the commit of the revocation is the moment it stops working. A tier change applies
to the user's next submission; jobs already submitted keep the tier they were promised.
Shared by the admin HTTP routes and the CLI.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.admin.errors import AdminError, audit
from app.admin.keys import create_key as new_api_key
from app.db.models import ApiKey, Tier, User


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def key_view(key: ApiKey, user_name: str) -> dict[str, Any]:
    """Never the key itself: only the prefix shown at creation identifies it afterwards."""
    return {
        "prefix": key.prefix,
        "user": user_name,
        "name": key.name,
        "scopes": list(key.scopes),
        "created_at": _iso(key.created_at),
        "revoked_at": _iso(key.revoked_at),
        "last_used_at": _iso(key.last_used_at),
    }


def _user_views(session: Session, users: list[User]) -> list[dict[str, Any]]:
    keys: dict[Any, list[ApiKey]] = {u.id: [] for u in users}
    if users:
        # One query for every listed user's keys, not one per user.
        for key in session.scalars(select(ApiKey).where(ApiKey.user_id.in_(list(keys))).order_by(ApiKey.created_at)):
            keys[key.user_id].append(key)
    return [
        {
            "id": str(u.id),
            "name": u.name,
            "tier": u.tier,
            "disabled": u.disabled,
            "created_at": _iso(u.created_at),
            "keys": [key_view(k, u.name) for k in keys[u.id]],
        }
        for u in users
    ]


def user_view(session: Session, user: User) -> dict[str, Any]:
    return _user_views(session, [user])[0]


def _check_tier(session: Session, tier: str) -> None:
    if session.get(Tier, tier) is None:
        names = ", ".join(session.scalars(select(Tier.name).order_by(Tier.rank)))
        raise AdminError("tier", f"no tier named '{tier}' (tiers: {names})")


def get_user(session: Session, name: str, *, lock: bool = False) -> User:
    query = select(User).where(User.name == name)
    if lock:
        query = query.with_for_update()
    user = session.scalar(query)
    if user is None:
        raise AdminError("name", f"no user named '{name}'", status=404)
    return user


def list_users(session: Session, *, tier: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    query = select(User).order_by(User.name).limit(limit)
    if tier is not None:
        query = query.where(User.tier == tier)
    return _user_views(session, list(session.scalars(query)))


def create_user(
    session: Session, name: str, tier: str, *, admin: bool = False, key_name: str = "", actor: str
) -> dict[str, Any]:
    """The user and a first key; the returned `key` is the only time the plaintext exists."""
    _check_tier(session, tier)
    if session.scalar(select(func.count()).select_from(User).where(User.name == name)):
        raise AdminError("name", f"a user named '{name}' already exists", status=409)
    user = User(name=name, tier=tier)
    session.add(user)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError:  # a concurrent create of the same name
        raise AdminError("name", f"a user named '{name}' already exists", status=409) from None
    scopes = ["user", "admin"] if admin else ["user"]
    key, plaintext = new_api_key(session, user, scopes, name=key_name or f"{name} key")
    audit("user.create", actor=actor, target=f"user:{name}", tier=tier, scopes=scopes, key_prefix=key.prefix)
    return {**user_view(session, user), "key": plaintext, "key_prefix": key.prefix}


def update_user(session: Session, name: str, changes: dict[str, Any], *, actor: str) -> dict[str, Any]:
    """`changes`: tier and/or disabled (already type-checked by schemas.UserPatch)."""
    user = get_user(session, name, lock=True)
    before = {"tier": user.tier, "disabled": user.disabled}
    if "tier" in changes:
        _check_tier(session, changes["tier"])
        user.tier = changes["tier"]
    if "disabled" in changes:
        user.disabled = changes["disabled"]
    session.flush()
    audit("user.update", actor=actor, target=f"user:{name}", changes=changes, before={k: before[k] for k in changes})
    return user_view(session, user)


def set_tier(session: Session, name: str, tier: str, *, actor: str) -> dict[str, Any]:
    return update_user(session, name, {"tier": tier}, actor=actor)


def create_key(
    session: Session, user_name: str, scopes: list[str], *, key_name: str = "", actor: str
) -> dict[str, Any]:
    user = get_user(session, user_name)
    scopes = sorted(set(scopes) | {"user"})  # an admin key can do what a user key can
    key, plaintext = new_api_key(session, user, scopes, name=key_name)
    audit("key.create", actor=actor, target=f"key:{key.prefix}", user=user_name, scopes=scopes)
    return {**key_view(key, user.name), "key": plaintext}


def list_keys(session: Session, user_name: str) -> list[dict[str, Any]]:
    return user_view(session, get_user(session, user_name))["keys"]


def revoke_key(session: Session, prefix: str, *, actor: str) -> dict[str, Any]:
    rows = session.execute(
        select(ApiKey, User.name)
        .join(User, User.id == ApiKey.user_id)
        .where(ApiKey.prefix == prefix)
        .with_for_update(of=ApiKey)
    ).all()
    if not rows:
        raise AdminError("prefix", f"no key with prefix '{prefix}'", status=404)
    if len(rows) > 1:
        # 48 random bits after `dq_`: a clash is rare, but revoking the wrong key would be worse.
        raise AdminError(
            "prefix", f"{len(rows)} keys share prefix '{prefix}'; revoke through the user's key list", status=409
        )
    key, user_name = rows[0]
    if key.revoked_at is None:
        key.revoked_at = dt.datetime.now(dt.timezone.utc)
        session.flush()
        audit("key.revoke", actor=actor, target=f"key:{prefix}", user=user_name)
    return key_view(key, user_name)
