"""Chaos: every accepted job finishes exactly once through worker kills, a wiped broker and a
Postgres restart.

The test runs a whole stack of its own, as subprocesses: an embedded Postgres and an embedded
Redis (so it may restart the one and FLUSHALL the other without touching the rest of the suite),
the suite's SeaweedFS, the API under gunicorn, two control+cpu workers (two dispatchers), three
GPU workers (CPU device) serving the tiny fixture model, and celery beat running the maintenance
tasks every second with a 3 s job lease.

While 200 jobs are submitted through the HTTP API (retried with an Idempotency-Key whenever the
API cannot answer, so a retry never makes a second job), the test SIGKILLs whole GPU workers
mid-job (and starts them again), FLUSHALLs Redis once, restarts Postgres once, and kills a third
worker. A poison job kills its worker on every attempt. At the end every job must have succeeded
(the poison one failed after max attempts), none may have completed twice, and the counts of
what recovery did are printed.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import redis
import requests

from app.stack.embedded import EmbeddedPostgres, EmbeddedRedis
from app.stack.process import ManagedProcess, find_free_port
from tests.support.stack import ROOT, TINY_BUNDLE
from workers.launch import control_worker_command, worker_command

pytestmark = pytest.mark.slow

JOBS = 200
GPU_WORKERS = 3
MAX_ATTEMPTS = 5
MODEL = "chaos"


class ChaosStack:
    def __init__(self, root: Path, stack_env):
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pg = EmbeddedPostgres(root / "pg", port=0, database="chaos")
        self.redis = EmbeddedRedis(root / "redis", port=0)
        self.procs: dict[str, ManagedProcess] = {}
        self.stack_env = stack_env
        self.env: dict[str, str] = {}
        self.api_url = ""
        self.keys: list[str] = []

    def start(self) -> None:
        self.pg.start()
        self.redis.start()
        self.env = {
            **os.environ,
            **self.stack_env.env,
            "DATABASE_URL": self.pg.url,
            "CELERY_BROKER_URL": self.redis.url,
            "DREAMQ_REDIS_URL": self.redis.url,
            "DREAMQ_HOME": str(self.root / "home"),
            "DREAMQ_MODEL_CACHE": str(self.root / "cache"),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
            "DREAMQ_JOB_LEASE_S": "3",
            "DREAMQ_MAINTENANCE_INTERVAL_S": "1",
            "DREAMQ_RECONCILE_AFTER_S": "3",
            "DREAMQ_HEARTBEAT_INTERVAL_S": "1",
            "DREAMQ_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
            "DREAMQ_TINY_STEP_S": "0.05",
            "DREAMQ_LOG_JSON": "1",
            "DREAMQ_LOG_LEVEL": "INFO",
        }
        import subprocess

        out = subprocess.run(
            [sys.executable, "-m", "tests.support.chaos_setup", MODEL, str(TINY_BUNDLE), "6", "8"],
            env=self.env,
            cwd=str(ROOT),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-4000:]
        self.keys = json.loads(out.stdout.strip().splitlines()[-1])["keys"]

        port = find_free_port(None)
        self.api_url = f"http://127.0.0.1:{port}"
        self._start(
            "api",
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-w",
                "2",
                "--threads",
                "4",
                "-b",
                f"127.0.0.1:{port}",
                "app.api:create_app()",
            ],
            ready=self._api_ready,
        )
        for index in range(2):
            name = f"control-{index}"
            self._start(name, control_worker_command(name))
        self._start(
            "beat",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tasks.celery_app:celery_app",
                "beat",
                "-s",
                str(self.root / "celerybeat-schedule"),
                "--loglevel",
                "INFO",
            ],
        )
        for index in range(GPU_WORKERS):
            self.start_gpu(index)
        deadline = time.monotonic() + 120
        while (
            self.scalar(
                "SELECT count(*) FROM workers WHERE state = 'idle' AND heartbeat_at > now() - interval '5 seconds'"
            )
            < GPU_WORKERS
        ):
            assert time.monotonic() < deadline, self.tails()
            time.sleep(0.3)

    def _api_ready(self) -> bool:
        try:
            return requests.get(f"{self.api_url}/readyz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None, ready=None) -> ManagedProcess:
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

    def start_gpu(self, index: int) -> None:

        name = f"gpu-{index}"
        argv, env = worker_command("local", MODEL, "", name)
        self._start(name, argv, env={**env, **self.env, "CUDA_VISIBLE_DEVICES": "", "DREAMQ_LOG_COMPONENT": name})

    def kill_gpu_mid_job(self, index: int, timeout_s: float = 20) -> bool:
        """SIGKILL the worker and its children while it runs a job (a lost host), then restart it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.scalar("SELECT count(*) FROM workers WHERE id LIKE %s AND state = 'busy'", (f"gpu-{index}@%",)):
                break
            time.sleep(0.02)
        busy = time.monotonic() < deadline
        self.procs[f"gpu-{index}"].kill()
        self.procs[f"gpu-{index}"].stop(grace_s=1)  # reap it: it is gone already
        time.sleep(0.5)
        self.start_gpu(index)
        return busy

    def restart_postgres(self) -> float:
        started = time.monotonic()
        self.pg.stop(grace_s=5)
        time.sleep(1.0)
        self.pg.start()
        return time.monotonic() - started

    def flushall(self) -> None:
        with redis.Redis.from_url(self.redis.url) as client:
            client.flushall()

    def scalar(self, sql: str, params=()) -> int:
        with psycopg.connect(self.pg.dsn, connect_timeout=5) as conn:
            return conn.execute(sql, params).fetchone()[0]

    def rows(self, sql: str, params=()) -> list[tuple]:
        with psycopg.connect(self.pg.dsn, connect_timeout=5) as conn:
            return conn.execute(sql, params).fetchall()

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


@pytest.fixture(scope="module")
def chaos(stack_env, tmp_path_factory):
    stack = ChaosStack(tmp_path_factory.mktemp("chaos"), stack_env)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def submit(stack: ChaosStack, key: str, body: dict, results: list, errors: collections.Counter) -> None:
    """POST until accepted: the same Idempotency-Key makes every retry return the same job."""
    idem = str(uuid.uuid4())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            response = requests.post(
                f"{stack.api_url}/v1/generations",
                json=body,
                timeout=10,
                headers={"Authorization": f"Bearer {key}", "Idempotency-Key": idem},
            )
        except requests.RequestException as exc:
            errors[type(exc).__name__] += 1
            time.sleep(0.2)
            continue
        if response.status_code in (200, 201, 202):
            results.append(response.json()["id"])
            return
        errors[str(response.status_code)] += 1
        time.sleep(float(response.headers.get("Retry-After", "0.2")) if response.status_code == 429 else 0.2)
    raise AssertionError(f"job never accepted: {dict(errors)}")


def test_kills_a_wiped_broker_and_a_postgres_restart_lose_nothing_and_run_nothing_twice(chaos):
    accepted: list[str] = []
    errors: collections.Counter = collections.Counter()
    poison: list[str] = []
    started = time.monotonic()

    def feed() -> None:
        for index in range(JOBS):
            key = chaos.keys[index % len(chaos.keys)]
            submit(chaos, key, {"prompt": f"chaos {index}", "model": MODEL, "num_frames": 8}, accepted, errors)
            time.sleep(0.05)

    feeder = threading.Thread(target=feed)
    feeder.start()
    submit(chaos, chaos.keys[0], {"prompt": "segfault", "model": MODEL, "num_frames": 8}, poison, errors)
    faults = {}
    time.sleep(2)
    faults["kill gpu-0 mid-job"] = chaos.kill_gpu_mid_job(0)
    time.sleep(2)
    chaos.flushall()
    faults["flushall"] = True
    time.sleep(2)
    faults["postgres restart s"] = round(chaos.restart_postgres(), 1)
    time.sleep(2)
    faults["kill gpu-1 mid-job"] = chaos.kill_gpu_mid_job(1)
    time.sleep(1)
    faults["kill gpu-2 mid-job"] = chaos.kill_gpu_mid_job(2)
    feeder.join()
    assert len(accepted) == JOBS and len(set(accepted)) == JOBS

    ids = accepted + poison
    deadline = time.monotonic() + 240
    while True:
        states = dict(chaos.rows("SELECT state, count(*) FROM jobs WHERE id = ANY(%s) GROUP BY state", (ids,)))
        if sum(states.get(s, 0) for s in ("succeeded", "failed", "cancelled")) == len(ids):
            break
        assert time.monotonic() < deadline, f"not finished: {states}\n{chaos.tails()}"
        time.sleep(0.5)
    elapsed = time.monotonic() - started

    outcome = dict(chaos.rows("SELECT state, count(*) FROM jobs WHERE id = ANY(%s) GROUP BY state", (accepted,)))
    completions = dict(
        chaos.rows(
            "SELECT job_id::text, count(*) FROM job_events WHERE job_id = ANY(%s) AND to_state IN ('succeeded', 'failed') "
            "AND from_state <> to_state GROUP BY job_id",
            (ids,),
        )
    )
    generated = chaos.rows(
        "SELECT count(*) FILTER (WHERE detail->>'step' = 'generated'), count(DISTINCT job_id) "
        "FROM job_events WHERE job_id = ANY(%s)",
        (accepted,),
    )[0]
    recoveries = dict(
        chaos.rows(
            "SELECT coalesce(detail->>'reason', 'redelivered'), count(*) FROM job_events WHERE job_id = ANY(%s) "
            "AND ((to_state = 'queued' AND from_state <> 'queued') OR (from_state = 'running' AND to_state = 'running' "
            "AND detail->>'step' IS NULL)) GROUP BY 1",
            (ids,),
        )
    )
    attempts = dict(
        chaos.rows("SELECT attempts, count(*) FROM jobs WHERE id = ANY(%s) GROUP BY attempts ORDER BY 1", (accepted,))
    )
    poison_job = chaos.rows("SELECT state, failure_code, attempts FROM jobs WHERE id = %s", (poison[0],))[0]
    print(
        f"\nchaos: {JOBS} jobs + 1 poison in {elapsed:.1f}s; faults {faults}; API errors retried {dict(errors)}"
        f"\n  outcome {outcome}; completions per job {collections.Counter(completions.values())}"
        f"\n  recoveries {recoveries}; attempts {attempts}; generate runs {generated[0]} for {generated[1]} jobs"
        f"\n  poison job: {poison_job}"
    )

    assert outcome == {"succeeded": JOBS}, outcome
    assert set(errors) <= {"503", "429", "ConnectionError"}, f"the API answered {dict(errors)} while Postgres restarted"
    assert set(completions.values()) == {1}, "a job completed twice"
    assert len(completions) == JOBS + 1
    assert poison_job[0] == "failed" and poison_job[1] in ("worker_lost", "max_attempts_exceeded")
    # The faults really hit running work: something had to be recovered.
    assert sum(recoveries.values()) > 0


def test_a_redelivered_message_of_a_running_job_does_not_run_it_twice(chaos):
    """What Redis does when a job outlives the visibility timeout: deliver its message again.

    soft < hard < visibility timeout (enforced at start) keeps that from happening; if it does
    (a misconfigured broker, a manual restore), the second delivery must not run the job. The
    message is published a second time while the job runs on one worker; another takes it.
    """
    from app.messaging import Release

    key = chaos.keys[1]
    response = requests.post(
        f"{chaos.api_url}/v1/generations",
        json={"prompt": "long", "model": MODEL, "num_frames": 60},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    deadline = time.monotonic() + 30
    while chaos.scalar("SELECT count(*) FROM jobs WHERE id = %s AND state = 'running'", (job_id,)) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    seq = chaos.scalar("SELECT dispatch_seq FROM jobs WHERE id = %s", (job_id,))
    publish = (
        "from app.messaging import Release, get_publisher; import uuid; "
        f"get_publisher().release([Release(uuid.UUID('{job_id}'), 'local.{MODEL}.api', {seq}, 'api')])"
    )
    import subprocess

    assert Release  # the message is built exactly as the dispatcher builds it
    out = subprocess.run(
        [sys.executable, "-c", publish], env=chaos.env, cwd=str(ROOT), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-3000:]
    deadline = time.monotonic() + 60
    while chaos.scalar("SELECT count(*) FROM jobs WHERE id = %s AND state IN ('succeeded', 'failed')", (job_id,)) == 0:
        assert time.monotonic() < deadline, chaos.tails()
        time.sleep(0.1)
    time.sleep(1.5)  # let the duplicate be consumed, whichever worker got it
    claims = chaos.scalar(
        "SELECT count(*) FROM job_events WHERE job_id = %s AND to_state = 'running' AND detail->>'step' IS NULL",
        (job_id,),
    )
    generated = chaos.scalar(
        "SELECT count(*) FROM job_events WHERE job_id = %s AND detail->>'step' = 'generated'", (job_id,)
    )
    state = chaos.rows("SELECT state, attempts FROM jobs WHERE id = %s", (job_id,))[0]
    assert state == ("succeeded", 1), state
    assert (claims, generated) == (1, 1)
    with redis.Redis.from_url(chaos.redis.url) as client:
        # The duplicate was taken off the queue and acknowledged, not left to come back.
        assert client.llen(f"local.{MODEL}.api") == 0
