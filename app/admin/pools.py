"""Pools as data: the GPU workers of one cluster serving one model, and their dispatch limit.

list, add, set (dispatch limit), drain, enable. A pool's queues are `<cluster>.<model>.<tier>`
(tasks/celery_app.py); its dispatch limit is the most jobs it may hold dispatched-but-not-started.
The numbers shown (effective limit, live workers, in flight) are computed exactly as the
dispatcher and the operator snapshot compute them: min(dispatch_limit, what the live workers may
hold: DISPATCH_PER_WORKER each, more for workers whose jobs are short), 0 while the pool or its
cluster is drained.

Drain = `pools.enabled = false`: the dispatcher stops releasing work to the pool; with `now=True`
its live workers are also marked draining, which requeues their running jobs at the next step
(see app/admin/clusters.py for the two strengths). Limit changes take effect at the next
dispatch pass (event-driven, and at least every beat tick). Shared by the admin routes and the CLI.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.admin.clusters import get_cluster
from app.admin.errors import AdminError, audit
from app.core.queues import pool_queue
from app.db.models import Cluster, Model, Pool, Tier
from app.jobs.workers import LIVE_DEPTH_SQL, WORKER_STALE_S, drain_workers, effective_dispatch_limit, undrain_workers

_POOL_ROWS = text(
    f"""
    SELECT p.id, c.name AS cluster, c.kind AS cluster_kind, c.enabled AS cluster_enabled, m.name AS model,
           p.dispatch_limit, p.enabled, p.created_at,
           (SELECT count(*) FROM workers w WHERE w.pool_id = p.id AND w.state IN ('idle', 'busy')
                AND w.heartbeat_at > now() - make_interval(secs => :stale)) AS live_workers,
           {LIVE_DEPTH_SQL} AS live_depth,
           (SELECT count(*) FROM workers w WHERE w.pool_id = p.id AND w.state = 'draining'
                AND w.heartbeat_at > now() - make_interval(secs => :stale)) AS draining_workers,
           (SELECT count(*) FROM jobs j WHERE j.pool_id = p.id AND j.state = 'dispatched') AS dispatched,
           (SELECT count(*) FROM jobs j WHERE j.pool_id = p.id AND j.state = 'running') AS running
    FROM pools p JOIN clusters c ON c.id = p.cluster_id JOIN models m ON m.id = p.model_id
    WHERE CAST(:ids AS uuid[]) IS NULL OR p.id = ANY(CAST(:ids AS uuid[]))
    ORDER BY c.name, m.name
    """
)


def _views(session: Session, ids: list | None = None) -> list[dict[str, Any]]:
    tiers = list(session.scalars(select(Tier.name).order_by(Tier.rank)))
    rows = session.execute(_POOL_ROWS, {"stale": WORKER_STALE_S, "ids": None if ids is None else [str(i) for i in ids]})
    views = []
    for r in rows:
        open_ = r.enabled and r.cluster_enabled
        views.append(
            {
                "name": f"{r.cluster}.{r.model}",
                "cluster": r.cluster,
                "cluster_kind": r.cluster_kind,
                "model": r.model,
                "enabled": r.enabled,
                "cluster_enabled": r.cluster_enabled,
                "dispatch_limit": r.dispatch_limit,
                "effective_limit": effective_dispatch_limit(r.dispatch_limit, r.live_depth, open_),
                "live_workers": r.live_workers,
                "draining_workers": r.draining_workers,
                "dispatched": r.dispatched,
                "running": r.running,
                "queues": [pool_queue(r.cluster, r.model, t) for t in tiers],
                "created_at": r.created_at.isoformat(),
            }
        )
    return views


def list_pools(session: Session) -> list[dict[str, Any]]:
    return _views(session)


def pool_view(session: Session, pool: Pool) -> dict[str, Any]:
    return _views(session, [pool.id])[0]


def get_pool(session: Session, cluster: str, model: str, *, lock: bool = False) -> Pool:
    query = (
        select(Pool)
        .join(Cluster, Cluster.id == Pool.cluster_id)
        .join(Model, Model.id == Pool.model_id)
        .where(Cluster.name == cluster, Model.name == model)
    )
    if lock:
        query = query.with_for_update(of=Pool)
    pool = session.scalar(query)
    if pool is None:
        raise AdminError("pool", f"no pool for model '{model}' in cluster '{cluster}'", status=404)
    return pool


def add_pool(
    session: Session, cluster: str, model: str, dispatch_limit: int, *, enabled: bool = True, actor: str
) -> dict[str, Any]:
    # Names given in a body that match nothing are invalid fields (422), not a missing resource.
    cluster_row = session.scalar(select(Cluster).where(Cluster.name == cluster))
    if cluster_row is None:
        raise AdminError("cluster", f"no cluster named '{cluster}' (add it first)")
    model_row = session.scalar(select(Model).where(Model.name == model))
    if model_row is None:
        raise AdminError("model", f"no model named '{model}' (push a version first)")
    exists = session.scalar(select(Pool.id).where(Pool.cluster_id == cluster_row.id, Pool.model_id == model_row.id))
    if exists is not None:
        raise AdminError("model", f"cluster '{cluster}' already has a pool for '{model}'", status=409)
    pool = Pool(cluster_id=cluster_row.id, model_id=model_row.id, dispatch_limit=dispatch_limit, enabled=enabled)
    session.add(pool)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError:
        raise AdminError("model", f"cluster '{cluster}' already has a pool for '{model}'", status=409) from None
    audit("pool.add", actor=actor, target=f"pool:{cluster}.{model}", dispatch_limit=dispatch_limit, enabled=enabled)
    return pool_view(session, pool)


def update_pool(session: Session, cluster: str, model: str, changes: dict[str, Any], *, actor: str) -> dict[str, Any]:
    """`changes`: dispatch_limit, already type-checked by schemas.PoolPatch."""
    pool = get_pool(session, cluster, model, lock=True)
    before = {k: getattr(pool, k) for k in changes}
    for key, value in changes.items():
        setattr(pool, key, value)
    session.flush()
    audit("pool.update", actor=actor, target=f"pool:{cluster}.{model}", changes=changes, before=before)
    return pool_view(session, pool)


def set_dispatch_limit(session: Session, cluster: str, model: str, limit: int, *, actor: str) -> dict[str, Any]:
    return update_pool(session, cluster, model, {"dispatch_limit": limit}, actor=actor)


def drain_pool(session: Session, cluster: str, model: str, *, now: bool = False, actor: str) -> dict[str, Any]:
    pool = get_pool(session, cluster, model, lock=True)
    pool.enabled = False
    marked = drain_workers(session, [pool.id], actor=actor) if now else 0
    session.flush()
    audit("pool.drain", actor=actor, target=f"pool:{cluster}.{model}", now=now, workers_marked_draining=marked)
    return {**pool_view(session, pool), "workers_marked_draining": marked}


def enable_pool(session: Session, cluster: str, model: str, *, actor: str) -> dict[str, Any]:
    pool = get_pool(session, cluster, model, lock=True)
    pool.enabled = True
    # Its workers come back only if the cluster is open too; enabling the cluster revives them.
    revived = undrain_workers(session, [pool.id]) if get_cluster(session, cluster).enabled else 0
    session.flush()
    audit("pool.enable", actor=actor, target=f"pool:{cluster}.{model}", workers_revived=revived)
    return pool_view(session, pool)
