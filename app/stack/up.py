"""`dreamq up`: the whole stack under one supervisor, on loopback.

Order: services (Postgres, Redis, SeaweedFS; each skipped when its URL is given by env) ->
migrations -> seed (tiers, demo model pushed through the model repository, pool, users and keys)
-> API (gunicorn) -> control+cpu worker -> GPU workers -> beat -> Flower. Ready means the API's
/readyz answers 200, every GPU worker heartbeats and Flower listens. Then the URLs and keys are
printed and written to .dreamq/credentials.json (for scripts and `dreamq generate`) and the
service URLs to .dreamq/stack.json (for operator commands).

Ctrl-C (or SIGTERM) stops everything in reverse order: SIGTERM, then SIGKILL after the grace
period, so no process is left behind. Data stays under .dreamq/, so a restart keeps queued and
finished jobs.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import requests

from app.admin.dream_machine import seed_mappings
from app.admin.keys import hash_key
from app.core.config import get_settings, reload_settings
from app.core.logging_setup import configure_logging
from app.core.storage import ensure_buckets
from app.db.migrate import upgrade
from app.db.models import ApiKey
from app.db.session import transaction
from app.observability.metrics import prepare_multiprocess_dir
from app.seed import ensure_demo_model, ensure_pool, new_user_key, seed_tiers
from app.stack.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedSeaweedFS, EmbeddedService
from app.stack.process import ManagedProcess, Supervisor, SupervisorShutdown, find_free_port
from workers.launch import celery_command, control_worker_command, visible_gpus, worker_command

# Preferred ports (used when free, else any free port): clear of the machine's own 5432/6379/5672
# and of common dev servers.
API_PORT = 18000
FLOWER_PORT = 15555

# Stop order: every app process together first, then the services they use.
SERVICES, APPS = 0, 1


@dataclass
class StackState:
    home: Path
    env: dict[str, str] = field(default_factory=dict)
    embedded: list = field(default_factory=list)
    kinds: dict[str, str] = field(default_factory=dict)


def _say(message: str) -> None:
    print(f"[dreamq up] {message}", file=sys.stderr, flush=True)


def _start_services(state: StackState, supervisor: Supervisor) -> None:
    """Start the embedded services whose URL the environment does not give, in parallel."""
    settings = get_settings()
    data = state.home / "data"
    data.mkdir(parents=True, exist_ok=True)
    wanted: dict[str, Callable[[], EmbeddedService]] = {}
    if not settings.database_url:
        wanted["postgres"] = lambda: EmbeddedPostgres(data / "postgres")
    if not settings.broker_url:
        wanted["redis"] = lambda: EmbeddedRedis(data / "redis")
    if not settings.s3_endpoint_url:
        wanted["seaweedfs"] = lambda: EmbeddedSeaweedFS(data / "seaweedfs")
    for name in ("postgres", "redis", "seaweedfs"):
        state.kinds[name] = "embedded" if name in wanted else "external"

    def start(name: str):
        service = wanted[name]()
        service.start()
        return name, service

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(start, name) for name in wanted]
        errors = []
        for future in concurrent.futures.as_completed(futures):
            try:
                name, service = future.result()
            except Exception as exc:  # report all failures, then stop what did start
                errors.append(exc)
                continue
            state.embedded.append(service)
            # Supervised too, so `watch()` notices if a service dies under the stack.
            supervisor.add(service.process, stage=SERVICES)
            _say(f"{name} ready at {service.url}")
            if name == "postgres":
                state.env["DATABASE_URL"] = service.url
            elif name == "redis":
                state.env["CELERY_BROKER_URL"] = service.url
                state.env["DREAMQ_REDIS_URL"] = service.url
            elif name == "seaweedfs":
                state.env["S3_ENDPOINT_URL"] = service.url
                state.env["AWS_ACCESS_KEY_ID"] = service.access_key
                state.env["AWS_SECRET_ACCESS_KEY"] = service.secret_key
        if errors:
            raise errors[0]


def _load_credentials(home: Path) -> dict:
    path = home / "credentials.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _key_is_valid(session, key: str | None) -> bool:
    from sqlalchemy import select

    if not key:
        return False
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    return row is not None and row.revoked_at is None


def _migrate_and_seed(state: StackState, previous: dict) -> dict:
    settings = get_settings()
    upgrade(settings.database_url)
    _say("schema migrated to head")
    ensure_buckets()
    with transaction() as session:
        seed_tiers(session)
        pushed = ensure_demo_model(session, settings.default_model)
        if pushed is not None:
            _say(f"pushed demo model {settings.default_model} v{pushed.number} ({pushed.digest[:19]}…)")
        ensure_pool(session, settings.default_cluster, settings.default_model, settings.default_dispatch_limit)
        seeded = seed_mappings(session, settings.default_model)
        if seeded:
            _say(f"Dream Machine model names {', '.join(seeded)} -> {settings.default_model}")
        api_key = previous.get("api_key")
        if not _key_is_valid(session, api_key):
            api_key = new_user_key(session, "demo", "api", ["user"])
        admin_key = previous.get("admin_key")
        if not _key_is_valid(session, admin_key):
            admin_key = new_user_key(session, "admin", "enterprise", ["user", "admin"])
    return {"api_key": api_key, "admin_key": admin_key}


def _child_env(state: StackState, component: str) -> dict[str, str]:
    env = {
        **os.environ,
        **state.env,
        "DREAMQ_HOME": str(state.home),
        "DREAMQ_LOG_COMPONENT": component,
        "PYTHONUNBUFFERED": "1",
    }
    if component == "flower":
        # Flower serves its own metrics; in the shared directory they would show up in the API's.
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


FLOWER_CONFIG = Path(__file__).resolve().parents[1] / "observability" / "flowerconfig.py"


def flower_command(port: int, user: str, password: str, *, address: str = "127.0.0.1") -> list[str]:
    """Flower as `dreamq up` runs it: basic auth, and the config that lists every pool queue."""
    return celery_command(
        "flower",
        f"--conf={FLOWER_CONFIG}",
        f"--address={address}",
        f"--port={port}",
        f"--basic-auth={user}:{password}",
        "--persistent=False",
    )


def _http_ok(url: str, **kwargs) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return requests.get(url, timeout=1, **kwargs).status_code == 200
        except requests.RequestException:
            return False

    return check


def _gpu_worker_ready(name: str) -> Callable[[], bool]:
    def check() -> bool:
        from sqlalchemy import text

        with transaction() as session:
            return (
                session.execute(
                    text(
                        "SELECT 1 FROM workers WHERE id LIKE :n AND state <> 'stopped' AND heartbeat_at > now() - interval '15 seconds'"
                    ),
                    {"n": f"{name}@%"},
                ).first()
                is not None
            )

    return check


def run_stack(*, gpu_workers: int | None = None, grace_s: float = 10.0, exit_when_ready: bool = False) -> int:
    configure_logging("up", json_logs=False, level="WARNING")
    settings = get_settings()
    home = Path(settings.home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    state = StackState(home=home)
    # One metrics directory for every process of this host (API workers, Celery children, beat):
    # /metrics sums their counters. Emptied at start: old files carry old pids and old counts.
    metrics_dir = home / "prometheus"
    prepare_multiprocess_dir(str(metrics_dir))
    state.env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    supervisor = Supervisor(grace_s=grace_s)
    supervisor.install_signal_handlers()
    started = time.monotonic()
    try:
        _start_services(state, supervisor)
        os.environ.update(state.env)
        os.environ["DREAMQ_HOME"] = str(home)
        reload_settings()
        previous = _load_credentials(home)
        keys = _migrate_and_seed(state, previous)
        flower_password = settings.flower_password or previous.get("flower_password") or secrets.token_urlsafe(12)
        # Signs /dashboard logins; kept across restarts so a browser stays logged in.
        secret_key = settings.secret_key or previous.get("secret_key") or secrets.token_urlsafe(32)
        state.env.update({"DATABASE_URL": get_settings().database_url, "CELERY_BROKER_URL": get_settings().broker_url})

        api_port = find_free_port(API_PORT)
        api_url = f"http://127.0.0.1:{api_port}"
        supervisor.add_and_start(
            ManagedProcess(
                "api",
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "-c",
                    "python:app.gunicorn_conf",
                    "-w",
                    "2",
                    "--threads",
                    "4",
                    "-b",
                    f"127.0.0.1:{api_port}",
                    "--graceful-timeout",
                    str(int(grace_s)),
                    "--access-logfile",
                    "-",
                    "app.api:create_app()",
                ],
                env={**_child_env(state, "api"), "DREAMQ_SECRET_KEY": secret_key},
                cwd=str(Path.cwd()),
                log_path=logs / "api.log",
                ready=_http_ok(f"{api_url}/readyz"),
            ),
            ready_timeout=60,
            stage=APPS,
        )
        _say(f"API ready at {api_url}")

        supervisor.add_and_start(
            ManagedProcess(
                "control-worker",
                control_worker_command("control", events=True),
                env=_child_env(state, "control-worker"),
                log_path=logs / "control-worker.log",
                signal_group=False,
            ),
            ready_timeout=0,
            stage=APPS,
        )

        visible = visible_gpus()
        count = gpu_workers if gpu_workers is not None else max(len(visible), 1)
        gpu_names = []
        for index in range(count):
            gpus = visible[index] if index < len(visible) else ""
            name = f"gpu{gpus}" if gpus else f"cpu{index}"
            argv, env = worker_command(settings.default_cluster, settings.default_model, gpus, name)
            env.update(state.env)
            # SIGTERM to the Celery main process only: a warm shutdown lets the running job finish
            # within the grace period; past it the group is killed and acks_late requeues the job.
            supervisor.add_and_start(
                ManagedProcess(
                    f"gpu-worker-{name}", argv, env=env, signal_group=False, log_path=logs / f"gpu-worker-{name}.log"
                ),
                ready_timeout=0,
                stage=APPS,
            )
            gpu_names.append(name)

        supervisor.add_and_start(
            ManagedProcess(
                "beat",
                celery_command("beat", "-s", str(home / "celerybeat-schedule"), "--loglevel", "INFO"),
                env=_child_env(state, "beat"),
                log_path=logs / "beat.log",
            ),
            ready_timeout=0,
            stage=APPS,
        )

        flower_port = find_free_port(FLOWER_PORT)
        flower_url = f"http://127.0.0.1:{flower_port}"
        flower_user = settings.flower_user
        supervisor.add_and_start(
            ManagedProcess(
                "flower",
                flower_command(flower_port, flower_user, flower_password),
                env=_child_env(state, "flower"),
                log_path=logs / "flower.log",
                ready=_http_ok(f"{flower_url}/healthcheck"),
            ),
            ready_timeout=60,
            stage=APPS,
        )

        deadline = time.monotonic() + 180
        for name in gpu_names:
            check = _gpu_worker_ready(name)
            while not check():
                dead = supervisor.first_unexpected_exit()
                if dead is not None:
                    raise RuntimeError(f"{dead.name} exited during start-up; see {dead.log_path}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"GPU worker {name} did not heartbeat; see {logs}")
                time.sleep(0.25)

        credentials = {
            "api_url": api_url,
            "api_key": keys["api_key"],
            "admin_key": keys["admin_key"],
            "flower_url": flower_url,
            "flower_user": flower_user,
            "flower_password": flower_password,
            "dashboard_url": f"{api_url}/dashboard",
            "secret_key": secret_key,
        }
        _write_private(home / "credentials.json", credentials)
        _write_private(
            home / "stack.json",
            {
                "env": {k: v for k, v in state.env.items()},
                "services": state.kinds,
                "api_url": api_url,
                "flower_url": flower_url,
            },
        )
        _print_summary(credentials, state, gpu_names, logs, time.monotonic() - started)
        if exit_when_ready:
            return 0
        dead = supervisor.watch()
        if dead is not None:
            _say(f"{dead.name} exited unexpectedly (code {dead.returncode}); stopping everything. Log: {dead.log_path}")
            return 1
        return 0
    except (KeyboardInterrupt, SupervisorShutdown):
        return 0
    except Exception as exc:
        _say(f"start-up failed: {exc}")
        return 1
    finally:
        _say("stopping…")
        supervisor.stop_all(grace_s=grace_s)
        stop_started = supervisor.stop_started_at or time.monotonic()
        for service in reversed(state.embedded):
            service.stop(grace_s=grace_s)
        supervisor.restore_signal_handlers()
        outcomes = ", ".join(f"{p.name}: {p.outcome}" for p in supervisor.processes if p.outcome)
        _say(f"stopped in {time.monotonic() - stop_started:.1f}s ({outcomes}); data kept in {home}")


def _write_private(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.chmod(0o600)
    os.replace(tmp, path)


def _print_summary(creds: dict, state: StackState, gpu_names: list[str], logs: Path, took: float) -> None:
    services = ", ".join(f"{k} ({v})" for k, v in state.kinds.items())
    lines = [
        "",
        f"dreamq is up in {took:.1f}s",
        f"  API          {creds['api_url']}   (OpenAPI: {creds['api_url']}/v1/openapi.json)",
        f"  Flower       {creds['flower_url']}   user {creds['flower_user']} / password {creds['flower_password']}",
        f"  Dashboard    {creds['dashboard_url']}   (log in with the admin key)",
        f"  Luma API     {creds['api_url']}/dream-machine/v1   (base_url for the official lumaai clients)",
        f"  API key      {creds['api_key']}   (tier api)",
        f"  admin key    {creds['admin_key']}",
        f"  services     {services}",
        f"  GPU workers  {', '.join(gpu_names)}",
        f"  credentials  {state.home / 'credentials.json'}",
        f"  logs         {logs}",
        "",
        'Try:  .venv/bin/dreamq generate "a red circle moving right" --wait --out x.mp4',
        "Ctrl-C stops everything.",
        "",
    ]
    print("\n".join(lines), flush=True)
