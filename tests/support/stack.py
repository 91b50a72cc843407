"""Wiring the test process and its subprocess workers to the test services."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class StackEnv:
    env: dict[str, str]
    home: Path
    run_id: str


def configure_environment(services, home: Path, run_id: str) -> StackEnv:
    from app.core import redis_client, storage
    from app.core.config import reload_settings
    from app.db import session as db_session
    from app.db.migrate import upgrade
    from app.seed import seed_tiers

    env = {
        "DATABASE_URL": services.database_url,
        "CELERY_BROKER_URL": services.redis_url,
        "DREAMQ_REDIS_URL": services.redis_url,
        "S3_ENDPOINT_URL": services.s3_url,
        "AWS_ACCESS_KEY_ID": services.s3_access_key,
        "AWS_SECRET_ACCESS_KEY": services.s3_secret_key,
        # Per run, so a shared external S3 never mixes two runs' objects.
        "DREAMQ_MODELS_BUCKET": f"dq-models-{run_id}",
        "DREAMQ_MEDIA_BUCKET": f"dq-media-{run_id}",
        "DREAMQ_HOME": str(home),
        "DREAMQ_MODEL_CACHE": str(home / "cache"),
        "DREAMQ_HEARTBEAT_INTERVAL_S": "1",
        "DREAMQ_LOG_JSON": "1",
    }
    # DREAMQ_TEST_REDIS_URL names a database reserved for tests: start it empty, so no message
    # or coalescing key from an earlier (maybe interrupted) run can reach this run's workers.
    import redis

    with redis.Redis.from_url(services.redis_url) as client:
        client.flushdb()
    os.environ.update(env)
    reload_settings()
    db_session.dispose_all()
    storage.reset_clients()
    redis_client.reset()
    upgrade(services.database_url)
    storage.ensure_buckets()
    from app.db.session import transaction

    with transaction() as session:
        seed_tiers(session)
    return StackEnv(env, home, run_id)


TINY_BUNDLE = ROOT / "tests" / "fixtures" / "bundles" / "tiny"
# The tiny model's step time on the session's workers (DREAMQ_TINY_STEP_S, tests/conftest.py).
SESSION_STEP_S = 0.05


def push_fixture_model(name: str, bundle: Path, *, dispatch_limit: int, force: bool = False) -> dict:
    """Push `bundle` as model `name` (once per content unless `force`) and give it a local pool."""
    from sqlalchemy import select

    from app.db.models import Model, ModelVersion
    from app.db.session import transaction
    from app.seed import ensure_demo_model, ensure_pool
    from workers.repository import push_version

    with transaction() as session:
        if force:
            push_version(session, bundle, name, created_by="test")
        else:
            ensure_demo_model(session, name, bundle)
        ensure_pool(session, "local", name, dispatch_limit)
        version = session.scalar(
            select(ModelVersion).join(Model).where(Model.name == name).order_by(ModelVersion.number.desc())
        )
        return {"name": name, "version": version.number, "digest": version.digest}


def _worker_ready(worker_name: str) -> bool:
    from sqlalchemy import text

    from app.db.session import transaction

    with transaction() as session:
        return bool(
            session.execute(
                text(
                    "SELECT 1 FROM workers WHERE id LIKE :n AND state <> 'stopped' AND heartbeat_at > now() - interval '10 seconds'"
                ),
                {"n": f"{worker_name}@%"},
            ).first()
        )


def _wait_for_ping(prefix: str, proc, log: Path, deadline: float) -> None:
    from tasks.celery_app import celery_app

    while True:
        replies = celery_app.control.ping(timeout=0.5) or []
        if any(name.startswith(prefix) for reply in replies for name in reply):
            return
        if not proc.alive():
            raise RuntimeError("control worker exited:\n" + log.read_text()[-4000:])
        if time.monotonic() > deadline:
            raise TimeoutError("control worker not ready:\n" + log.read_text()[-4000:])


@contextlib.contextmanager
def running_workers(
    stack: StackEnv,
    log_dir: Path,
    *,
    models: list[str],
    extra_env: dict[str, str] | None = None,
    control: int = 1,
    tag: str = "t",
) -> Iterator[dict]:
    """Start `control` control+cpu workers and one GPU worker per entry of `models` (a model may
    repeat: several workers in its pool); stop them all at the end."""
    from app.stack.process import ManagedProcess
    from workers.launch import control_worker_command, worker_command

    base_env = {**os.environ, **stack.env, **(extra_env or {})}
    procs: dict[str, ManagedProcess] = {}
    gpu_names: list[str] = []
    try:
        for index in range(control):
            name = f"cpu-{tag}-{index}"
            argv = control_worker_command(name)
            procs[name] = ManagedProcess(
                name,
                argv,
                env={**base_env, "DREAMQ_LOG_COMPONENT": name},
                cwd=str(ROOT),
                log_path=log_dir / f"{name}.log",
                signal_group=False,
            )
            procs[name].start()
        for index, model in enumerate(models):
            name = f"{model}-{tag}-{index}"
            argv, env = worker_command("local", model, "", name)
            procs[name] = ManagedProcess(
                name,
                argv,
                env={**env, **base_env, "CUDA_VISIBLE_DEVICES": ""},
                cwd=str(ROOT),
                log_path=log_dir / f"{name}.log",
                signal_group=False,
            )
            procs[name].start()
            gpu_names.append(name)
        deadline = time.monotonic() + 120
        for name in gpu_names:
            while not _worker_ready(name):
                if not procs[name].alive():
                    raise RuntimeError(f"worker {name} exited:\n" + (log_dir / f"{name}.log").read_text()[-4000:])
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker {name} not ready:\n" + (log_dir / f"{name}.log").read_text()[-4000:])
                time.sleep(0.2)
        for index in range(control):
            name = f"cpu-{tag}-{index}"
            _wait_for_ping(f"{name}@", procs[name], log_dir / f"{name}.log", deadline)
        yield {"procs": procs, "log_dir": log_dir, "gpu_workers": gpu_names}
    finally:
        # In parallel: each warm shutdown takes a second or two, and they do not depend on each other.
        stoppers = [threading.Thread(target=proc.stop, kwargs={"grace_s": 10}) for proc in procs.values()]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()


def _http_ok(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


@contextlib.contextmanager
def gunicorn_api(
    stack: StackEnv, log_path: Path, *, workers: int = 2, threads: int = 4, extra_env: dict[str, str] | None = None
) -> Iterator[str]:
    """The API under gunicorn on a free port of 127.0.0.1, as in production; yields its base URL."""
    from app.stack.process import ManagedProcess, find_free_port

    port = find_free_port(None)
    api = ManagedProcess(
        "api",
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-w",
            str(workers),
            "--threads",
            str(threads),
            "-b",
            f"127.0.0.1:{port}",
            "app.api:create_app()",
        ],
        env={**os.environ, **stack.env, **(extra_env or {})},
        cwd=str(ROOT),
        log_path=log_path,
        ready=lambda: _http_ok(f"http://127.0.0.1:{port}/healthz"),
    )
    api.start()
    try:
        api.wait_ready(60)
        yield f"http://127.0.0.1:{port}"
    finally:
        api.stop(5)
