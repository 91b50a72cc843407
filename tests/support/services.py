"""Backing services for the test suite: external ones from env vars, else embedded ones.

Used once per test session by the conftest:

    with test_services(tmp_path_factory.mktemp("services")) as services:
        ...services.database_url, services.redis_url, services.s3_url...

Per service, an env var selects a server that already runs (CI containers, a dev's own
stack); otherwise the embedded binary from the venv is started under tmp_root and stopped at
the end. On an external Postgres a fresh, uniquely named database is created and dropped at
the end, so parallel runs against one server do not see each other's rows.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

from app.stack.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedSeaweedFS, EmbeddedService

log = logging.getLogger(__name__)

ENV_DATABASE_URL = "DREAMQ_TEST_DATABASE_URL"
ENV_REDIS_URL = "DREAMQ_TEST_REDIS_URL"
ENV_S3_URL = "DREAMQ_TEST_S3_URL"
ENV_S3_ACCESS_KEY = "DREAMQ_TEST_S3_ACCESS_KEY"
ENV_S3_SECRET_KEY = "DREAMQ_TEST_S3_SECRET_KEY"

EMBEDDED_DATABASE = "dreamq_test"
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ServiceUrls:
    database_url: str  # SQLAlchemy form, postgresql+psycopg://
    redis_url: str
    s3_url: str
    s3_access_key: str
    s3_secret_key: str
    database_kind: str = "embedded"  # 'external' | 'embedded'
    redis_kind: str = "embedded"
    s3_kind: str = "embedded"
    start_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def kinds(self) -> dict[str, str]:
        return {"database": self.database_kind, "redis": self.redis_kind, "s3": self.s3_kind}

    @property
    def database_dsn(self) -> str:
        """libpq form of database_url, for psycopg.connect()."""
        return to_libpq_url(self.database_url)

    def describe(self) -> str:
        return (
            f"database={self.database_kind} {self.database_url} | "
            f"redis={self.redis_kind} {self.redis_url} | s3={self.s3_kind} {self.s3_url}"
        )


def to_sqlalchemy_url(url: str) -> str:
    scheme, rest = url.split("://", 1)
    if scheme in ("postgres", "postgresql", "postgresql+psycopg"):
        return "postgresql+psycopg://" + rest
    raise ValueError(f"{ENV_DATABASE_URL} must be a postgresql:// URL, got {scheme}://")


def to_libpq_url(url: str) -> str:
    return "postgresql://" + to_sqlalchemy_url(url).split("://", 1)[1]


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def _create_database(server_url: str) -> str:
    """Create a uniquely named database on the server of server_url; returns its URL."""
    import psycopg
    from psycopg import sql

    name = f"dreamq_test_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(to_libpq_url(server_url), autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return _with_database(to_sqlalchemy_url(server_url), name)


def _drop_database(database_url: str) -> None:
    import psycopg
    from psycopg import sql

    name = urlsplit(database_url).path.lstrip("/")
    # Connect to the server's maintenance database, not to the one being dropped.
    admin_url = to_libpq_url(_with_database(database_url, "postgres"))
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        # FORCE (PG 13+) ends connections a leaked engine or pool may still hold.
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _stop_all(services: list[EmbeddedService]) -> None:
    if not services:
        return
    with ThreadPoolExecutor(max_workers=len(services)) as pool:
        outcomes = list(pool.map(lambda s: (s.name, s.stop()), services))
    log.info("embedded services stopped: %s", dict(outcomes))


@contextmanager
def test_services(tmp_root: Path) -> Iterator[ServiceUrls]:
    """Yield ServiceUrls for database, redis and S3; stop/drop whatever was created on exit."""
    tmp_root = Path(tmp_root)
    env = os.environ
    embedded: dict[str, EmbeddedService] = {}
    if not env.get(ENV_DATABASE_URL):
        embedded["database"] = EmbeddedPostgres(tmp_root / "postgres", port=0, database=EMBEDDED_DATABASE)
    if not env.get(ENV_REDIS_URL):
        embedded["redis"] = EmbeddedRedis(tmp_root / "redis", port=0)
    if env.get(ENV_S3_URL):
        if not (env.get(ENV_S3_ACCESS_KEY) and env.get(ENV_S3_SECRET_KEY)):
            raise RuntimeError(f"{ENV_S3_URL} needs {ENV_S3_ACCESS_KEY} and {ENV_S3_SECRET_KEY}")
    else:
        embedded["s3"] = EmbeddedSeaweedFS(tmp_root / "seaweedfs", s3_port=0)

    with ExitStack() as cleanup:
        started: list[EmbeddedService] = []
        cleanup.callback(_stop_all, started)
        start_seconds: dict[str, float] = {}
        if embedded:
            # Concurrently: the slowest service (SeaweedFS, ~1-2s) bounds the wait.
            def start(item: tuple[str, EmbeddedService]) -> None:
                kind, service = item
                t0 = time.monotonic()
                service.start(timeout_s=START_TIMEOUT_S)
                start_seconds[kind] = round(time.monotonic() - t0, 2)

            with ThreadPoolExecutor(max_workers=len(embedded)) as pool:
                futures = [pool.submit(start, item) for item in embedded.items()]
            # Register every service, started or not, before raising: stop() of one that
            # never started is a no-op, and one that did must not be left running.
            started.extend(embedded.values())
            for future in futures:
                future.result()

        if "database" in embedded:
            database_url = embedded["database"].url
        else:
            database_url = _create_database(env[ENV_DATABASE_URL])
            drop: Callable[[], None] = lambda: _drop_database(database_url)  # noqa: E731
            cleanup.callback(drop)

        if "s3" in embedded:
            seaweed = embedded["s3"]
            assert isinstance(seaweed, EmbeddedSeaweedFS)
            s3_url, access_key, secret_key = seaweed.url, seaweed.access_key, seaweed.secret_key
        else:
            s3_url, access_key, secret_key = env[ENV_S3_URL], env[ENV_S3_ACCESS_KEY], env[ENV_S3_SECRET_KEY]
        assert access_key is not None and secret_key is not None

        urls = ServiceUrls(
            database_url=database_url,
            redis_url=embedded["redis"].url if "redis" in embedded else env[ENV_REDIS_URL],
            s3_url=s3_url,
            s3_access_key=access_key,
            s3_secret_key=secret_key,
            database_kind="embedded" if "database" in embedded else "external",
            redis_kind="embedded" if "redis" in embedded else "external",
            s3_kind="embedded" if "s3" in embedded else "external",
            start_seconds=start_seconds,
        )
        log.info("test services: %s (embedded start seconds: %s)", urls.describe(), start_seconds)
        yield urls


# A function named test_* imported into a test module would otherwise be collected as a test.
test_services.__test__ = False  # type: ignore[attr-defined]
