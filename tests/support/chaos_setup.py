"""The chaos tests' private stack, and (run as a module) the preparation of its database.

`ChaosStack` runs a whole stack of its own, as subprocesses: an embedded Postgres and an embedded
Redis (so a test may restart, freeze or wipe them without touching the rest of the suite), the
suite's SeaweedFS, the API under gunicorn and, unless told otherwise, two control+cpu workers,
GPU workers (CPU device) serving the tiny fixture model and celery beat running the maintenance
tasks every second with a 3 s job lease. Its faults (`kill_gpu_mid_job`, `restart_postgres`,
`flush_broker`, `postgres_frozen`) wait for the state that makes them hit work and return what
they hit, so a test can assert that each one's recovery happened.

    python -m tests.support.chaos_setup MODEL BUNDLE DISPATCH_LIMIT USERS   (env: the stack's URLs)

migrates, seeds tiers, makes the buckets, pushes BUNDLE as MODEL with a pool in cluster `local`,
creates USERS api-tier users and prints {"keys": [...], "users": [...], "version": N} as JSON.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

MODEL = "chaos"
MAX_ATTEMPTS = 5
# Seconds a fault waits for the state it needs (a busy worker, a waiting message, the outage
# seen by the API) and a test waits for a recovery: generous for a loaded 2-core machine; the
# recoveries themselves take a lease (3 s) plus a maintenance interval (1 s).
STATE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Kill:
    """A GPU worker SIGKILLed: `busy` says it was frozen while running `job_id` (dispatch `seq`),
    checked in Postgres before the kill; `at` is Postgres' clock at that check."""

    worker: str
    busy: bool
    job_id: str | None
    seq: int | None
    at: dt.datetime | None


@dataclass(frozen=True)
class Flush:
    """Redis wiped by FLUSHALL: `lost` are the task ids (`<job>-<seq>`) that were waiting in the
    pool's queues, read in the same MULTI as the FLUSHALL; `at` is Postgres' clock just before."""

    at: dt.datetime
    lost: list[str]

    @property
    def lost_jobs(self) -> list[str]:
        return [task_id.rsplit("-", 1)[0] for task_id in self.lost]


@dataclass(frozen=True)
class Restart:
    """Postgres stopped and started: `running` are the (job, worker) pairs that were running on
    live workers, early in their model, just before the stop (Postgres' clock `at`); `down_s`
    how long it was down."""

    at: dt.datetime
    running: list[tuple[str, str]]
    down_s: float


@dataclass
class Submissions:
    """What a client saw while it POSTed (each attempt's status, or the exception's name)."""

    accepted: list[str] = field(default_factory=list)
    errors: collections.Counter = field(default_factory=collections.Counter)
    statuses: list[tuple[str, str]] = field(default_factory=list)  # (idempotency key, status or error)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, key: str, outcome: str, *, error: bool) -> None:
        with self.lock:
            self.statuses.append((key, outcome))
            if error:
                self.errors[outcome] += 1

    def count(self, outcome: str) -> int:
        with self.lock:
            return self.errors[outcome]


def post_until_accepted(
    api_url: str,
    key: str,
    body: dict,
    seen: Submissions,
    *,
    idempotency_key: str | None = None,
    request_timeout_s: float = 10.0,
    give_up_s: float = 120.0,
) -> str:
    """POST /v1/generations until it is accepted, always with the same Idempotency-Key (a retry
    must return the same job, never make a second one); returns the job id."""
    import requests

    idem = idempotency_key or str(uuid.uuid4())
    deadline = time.monotonic() + give_up_s
    while time.monotonic() < deadline:
        try:
            response = requests.post(
                f"{api_url}/v1/generations",
                json=body,
                timeout=request_timeout_s,
                headers={"Authorization": f"Bearer {key}", "Idempotency-Key": idem},
            )
        except requests.RequestException as exc:
            seen.record(idem, type(exc).__name__, error=True)
            time.sleep(0.2)
            continue
        if response.status_code in (200, 201, 202):
            job_id = response.json()["id"]
            seen.record(idem, f"{response.status_code} {job_id}", error=False)
            with seen.lock:
                seen.accepted.append(job_id)
            return job_id
        seen.record(idem, str(response.status_code), error=True)
        time.sleep(float(response.headers.get("Retry-After", "0.2")) if response.status_code == 429 else 0.2)
    raise AssertionError(f"job never accepted: {dict(seen.errors)}")


def wait_for(
    condition: Callable[[], object],
    what: str | Callable[[], str],
    timeout_s: float = STATE_TIMEOUT_S,
    poll_s: float = 0.1,
):
    """Poll `condition` until it returns something truthy (returned); fail naming `what` (a
    callable is called then, so the message shows the state at the failure)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what() if callable(what) else what}")
        time.sleep(poll_s)


def _signal_tree(pid: int, sig: int) -> None:
    """`sig` to a process and all its descendants (SIGSTOP / SIGCONT: a frozen process tree)."""
    import psutil

    try:
        leader = psutil.Process(pid)
        procs = [leader, *leader.children(recursive=True)]
    except psutil.Error:
        return
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass


class ChaosStack:
    def __init__(self, root: Path, stack_env, *, gpu_workers: int = 3, workers: bool = True, users: int = 8):
        from app.stack.embedded import EmbeddedPostgres, EmbeddedRedis
        from app.stack.process import ManagedProcess

        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pg = EmbeddedPostgres(root / "pg", port=0, database="chaos")
        self.redis = EmbeddedRedis(root / "redis", port=0)
        self.procs: dict[str, ManagedProcess] = {}
        self.stack_env = stack_env
        self.gpu_workers = gpu_workers
        self.with_workers = workers
        self.users_wanted = users
        self.env: dict[str, str] = {}
        self.api_url = ""
        self.keys: list[str] = []
        self.users: list[str] = []
        # Its own Prometheus directory: the stack's counters are its own (and readable by a test).
        self.metrics_dir = root / "prometheus"
        self.stack_id = uuid.uuid4().hex[:10]

    def start(self) -> None:
        from app.stack.process import find_free_port
        from tests.support.stack import ROOT, TINY_BUNDLE
        from workers.launch import celery_command, control_worker_command

        self.pg.start()
        self.redis.start()
        self.metrics_dir.mkdir(exist_ok=True)
        self.env = {
            **os.environ,
            **self.stack_env.env,
            "DATABASE_URL": self.pg.url,
            "CELERY_BROKER_URL": self.redis.url,
            "DREAMQ_REDIS_URL": self.redis.url,
            "DREAMQ_HOME": str(self.root / "home"),
            "DREAMQ_MODEL_CACHE": str(self.root / "cache"),
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
            # Buckets of its own: a fresh Postgres pushes its model as version 1 again, which the
            # session's buckets may hold already (from another chaos stack).
            "DREAMQ_MODELS_BUCKET": f"dq-chaos-models-{self.stack_id}",
            "DREAMQ_MEDIA_BUCKET": f"dq-chaos-media-{self.stack_id}",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH")])),
            "DREAMQ_JOB_LEASE_S": "3",
            "DREAMQ_MAINTENANCE_INTERVAL_S": "1",
            "DREAMQ_RECONCILE_AFTER_S": "3",
            "DREAMQ_HEARTBEAT_INTERVAL_S": "1",
            "DREAMQ_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
            "DREAMQ_TINY_STEP_S": "0.05",
            "DREAMQ_LOG_JSON": "1",
            "DREAMQ_LOG_LEVEL": "INFO",
        }
        out = subprocess.run(
            [sys.executable, "-m", "tests.support.chaos_setup", MODEL, str(TINY_BUNDLE), "6", str(self.users_wanted)],
            env=self.env,
            cwd=str(ROOT),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-4000:]
        prepared = json.loads(out.stdout.strip().splitlines()[-1])
        self.keys, self.users = prepared["keys"], prepared["users"]

        port = find_free_port(None)
        self.api_url = f"http://127.0.0.1:{port}"
        gunicorn = [sys.executable, "-m", "gunicorn", "-w", "2", "--threads", "4", "-b", f"127.0.0.1:{port}"]
        self._start("api", [*gunicorn, "app.api:create_app()"], ready=self._api_ready)
        if not self.with_workers:
            return
        for index in range(2):
            name = f"control-{index}"
            self._start(name, control_worker_command(name))
        self._start("beat", celery_command("beat", "-s", str(self.root / "celerybeat-schedule"), "--loglevel", "INFO"))
        for index in range(self.gpu_workers):
            self.start_gpu(index)
        wait_for(
            lambda: (
                self.scalar(
                    "SELECT count(*) FROM workers WHERE state = 'idle' AND heartbeat_at > now() - interval '5 seconds'"
                )
                >= self.gpu_workers
            ),
            "every GPU worker idle and heartbeating",
            timeout_s=120,
            poll_s=0.3,
        )

    def _api_ready(self) -> bool:
        import requests

        try:
            return requests.get(f"{self.api_url}/readyz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None, ready=None):
        from app.stack.process import ManagedProcess
        from tests.support.stack import ROOT

        proc = ManagedProcess(
            name,
            argv,
            env=env or {**self.env, "DREAMQ_LOG_COMPONENT": name},
            cwd=str(ROOT),
            log_path=self.logs / f"{name}.log",
            ready=ready,
            signal_group=False,
        )
        proc.start()
        if ready is not None:
            proc.wait_ready(60)
        self.procs[name] = proc
        return proc

    @staticmethod
    def worker_id(index: int) -> str:
        """The GPU worker's Celery node name, its id in the workers table (workers.launch)."""
        return f"gpu-{index}@{socket.gethostname()}"

    def start_gpu(self, index: int) -> None:
        from workers.launch import worker_command

        name = f"gpu-{index}"
        argv, env = worker_command("local", MODEL, "", name)
        self._start(name, argv, env={**env, **self.env, "CUDA_VISIBLE_DEVICES": "", "DREAMQ_LOG_COMPONENT": name})

    # --- faults ----------------------------------------------------------------------------

    def kill_gpu_mid_job(self, index: int, *, exclude: Iterable[str] = (), timeout_s: float = STATE_TIMEOUT_S) -> Kill:
        """SIGKILL GPU worker `index` and its children while it runs a job (a lost host), then
        start it again.

        It waits for the worker to be busy with a running job not in `exclude`, freezes the
        worker's process tree (SIGSTOP) and checks in Postgres that the job is still running
        there: a job that finished in between would make the kill hit nothing, so the worker is
        thawed and the wait goes on. Frozen, the worker can change nothing before the SIGKILL."""
        worker = self.worker_id(index)
        proc = self.procs[f"gpu-{index}"]
        deadline = time.monotonic() + timeout_s
        hit: tuple | None = None
        while hit is None and time.monotonic() < deadline:
            current = self.rows(
                "SELECT j.id::text, j.dispatch_seq FROM workers w JOIN jobs j ON j.id = w.current_job_id "
                "WHERE w.id = %s AND w.state = 'busy' AND j.state = 'running' AND j.worker_id = w.id "
                "AND NOT (j.id = ANY(%s::uuid[]))",
                (worker, list(exclude)),
            )
            if not current:
                time.sleep(0.02)
                continue
            _signal_tree(proc.pid, signal.SIGSTOP)
            still = self.rows(
                "SELECT now() FROM jobs WHERE id = %s AND state = 'running' AND worker_id = %s AND dispatch_seq = %s",
                (current[0][0], worker, current[0][1]),
            )
            if still:
                hit = (current[0][0], current[0][1], still[0][0])
            else:
                _signal_tree(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.stop(grace_s=1)  # reaps it: it is gone already
        self.start_gpu(index)
        if hit is None:
            return Kill(worker, False, None, None, None)
        return Kill(worker, True, *hit)

    def restart_postgres(
        self,
        *,
        exclude: Iterable[str] = (),
        until: Callable[[list[tuple[str, str]]], object],
        timeout_s: float = STATE_TIMEOUT_S,
    ) -> Restart:
        """Stop Postgres while live workers run jobs (not in `exclude`) early in their model, keep
        it down until `until(running)` (e.g. the API refused a submission and one of those runs
        failed on the database), start it again."""
        running = wait_for(
            lambda: self.rows(
                "SELECT now(), j.id::text, w.id FROM workers w JOIN jobs j ON j.id = w.current_job_id "
                "WHERE w.state = 'busy' AND j.state = 'running' AND j.worker_id = w.id AND j.progress < 0.5 "
                "AND w.heartbeat_at > now() - interval '3 seconds' AND NOT (j.id = ANY(%s::uuid[]))",
                (list(exclude),),
            ),
            "a live worker early in a job before the Postgres restart",
            timeout_s,
            poll_s=0.02,
        )
        hit = [(job, worker) for _, job, worker in running]
        started = time.monotonic()
        with self.postgres_down():
            wait_for(lambda: until(hit), "the outage seen while Postgres is down", timeout_s)
        return Restart(running[0][0], hit, time.monotonic() - started)

    @contextlib.contextmanager
    def postgres_down(self) -> Iterator[None]:
        """Postgres stopped (fast shutdown: open transactions roll back) for the block, then started
        again on the same port and data: connections fail at once while it is down."""
        self.pg.stop(grace_s=5)
        try:
            yield
        finally:
            self.pg.start()

    @contextlib.contextmanager
    def postgres_frozen(self) -> Iterator[None]:
        """Postgres stalled (every process SIGSTOPped): connections hang instead of failing, so a
        client's request times out while the API still holds it, and runs on after the thaw."""
        assert self.pg.process is not None and self.pg.process.pid is not None
        _signal_tree(self.pg.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            _signal_tree(self.pg.process.pid, signal.SIGCONT)

    def waiting_messages(self) -> int:
        """Messages waiting in the pool's queues (pool and per-worker queues, every tier)."""
        import redis

        with redis.Redis.from_url(self.redis.url) as client:
            return sum(
                client.llen(key) for key in client.scan_iter(match=f"local.{MODEL}.*") if client.type(key) == b"list"
            )

    def flush_broker(self, timeout_s: float = STATE_TIMEOUT_S) -> Flush:
        """FLUSHALL Redis once messages wait in the pool's queues; what was waiting is read in the
        same MULTI, so `lost` is exactly what the wipe took."""
        import redis

        wait_for(lambda: self.waiting_messages() >= 2, "messages waiting in the pool's queues", timeout_s, 0.02)
        at = self.rows("SELECT now()")[0][0]
        with redis.Redis.from_url(self.redis.url) as client:
            keys = [key for key in client.scan_iter(match=f"local.{MODEL}.*") if client.type(key) == b"list"]
            pipe = client.pipeline(transaction=True)
            for key in keys:
                pipe.lrange(key, 0, -1)
            pipe.flushall()
            *waiting, _ = pipe.execute()
        lost = [json.loads(raw)["headers"]["id"] for messages in waiting for raw in messages]
        return Flush(at, lost)

    # --- reading it ------------------------------------------------------------------------

    def scalar(self, sql: str, params=()):
        import psycopg

        with psycopg.connect(self.pg.dsn, connect_timeout=5) as conn:
            return conn.execute(sql, params).fetchone()[0]

    def rows(self, sql: str, params=()) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.pg.dsn, connect_timeout=5) as conn:
            return conn.execute(sql, params).fetchall()

    def api_answers(self, route: str = "/v1/generations", method: str = "POST") -> collections.Counter:
        """Requests the API has answered on `route`, by status (its Prometheus counters), whether
        or not the client was still there to read the answer."""
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.metrics_dir))
        counts: collections.Counter = collections.Counter()
        for metric in registry.collect():
            if metric.name != "dreamq_http_requests":
                continue
            for sample in metric.samples:
                if (
                    sample.name.endswith("_total")
                    and sample.labels.get("route") == route
                    and sample.labels.get("method") == method
                ):
                    counts[sample.labels["status"]] += int(sample.value)
        return counts

    def log_lines(self, prefix: str, **match: object) -> list[dict]:
        """JSON log lines of the processes named `prefix*` whose fields equal `match`."""
        found = []
        for path in sorted(self.logs.glob(f"{prefix}*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if not line.startswith("{") or any(str(v) not in line for v in match.values()):
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if all(record.get(k) == v for k, v in match.items()):
                    found.append(record)
        return found

    def tails(self) -> str:
        return "\n".join(f"--- {name}\n{proc.log_tail(30)}" for name, proc in self.procs.items())

    def stop(self) -> None:
        threads = [threading.Thread(target=p.stop, kwargs={"grace_s": 8}) for p in self.procs.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.redis.stop()
        self.pg.stop()


def main(model: str, bundle: str, dispatch_limit: str, users: str) -> None:
    from app.core.config import get_settings
    from app.core.storage import ensure_buckets
    from app.db.migrate import upgrade
    from app.db.session import transaction
    from app.seed import ensure_demo_model, ensure_pool, seed_tiers

    upgrade(get_settings().database_url)
    ensure_buckets()
    with transaction() as session:
        seed_tiers(session)
        version = ensure_demo_model(session, model, Path(bundle))
        ensure_pool(session, "local", model, int(dispatch_limit))
    from tests.support.factories import create_user

    made = [create_user("api", name=f"chaos-{index}") for index in range(int(users))]
    print(
        json.dumps(
            {
                "keys": [key for _, key in made],
                "users": [str(user_id) for user_id, _ in made],
                "version": getattr(version, "number", None),
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
