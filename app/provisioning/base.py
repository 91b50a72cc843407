"""The provisioner interface and what local and Slurm share (retiring a worker)."""

from __future__ import annotations

import logging
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass

from app.core.queues import pool_queues
from app.jobs.workers import retire_worker_rows, rows_by_prefix, worker_nodes
from app.messaging import get_publisher

log = logging.getLogger(__name__)

# Worker names a provisioner gives its workers: burst-<cluster>-<short id>. The Celery node name
# is <name>@<host>, which is also the workers.id its heartbeat writes.
NAME_PREFIX = "burst"


@dataclass(frozen=True)
class ProvisionedWorker:
    name: str  # worker name (the Celery node name is name@host)
    handle: str  # pid (local) or Slurm job id
    state: str  # starting | running | exited
    started_at: float  # unix time
    cluster: str
    model: str

    def node_prefix(self) -> str:
        return f"{self.name}@"


def new_worker_name(cluster: str) -> str:
    return f"{NAME_PREFIX}-{cluster}-{uuid.uuid4().hex[:8]}"


class Provisioner(ABC):
    """Start N workers for a pool, list them, retire one, stop one."""

    kind: str

    @abstractmethod
    def start(self, cluster: str, model: str, count: int) -> list[ProvisionedWorker]:
        """Start `count` workers serving (cluster, model); returns them (state `starting`)."""

    @abstractmethod
    def list(self, cluster: str, model: str | None = None) -> list[ProvisionedWorker]:
        """Workers this provisioner started for the cluster that have not exited."""

    @abstractmethod
    def stop(self, worker: ProvisionedWorker) -> None:
        """Leave now: SIGTERM (warm shutdown: the running job is requeued at its next step)."""

    @abstractmethod
    def kill(self, worker: ProvisionedWorker) -> None:
        """Last resort after stop's grace period."""

    def retire(self, worker: ProvisionedWorker) -> None:
        """Finish the current job, take nothing new; the controller stops it once idle."""
        retire_worker_rows(worker.node_prefix())
        for node in worker_nodes(worker.node_prefix()):
            get_publisher().stop_consuming(pool_queues(worker.cluster, worker.model, node), node)
        log.info("burst worker retiring", extra={"worker": worker.name, "cluster": worker.cluster})


def worker_rows_by_name(workers: list[ProvisionedWorker]) -> dict[str, list[dict]]:
    """worker_rows for several workers in one query (the burst controller's tick)."""
    if not workers:
        return {}
    prefixes = {w.node_prefix(): w.name for w in workers}
    found: dict[str, list[dict]] = {w.name: [] for w in workers}
    for prefix, rows in rows_by_prefix(list(prefixes)).items():
        found[prefixes[prefix]] = rows
    return found


def wait_until(predicate, timeout_s: float, poll_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()
