"""A real single-node Slurm for the burst tests: installed (Debian packages) and started here.

    reason = ensure_slurm()     # None when sbatch works, else why it cannot (the test skips)

Writes tests/fixtures/slurm/slurm.conf (documented there) to /etc/slurm/slurm.conf with this
host's name, starts munged, slurmctld and slurmd when they are not running, and waits until the
`burst` partition has an idle node. Needs root; installs slurmctld, slurmd, slurm-client and
munge with apt-get when they are missing (.ci/run does the same up front).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "fixtures" / "slurm" / "slurm.conf"
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def _running(name: str) -> bool:
    return subprocess.run(["pgrep", "-x", name], capture_output=True).returncode == 0


def _install() -> str | None:
    if shutil.which("apt-get") is None:
        return "Slurm is not installed and apt-get is not available"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        if subprocess.run(argv, capture_output=True, env=env, timeout=600).returncode != 0:
            return f"could not install {' '.join(PACKAGES)} with apt-get"
    return None


def ensure_slurm(timeout_s: float = 60) -> str | None:
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root"
    if shutil.which("slurmctld") is None or shutil.which("sbatch") is None:
        reason = _install()
        if reason:
            return reason
    host = socket.gethostname()
    wanted = CONF.read_text().replace("@HOST@", host)
    conf = Path("/etc/slurm/slurm.conf")
    changed = not conf.exists() or conf.read_text() != wanted
    if changed:
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(wanted)
    for directory in ("/var/spool/slurmd", "/var/spool/slurmctld", "/var/log/slurm"):
        Path(directory).mkdir(parents=True, exist_ok=True)
    if not _running("munged"):
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["mungekey", "--create"], capture_output=True)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--num-threads=10"], capture_output=True)
    for daemon in ("slurmctld", "slurmd"):
        if changed and _running(daemon):
            subprocess.run(["pkill", "-x", daemon], capture_output=True)
            time.sleep(1)
        if not _running(daemon):
            subprocess.run([daemon], capture_output=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(["sinfo", "--noheader", "-p", "burst", "-o", "%t"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc"):
            return None
        if out.returncode == 0 and out.stdout.strip().startswith(("down", "drain")):
            subprocess.run(["scontrol", "update", f"nodename={host}", "state=resume"], capture_output=True)
        time.sleep(1)
    return "slurm did not bring the burst partition up: see /var/log/slurm/"
