"""Embedded Postgres / Redis / SeaweedFS and the process supervisor, against real processes."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Iterator  # noqa: E402

import psutil  # noqa: E402
import pytest  # noqa: E402

from app.stack.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedSeaweedFS  # noqa: E402
from app.stack.process import (  # noqa: E402
    ManagedProcess,
    ProcessStartError,
    Supervisor,
    find_free_port,
    release_port,
    wait_for_port,
)
from tests.support.services import (  # noqa: E402
    ENV_DATABASE_URL,
    ENV_REDIS_URL,
    ENV_S3_ACCESS_KEY,
    ENV_S3_SECRET_KEY,
    ENV_S3_URL,
    test_services,
)

pytestmark = pytest.mark.slow

PY = sys.executable


# -- helpers -----------------------------------------------------------------------------


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def live(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def processes_mentioning(path: Path) -> list[psutil.Process]:
    needle = str(path)
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(needle in arg for arg in p.info["cmdline"] or ()):
            out.append(p)
    return out


def wait_gone(tree: list[psutil.Process], timeout: float = 2.0) -> list[psutil.Process]:
    # Grandchildren orphaned by a SIGKILL are reaped by init asynchronously.
    deadline = time.monotonic() + timeout
    while live(tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    return live(tree)


def assert_gone(tree: list[psutil.Process], data_dir: Path) -> None:
    assert wait_gone(tree) == []
    assert processes_mentioning(data_dir) == []


@contextmanager
def occupied_port() -> Iterator[int]:
    """A port somebody else listens on (for the fallback tests)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


# -- Postgres ----------------------------------------------------------------------------


def test_postgres_sql_restart_crash_and_cleanup(tmp_path: Path) -> None:
    import psycopg

    pg = EmbeddedPostgres(tmp_path / "pg", port=0, database="dreamq")
    try:
        pg.start()
        assert pg.url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
        assert pg.url.endswith("/dreamq")
        with psycopg.connect(pg.dsn) as conn:
            assert conn.execute("SHOW max_connections").fetchone() == ("200",)
            assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
            conn.execute("CREATE TABLE jobs (id serial PRIMARY KEY, tier text NOT NULL)")
            conn.execute("INSERT INTO jobs (tier) VALUES ('realtime')")
            assert conn.execute("SELECT tier FROM jobs").fetchall() == [("realtime",)]
        assert pg.start() is pg  # idempotent while running

        tree = process_tree(pg.process.pid)
        assert len(tree) > 1  # postmaster + checkpointer, walwriter, ...
        assert pg.stop() == "terminated"  # fast shutdown, no SIGKILL needed
        assert_gone(tree, pg.data_dir)
        assert pg.stop() == "terminated"  # idempotent

        pg.start()
        with psycopg.connect(pg.dsn) as conn:
            assert conn.execute("SELECT tier FROM jobs").fetchall() == [("realtime",)]
            conn.execute("INSERT INTO jobs (tier) VALUES ('batch')")

        # Crash: everything SIGKILLed, postmaster.pid left behind.
        tree = process_tree(pg.process.pid)
        pg.process.kill()
        assert pg.process._wait_exit(5)
        assert (pg.pgdata / "postmaster.pid").exists()
        pg.start()  # reaps the dead one, clears the stale pid file, recovers from WAL
        assert wait_gone(tree) == []
        with psycopg.connect(pg.dsn) as conn:
            rows = conn.execute("SELECT tier FROM jobs ORDER BY id").fetchall()
        assert rows == [("realtime",), ("batch",)]
    finally:
        pg.stop()
    assert processes_mentioning(pg.data_dir) == []


# -- Redis -------------------------------------------------------------------------------


def test_redis_config_persistence_and_port_fallback(tmp_path: Path) -> None:
    import redis

    with occupied_port() as taken:
        r = EmbeddedRedis(tmp_path / "redis", port=taken)
        try:
            r.start()
            assert r.port != taken
            assert r.url == f"redis://127.0.0.1:{r.port}/0"
            client = redis.Redis.from_url(r.url, decode_responses=True)
            try:
                assert client.config_get("appendonly") == {"appendonly": "yes"}
                assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
                assert client.config_get("bind") == {"bind": "127.0.0.1"}
                client.set("celery-message", "payload")
                client.rpush("queue", "job-1")
                assert client.get("celery-message") == "payload"
            finally:
                client.close()

            tree = process_tree(r.process.pid)
            assert r.stop() == "terminated"
            assert_gone(tree, r.data_dir)

            r.start()
            client = redis.Redis.from_url(r.url, decode_responses=True)
            try:
                assert client.get("celery-message") == "payload"
                client.rpush("queue", "job-2")
            finally:
                client.close()
            # A crash (SIGKILL) keeps what was acknowledged: the AOF is written before replies.
            r.process.kill()
            assert r.process._wait_exit(5)
            r.start()
            client = redis.Redis.from_url(r.url, decode_responses=True)
            try:
                assert client.lrange("queue", 0, -1) == ["job-1", "job-2"]
            finally:
                client.close()
        finally:
            r.stop()


ORPHANING_PARENT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    import redis
    from app.stack.embedded import EmbeddedRedis
    r = EmbeddedRedis(Path({data!r}), port=0).start()
    client = redis.Redis.from_url(r.url)
    client.set("k", "survives")
    client.close()
    print(r.process.pid, flush=True)
    time.sleep(60)
    """
)


def test_orphaned_server_is_stopped_and_live_one_is_not_doubled(tmp_path: Path) -> None:
    import redis

    from app.stack.embedded import ServiceAlreadyRunning

    data = tmp_path / "redis"
    script = ORPHANING_PARENT.format(root=str(Path(__file__).resolve().parents[3]), data=str(data))
    with subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, text=True) as parent:
        server = psutil.Process(int(parent.stdout.readline()))
        # Its supervisor is alive: a second instance on the same data dir is refused.
        with pytest.raises(ServiceAlreadyRunning):
            EmbeddedRedis(data, port=0).start()
        parent.kill()  # supervisor dies without stopping anything: the server is orphaned
    assert server.is_running()
    r = EmbeddedRedis(data, port=0)
    try:
        r.start()
        assert wait_gone([server]) == []
        client = redis.Redis.from_url(r.url, decode_responses=True)
        try:
            assert client.get("k") == "survives"
        finally:
            client.close()
    finally:
        r.stop()


# -- SeaweedFS ---------------------------------------------------------------------------


def test_seaweedfs_s3_roundtrip_presign_restart(tmp_path: Path) -> None:
    import botocore.exceptions
    from boto3.s3.transfer import TransferConfig

    data_dir = tmp_path / "seaweed"
    with occupied_port() as taken:
        sw = EmbeddedSeaweedFS(data_dir, s3_port=taken)
        try:
            sw.start()
            assert sw.port != taken
            assert sw.url == f"http://127.0.0.1:{sw.port}"
            assert sw.access_key and sw.secret_key
            s3 = sw.client()
            try:
                s3.create_bucket(Bucket="dreamq-models")
                s3.put_object(Bucket="dreamq-models", Key="v1/weights.bin", Body=b"\x00\x01weights")
                body = s3.get_object(Bucket="dreamq-models", Key="v1/weights.bin")["Body"]
                with body:
                    assert body.read() == b"\x00\x01weights"
                assert s3.head_object(Bucket="dreamq-models", Key="v1/weights.bin")["ContentLength"] == 9
                big = tmp_path / "video.mp4"
                big.write_bytes(os.urandom(6 * 1024 * 1024))
                s3.upload_file(
                    str(big),
                    "dreamq-models",
                    "out/video.mp4",
                    Config=TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024),
                )
                etag = s3.head_object(Bucket="dreamq-models", Key="out/video.mp4")["ETag"]
                assert etag.endswith('-2"')  # really went through multipart
                listed = s3.list_objects_v2(Bucket="dreamq-models")["Contents"]
                assert sorted(o["Key"] for o in listed) == ["out/video.mp4", "v1/weights.bin"]

                url = s3.generate_presigned_url(
                    "get_object", Params={"Bucket": "dreamq-models", "Key": "v1/weights.bin"}, ExpiresIn=60
                )
                with urllib.request.urlopen(url, timeout=5) as resp:
                    assert resp.read() == b"\x00\x01weights"
                # Unsigned requests are refused: the credentials really are enforced.
                with pytest.raises(urllib.error.HTTPError) as denied:
                    urllib.request.urlopen(f"{sw.url}/dreamq-models/v1/weights.bin", timeout=5)
                denied.value.close()
                assert denied.value.code == 403

                s3.delete_object(Bucket="dreamq-models", Key="out/video.mp4")
                with pytest.raises(botocore.exceptions.ClientError):
                    s3.head_object(Bucket="dreamq-models", Key="out/video.mp4")
            finally:
                s3.close()

            tree = process_tree(sw.process.pid)
            assert sw.stop() in ("terminated", "killed")
            assert_gone(tree, data_dir)
        finally:
            sw.stop()

    # A new instance on the same data dir: same persisted credentials, same object.
    state = json.loads((data_dir / "seaweed.json").read_text())
    sw2 = EmbeddedSeaweedFS(data_dir)
    try:
        sw2.start()
        assert (sw2.access_key, sw2.secret_key) == (state["access_key"], state["secret_key"])
        assert sw2.ports == state["ports"]
        s3 = sw2.client()
        try:
            body = s3.get_object(Bucket="dreamq-models", Key="v1/weights.bin")["Body"]
            with body:
                assert body.read() == b"\x00\x01weights"
        finally:
            s3.close()
    finally:
        sw2.stop()
    assert processes_mentioning(data_dir) == []


# -- ManagedProcess / Supervisor ---------------------------------------------------------

STUBBORN = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # one child in the group, one that escapes it with its own session
    subprocess.Popen([sys.executable, "-c", "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
    subprocess.Popen([sys.executable, "-c", "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"], start_new_session=True)
    print("UP" + "NOW", flush=True)  # split: the log's header line repeats argv
    time.sleep(60)
    """
)


def test_process_ignoring_sigterm_is_killed_after_grace(tmp_path: Path) -> None:
    log_path = tmp_path / "stubborn.log"
    proc = ManagedProcess(
        "stubborn",
        [PY, "-c", STUBBORN],
        log_path=log_path,
        ready=lambda: "UPNOW" in log_path.read_text(),
    )
    proc.start()
    proc.wait_ready(10)
    deadline = time.monotonic() + 5
    while len(process_tree(proc.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    tree = process_tree(proc.pid)
    assert len(tree) == 3
    t0 = time.monotonic()
    assert proc.stop(grace_s=0.5) == "killed"
    elapsed = time.monotonic() - t0
    assert 0.5 <= elapsed < 3
    assert proc.returncode == -signal.SIGKILL
    assert not proc.alive()
    assert live(tree) == []
    assert proc.stop() == "killed"  # idempotent


def test_wait_ready_fails_fast_with_log_tail(tmp_path: Path) -> None:
    proc = ManagedProcess(
        "crasher",
        ["sh", "-c", "echo 'FATAL: boom'; exit 3"],
        log_path=tmp_path / "c.log",
        ready=lambda: False,
    )
    proc.start()
    t0 = time.monotonic()
    with pytest.raises(ProcessStartError) as err:
        proc.wait_ready(30)
    assert time.monotonic() - t0 < 2
    assert "exited with code 3" in str(err.value)
    assert "FATAL: boom" in str(err.value)
    assert proc.stop() == "exited"

    slow = ManagedProcess("never-ready", ["sleep", "30"], log_path=tmp_path / "s.log", ready=lambda: False)
    slow.start()
    try:
        with pytest.raises(ProcessStartError, match="not ready after 0.3s"):
            slow.wait_ready(0.3)
    finally:
        assert slow.stop(1) == "terminated"


def test_ports_fall_back_when_taken() -> None:
    with occupied_port() as taken:
        port = find_free_port(taken)
        assert port != taken
        with socket.socket() as s:  # really free
            s.bind(("127.0.0.1", port))
        release_port(port)
        wait_for_port("127.0.0.1", taken, timeout=1)
    free = find_free_port(None)
    release_port(free)
    assert find_free_port(free) == free  # a free preferred port is used as is
    release_port(free)
    with pytest.raises(TimeoutError):
        wait_for_port("127.0.0.1", free, timeout=0.2)


def test_supervisor_reverse_stop_and_watch(tmp_path: Path) -> None:
    sup = Supervisor(grace_s=2)
    a = sup.add_and_start(ManagedProcess("a", ["sleep", "30"], log_path=tmp_path / "a.log"), 5)
    b = sup.add_and_start(ManagedProcess("b", ["sh", "-c", "sleep 0.3; exit 7"], log_path=tmp_path / "b.log"), 5)
    dead = sup.watch(poll_s=0.05)
    assert dead is b and b.returncode == 7
    assert list(sup.stop_all()) == ["b", "a"]  # reverse start order
    assert not a.alive() and a.outcome == "terminated"
    assert sup.watch() is None  # after stop_all nothing is "unexpected"


SUPERVISED = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from app.stack.process import ManagedProcess, Supervisor
    out = Path({out!r})
    sup = Supervisor(grace_s=1)
    sup.install_signal_handlers()
    sup.add_and_start(ManagedProcess("sleeper", ["sleep", "60"], log_path=out / "sleeper.log"))
    sup.add_and_start(ManagedProcess("stubborn", [sys.executable, "-c",
        "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('UP' + 'NOW', flush=True); time.sleep(60)"],
        log_path=out / "stubborn.log", ready=lambda: "UPNOW" in (out / "stubborn.log").read_text()))
    (out / "pids").write_text(" ".join(str(p.pid) for p in sup.processes))
    dead = sup.watch(poll_s=0.05)
    print("watch returned", dead, "signal", sup.received_signal, flush=True)
    print("outcomes", {{p.name: p.outcome for p in sup.processes}}, flush=True)
    """
)


def test_supervisor_signal_handler_stops_everything(tmp_path: Path) -> None:
    root = str(Path(__file__).resolve().parents[3])
    script = SUPERVISED.format(root=root, out=str(tmp_path))
    with subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, text=True) as parent:
        deadline = time.monotonic() + 10
        while not (tmp_path / "pids").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        children = [psutil.Process(int(p)) for p in (tmp_path / "pids").read_text().split()]
        parent.send_signal(signal.SIGTERM)
        out, _ = parent.communicate(timeout=10)
    assert parent.returncode == 0, out
    assert "watch returned None signal 15" in out
    assert "'sleeper': 'terminated'" in out and "'stubborn': 'killed'" in out
    assert live(children) == []


# -- tests/support/services.py -----------------------------------------------------------


def test_test_services_embedded_then_external(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import psycopg
    import redis

    for name in (ENV_DATABASE_URL, ENV_REDIS_URL, ENV_S3_URL, ENV_S3_ACCESS_KEY, ENV_S3_SECRET_KEY):
        monkeypatch.delenv(name, raising=False)
    with test_services(tmp_path / "embedded") as services:
        assert services.kinds == {"database": "embedded", "redis": "embedded", "s3": "embedded"}
        assert services.database_url.startswith("postgresql+psycopg://")
        with psycopg.connect(services.database_dsn) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("dreamq_test",)
        # The embedded ones double as "external" servers for the env-var path.
        monkeypatch.setenv(ENV_DATABASE_URL, services.database_url)
        monkeypatch.setenv(ENV_REDIS_URL, services.redis_url)
        monkeypatch.setenv(ENV_S3_URL, services.s3_url)
        monkeypatch.setenv(ENV_S3_ACCESS_KEY, services.s3_access_key)
        monkeypatch.setenv(ENV_S3_SECRET_KEY, services.s3_secret_key)
        with test_services(tmp_path / "external") as ext:
            assert ext.kinds == {"database": "external", "redis": "external", "s3": "external"}
            assert ext.redis_url == services.redis_url and ext.s3_url == services.s3_url
            fresh_db = ext.database_url.rsplit("/", 1)[1]
            assert fresh_db.startswith("dreamq_test_") and ext.database_url.startswith("postgresql+psycopg://")
            with psycopg.connect(ext.database_dsn) as conn:
                assert conn.execute("SELECT current_database()").fetchone() == (fresh_db,)
            client = redis.Redis.from_url(ext.redis_url)
            try:
                assert client.ping()
            finally:
                client.close()
        assert not (tmp_path / "external").exists()  # nothing embedded was started
        with psycopg.connect(services.database_dsn) as conn:
            gone = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (fresh_db,)).fetchone()
        assert gone is None  # dropped at exit
    assert processes_mentioning(tmp_path / "embedded") == []
