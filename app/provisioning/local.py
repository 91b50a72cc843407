"""Local provisioner: `dreamq worker` processes on this host.

The burst controller runs as a beat task in whichever control worker takes it, so the workers it
starts must outlive that process and be found again by the next one: each is started in its own
session (its own process group) and recorded in a small JSON registry under DREAMQ_HOME, guarded
by a file lock. A registry entry whose process has exited is dropped when listed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from filelock import FileLock

from app.core.config import get_settings
from app.provisioning.base import ProvisionedWorker, Provisioner, new_worker_name

log = logging.getLogger(__name__)

# Workers this process started: kept so they are reaped when they exit (and Popen does not warn
# that it was dropped while its child still runs). Workers started by another process are found
# through the registry and checked by pid.
_CHILDREN: dict[int, subprocess.Popen] = {}


class LocalProvisioner(Provisioner):
    kind = "local"

    def __init__(self, root: Path | None = None, gpus: str = "cpu", extra_env: dict[str, str] | None = None):
        self.root = Path(root or Path(get_settings().home) / "provisioner")
        self.root.mkdir(parents=True, exist_ok=True)
        self.registry = self.root / "local.json"
        self.lock = FileLock(str(self.root / "local.lock"))
        self.gpus = gpus
        self.extra_env = extra_env or {}

    def _load(self) -> dict[str, dict]:
        try:
            return json.loads(self.registry.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def _save(self, entries: dict[str, dict]) -> None:
        tmp = self.registry.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        tmp.replace(self.registry)

    def start(self, cluster: str, model: str, count: int) -> list[ProvisionedWorker]:
        started = []
        with self.lock:
            entries = self._load()
            for _ in range(count):
                name = new_worker_name(cluster)
                log_path = self.root / f"{name}.log"
                argv = [
                    sys.executable,
                    "-m",
                    "app.cli",
                    "worker",
                    "--cluster",
                    cluster,
                    "--model",
                    model,
                    "--gpus",
                    self.gpus,
                    "--name",
                    name,
                ]
                with open(log_path, "ab") as out:
                    proc = subprocess.Popen(
                        argv,
                        env={**os.environ, **self.extra_env, "DREAMQ_LOG_COMPONENT": name},
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                        cwd=os.getcwd(),
                    )
                _CHILDREN[proc.pid] = proc
                entries[name] = {
                    "pid": proc.pid,
                    "started_at": time.time(),
                    "cluster": cluster,
                    "model": model,
                    "log": str(log_path),
                }
                started.append(
                    ProvisionedWorker(name, str(proc.pid), "starting", entries[name]["started_at"], cluster, model)
                )
                log.info("local burst worker started", extra={"worker": name, "pid": proc.pid, "cluster": cluster})
            self._save(entries)
        return started

    @staticmethod
    def _alive(pid: int) -> bool:
        child = _CHILDREN.get(pid)
        if child is not None:
            if child.poll() is None:
                return True
            del _CHILDREN[pid]
            return False
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def list(self, cluster: str, model: str | None = None) -> list[ProvisionedWorker]:
        with self.lock:
            entries = self._load()
            alive = {name: e for name, e in entries.items() if self._alive(e["pid"])}
            if len(alive) != len(entries):
                self._save(alive)
        return [
            ProvisionedWorker(name, str(e["pid"]), "running", e["started_at"], e["cluster"], e["model"])
            for name, e in sorted(alive.items(), key=lambda kv: kv[1]["started_at"])
            if e["cluster"] == cluster and (model is None or e["model"] == model)
        ]

    def stop(self, worker: ProvisionedWorker) -> None:
        try:
            os.kill(int(worker.handle), signal.SIGTERM)
        except ProcessLookupError:
            pass

    def kill(self, worker: ProvisionedWorker) -> None:
        try:
            os.killpg(int(worker.handle), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
