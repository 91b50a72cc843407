"""Clusters as data: list, add, change, drain, enable.

A cluster is a group of GPUs under one operator: `inference` (standing workers) or `burst`
(borrowed from training, none standing; the burst controller starts workers there). Its pools
(app/admin/pools.py) are what the dispatcher releases work to.

Drain, two strengths:
- default: `clusters.enabled = false`. The dispatcher stops releasing work to every pool of the
  cluster (it only locks pools of enabled clusters, app/scheduling/dispatcher.py); workers finish
  what they run and the few messages already in their queues (at most the dispatch limit).
- `now=True`: also marks the cluster's live workers `draining`. A running job sees that at its
  next progress step and goes back to the queue at once, attempt not counted (app/jobs/execution.py),
  and the dispatcher no longer counts those workers as capacity. Workers drained this way carry
  `info.drained_by`, so `enable` revives exactly them and never a worker that is draining
  because it is shutting down.

Shared by the admin HTTP routes and the CLI.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.admin.errors import AdminError, audit
from app.core.queues import CONTROL_QUEUE
from app.db.models import Cluster, Pool
from app.jobs.workers import WORKER_STALE_S, drain_workers, undrain_workers
from app.messaging import get_publisher

KINDS = ("inference", "burst")

_CLUSTER_COUNTS = text(
    """
    SELECT c.id,
           (SELECT count(*) FROM pools p WHERE p.cluster_id = c.id) AS pools,
           (SELECT count(*) FROM workers w JOIN pools p ON p.id = w.pool_id WHERE p.cluster_id = c.id
                AND w.state IN ('idle', 'busy') AND w.heartbeat_at > now() - make_interval(secs => :stale)) AS live_workers,
           (SELECT count(*) FROM workers w JOIN pools p ON p.id = w.pool_id WHERE p.cluster_id = c.id
                AND w.state = 'draining' AND w.heartbeat_at > now() - make_interval(secs => :stale)) AS draining_workers
    FROM clusters c WHERE c.id = ANY(CAST(:ids AS uuid[]))
    """
)


def get_cluster(session: Session, name: str, *, lock: bool = False) -> Cluster:
    query = select(Cluster).where(Cluster.name == name)
    if lock:
        query = query.with_for_update()
    cluster = session.scalar(query)
    if cluster is None:
        raise AdminError("name", f"no cluster named '{name}'", status=404)
    return cluster


def _views(session: Session, clusters: list[Cluster]) -> list[dict[str, Any]]:
    counts = (
        {
            r.id: r
            for r in session.execute(_CLUSTER_COUNTS, {"ids": [str(c.id) for c in clusters], "stale": WORKER_STALE_S})
        }
        if clusters
        else {}
    )
    views = []
    for c in clusters:
        row = counts[c.id]
        views.append(
            {
                "name": c.name,
                "kind": c.kind,
                "enabled": c.enabled,
                "max_workers": c.max_workers,
                "pools": row.pools,
                "live_workers": row.live_workers,
                "draining_workers": row.draining_workers,
                "created_at": c.created_at.isoformat(),
            }
        )
    return views


def cluster_view(session: Session, cluster: Cluster) -> dict[str, Any]:
    return _views(session, [cluster])[0]


def list_clusters(session: Session) -> list[dict[str, Any]]:
    return _views(session, list(session.scalars(select(Cluster).order_by(Cluster.name))))


def add_cluster(
    session: Session, name: str, kind: str, *, max_workers: int | None = None, enabled: bool = True, actor: str
) -> dict[str, Any]:
    if kind not in KINDS:
        raise AdminError("kind", f"must be one of {', '.join(KINDS)}")
    if session.scalar(select(Cluster.id).where(Cluster.name == name)) is not None:
        raise AdminError("name", f"a cluster named '{name}' already exists", status=409)
    cluster = Cluster(name=name, kind=kind, max_workers=max_workers, enabled=enabled)
    session.add(cluster)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError:
        raise AdminError("name", f"a cluster named '{name}' already exists", status=409) from None
    session.refresh(cluster)
    audit("cluster.add", actor=actor, target=f"cluster:{name}", kind=kind, max_workers=max_workers, enabled=enabled)
    return cluster_view(session, cluster)


def update_cluster(session: Session, name: str, changes: dict[str, Any], *, actor: str) -> dict[str, Any]:
    """`changes`: max_workers (null clears it), already type-checked by schemas.ClusterPatch."""
    cluster = get_cluster(session, name, lock=True)
    before = {k: getattr(cluster, k) for k in changes}
    for key, value in changes.items():
        setattr(cluster, key, value)
    session.flush()
    audit("cluster.update", actor=actor, target=f"cluster:{name}", changes=changes, before=before)
    return cluster_view(session, cluster)


def _pool_ids(session: Session, cluster: Cluster, *, enabled_only: bool = False) -> list:
    query = select(Pool.id).where(Pool.cluster_id == cluster.id)
    if enabled_only:
        query = query.where(Pool.enabled)
    return list(session.scalars(query))


def drain_cluster(session: Session, name: str, *, now: bool = False, actor: str) -> dict[str, Any]:
    cluster = get_cluster(session, name, lock=True)
    cluster.enabled = False
    marked = drain_workers(session, _pool_ids(session, cluster), actor=actor) if now else 0
    session.flush()
    audit("cluster.drain", actor=actor, target=f"cluster:{name}", now=now, workers_marked_draining=marked)
    return {**cluster_view(session, cluster), "workers_marked_draining": marked}


def enable_cluster(session: Session, name: str, *, actor: str) -> dict[str, Any]:
    cluster = get_cluster(session, name, lock=True)
    cluster.enabled = True
    # A pool drained on its own stays drained, workers included, until it is enabled itself.
    revived = undrain_workers(session, _pool_ids(session, cluster, enabled_only=True))
    session.flush()
    audit("cluster.enable", actor=actor, target=f"cluster:{name}", workers_revived=revived)
    return cluster_view(session, cluster)


def reclaim_cluster(session: Session, name: str, *, actor: str) -> dict[str, Any]:
    """Give a cluster back now (the training side wants its GPUs).

    Dispatch to it stops, its live workers are marked draining (each running job is requeued
    at its next step), and the burst controller is asked to run at once: for a burst cluster it
    sees the cluster disabled and stops every worker through the provisioner (tasks/burst.py).
    """
    view = drain_cluster(session, name, now=True, actor=actor)
    audit("cluster.reclaim", actor=actor, target=f"cluster:{name}")

    get_publisher().send("dreamq.maintenance.burst_control", queue=CONTROL_QUEUE, session=session)
    return view
