"""How worker processes are started: a GPU worker's GPU pinned, its queues, and the Celery
command lines of every Celery process (GPU and control workers, beat, Flower).

`dreamq worker` and `dreamq up` (and the tests' stacks) start GPU workers with `worker_command()`:
CUDA_VISIBLE_DEVICES is set in the child's environment before anything can initialise CUDA,
so device 0 inside the worker is "my GPU". `control_worker_command()` is the control+cpu worker.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

from app.core.queues import pool_queues


def visible_gpus() -> list[str]:
    """GPU indices from nvidia-smi, without initialising CUDA in this (forking) process."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.split(",")[0].strip() for line in out.splitlines() if line.strip()]


def gpu_label(gpus: str) -> str:
    if not gpus:
        return "cpu"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={gpus}", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return f"cuda:{gpus} ({', '.join(sorted(set(out.split(chr(10))) - {''}))})"
    except (subprocess.SubprocessError, OSError):
        return f"cuda:{gpus}"


def worker_command(
    cluster: str, model: str, gpus: str, name: str, *, concurrency: int = 1
) -> tuple[list[str], dict[str, str]]:
    """The Celery command line and environment of one GPU worker (also used by `dreamq up`)."""
    env = dict(os.environ)
    # Pin the GPU set before anything can initialise CUDA: device 0 in the worker is "my GPU".
    # An empty value hides every GPU (a CPU worker).
    env["CUDA_VISIBLE_DEVICES"] = gpus
    env["DREAMQ_WORKER_CLUSTER"] = cluster
    env["DREAMQ_WORKER_MODEL"] = model
    env["DREAMQ_DEVICE_LABEL"] = gpu_label(gpus)
    env["DREAMQ_LOG_COMPONENT"] = f"gpu-worker:{name}"
    # The Celery node name, known before Celery starts: the child reports its loaded versions
    # under it, and the dispatcher routes to its own queue.
    env["DREAMQ_WORKER_NODENAME"] = f"{name}@{socket.gethostname()}"
    argv = celery_command(
        "worker",
        # Per tier, its own queue (jobs routed to it because it holds their version) and then
        # the pool's; tiers in order. Celery expands %h to socket.gethostname() too.
        "-Q",
        ",".join(pool_queues(cluster, model, env["DREAMQ_WORKER_NODENAME"])),
        "-c",
        str(concurrency),
        "--prefetch-multiplier",
        "1",
        "-P",
        "prefork",
        "-n",
        f"{name}@%h",
        "--without-gossip",
        "--without-mingle",
        "-E",
        "--loglevel",
        "INFO",
    )
    return argv, env


def celery_command(*args: str) -> list[str]:
    """`celery -A tasks.celery_app:celery_app ARGS` on this interpreter: every Celery process
    (GPU and control workers, beat, Flower) starts from the one app module."""
    return [sys.executable, "-m", "celery", "-A", "tasks.celery_app:celery_app", *args]


def control_worker_command(name: str, *, concurrency: int = 2, events: bool = False) -> list[str]:
    """A control+cpu worker (dispatch, maintenance, finalize, webhooks) named `name@%h`; with
    `events`, it sends task events (what Flower shows, as under `dreamq up`)."""
    return celery_command(
        "worker",
        "-Q",
        "control,cpu",
        "-c",
        str(concurrency),
        "-n",
        f"{name}@%h",
        "--without-gossip",
        "--without-mingle",
        *(["-E"] if events else []),
        "--loglevel",
        "INFO",
    )
