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
import time
from typing import Any, Callable, Iterator, Mapping

from psycopg.pq import TransactionStatus
from sqlalchemy import create_engine, event, exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import get_settings

log = logging.getLogger(__name__)

_engines: dict[str, Engine] = {}
_lock = threading.Lock()

_AFTER_COMMIT = "dreamq.after_commit"
# A pooled connection idle longer than this is pinged before use; one used more recently is not.
PING_AFTER_IDLE_S = 1.0
_CHECKED_IN_AT = "dreamq.checked_in_at"


def normalize_url(url: str) -> str:
    """Accept plain `postgresql://` URLs (as libpq tools print them) and use psycopg 3."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def get_engine(url: str | None = None) -> Engine:
    settings = get_settings()
    if url is None:
        if not settings.database_url:  # require() walks every setting: only on the way to failing
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
                pool_recycle=1800,
                connect_args={
                    "options": f"-c statement_timeout={settings.db_statement_timeout_ms}",
                    "application_name": "dreamq",
                },
            )
            event.listen(engine, "checkin", _remember_checkin)
            event.listen(engine, "checkout", _ping_if_idle)
            _engines[url] = engine
        return engine


# Instead of `pool_pre_ping=True`, which pings on every checkout: on a submission that was 3 of
# its 8 waits on Postgres (a SELECT 1 and what psycopg sends around it), per request.
# A connection that sat idle (the ones a Postgres restart or an idle timeout leaves dead) is still
# pinged, and a dead one replaced before the request sees it. One used in the last second is
# trusted: if Postgres died within that second, the request on it fails with the 503 of any
# request in flight during a restart, and SQLAlchemy then invalidates every older connection of
# the pool, so the next checkouts reconnect.
def _remember_checkin(dbapi_connection, record) -> None:
    record.info[_CHECKED_IN_AT] = time.monotonic()


def _ping_if_idle(dbapi_connection, record, proxy) -> None:
    checked_in_at = record.info.get(_CHECKED_IN_AT)
    if checked_in_at is None or time.monotonic() - checked_in_at < PING_AFTER_IDLE_S:
        return  # just connected, or in use a moment ago
    record.info.pop(_CHECKED_IN_AT, None)
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SELECT 1")
        finally:
            cursor.close()
    except Exception as error:
        # The pool discards this connection and checks out another (a fresh one if need be).
        raise exc.DisconnectionError(f"pooled connection failed its ping: {error}") from error


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
    run_callbacks(session.info.pop(_AFTER_COMMIT, []))


def run_callbacks(callbacks: list[Callable[[], None]]) -> None:
    """Run after-commit callbacks; a failure is logged, the others still run."""
    for callback in callbacks:
        try:
            callback()
        except Exception:  # the commit stands; the beat safety tick repairs a lost publish
            log.exception("after-commit callback failed", extra={"callback": repr(callback)})


def driver_execute(session: Session, sql: str, params: Mapping[str, Any] | None = None):
    """Run one statement in the session's transaction straight through psycopg; returns its cursor.

    For the few statements of the submission path only (API key lookup, version resolution, the
    job insert): per statement SQLAlchemy's compile cache, result objects and (for ORM
    statements) entity loading cost 0.2-1 ms of CPU, against ~0.1 ms here (bench/intake.py).
    Placeholders are psycopg's `%(name)s`. Errors come out as SQLAlchemy's exceptions, as from
    `session.execute`, so a lost database still answers 503 and the pool drops dead connections.
    """
    connection = session.connection()
    dbapi_connection = connection.connection.driver_connection
    assert dbapi_connection is not None  # a checked-out connection has its driver connection
    try:
        return dbapi_connection.execute(sql, params)
    except connection.dialect.loaded_dbapi.Error as error:
        # SQLAlchemy's own handler (private API; requirements.txt pins the version): the exception
        # classes session.execute raises, the handle_error hooks, and on a disconnect this
        # connection and every older one in the pool invalidated. It always raises.
        connection._handle_dbapi_exception(error, sql, params, None, None)
        raise


@contextlib.contextmanager
def driver_connection(engine: Engine | None = None) -> Iterator[Any]:
    """A pooled connection in autocommit, straight through psycopg, without an ORM Session.

    For the common case of POST /v1/generations only (see app/api/generations.py): a Session's
    create, checkout, commit and close, and the BEGIN and COMMIT round trips, cost more CPU than
    the route's statements did (bench/intake.py). Each statement commits on its own; a caller
    that needs several in one transaction opens one (`with connection.transaction():`). Same
    pool and ping-if-idle checkout as `transaction()`. A psycopg error inside comes out as
    SQLAlchemy's exception through its own handler, as from `session.execute`: a lost database
    answers 503 and the pool drops its dead connections.
    """
    connection = (engine or get_engine()).connect()
    dbapi_connection = connection.connection.driver_connection
    assert dbapi_connection is not None  # a checked-out connection has its driver connection
    try:
        if dbapi_connection.info.transaction_status != TransactionStatus.IDLE:
            dbapi_connection.rollback()  # the checkout's ping (after 1 s idle) left one open
        dbapi_connection.autocommit = True
        yield dbapi_connection
    except connection.dialect.loaded_dbapi.Error as error:
        # SQLAlchemy's own handler (private API; requirements.txt pins the version), as in
        # driver_execute(): the exception classes, handle_error hooks, pool invalidation.
        connection._handle_dbapi_exception(error, None, None, None, None)
        raise
    finally:
        try:
            # Out of a `with connection.transaction()` an exception has rolled back already;
            # this is for one left open otherwise. Then back to what the pool hands out, or
            # never back to the pool.
            if dbapi_connection.info.transaction_status != TransactionStatus.IDLE:
                dbapi_connection.rollback()
            dbapi_connection.autocommit = False
        except Exception:
            connection.invalidate()
        connection.close()


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
