"""Death in a job's tail, and a warm shutdown during one, on real workers (docs/operating.md, Worker
faults; docs/architecture.md, rule 4).

What follows the model (staging the frames and the hand-off, or for a small clip encoding and
completing) runs on the worker's tail thread after the task has returned, so the Celery message
is already acknowledged: if the process dies there, only the job's lease can bring it back.

* A worker SIGKILLed in the tail: nothing renews the lease, the reaper requeues the job once the
  lease has run out (not before), another worker runs it, and it completes exactly once (one
  completion, one set of outputs, those of the second dispatch; both claims counted as attempts).
* A warm shutdown (SIGTERM) in the tail: the worker waits for the tail, whose own lease keeps the
  job running for longer than a lease meanwhile, and the job completes before the worker's last
  process exits.

The tail is held in the middle by the GPU worker's object storage: its S3_ENDPOINT_URL is a proxy
(HoldingS3Proxy, below) that forwards everything to the test's S3 except the worker's uploads to
the media bucket (the tail's staging object or outputs), which it holds until the test lets them
go. No code of the worker is changed. The reaper is `dreamq.maintenance.reap_expired_leases`,
what beat runs, called from this process with a lease of LEASE_S; the workers use the same lease.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import urlsplit

import psutil
import pytest
from sqlalchemy import text

from app.core.config import get_settings, reload_settings
from app.core.storage import s3_client
from app.db.session import transaction
from tests.support.factories import auth, create_user
from tests.support.stack import TINY_BUNDLE, push_fixture_model, running_workers
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

# A model (so a pool and queues) per test: a worker killed in one test is no holder of the other's version.
KILL_MODEL, WARM_MODEL = "tail-kill", "tail-warm"
# Short, so a test waits seconds for it, with room for a lease renewal (every LEASE_S/3) late on a loaded host.
LEASE_S = 4
# Hop-by-hop headers the proxy does not pass on (it answers Expect: 100-continue itself).
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "te", "upgrade"}


class HoldingS3Proxy:
    """An HTTP proxy in front of S3 that holds PUTs under `hold_prefix` while `holding` is on."""

    def __init__(self, upstream: str, hold_prefix: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port or 80)
        self.hold_prefix = hold_prefix
        self.holding = False
        self.drop_held = False  # on release: answer held requests by closing the connection
        self.held: list[str] = []
        self.arrived = threading.Event()
        self._gate = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _body(self) -> bytes | None:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    raw = b""
                    while True:  # kept as sent (chunked, with any trailer), passed on as is
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while True:
                                trailer = self.rfile.readline()
                                raw += trailer
                                if trailer in (b"\r\n", b"\n", b""):
                                    return raw
                        raw += self.rfile.read(size + 2)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            def _proxy(self) -> None:
                body = self._body()
                if self.command == "PUT" and self.path.startswith(proxy.hold_prefix) and proxy.holding:
                    proxy.held.append(self.path)
                    proxy.arrived.set()
                    proxy._gate.wait(120)
                    if proxy.drop_held:
                        self.close_connection = True
                        return
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        # Transfer-Encoding stays: a chunked body is passed on as it came.
                        if name.lower() not in _HOP_BY_HOP or name.lower() == "transfer-encoding":
                            upstream.putheader(name, value)
                    upstream.endheaders(body)
                    response = upstream.getresponse()
                    data = response.read()
                    self.send_response_only(response.status, response.reason)
                    for name, value in response.getheaders():
                        if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                            self.send_header(name, value)
                    length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _proxy  # noqa: N815 (http.server's naming)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def hold(self) -> None:
        self.held.clear()
        self.arrived.clear()
        self._gate.clear()
        self.drop_held = False
        self.holding = True

    def release(self, *, drop: bool = False) -> None:
        self.drop_held = drop
        self.holding = False
        self._gate.set()

    def __enter__(self) -> "HoldingS3Proxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release(drop=True)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@contextlib.contextmanager
def lease_of(seconds: float) -> Iterator[None]:
    """This process's job lease (what its reaper calls ran out), restored at the end."""
    saved = os.environ.get("DREAMQ_JOB_LEASE_S")
    os.environ["DREAMQ_JOB_LEASE_S"] = str(seconds)
    reload_settings()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("DREAMQ_JOB_LEASE_S", None)
        else:
            os.environ["DREAMQ_JOB_LEASE_S"] = saved
        reload_settings()


@pytest.fixture()
def tail_stack(stack_env, tmp_path_factory):
    """The models' pools, a control+cpu worker on the real S3, and the S3 proxy for GPU workers."""
    for model in (KILL_MODEL, WARM_MODEL):
        push_fixture_model(model, TINY_BUNDLE, dispatch_limit=2)
    logs = tmp_path_factory.mktemp("tail-logs")
    media = stack_env.env["DREAMQ_MEDIA_BUCKET"]
    with (
        HoldingS3Proxy(stack_env.env["S3_ENDPOINT_URL"], f"/{media}/") as proxy,
        lease_of(LEASE_S),
        running_workers(
            stack_env, logs, models=[], control=1, tag="tlc", extra_env={"DREAMQ_JOB_LEASE_S": str(LEASE_S)}
        ),
    ):
        gpu_env = {"S3_ENDPOINT_URL": proxy.url, "DREAMQ_JOB_LEASE_S": str(LEASE_S), "DREAMQ_TINY_STEP_S": "0.05"}
        yield stack_env, logs, proxy, gpu_env


def job_row(job_id: str):
    with transaction() as session:
        return session.execute(
            text(
                "SELECT state, attempts, progress, dispatch_seq, worker_id, video_key, thumbnail_key, updated_at "
                "FROM jobs WHERE id = :id"
            ),
            {"id": job_id},
        ).one()


def job_events(job_id: str):
    with transaction() as session:
        return session.execute(
            text("SELECT at, from_state, to_state, worker_id, detail FROM job_events WHERE job_id = :id ORDER BY id"),
            {"id": job_id},
        ).all()


def media_keys(prefix: str) -> list[str]:
    listed = s3_client().list_objects_v2(Bucket=get_settings().media_bucket, Prefix=prefix)
    return sorted(item["Key"] for item in listed.get("Contents", []))


def message_acknowledged(model: str, job_id: str, dispatch_seq: int) -> bool:
    """The broker holds no message of this dispatch any more, ready or delivered-unacknowledged."""
    from tasks.maintenance import broker_task_ids

    return f"{job_id}-{dispatch_seq}" not in (broker_task_ids([f"local.{model}."]) or set())


def process_tree(pid: int) -> list[psutil.Process]:
    parent = psutil.Process(pid)
    return [parent, *parent.children(recursive=True)]


def all_gone(processes: list[psutil.Process]) -> bool:
    def gone(process: psutil.Process) -> bool:
        try:
            return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    return all(gone(process) for process in processes)


def submit(client, key, model: str, **params) -> str:
    response = client.post("/v1/generations", json={"prompt": "tail", "model": model, **params}, headers=auth(key))
    assert response.status_code == 202, response.json
    return response.json["id"]


def wait_in_tail(proxy: HoldingS3Proxy, model: str, job_id: str, gpus: dict) -> str:
    """Until the job's tail is held at its first upload and its task has returned (message acked)."""
    if not proxy.arrived.wait(90):
        logs = "\n".join(f"--- {name}\n{gpus['procs'][name].log_tail(30)}" for name in gpus["gpu_workers"])
        raise AssertionError(f"the tail's upload never arrived; job {job_row(job_id)}\n{logs}")
    held = proxy.held[0]
    assert f"/{job_id}/1/" in held, held
    wait_until(
        lambda: message_acknowledged(model, job_id, 1), 30, "the task to return and its message to be acknowledged"
    )
    row = job_row(job_id)
    # Running, first attempt, the model's last step recorded (steps report up to 0.9), not handed off.
    assert (row.state, row.attempts, float(row.progress)) == ("running", 1, 0.9), row
    return held


def test_a_worker_killed_in_a_jobs_tail_loses_nothing_the_lease_and_the_reaper_recover_it(client, tail_stack):
    from tasks.maintenance import reap_expired_leases

    stack_env, logs, proxy, gpu_env = tail_stack
    _, key = create_user("api")
    # Two GPU workers: one dies in the tail, the other runs the job again.
    with running_workers(
        stack_env, logs, models=[KILL_MODEL, KILL_MODEL], control=0, tag="tk", extra_env=gpu_env
    ) as gpus:
        proxy.hold()
        # 128x128x8 frames (393 KB) is over the inline limit: the tail stages them for the cpu queue.
        job_id = submit(client, key, KILL_MODEL, width=128, height=128, num_frames=8)
        held = wait_in_tail(proxy, KILL_MODEL, job_id, gpus)
        assert held.endswith(f"/staging/{job_id}/1/frames.npy")
        victim = job_row(job_id).worker_id
        [name] = [n for n in gpus["gpu_workers"] if victim.startswith(f"{n}@")]
        tree = process_tree(gpus["procs"][name].pid)
        assert len(tree) >= 2  # the Celery parent and the prefork child whose thread runs the tail
        gpus["procs"][name].kill()  # SIGKILL, the worker and its child
        wait_until(lambda: all_gone(tree), 10, "the killed worker's processes to be gone")
        proxy.release(drop=True)  # the dead tail's upload never lands
        last_renewed = job_row(job_id).updated_at

        def requeued() -> bool:
            reap_expired_leases()
            return job_row(job_id).state != "running"

        wait_until(requeued, LEASE_S + 30, "the reaper to take the job back")

        def finished():
            reap_expired_leases()  # beat keeps running it: whatever else goes wrong is recovered too
            row = job_row(job_id)
            return row.state in ("succeeded", "failed", "cancelled") and row

        done = wait_until(finished, 120, "the job to finish on the other worker")

    assert done.state == "succeeded" and done.attempts == 2, done
    events = job_events(job_id)
    requeues = [e for e in events if (e.from_state, e.to_state) == ("running", "queued")]
    assert len(requeues) == 1 and requeues[0].detail == {"reason": "lease_expired", "by": "reaper", "worker": victim}
    # Not before the lease ran out: the last renewal (the dead worker's) was a whole lease earlier.
    assert (requeues[0].at - last_renewed).total_seconds() >= LEASE_S
    claims = [e for e in events if e.to_state == "running" and not (e.detail or {}).get("step")]
    assert [c.worker_id for c in claims][0] == victim and claims[-1].worker_id != victim and len(claims) == 2
    assert [e for e in events if e.to_state == "succeeded"] == events[-1:]
    # One set of outputs, the second dispatch's; nothing of the killed run; staging cleaned up.
    assert (done.dispatch_seq, done.video_key) == (2, f"outputs/{job_id}/2/video.mp4")
    assert media_keys(f"outputs/{job_id}/") == [f"outputs/{job_id}/2/thumbnail.jpg", f"outputs/{job_id}/2/video.mp4"]
    assert media_keys(f"staging/{job_id}/") == []


def test_a_warm_shutdown_waits_for_the_tail_and_the_job_completes_before_the_worker_exits(client, tail_stack):
    from tasks.maintenance import reap_expired_leases

    stack_env, logs, proxy, gpu_env = tail_stack
    _, key = create_user("api")
    with running_workers(stack_env, logs, models=[WARM_MODEL], control=0, tag="tw", extra_env=gpu_env) as gpus:
        proc = gpus["procs"][gpus["gpu_workers"][0]]
        proxy.hold()
        # The default 32x32x4 clip is small: the tail encodes, uploads and completes it here.
        job_id = submit(client, key, WARM_MODEL)
        held = wait_in_tail(proxy, WARM_MODEL, job_id, gpus)
        assert f"/outputs/{job_id}/1/" in held
        tree = process_tree(proc.pid)
        os.kill(proc.pid, signal.SIGTERM)  # warm shutdown, as Celery gets it from a deploy or a preemption
        # Held for two leases: the worker waits for its tail, whose own lease keeps the job running.
        held_until = time.monotonic() + 2 * LEASE_S
        while time.monotonic() < held_until:
            reap_expired_leases()
            assert job_row(job_id).state == "running", "the job left running while its tail was held"
            assert not all_gone(tree), "the worker exited with its tail unfinished"
            time.sleep(0.2)
        proxy.release()
        wait_until(lambda: all_gone(tree), 60, "the worker to exit after its tail")
        # Read after every process of the worker is gone: a commit seen now came before the exit.
        done = job_row(job_id)
        rc = proc.returncode

    assert done.state == "succeeded" and done.attempts == 1, done
    assert done.video_key == f"outputs/{job_id}/1/video.mp4"
    events = job_events(job_id)
    # Claimed once, never requeued, completed by the worker that claimed it (nobody else could).
    [claim] = [e for e in events if e.to_state == "running" and not (e.detail or {}).get("step")]
    assert claim.worker_id.startswith(f"{gpus['gpu_workers'][0]}@")
    assert (events[-1].to_state, events[-1].worker_id) == ("succeeded", claim.worker_id)
    assert not [e for e in events if e.to_state == "queued" and e.from_state is not None]
    assert rc == 0, f"the worker did not exit cleanly (rc {rc})"
