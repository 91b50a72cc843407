"""A live dreamq stack for the job-path benches (bench/control_plane.py, bench/latency.py).

Services: Postgres and Redis from DREAMQ_BENCH_DATABASE_URL / DREAMQ_BENCH_REDIS_URL when set
(a fresh database `dreamq_bench_<random>` is created there and dropped at the end; the Redis
database must be one no other stack uses, since the bench's workers consume its `control` and
`cpu` queues), else embedded ones in a temp dir. SeaweedFS (model repository and media) is
always embedded. Everything started here is stopped at the end.

Ours: the noop fixture model (tests/fixtures/bundles/noop: generate returns one 16x16 frame at
once) pushed to the repository like any model, served by pool `bench.noop`; one control+cpu
worker (as `dreamq up` starts it: -Q control,cpu -c 2) and one GPU worker started exactly as
`dreamq worker` starts it (workers.launch.worker_command: prefork, concurrency 1, prefetch 1, -E),
on the CPU device. Jobs go in through `create_job` + commit + `request_dispatch` after the
commit: the POST /v1/generations handler without HTTP, auth and rate limiting.

Baseline: a Celery app built from the same settings as tasks.celery_app (JSON, acks_late,
prefetch 1, reject_on_worker_lost, the same broker transport options, task events on), one
worker with the same command line shape (prefork -c 1 --prefetch-multiplier 1 -E), and a no-op
task that records its completion in Redis (one pipelined INCR + SET).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
import threading
import time
import types
import uuid
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NOOP_BUNDLE = ROOT / "tests" / "fixtures" / "bundles" / "noop"
CLUSTER = "bench"
MODEL = "noop"
RAW_QUEUE = "bench-raw"

from bench.dispatch_scale import Services as DbServices  # noqa: E402
from bench.dispatch_scale import log  # noqa: E402


class Services(DbServices):
    """bench/dispatch_scale.py's Postgres + Redis (given or embedded), plus an embedded SeaweedFS."""

    def __init__(self) -> None:
        super().__init__()
        self.s3 = None

    def start(self) -> None:
        from app.stack.embedded import EmbeddedSeaweedFS

        self.s3 = EmbeddedSeaweedFS(self._tmpdir() / "seaweedfs", s3_port=0)
        # SeaweedFS takes the longest to start: alongside Postgres and Redis.
        starting = threading.Thread(target=self.s3.start, kwargs={"timeout_s": 60})
        starting.start()
        try:
            super().start()
        finally:
            starting.join()
        log(f"s3: embedded {self.s3.url}")

    def stop(self) -> None:
        if self.s3 is not None:
            with contextlib.suppress(Exception):
                self.s3.stop()
        super().stop()


class Stack:
    """The app configured against the services, the noop model pushed, workers on demand."""

    def __init__(self, services: Services, extra_env: dict[str, str] | None = None) -> None:
        self.services = services
        self.run_id = secrets.token_hex(4)
        self.home = services._tmpdir() / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs = services._tmpdir() / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {
            "DATABASE_URL": services.db_url,
            "CELERY_BROKER_URL": services.redis_url,
            "DREAMQ_REDIS_URL": services.redis_url,
            "S3_ENDPOINT_URL": services.s3.url,
            "AWS_ACCESS_KEY_ID": services.s3.access_key,
            "AWS_SECRET_ACCESS_KEY": services.s3.secret_key,
            "DREAMQ_MODELS_BUCKET": f"dq-models-{self.run_id}",
            "DREAMQ_MEDIA_BUCKET": f"dq-media-{self.run_id}",
            "DREAMQ_HOME": str(self.home),
            "DREAMQ_MODEL_CACHE": str(self.home / "cache"),
            "DREAMQ_LOG_JSON": "1",
            # One line per job at INFO is the production default and part of the cost.
            "DREAMQ_LOG_LEVEL": os.environ.get("DREAMQ_LOG_LEVEL", "INFO"),
            **(extra_env or {}),
        }
        self.procs: dict = {}

    def setup(self) -> None:
        from sqlalchemy import text

        from app.core import redis_client, storage
        from app.core.config import reload_settings
        from app.db import session as db_session
        from app.db.migrate import upgrade
        from app.db.session import transaction
        from app.seed import ensure_demo_model, ensure_pool, seed_tiers

        os.environ.update(self.env)
        reload_settings()
        db_session.dispose_all()
        storage.reset_clients()
        redis_client.reset()
        # Queues and coalescing keys an interrupted earlier run may have left behind.
        redis = redis_client.get_redis()
        stale = [
            k
            for pattern in ("control", "cpu", f"{CLUSTER}.*", RAW_QUEUE, "dreamq:dispatch:*")
            for k in redis.scan_iter(match=pattern)
        ]
        if stale:
            redis.delete(*stale)
        upgrade(self.services.db_url)
        storage.ensure_buckets()
        with transaction() as session:
            seed_tiers(session)
            ensure_demo_model(session, MODEL, NOOP_BUNDLE)
            ensure_pool(session, CLUSTER, MODEL, 10_000)
            session.execute(text("UPDATE tiers SET concurrency_cap = 1000000"))

    def new_user(self, tier: str = "api") -> types.SimpleNamespace:
        """A new user of `tier` (GPU workers consume the five standard tiers' queues). setup()
        lifted the tiers' concurrency caps: here the pool's dispatch limit is what binds."""
        from app.db.models import User
        from app.db.session import transaction

        with transaction() as session:
            user = User(name=f"bench-{uuid.uuid4().hex[:10]}", tier=tier)
            session.add(user)
            session.flush()
            return types.SimpleNamespace(user_id=user.id, tier=tier)

    # -- workers --

    def start_workers(self, *, raw: bool = True) -> None:
        from app.stack.process import ManagedProcess
        from workers.launch import control_worker_command, worker_command

        base = {**os.environ, **self.env}
        control = control_worker_command(f"control-{self.run_id}")
        self._start(
            ManagedProcess(
                "control",
                control,
                env={**base, "DREAMQ_LOG_COMPONENT": "control"},
                cwd=str(ROOT),
                log_path=self.logs / "control.log",
                signal_group=False,
            )
        )
        self.gpu_name = f"gpu-{self.run_id}"
        argv, env = worker_command(CLUSTER, MODEL, "", self.gpu_name)
        self._start(
            ManagedProcess(
                "gpu",
                argv,
                env={**env, **base, "CUDA_VISIBLE_DEVICES": ""},
                cwd=str(ROOT),
                log_path=self.logs / "gpu.log",
                signal_group=False,
            )
        )
        if raw:
            argv = [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "bench.raw_celery:app",
                "worker",
                "-Q",
                RAW_QUEUE,
                "-c",
                "1",
                "--prefetch-multiplier",
                "1",
                "-P",
                "prefork",
                "-n",
                f"raw-{self.run_id}@%h",
                "--without-gossip",
                "--without-mingle",
                "-E",
                "--loglevel",
                "INFO",
            ]
            self._start(
                ManagedProcess(
                    "raw",
                    argv,
                    env={**base, "DREAMQ_BENCH_RAW_QUEUE": RAW_QUEUE},
                    cwd=str(ROOT),
                    log_path=self.logs / "raw.log",
                    signal_group=False,
                )
            )
        self._wait_ready(raw)

    def _start(self, proc) -> None:
        self.procs[proc.name] = proc
        proc.start()

    def _wait_ready(self, raw: bool) -> None:
        from sqlalchemy import text

        from app.db.session import transaction
        from tasks.celery_app import celery_app

        deadline = time.monotonic() + 180
        want = {f"control-{self.run_id}@"} | ({f"raw-{self.run_id}@"} if raw else set())
        gpu_ready = False
        while True:
            for name, proc in self.procs.items():
                if not proc.alive():
                    raise RuntimeError(f"{name} worker exited:\n" + (self.logs / f"{name}.log").read_text()[-4000:])
            if not gpu_ready:
                with transaction() as session:
                    # Ready = registered and its child has loaded the model (it reports `loaded`).
                    gpu_ready = bool(
                        session.execute(
                            text(
                                "SELECT 1 FROM workers WHERE id LIKE :n AND state = 'idle' "
                                "AND jsonb_array_length(COALESCE(info->'loaded', '[]'::jsonb)) > 0"
                            ),
                            {"n": f"{self.gpu_name}@%"},
                        ).first()
                    )
            if want:
                replies = celery_app.control.ping(timeout=0.5) or []
                seen = {name for reply in replies for name in reply}
                want = {w for w in want if not any(s.startswith(w) for s in seen)}
            if gpu_ready and not want:
                return
            if time.monotonic() > deadline:
                raise TimeoutError("workers not ready; logs in " + str(self.logs))
            time.sleep(0.2)

    def stop_workers(self) -> None:
        stoppers = [threading.Thread(target=p.stop, kwargs={"grace_s": 10}) for p in self.procs.values()]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        self.procs.clear()

    # -- ours: submission and reading back --

    def submit(self, principal) -> uuid.UUID:
        """What POST /v1/generations does once the request is authenticated: insert, commit,
        then ask for a dispatch. Returns when the job is accepted (the commit is done)."""
        from app.api.schemas import GenerationCreate
        from app.db.session import transaction
        from app.jobs.submit import create_job
        from app.messaging import get_publisher

        body = GenerationCreate(prompt="noop", model=MODEL)
        with transaction() as session:
            job, _ = create_job(session, principal, body)
            get_publisher().request_dispatch(session)
        return job.id

    def succeeded(self, user_id) -> int:
        from sqlalchemy import text

        from app.db.session import transaction

        with transaction() as session:
            return session.execute(
                text("SELECT count(*) FROM jobs WHERE user_id = :u AND state = 'succeeded'"), {"u": user_id}
            ).scalar_one()

    def not_succeeded(self, user_id) -> dict[str, int]:
        from sqlalchemy import text

        from app.db.session import transaction

        with transaction() as session:
            return dict(
                session.execute(
                    text("SELECT state, count(*) FROM jobs WHERE user_id = :u AND state <> 'succeeded' GROUP BY state"),
                    {"u": user_id},
                ).all()
            )

    def worker_job_s(self) -> float | None:
        """What the GPU worker last reported as its job time (workers.info.job_s)."""
        from sqlalchemy import text

        from app.db.session import transaction

        with transaction() as session:
            value = session.execute(
                text("SELECT info ->> 'job_s' FROM workers WHERE id LIKE :n"), {"n": f"{self.gpu_name}@%"}
            ).scalar()
        return None if value is None else float(value)

    def timings(self, user_id) -> list[tuple[float, float | None, float | None, float | None]]:
        """(created, dispatched, started, finished) epoch seconds per job of the user, in creation order."""
        from sqlalchemy import text

        from app.db.session import transaction

        with transaction() as session:
            return [
                tuple(None if v is None else float(v) for v in row)
                for row in session.execute(
                    text(
                        "SELECT extract(epoch FROM created_at), extract(epoch FROM dispatched_at), "
                        "extract(epoch FROM started_at), extract(epoch FROM finished_at) "
                        "FROM jobs WHERE user_id = :u ORDER BY created_at"
                    ),
                    {"u": user_id},
                ).all()
            ]


@contextlib.contextmanager
def live_stack(extra_env: dict[str, str] | None = None, *, raw: bool = True) -> Iterator[Stack]:
    services = Services()
    stack = None
    try:
        started = time.perf_counter()
        services.start()
        stack = Stack(services, extra_env)
        stack.setup()
        stack.start_workers(raw=raw)
        log(f"stack ready in {time.perf_counter() - started:.1f}s (logs under {stack.logs})")
        yield stack
    finally:
        if stack is not None:
            stack.stop_workers()
            keep = os.environ.get("DREAMQ_BENCH_KEEP_LOGS")
            if keep:
                shutil.copytree(stack.logs, keep, dirs_exist_ok=True)
        services.stop()
