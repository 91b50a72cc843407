"""`dreamq up` as a newcomer runs it: everything embedded, one command, Ctrl-C, restart.

Starts the real stack three times on one data directory: (1) generate a video through the CLI,
then Ctrl-C and check nothing is left running; (2) restart without GPU workers: the finished job
is still there with its assets, and a new job stays queued; SIGTERM; (3) restart with workers
and an external Redis (one the test starts for itself): the job queued across the restart
completes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import psutil
import pytest
import redis
import requests

from app.stack.embedded import EmbeddedRedis
from tests.support.frames import dominant_colour, motion_direction

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DREAMQ = str(Path(sys.executable).with_name("dreamq"))
# What the test process itself was pointed at must not leak into the stack under test: with
# none of these set, `dreamq up` starts every service embedded, as on a fresh machine.
SERVICE_VARS = (
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "DREAMQ_REDIS_URL",
    "S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "DREAMQ_MODELS_BUCKET",
    "DREAMQ_MEDIA_BUCKET",
    "DREAMQ_MODEL_CACHE",
    "DREAMQ_API_URL",
    "DREAMQ_API_KEY",
)


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS}
    env.update({"DREAMQ_HOME": str(home), "PYTHONUNBUFFERED": "1", "DREAMQ_LOG_JSON": "1", "DREAMQ_LOG_LEVEL": "INFO"})
    env.update(extra)
    return env


class Stack:
    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None):
        self.workdir = workdir
        self.home = workdir / ".dreamq"
        self.out = (workdir / f"up-{time.monotonic_ns()}.log").open("w+")
        self.proc = subprocess.Popen(
            [DREAMQ, "up", "--grace", "5", *args],
            cwd=workdir,
            env=clean_env(self.home, **(env or {})),
            stdout=self.out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        if not self.out.closed:
            self.out.flush()
        return Path(self.out.name).read_text()

    def wait_ready(self, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while "dreamq is up" not in self.output():
            if self.proc.poll() is not None:
                raise AssertionError(f"dreamq up exited {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"dreamq up not ready after {timeout}s:\n{self.output()}")
            time.sleep(0.5)
        return json.loads((self.home / "credentials.json").read_text())

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = signal.SIGINT, timeout: float = 90) -> int:
        children = self.descendants()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, f"left running after stop: {[p.cmdline() for p in alive]}"
        self.out.close()
        return code


def leftovers(home: Path) -> list[str]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if str(home) in cmd:
            found.append(cmd)
    return found


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture()
def workdir():
    """A directory of this test's own, outside pytest's /tmp/pytest-of-<user>.

    Run as root, the embedded Postgres runs as another account and reaches its data directory
    through an o+x that EmbeddedPostgres adds to each ancestor; any other pytest session that
    starts on the machine meanwhile resets pytest-of-<user> to 0700, and this stack's Postgres
    then fails with "Permission denied" at its next start.
    """
    path = Path(tempfile.mkdtemp(prefix="dreamq-up-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_up_generate_stop_restart_keeps_jobs(workdir):
    stack = Stack(workdir)
    creds = stack.wait_ready()
    try:
        assert set(creds) == {
            "api_url",
            "api_key",
            "admin_key",
            "flower_url",
            "flower_user",
            "flower_password",
            "dashboard_url",
            "secret_key",
        }
        summary = stack.output()
        for needle in (
            creds["api_url"],
            creds["flower_url"],
            creds["api_key"],
            creds["admin_key"],
            "GPU workers  cpu0",
        ):
            assert needle in summary
        # Each service on loopback, none on the machine's own PostgreSQL/Redis/RabbitMQ ports.
        stack_json = json.loads((stack.home / "stack.json").read_text())
        assert stack_json["services"] == {"postgres": "embedded", "redis": "embedded", "seaweedfs": "embedded"}
        for url in stack_json["env"].values():
            if "://" in url:
                assert "127.0.0.1" in url and not any(f":{p}/" in url + "/" for p in (5432, 6379, 5672))

        out = workdir / "x.mp4"
        result = subprocess.run(
            [DREAMQ, "generate", "a red circle moving right", "--wait", "--out", str(out)],
            cwd=workdir,
            env=clean_env(stack.home),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert result.returncode == 0, result.stderr + result.stdout
        first_job = json.loads(result.stdout)
        assert first_job["state"] == "succeeded"
        frames = decode(out)
        assert frames.shape == (24, 128, 128, 3)
        assert dominant_colour(frames) == "red" and motion_direction(frames) == "right"

        luma_generation_completes(creds, summary)

        assert requests.get(creds["flower_url"] + "/api/workers", timeout=10).status_code == 401
        workers = requests.get(
            creds["flower_url"] + "/api/workers?refresh=1",
            timeout=30,
            auth=(creds["flower_user"], creds["flower_password"]),
        ).json()
        assert any(name.startswith("cpu0@") for name in workers)
    finally:
        assert stack.stop(signal.SIGINT) == 0
    assert "stopped in" in stack.output()
    assert leftovers(stack.home) == []

    # Restart without GPU workers: the finished job survived, a new job waits in Postgres.
    stack = Stack(workdir, "--gpu-workers", "0")
    creds2 = stack.wait_ready()
    try:
        assert creds2["api_key"] == creds["api_key"], "keys survive a restart"
        headers = {"Authorization": f"Bearer {creds2['api_key']}"}
        old = requests.get(f"{creds2['api_url']}/v1/generations/{first_job['id']}", headers=headers, timeout=10).json()
        assert old["state"] == "succeeded"
        video = requests.get(old["assets"]["video"], timeout=30)
        assert video.status_code == 200 and decode_bytes(video.content).shape[0] == 24
        passes_before = dispatch_passes(creds2)
        queued = requests.post(
            f"{creds2['api_url']}/v1/generations",
            headers=headers,
            timeout=10,
            json={"prompt": "a green square moving down", "seed": 5},
        ).json()
        # Two more dispatch passes: the second began after the first ended, so after the job was
        # accepted. A pass saw the job and, with no GPU worker in its pool, released nothing.
        deadline = time.monotonic() + 60
        while dispatch_passes(creds2) < passes_before + 2:
            assert time.monotonic() < deadline, "no dispatch pass ran after the submission"
            time.sleep(0.5)
        assert requests.get(f"{creds2['api_url']}/v1/generations/{queued['id']}", headers=headers, timeout=10).json()[
            "state"
        ] in ("queued", "dispatched")
    finally:
        assert stack.stop(signal.SIGTERM) == 0
    assert leftovers(stack.home) == []

    # Restart with a worker and an external Redis (CELERY_BROKER_URL given, so none is started):
    # the job accepted before the restart waited in Postgres, not in the broker, and completes.
    # The external Redis is one this test starts and owns (no machine Redis, no database another
    # session might use), and the URL names database 5 of it, so the stack must honour the number.
    external = EmbeddedRedis(workdir / "external-redis", port=0)
    external.start()
    try:
        external_url = external.url.rsplit("/", 1)[0] + "/5"
        stack = Stack(workdir, env={"CELERY_BROKER_URL": external_url})
        creds3 = stack.wait_ready()
        try:
            stack_json = json.loads((stack.home / "stack.json").read_text())
            assert stack_json["services"] == {"postgres": "embedded", "redis": "external", "seaweedfs": "embedded"}
            assert "redis ready" not in stack.output()
            headers = {"Authorization": f"Bearer {creds3['api_key']}"}
            job = requests.get(
                f"{creds3['api_url']}/v1/generations/{queued['id']}",
                headers={**headers, "Prefer": "wait=60"},
                timeout=90,
            ).json()
            assert job["state"] == "succeeded", job
            frames = decode_bytes(requests.get(job["assets"]["video"], timeout=30).content)
            assert dominant_colour(frames) == "green" and motion_direction(frames) == "down"
            # The stack's queues are in the database the URL named, and only there.
            with redis.Redis.from_url(external_url) as client:
                assert any(key.startswith(b"_kombu.binding.") for key in client.scan_iter(count=1000))
            with redis.Redis.from_url(external.url) as client:
                assert client.dbsize() == 0
        finally:
            assert stack.stop(signal.SIGINT) == 0
        assert leftovers(stack.home) == []
    finally:
        external.stop()


def dispatch_passes(creds: dict) -> float:
    """dreamq_dispatch_passes_total from the stack's /metrics (summed over its processes)."""
    response = requests.get(
        f"{creds['api_url']}/metrics", headers={"Authorization": f"Bearer {creds['admin_key']}"}, timeout=30
    )
    assert response.status_code == 200, response.text
    for line in response.text.splitlines():
        if line.startswith("dreamq_dispatch_passes_total "):
            return float(line.split()[1])
    return 0.0


def luma_generation_completes(creds: dict, summary: str) -> None:
    """The README's three lines: Luma's official client on the printed URL, with the printed key
    and a model name the fresh stack seeded (ray-2 -> demo)."""
    from lumaai import LumaAI

    base_url = f"{creds['api_url']}/dream-machine/v1"
    assert base_url in summary
    client = LumaAI(base_url=base_url, auth_token=creds["api_key"])
    generation = client.generations.create(model="ray-2", prompt="a blue circle moving left")
    deadline = time.monotonic() + 120
    while (generation := client.generations.get(generation.id)).state not in ("completed", "failed"):
        assert time.monotonic() < deadline, generation
        time.sleep(0.5)
    assert generation.state == "completed", generation
    frames = decode_bytes(requests.get(generation.assets.video, timeout=30).content)
    assert dominant_colour(frames) == "blue" and motion_direction(frames) == "left"
    client.close()


def decode_bytes(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
