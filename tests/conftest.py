"""Test setup: real Postgres, Redis and SeaweedFS, once per session.

Services come from DREAMQ_TEST_DATABASE_URL / DREAMQ_TEST_REDIS_URL / DREAMQ_TEST_S3_URL when
set (CI points the first two at the machine's own PostgreSQL and Redis), else the embedded ones
are started under a temporary directory. Either way the schema is migrated to head once, and
each test makes its own users, so tests never see each other's jobs.

Pure unit tests request none of these fixtures and start nothing.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# Settings read at import by some modules: keep test processes quiet and fast.
os.environ.setdefault("DREAMQ_LOG_JSON", "0")
os.environ.setdefault("DREAMQ_LOG_LEVEL", "WARNING")
# Prometheus multiprocess mode for this process and every worker/gunicorn it starts (they inherit
# the environment), as under `dreamq up`: /metrics in a test then sums what the subprocess
# workers counted. Set before anything imports prometheus_client, which reads it at import.
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="dreamq-prom-")
    atexit.register(shutil.rmtree, os.environ["PROMETHEUS_MULTIPROC_DIR"], True)


# The catch-all behind tests/support/system_deps.py: under CI=true (which installs every system
# dependency first) a skip hides a broken install step, so any skip but a CUDA one fails there,
# also one added later without going through the rule.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    from tests.support import system_deps

    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and system_deps.in_ci():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "CUDA" not in reason:
            report.outcome = "failed"
            report.longrepr = f"skipped under CI=true, which runs everything but CUDA: {reason}"


@pytest.fixture(scope="session")
def run_id() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    from tests.support.services import test_services

    with test_services(tmp_path_factory.mktemp("services")) as urls:
        yield urls


@pytest.fixture(scope="session")
def stack_env(services, tmp_path_factory, run_id):
    """Point this process's settings at the test services; migrate; seed tiers; buckets."""
    from tests.support.stack import configure_environment

    home = tmp_path_factory.mktemp("dreamq-home")
    env = configure_environment(services, home, run_id)
    # As every entry point does (app/wiring.py): webhooks and metrics follow the tests' transitions.
    from app.wiring import connect_listeners

    connect_listeners()
    yield env


@pytest.fixture(scope="session")
def tiny_model(stack_env):
    """The tiny fixture model pushed as version(s) of model `tiny`, served by pool local.tiny."""
    from tests.support.stack import push_fixture_model

    return push_fixture_model("tiny", ROOT / "tests" / "fixtures" / "bundles" / "tiny", dispatch_limit=4)


@pytest.fixture(scope="session")
def parked_model(stack_env):
    """The tiny bundle as model `parked`: it has a pool but no worker, so its jobs never run."""
    from tests.support.stack import push_fixture_model

    return push_fixture_model("parked", ROOT / "tests" / "fixtures" / "bundles" / "tiny", dispatch_limit=2)


@pytest.fixture(scope="session")
def demo_model(stack_env):
    """The real demo model (workers/demo_models/shapes) pushed as model `demo`."""
    from tests.support.stack import push_fixture_model

    return push_fixture_model("demo", ROOT / "workers" / "demo_models" / "shapes", dispatch_limit=4)


@pytest.fixture(scope="session")
def workers(stack_env, tiny_model, demo_model, tmp_path_factory):
    """Real Celery workers as subprocesses: control+cpu, and one CPU-device GPU worker per pool."""
    from tests.support.stack import SESSION_STEP_S, running_workers
    from tests.support.webhooks import WEBHOOK_TEST_ENV

    # Each tiny-model step sleeps 50 ms so a test can watch progress and cancel mid-run.
    with running_workers(
        stack_env,
        tmp_path_factory.mktemp("worker-logs"),
        models=["tiny", "demo"],
        extra_env={"DREAMQ_TINY_STEP_S": str(SESSION_STEP_S), **WEBHOOK_TEST_ENV},
    ) as handles:
        yield handles


@pytest.fixture(scope="session")
def flask_app(stack_env):
    from app.api import create_app

    app = create_app()
    app.testing = False  # errors go through our handlers, as in production
    return app


@pytest.fixture()
def client(flask_app):
    return flask_app.test_client()


@pytest.fixture()
def make_user(stack_env):
    """Factory: a fresh user (unique name) in a tier, with a key; returns (user_id, key)."""
    from tests.support.factories import create_user

    return create_user


@pytest.fixture()
def db_session(stack_env):
    """A session inside a transaction that is rolled back when the test ends (warehouse's pattern):
    its commits only release a savepoint, so nothing it writes is ever seen by another test."""
    from sqlalchemy.orm import Session

    from app.db.session import get_engine

    connection = get_engine().connect()
    outer = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()
        outer.rollback()
        connection.close()


@pytest.fixture()
def publisher():
    """The in-memory publisher installed for this process while the test runs (app/messaging)."""
    from app.messaging import InMemoryPublisher, set_publisher

    fake = InMemoryPublisher()
    previous = set_publisher(fake)
    try:
        yield fake
    finally:
        set_publisher(previous)
