"""Engines and the one place transactions are committed or rolled back.

A process has one engine per database URL. Forked children (gunicorn workers, Celery prefork
children) must not reuse the parent's pooled connections: `dispose_after_fork()` is called from
the fork hooks so each child opens its own.

`transaction()` is the unit of work for a request or a task: it commits once at the end, then
runs the callbacks registered with `after_commit()` — publishing to the broker happens there, so
nothing is ever published for a change that was rolled back.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Callable, Iterator

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.config import get_settings

log = logging.getLogger(__name__)

_engines: dict[str, Engine] = {}
_lock = threading.Lock()

_AFTER_COMMIT = "dreamq.after_commit"


def normalize_url(url: str) -> str:
    """Accept plain `postgresql://` URLs (as libpq tools print them) and use psycopg 3."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def get_engine(url: str | None = None) -> Engine:
    settings = get_settings()
    if url is None:
        settings.require("database_url")
        url = settings.database_url
    url = normalize_url(url)
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = create_engine(
                url,
                pool_size=settings.db_pool_size,
                max_overflow=settings.db_pool_size,
                pool_pre_ping=True,
                pool_recycle=1800,
                connect_args={
                    "options": f"-c statement_timeout={settings.db_statement_timeout_ms}",
                    "application_name": "dreamq",
                },
            )
            _engines[url] = engine
        return engine


def dispose_after_fork() -> None:
    """Forget connections inherited from the parent; `close=False` leaves the parent's sockets alone."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=False)


def dispose_all() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


_factories: dict[int, sessionmaker] = {}


def _factory(engine: Engine) -> sessionmaker:
    key = id(engine)
    factory = _factories.get(key)
    if factory is None:
        factory = sessionmaker(bind=engine, expire_on_commit=False, autoflush=True)
        _factories[key] = factory
    return factory


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run `callback` once this session's transaction has committed (never if it rolls back)."""
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


def _run_after_commit(session: Session) -> None:
    callbacks = session.info.pop(_AFTER_COMMIT, [])
    for callback in callbacks:
        try:
            callback()
        except Exception:  # the commit stands; the beat safety tick repairs a lost publish
            log.exception("after-commit callback failed", extra={"callback": repr(callback)})


@contextlib.contextmanager
def transaction(engine: Engine | None = None) -> Iterator[Session]:
    """One unit of work: commit at the end, roll back on any exception, then after-commit hooks."""
    session = _factory(engine or get_engine())()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        session.info.pop(_AFTER_COMMIT, None)
        raise
    finally:
        session.close()
    _run_after_commit(session)


@event.listens_for(Session, "after_soft_rollback")
def _drop_callbacks_on_rollback(session: Session, previous_transaction) -> None:
    if previous_transaction.parent is None:
        session.info.pop(_AFTER_COMMIT, None)
