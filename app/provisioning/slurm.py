"""Slurm provisioner: each burst worker is one batch job running `dreamq worker`.

    sbatch --parsable -p <partition> -J dreamq-<worker name> --wrap "exec python -m app.cli worker ..."

The job's environment is this process's (`--export=ALL`): the database, broker and S3 settings
travel with it, as they would on a real cluster through the site's module or container setup.
`exec` makes Celery the batch step's main process, so the signals Slurm sends reach it directly:
a preemption by the training side (or `scancel --signal=TERM`) is a SIGTERM, which Celery turns
into a warm shutdown and dreamq into a drain (the running job is requeued at its next step,
within one model step; KillWait must leave at least that long before the SIGKILL).
Stopping a worker ourselves is the same `scancel --batch --signal=TERM`; `kill` is plain scancel.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from app.core.config import get_settings
from app.provisioning.base import ProvisionedWorker, Provisioner, new_worker_name

log = logging.getLogger(__name__)

JOB_PREFIX = "dreamq-"


class SlurmUnavailable(RuntimeError):
    pass


class SlurmProvisioner(Provisioner):
    kind = "slurm"

    def __init__(
        self,
        partition: str = "burst",
        log_dir: Path | None = None,
        gpus_per_worker: int = 0,
        extra_env: dict[str, str] | None = None,
    ):
        if shutil.which("sbatch") is None:
            raise SlurmUnavailable("sbatch is not on PATH: install Slurm's client tools on the controller host")
        self.partition = partition
        self.log_dir = Path(log_dir or Path(get_settings().home) / "provisioner" / "slurm")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.gpus_per_worker = gpus_per_worker
        self.extra_env = extra_env or {}

    def _run(self, argv: list[str]) -> str:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, env={**os.environ, **self.extra_env})
        if out.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({out.returncode}): {out.stderr.strip()[:500]}")
        return out.stdout

    def start(self, cluster: str, model: str, count: int) -> list[ProvisionedWorker]:
        started = []
        for _ in range(count):
            name = new_worker_name(cluster)
            gpus = "0" if self.gpus_per_worker else "cpu"  # Slurm sets CUDA_VISIBLE_DEVICES for the job
            command = f"exec {sys.executable} -m app.cli worker --cluster {cluster} --model {model} --gpus {gpus} --name {name}"
            argv = [
                "sbatch",
                "--parsable",
                "-p",
                self.partition,
                "-J",
                f"{JOB_PREFIX}{name}",
                "--export=ALL",
                "-D",
                os.getcwd(),
                "-o",
                str(self.log_dir / f"{name}-%j.log"),
                "--cpus-per-task=1",
                f"--comment=dreamq {cluster} {model}",
            ]
            if self.gpus_per_worker:
                argv.append(f"--gres=gpu:{self.gpus_per_worker}")
            job_id = self._run([*argv, "--wrap", command]).strip().split(";")[0]
            started.append(ProvisionedWorker(name, job_id, "starting", datetime.now().timestamp(), cluster, model))
            log.info("slurm burst worker submitted", extra={"worker": name, "slurm_job": job_id, "cluster": cluster})
        return started

    def list(self, cluster: str, model: str | None = None) -> list[ProvisionedWorker]:
        # %i job id, %j name, %T state, %V submit time, %k comment
        out = self._run(["squeue", "--noheader", "-p", self.partition, "--format=%i|%j|%T|%V|%k"])
        workers = []
        for line in out.splitlines():
            job_id, job_name, state, submitted, comment = (line.split("|") + [""] * 5)[:5]
            parts = comment.split()
            if not job_name.startswith(JOB_PREFIX) or len(parts) != 3 or parts[1] != cluster:
                continue
            if model is not None and parts[2] != model:
                continue
            try:
                at = datetime.fromisoformat(submitted).timestamp()
            except ValueError:
                at = 0.0
            workers.append(
                ProvisionedWorker(
                    job_name[len(JOB_PREFIX) :],
                    job_id,
                    "running" if state == "RUNNING" else "starting",
                    at,
                    parts[1],
                    parts[2],
                )
            )
        return sorted(workers, key=lambda w: w.started_at)

    def stop(self, worker: ProvisionedWorker) -> None:
        self._run(["scancel", "--batch", "--signal=TERM", worker.handle])

    def kill(self, worker: ProvisionedWorker) -> None:
        self._run(["scancel", worker.handle])
