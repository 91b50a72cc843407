"""API keys: made here (admin verbs, `dreamq up`), checked by app/api/auth.py.

Only the sha256 of a key is stored; the plaintext is shown once, when it is made.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy.orm import Session

from app.db.models import ApiKey, User

KEY_PREFIX = "dq_"
SCOPES = ("user", "admin")


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    return key[:11]


def create_key(session: Session, user: User, scopes: list[str], name: str = "") -> tuple[ApiKey, str]:
    unknown = set(scopes) - set(SCOPES)
    if unknown:
        raise ValueError(f"unknown scopes {sorted(unknown)}")
    plaintext = new_key()
    key = ApiKey(
        user_id=user.id,
        key_hash=hash_key(plaintext),
        prefix=display_prefix(plaintext),
        scopes=sorted(scopes),
        name=name,
    )
    session.add(key)
    session.flush()
    return key, plaintext
