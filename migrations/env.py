"""Alembic environment: online migrations only, with lock and statement timeouts.

A migration that waits on a lock held by a long transaction would block every query queued
behind it; lock_timeout makes it fail fast instead, and it can simply be retried.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from app.core.config import get_settings
from app.db.models import Base
from app.db.session import normalize_url

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("database_url") or get_settings().database_url
    if not url:
        raise SystemExit("DATABASE_URL is not set: export it or run `dreamq up`")
    return normalize_url(url)


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(
        _url(),
        poolclass=pool.NullPool,
        connect_args={"options": "-c lock_timeout=10s -c statement_timeout=300s"},
    )
    with engine.connect() as connection:
        _run(connection)
    engine.dispose()


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        # Two `dreamq up` (or API replicas) migrating at once serialise on this lock.
        connection.exec_driver_sql("SELECT pg_advisory_xact_lock(72157001)")
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run against a database")
run_migrations_online()
