"""A private single-node Slurm for the burst tests, started by this test process and stopped by it.

    cluster = require_slurm()   # once per process; from then on SLURM_CONF names cluster.conf

Everything lives in one temporary directory: its slurm.conf (tests/fixtures/slurm/slurm.conf
with this host, this user, two free ports and the directory's own state, spool, log and pid
paths), a munge key and socket of its own, and the daemons' logs. munged, slurmctld and slurmd
run in the foreground as children of this process, by absolute path, and die with it
(PR_SET_PDEATHSIG); at exit the cluster cancels its jobs and stops the three by pid. Nothing
under /etc, /var or /run is written, and a system munged or Slurm, if one runs, is not touched.

SLURM_CONF is set in os.environ, which is what the code under test hands on: the Slurm
provisioner (app/provisioning/slurm.py) runs sbatch, squeue and scancel with
{**os.environ, **extra_env}, and sbatch --export=ALL carries it into the burst worker's job.

Root is not needed: the daemons run as this user (SlurmUser, SlurmdUser), and a slurmd that is
not root runs jobs of its own user only (slurmstepd drops no privileges), which is all a test
submits. Missing binaries go through tests.support.system_deps (skip locally, fail under
CI=true); a Slurm that is installed but does not come up fails the test with the daemons' logs.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.system_deps import missing

TEMPLATE = Path(__file__).resolve().parents[1] / "fixtures" / "slurm" / "slurm.conf"
PARTITION = "burst"
# What each binary is in Debian; the daemons live in /usr/sbin, which a non-root PATH may lack.
BINARIES = {
    "munged": "munge",
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "squeue": "slurm-client",
    "scancel": "slurm-client",
    "sinfo": "slurm-client",
}
# Fresh daemons on an empty state directory register the node within a few seconds; the bound
# leaves room for a loaded 2-core machine, and a dead daemon ends the wait at once.
UP_TIMEOUT_S = 90
# A cancelled job gets SIGTERM, then SIGKILL after KillWait (10 s in the template).
DRAIN_TIMEOUT_S = 40
STOP_TIMEOUT_S = 15
PORT_RETRIES = 3

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # A test process killed outright (SIGKILL, a CI timeout) takes its daemons with it.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _find(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class SlurmStartError(RuntimeError):
    def __init__(self, message: str, retry_ports: bool = False):
        super().__init__(message)
        self.retry_ports = retry_ports


class SlurmCluster:
    """munged + slurmctld + slurmd of one temporary directory; start() returns once `burst` is idle."""

    def __init__(self, binaries: dict[str, str]):
        self.binaries = binaries
        self.dir = Path(tempfile.mkdtemp(prefix="dreamq-slurm-"))
        # munged wants every user able to reach its socket's directory; the key directory stays 0700.
        self.dir.chmod(0o755)
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}
        self._saved_conf: str | None = None
        self._stopped = False

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.dir / f"{name}.out", "wb")  # the child keeps its own copy of the descriptor
        try:
            self.procs[name] = subprocess.Popen(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches pytest, which stops these in order
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()

    def _logs(self) -> str:
        parts = []
        for name in ("munged", "slurmctld", "slurmd"):
            for path in (self.dir / f"{name}.out", self.dir / f"{name}.log"):
                if path.exists():
                    parts.append(f"--- {path}\n{_tail(path)}")
        return "\n".join(parts)

    def _dead(self) -> str | None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                return f"{name} exited ({proc.returncode})"
        return None

    def _wait(self, what: str, ready, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = self._dead()
            if dead or time.monotonic() > deadline:
                logs = self._logs()
                raise SlurmStartError(
                    f"{dead or f'no {what} after {timeout_s:.0f} s'}; logs in {self.dir}:\n{logs}",
                    retry_ports="Address already in use" in logs,
                )
            time.sleep(0.2)

    def start(self) -> None:
        user = pwd.getpwuid(os.getuid()).pw_name
        host = socket.gethostname().split(".")[0]
        values = {
            "HOST": host,
            "USER": user,
            "DIR": str(self.dir),
            "SLURMCTLD_PORT": str(_free_port()),
            "SLURMD_PORT": str(_free_port()),
        }
        text = TEMPLATE.read_text()
        for key, value in values.items():
            text = text.replace(f"@{key}@", value)
        assert not re.search(r"@[A-Z_]+@", text), f"a placeholder of {TEMPLATE} has no value"
        self.conf.write_text(text)
        (self.dir / "plugstack.conf").write_text("")
        munge_dir = self.dir / "munge"
        munge_dir.mkdir(mode=0o755)
        key_dir = self.dir / "munge-key"
        key_dir.mkdir(mode=0o700)
        key = key_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        munge_socket = munge_dir / "munge.socket"
        self._spawn(
            "munged",
            [
                self.binaries["munged"],
                "--foreground",
                f"--socket={munge_socket}",
                f"--key-file={key}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--seed-file={key_dir / 'munged.seed'}",
                f"--log-file={self.dir / 'munged.log'}",
                "--num-threads=4",
            ],
        )
        self._wait("munge socket", munge_socket.exists, 20)
        self._spawn("slurmctld", [self.binaries["slurmctld"], "-D", "-f", str(self.conf)])
        self._spawn("slurmd", [self.binaries["slurmd"], "-D", "-f", str(self.conf), "-N", host])
        self._wait(f"idle node in partition {PARTITION}", self._partition_up, UP_TIMEOUT_S)
        self._saved_conf = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.conf)

    def _partition_up(self) -> bool:
        out = subprocess.run(
            [self.binaries["sinfo"], "--noheader", "-p", PARTITION, "-o", "%t"],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=30,
        )
        return out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc")

    def job_ids(self) -> list[str]:
        out = subprocess.run(
            [self.binaries["squeue"], "--noheader", "-o", "%i"],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=30,
        )
        if out.returncode != 0:
            raise RuntimeError(f"squeue failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout.split()

    def stop(self, keep_logs: bool = False) -> None:
        """Cancel every job of this cluster (it has no others), then stop slurmd, slurmctld, munged by pid."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
                ids = self.job_ids()
                if ids:
                    subprocess.run([self.binaries["scancel"], *ids], capture_output=True, env=self.env, timeout=30)
                    deadline = time.monotonic() + DRAIN_TIMEOUT_S
                    while self.job_ids() and time.monotonic() < deadline:
                        time.sleep(0.5)
        finally:
            for name in ("slurmd", "slurmctld", "munged"):
                proc = self.procs.get(name)
                if proc is None or proc.poll() is not None:
                    continue
                proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(STOP_TIMEOUT_S)
            if os.environ.get("SLURM_CONF") == str(self.conf):
                if self._saved_conf is None:
                    os.environ.pop("SLURM_CONF", None)
                else:
                    os.environ["SLURM_CONF"] = self._saved_conf
            if not keep_logs:
                shutil.rmtree(self.dir, ignore_errors=True)


_cluster: SlurmCluster | None = None
_failure: str | None = None


def require_slurm() -> SlurmCluster:
    """The process's private Slurm, started on first use; skips (locally) or fails (CI) without Slurm."""
    global _cluster, _failure
    if _cluster is not None:
        return _cluster
    if _failure is not None:
        pytest.fail(_failure, pytrace=False)  # one failed start is enough: the next test would wait as long
    found = {name: _find(name) for name in BINARIES}
    absent = [name for name, path in found.items() if path is None]
    if absent:
        packages = " ".join(sorted({BINARIES[name] for name in absent}))
        missing(
            f"Slurm/munge binaries not found: {', '.join(absent)} (root is not needed to run them)",
            install=f"apt-get install {packages} (`make system-packages` does, as root)",
        )
    binaries = {name: path for name, path in found.items() if path is not None}
    for attempt in range(PORT_RETRIES):
        cluster = SlurmCluster(binaries)
        try:
            cluster.start()
        except SlurmStartError as error:
            retry = error.retry_ports and attempt + 1 < PORT_RETRIES
            cluster.stop(keep_logs=not retry)
            if retry:
                continue  # another process took a probed port first: fresh ports
            _failure = f"the private Slurm did not come up: {error}"
            pytest.fail(_failure, pytrace=False)
        except BaseException:
            cluster.stop(keep_logs=True)
            raise
        atexit.register(cluster.stop)
        _cluster = cluster
        return cluster
    raise AssertionError("unreachable")
