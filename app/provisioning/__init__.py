"""Provisioners: how burst workers are started, listed, drained and stopped.

One small interface, two implementations:

    local   `dreamq worker` processes on this host (app/provisioning/local.py)
    slurm   each worker an `sbatch` job running `dreamq worker` in the burst partition
            (app/provisioning/slurm.py); preemption by Slurm is a SIGTERM, which the worker
            treats as a drain: its running job goes back to the queue at once

Workers are pull-based: a provisioner only starts a process that consumes its pool's queues and
heartbeats into Postgres; the dispatcher counts it as capacity once it heartbeats, exactly like
a standing worker. Stopping comes in two strengths:

    retire(name)  finish the current job, take nothing new, then exit (scale-down): the worker
                  stops consuming (Celery cancel_consumer), is marked `retiring` so the
                  dispatcher neither counts nor routes to it, and the controller stops it once
                  it is idle
    stop(name)    leave now (reclaim, operator): SIGTERM, Celery's warm shutdown; the worker
                  marks itself draining and its running job is requeued at its next step
"""

from __future__ import annotations

from app.provisioning.base import ProvisionedWorker, Provisioner
from app.provisioning.local import LocalProvisioner
from app.provisioning.slurm import SlurmProvisioner


def get_provisioner(kind: str, **options) -> Provisioner:
    if kind == "local":
        return LocalProvisioner(**options)
    if kind == "slurm":
        return SlurmProvisioner(**options)
    raise ValueError(f"unknown provisioner {kind!r}: local or slurm")


__all__ = ["Provisioner", "ProvisionedWorker", "get_provisioner"]
