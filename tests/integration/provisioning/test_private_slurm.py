"""tests/support/slurm.py's private Slurm: it runs a job, and stopping it stops only what it started.

The burst tests trust it to leave nothing behind and to touch nothing it did not start: a job
still running, a daemon left over, a system daemon of the same name stopped (the old setup ran
`pkill -x slurmctld`), or a file under /etc/slurm written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.support import slurm

pytestmark = pytest.mark.slow

ETC_SLURM = Path("/etc/slurm")


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    if not directory.is_dir():
        return {}
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in directory.rglob("*") if p.is_file()}


def _gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


def test_the_private_slurm_runs_a_job_and_stops_only_what_it_started(tmp_path):
    found = {name: slurm._find(name) for name in slurm.BINARIES}
    if None in found.values():
        slurm.require_slurm()  # the rule's skip (locally) or failure (CI) naming what is missing
    # Decoys named like system daemons (what `pkill -x slurmctld` would have hit): ours, not the cluster's.
    decoys = []
    for name in ("munged", "slurmctld", "slurmd"):
        binary = tmp_path / name
        shutil.copy("/bin/sleep", binary)
        decoys.append(subprocess.Popen([str(binary), "600"]))
    try:
        _run_and_stop(found, decoys, tmp_path)
    finally:
        for decoy in decoys:
            decoy.kill()
            decoy.wait()


def _run_and_stop(found: dict[str, str | None], decoys: list[subprocess.Popen], tmp_path: Path) -> None:
    etc_before = _snapshot(ETC_SLURM)
    conf_before = os.environ.get("SLURM_CONF")
    cluster = slurm.SlurmCluster({name: path for name, path in found.items() if path})
    try:
        cluster.start()
        assert os.environ["SLURM_CONF"] == str(cluster.conf) and cluster.conf.parent == cluster.dir
        pid_file = tmp_path / "job.pid"
        # A job that outlives the test unless stop() cancels it; sbatch sees SLURM_CONF through os.environ.
        submitted = subprocess.run(
            [
                "sbatch",
                "--parsable",
                "-p",
                slurm.PARTITION,
                "-o",
                str(tmp_path / "job.out"),
                "--wrap",
                f"echo $$ > {pid_file}; exec sleep 600",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert submitted.returncode == 0, submitted.stderr
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text().strip()):
            assert time.monotonic() < deadline, f"job never started: {cluster.job_ids()}"
            time.sleep(0.2)
        job_pid = int(pid_file.read_text())
        assert psutil.Process(job_pid).username() == psutil.Process().username()  # no root-only setuid
        daemons = {name: proc.pid for name, proc in cluster.procs.items()}
        assert set(daemons) == {"munged", "slurmctld", "slurmd"}
    finally:
        cluster.stop()
    # The cancelled job: SIGTERM, then SIGKILL after KillWait (10 s); stop() waited for it.
    assert _gone(job_pid, 1), "stop() left the job running"
    for name, pid in daemons.items():
        assert _gone(pid, 1), f"stop() left {name} ({pid}) running"
    assert [d.poll() for d in decoys] == [None, None, None], "stop() stopped a process it did not start"
    assert not cluster.dir.exists()
    assert os.environ.get("SLURM_CONF") == conf_before
    assert _snapshot(ETC_SLURM) == etc_before
