"""Supervised child processes for the local stack (`dreamq up`, test fixtures).

Every child runs in its own session, so one signal reaches everything it forked, and Ctrl-C in
the terminal reaches only the supervisor, which then shuts the children down in order.
"""

from __future__ import annotations

import logging
import os
import pwd
import shlex
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import psutil

log = logging.getLogger(__name__)

READY_POLL_S = 0.05
_EXIT_POLL_S = 0.02
LOG_TAIL_LINES = 40


class ProcessStartError(RuntimeError):
    """A managed process exited or did not become ready; the message carries its log tail."""

    def __init__(self, name: str, reason: str, log_path: Path, log_tail: str) -> None:
        self.name = name
        self.reason = reason
        self.log_path = log_path
        self.log_tail = log_tail
        super().__init__(f"{name}: {reason}\n--- last {LOG_TAIL_LINES} lines of {log_path} ---\n{log_tail}")


class SupervisorShutdown(BaseException):
    """Raised in the main thread after a SIGINT/SIGTERM made the Supervisor stop everything.

    A BaseException, like KeyboardInterrupt, so that `except Exception` around start-up code
    does not swallow the request to exit.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def read_log_tail(path: Path, lines: int = LOG_TAIL_LINES, *, start_offset: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            # 64 KiB holds 40 lines of any sane log; reading the whole file of a long-lived
            # service (weed logs a lot) would be slow and pointless.
            begin = max(start_offset, size - 65536, 0)
            f.seek(begin)
            data = f.read()
    except OSError as exc:
        return f"<log unavailable: {exc}>"
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


class ManagedProcess:
    """One child process: own process group, output appended to a log file, polled readiness.

    stop() escalates term_signal -> SIGKILL of the whole group (plus any descendant that left
    the group) and reaps the child. The leader is never reaped before the group SIGKILL: while
    it is an unreaped zombie its pid, hence the pgid, cannot be reused by an unrelated process.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        log_path: Path,
        ready: Callable[[], bool] | None = None,
        user: str | None = None,
        term_signal: int = signal.SIGTERM,
        signal_group: bool = True,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.log_path = Path(log_path)
        self.ready = ready
        self.user = user
        # Postgres wants its shutdown signal on the postmaster only (it signals its children
        # itself); most other servers are fine with the whole group getting it.
        self.term_signal = term_signal
        self.signal_group = signal_group
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._outcome: str | None = None
        self._stopping = False
        self._start_lock = threading.Lock()
        # Re-entrant: a signal handler running Supervisor.stop_all() may interrupt a stop()
        # that the main thread is already inside.
        self._stop_lock = threading.RLock()

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} alive={self.alive()}>"

    # -- state ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def stopping(self) -> bool:
        """True once stop() was called: a death after that is expected, not a crash."""
        return self._stopping

    @property
    def outcome(self) -> str | None:
        return self._outcome

    def _exit_status(self) -> int | None:
        """Exit status if the child has exited, without reaping it (see class docstring)."""
        p = self._popen
        if p is None:
            return None
        if p.returncode is not None:
            return p.returncode
        try:
            info = os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            # Someone else reaped it (a foreign SIGCHLD handler); Popen.wait() copes with that.
            p.wait()
            return p.returncode
        if info is None:
            return None
        if info.si_code == os.CLD_EXITED:
            return info.si_status
        return -info.si_status

    @property
    def returncode(self) -> int | None:
        return self._exit_status()

    def alive(self) -> bool:
        return self._popen is not None and self._exit_status() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines this run wrote (earlier runs share the append-only file)."""
        return read_log_tail(self.log_path, lines, start_offset=self._log_offset)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> "ManagedProcess":
        """Spawn the child; a no-op while it runs. After it stopped, spawns a fresh one."""
        with self._start_lock:
            if self.alive():
                return self
            if self._popen is not None:
                self.stop(0)  # reap the previous run and any leftovers of its group
            env = dict(os.environ if self.env is None else self.env)
            kwargs: dict = {}
            if self.user is not None:
                pw = pwd.getpwnam(self.user)
                if pw.pw_uid != os.geteuid():
                    # group/extra_groups too: user= alone keeps root's gid and groups.
                    kwargs.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
                env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as logf:
                self._log_offset = logf.seek(0, os.SEEK_END)
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                logf.write(f"--- {stamp} dreamq starting {self.name}: {shlex.join(self.argv)}\n".encode())
                logf.flush()
                self._popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=env,
                    cwd=self.cwd,
                    close_fds=True,
                    **kwargs,
                )
            self._outcome = None
            self._stopping = False
            log.debug("started %s pid=%s", self.name, self._popen.pid)
            return self

    def wait_ready(self, timeout_s: float, poll_s: float = READY_POLL_S) -> float:
        """Poll ready() until it returns True; returns the seconds waited.

        Raises ProcessStartError as soon as the process exits, or when timeout_s passes.
        """
        if self._popen is None:
            raise RuntimeError(f"{self.name}: wait_ready() before start()")
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        last_error: BaseException | None = None
        while True:
            rc = self._exit_status()
            if rc is not None:
                raise ProcessStartError(
                    self.name, f"exited with code {rc} before it was ready", self.log_path, self.log_tail()
                )
            if self.ready is None:
                return time.monotonic() - t0
            try:
                if self.ready():
                    return time.monotonic() - t0
            except Exception as exc:  # noqa: BLE001 - readiness probes fail in many ways while booting
                last_error = exc
            if time.monotonic() >= deadline:
                hint = f" (last probe error: {last_error!r})" if last_error is not None else ""
                raise ProcessStartError(
                    self.name, f"not ready after {timeout_s:.1f}s{hint}", self.log_path, self.log_tail()
                )
            time.sleep(poll_s)

    def _descendants(self) -> list[psutil.Process]:
        if self._popen is None or self._popen.returncode is not None:
            return []
        try:
            return psutil.Process(self._popen.pid).children(recursive=True)
        except psutil.Error:
            return []

    def _signal_leader_or_group(self, sig: int, *, group: bool) -> None:
        p = self._popen
        if p is None or p.returncode is not None:
            return
        try:
            if group:
                os.killpg(p.pid, sig)
            else:
                os.kill(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _wait_exit(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self._exit_status() is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(_EXIT_POLL_S)
        return True

    def kill(self) -> None:
        """SIGKILL the group and known descendants now, without waiting or reaping."""
        escaped = self._descendants()
        self._signal_leader_or_group(signal.SIGKILL, group=True)
        for child in escaped:
            try:
                child.kill()
            except psutil.Error:
                pass

    def stop(self, grace_s: float = 10.0) -> str:
        """Stop the process and everything it started; idempotent.

        Returns 'exited' (it had already exited by itself), 'terminated' (term_signal was
        enough within grace_s), 'killed' (needed SIGKILL) or 'not_started'.
        """
        with self._stop_lock:
            if self._outcome is not None:
                return self._outcome
            p = self._popen
            if p is None:
                return "not_started"
            self._stopping = True
            # Snapshot before signalling: once the leader dies its children get reparented
            # and can no longer be found from it.
            escaped = self._descendants()
            if self._exit_status() is not None:
                outcome = "exited"
            else:
                self._signal_leader_or_group(self.term_signal, group=self.signal_group)
                if self._wait_exit(grace_s):
                    outcome = "terminated"
                else:
                    escaped += self._descendants()
                    self._signal_leader_or_group(signal.SIGKILL, group=True)
                    outcome = "killed"
                    if not self._wait_exit(10.0):
                        log.error("%s (pid %s) survived SIGKILL for 10s", self.name, p.pid)
            # Leftovers of the group (the leader is an unreaped zombie, so the pgid is still
            # ours) and descendants that moved to another group or session.
            self._signal_leader_or_group(signal.SIGKILL, group=True)
            survivors = []
            for child in escaped:
                try:
                    # A zombie is dead already; waiting for init to reap it would only stall.
                    if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                        child.kill()
                        survivors.append(child)
                except psutil.Error:
                    pass
            if survivors:
                psutil.wait_procs(survivors, timeout=5)
            p.wait()
            if self._outcome is None:
                self._outcome = outcome
                log.debug("stopped %s pid=%s: %s (rc=%s)", self.name, p.pid, outcome, p.returncode)
            return self._outcome


class Supervisor:
    """Starts ManagedProcesses in order, watches them, and stops them in reverse order."""

    def __init__(self, *, grace_s: float = 10.0) -> None:
        self.grace_s = grace_s
        self._procs: list[ManagedProcess] = []
        self._stages: dict[int, int] = {}
        self.stop_started_at: float | None = None
        self._stop_event = threading.Event()
        self._stopping = False
        self._critical = 0
        self._pending_signal: int | None = None
        self._previous_handlers: dict[int, object] = {}
        self.received_signal: int | None = None

    @property
    def processes(self) -> tuple[ManagedProcess, ...]:
        return tuple(self._procs)

    @contextmanager
    def _signals_deferred(self) -> Iterator[None]:
        # A handler that ran stop_all() between Popen() returning and the process being
        # recorded would miss that process; defer it to the end of the block instead.
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
            if self._critical == 0 and self._pending_signal is not None:
                signum, self._pending_signal = self._pending_signal, None
                self._on_signal(signum)

    def add(self, proc: ManagedProcess, *, stage: int = 0) -> ManagedProcess:
        with self._signals_deferred():
            if proc not in self._procs:
                self._procs.append(proc)
                self._stages[id(proc)] = stage
        return proc

    def add_and_start(self, proc: ManagedProcess, ready_timeout: float = 60.0, *, stage: int = 0) -> ManagedProcess:
        """Start `proc` and wait until ready. `stage` groups processes for stop_all()."""
        if self._stop_event.is_set():
            raise RuntimeError("supervisor is stopping; refusing to start more processes")
        with self._signals_deferred():
            if proc not in self._procs:
                self._procs.append(proc)
                self._stages[id(proc)] = stage
            proc.start()
        if ready_timeout:
            proc.wait_ready(ready_timeout)
        return proc

    def stop_all(self, grace_s: float | None = None) -> dict[str, str]:
        """Stop every process: highest stage first, the processes of one stage in parallel.

        Stages let the stack stop its clients (API, workers, beat) together and only then the
        services they use (Postgres, Redis, S3): stopping one by one would add every grace
        period up; stopping services first would make clients fail their last writes.
        Within a stage, last started is listed first. Returns name -> stop() outcome.
        """
        grace = self.grace_s if grace_s is None else grace_s
        self._stop_event.set()
        self._stopping = True
        if self.stop_started_at is None:
            self.stop_started_at = time.monotonic()
        results: dict[str, str] = {}
        try:
            for stage in sorted({self._stages.get(id(p), 0) for p in self._procs}, reverse=True):
                group = [p for p in reversed(self._procs) if self._stages.get(id(p), 0) == stage]
                if len(group) == 1:
                    results[group[0].name] = group[0].stop(grace)
                    continue
                threads = [
                    threading.Thread(
                        target=lambda p=p: results.__setitem__(p.name, p.stop(grace)),
                        name=f"stop-{p.name}",
                        daemon=True,
                    )
                    for p in group
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
        finally:
            self._stopping = False
        return results

    def kill_all(self) -> None:
        for proc in reversed(self._procs):
            proc.kill()

    def first_unexpected_exit(self) -> ManagedProcess | None:
        for proc in self._procs:
            if not proc.stopping and proc.pid is not None and not proc.alive():
                return proc
        return None

    def watch(self, poll_s: float = 0.5) -> ManagedProcess | None:
        """Block until a process dies unexpectedly (returned) or a stop was requested (None).

        The caller stops the rest: `dead = sup.watch(); sup.stop_all()`.
        """
        try:
            while not self._stop_event.is_set():
                dead = self.first_unexpected_exit()
                if dead is not None:
                    return dead
                self._stop_event.wait(poll_s)
        except SupervisorShutdown:
            pass
        return None

    def request_stop(self) -> None:
        """Make watch() return None (thread-safe; does not stop anything by itself)."""
        self._stop_event.set()

    def _on_signal(self, signum: int) -> None:
        self.received_signal = signum
        if self._stopping:
            # Second Ctrl-C while a graceful stop is running: the user wants it over now.
            log.warning("%s during shutdown: killing all processes", signal.Signals(signum).name)
            self.kill_all()
            return
        if self._critical:
            self._pending_signal = signum
            return
        log.info("%s received: stopping %d processes", signal.Signals(signum).name, len(self._procs))
        self.stop_all()
        raise SupervisorShutdown(signum)

    def install_signal_handlers(self, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> None:
        """SIGINT/SIGTERM -> stop_all() (graceful, then SIGKILL) and SupervisorShutdown.

        Main thread only (a Python restriction). watch() turns the exception into None.
        """
        for signum in signals:
            self._previous_handlers[signum] = signal.signal(signum, lambda s, _f: self._on_signal(s))

    def restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous_handlers.clear()


# -- ports -------------------------------------------------------------------------------

# Ports handed out but maybe not bound yet: services started concurrently (threads) must not
# receive the same ephemeral port between our probe and their bind. Entries expire so a
# caller that never binds cannot leak them.
_RESERVATION_S = 60.0
_reserved: dict[int, float] = {}
_reserved_lock = threading.Lock()


def _can_bind(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Servers set SO_REUSEADDR, so a port whose old connections sit in TIME_WAIT is free
        # for them; probing without it would wrongly skip our own port after a restart.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def find_free_port(preferred: int | None = None, host: str = "127.0.0.1", *, paired_offset: int | None = None) -> int:
    """`preferred` if it can be bound on host, else a free ephemeral port. Reserves the result.

    With paired_offset, port + paired_offset must be free too and is reserved as well (servers
    that derive their gRPC port as HTTP port + 10000).
    """

    def usable(port: int) -> bool:
        ports = [port] if paired_offset is None else [port, port + paired_offset]
        return all(0 < p < 65536 and p not in _reserved and _can_bind(host, p) for p in ports)

    def reserve(port: int) -> int:
        until = time.monotonic() + _RESERVATION_S
        _reserved[port] = until
        if paired_offset is not None:
            _reserved[port + paired_offset] = until
        return port

    with _reserved_lock:
        now = time.monotonic()
        for port, until in list(_reserved.items()):
            if until < now:
                del _reserved[port]
        if preferred and usable(preferred):
            return reserve(preferred)
        for _ in range(200):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if usable(port):
                return reserve(port)
    raise OSError("no free TCP port found")


def release_port(port: int) -> None:
    """Forget a reservation (the service bound it, or stopped and gave it back)."""
    with _reserved_lock:
        _reserved.pop(port, None)


def port_is_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float, poll_s: float = READY_POLL_S) -> float:
    """Wait until a TCP connect to host:port succeeds; returns seconds waited, TimeoutError else."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while not port_is_open(host, port):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} not accepting connections after {timeout:.1f}s")
        time.sleep(poll_s)
    return time.monotonic() - t0
