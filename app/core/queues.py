"""Queue names: what the dispatcher publishes to and what each worker consumes.

    control                     dispatch, maintenance (beat)
    cpu                         encode MP4 + thumbnail, upload, webhooks
    <cluster>.<model>.<tier>    per pool and tier; a GPU worker consumes its pool's five queues
                                in tier order (api first), see `pool_queues()`.
    <cluster>.<model>.worker.<node>.<tier>
                                per GPU worker and tier: jobs the dispatcher routed to the worker
                                because it holds their version (affinity). A worker consumes its
                                own queue of a tier just before the pool's queue of that tier, so
                                affinity never lets a free job overtake an api job.

No Celery here: the dispatcher (the domain) names queues, the Celery app (tasks/celery_app.py)
and the workers consume them.
"""

from __future__ import annotations

from app.core.tiers import TIER_ORDER

CONTROL_QUEUE = "control"
CPU_QUEUE = "cpu"


def pool_queue_prefix(cluster: str, model: str) -> str:
    return f"{cluster}.{model}"


def pool_queue(cluster: str, model: str, tier: str) -> str:
    return f"{pool_queue_prefix(cluster, model)}.{tier}"


def worker_queue(pool_prefix: str, worker_id: str, tier: str) -> str:
    """A GPU worker's own queue for one tier (jobs routed to it for version affinity)."""
    return f"{pool_prefix}.worker.{worker_id}.{tier}"


def pool_queues(cluster: str, model: str, worker_id: str | None = None) -> list[str]:
    """The queues a GPU worker consumes, in the order it takes work from them.

    With a worker id: its own queue of each tier before the pool's queue of the same tier, so a
    job waiting for this worker's loaded version goes first within its tier and never ahead of
    a higher tier.
    """
    prefix = pool_queue_prefix(cluster, model)
    queues = []
    for tier in TIER_ORDER:
        if worker_id is not None:
            queues.append(worker_queue(prefix, worker_id, tier))
        queues.append(pool_queue(cluster, model, tier))
    return queues
