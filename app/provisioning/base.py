"""The provisioner interface and what local and Slurm share (retiring a worker)."""

from __future__ import annotations

import logging
import socket
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass

from sqlalchemy import text

from app.core.queues import pool_queues
from app.db.models import JobState
from app.db.session import transaction
from app.jobs.transitions import transition
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


def worker_nodes(prefix: str) -> list[str]:
    with transaction() as session:
        nodes = [r[0] for r in session.execute(text("SELECT id FROM workers WHERE id LIKE :p"), {"p": f"{prefix}%"})]
    return nodes or [f"{prefix}{socket.gethostname()}"]


def retire_worker_rows(prefix: str) -> int:
    """Mark the worker retiring and take back the jobs routed to its own queues (version
    affinity) that it has not started: it stops consuming, so nobody else would run them.
    Returns how many went back to the queue."""
    returned = 0
    with transaction() as session:
        session.execute(
            text("UPDATE workers SET state = 'retiring' WHERE id LIKE :p AND state IN ('idle', 'busy', 'starting')"),
            {"p": f"{prefix}%"},
        )
        routed = session.execute(
            text("SELECT id, dispatch_seq, worker_id FROM jobs WHERE state = 'dispatched' AND worker_id LIKE :p"),
            {"p": f"{prefix}%"},
        ).all()
        for job in routed:
            if transition(
                session,
                job.id,
                JobState.dispatched,
                JobState.queued,
                guard={"dispatch_seq": job.dispatch_seq},
                detail={"reason": "routed_worker_retiring", "worker": job.worker_id},
            ):
                returned += 1
    if returned:
        get_publisher().request_dispatch()
    return returned


def worker_rows(prefix: str) -> list[dict]:
    with transaction() as session:
        return [
            dict(r)
            for r in session.execute(
                text(
                    "SELECT id, state, current_job_id, EXTRACT(EPOCH FROM now() - heartbeat_at) AS age_s FROM workers "
                    "WHERE id LIKE :p"
                ),
                {"p": f"{prefix}%"},
            ).mappings()
        ]


def worker_rows_by_name(workers: list[ProvisionedWorker]) -> dict[str, list[dict]]:
    """worker_rows for several workers in one query (the burst controller's tick)."""
    if not workers:
        return {}
    prefixes = {w.node_prefix(): w.name for w in workers}
    found: dict[str, list[dict]] = {w.name: [] for w in workers}
    with transaction() as session:
        for row in session.execute(
            text(
                "SELECT id, state, current_job_id, EXTRACT(EPOCH FROM now() - heartbeat_at) AS age_s FROM workers "
                "WHERE split_part(id, '@', 1) || '@' = ANY(:p)"
            ),
            {"p": list(prefixes)},
        ).mappings():
            found[prefixes[row["id"].split("@", 1)[0] + "@"]].append(dict(row))
    return found


def wait_until(predicate, timeout_s: float, poll_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()
