"""The operator's picture of the system, read from Postgres in a few queries.

One function, `take_snapshot()`, feeds every view an operator has: the `/dashboard` page, its
JSON (`/v1/admin/status`), `dreamq status` in the terminal and the Postgres-derived gauges of
`/metrics`. They never disagree, because they are the same numbers.

    tiers     per tier: queued / dispatched / running, the oldest queued job's wait and its
              urgency (wait / W, the tier's promised worst-case wait: above 1 the promise is
              broken for that job), and SLO attainment over the last hour (jobs that started
              within W, out of those started, plus those still queued past W)
    pools     per cluster and model: dispatch limit, the effective limit the dispatcher uses
              (min(limit, what live workers may hold: DISPATCH_PER_WORKER each, more for
              short jobs)), in flight, live workers
    workers   every worker seen in the last hour: device, state, current job, the model versions
              it holds, seconds since its heartbeat (stale past WORKER_STALE_S)
    failures  the most recent failed jobs with their reason
    queues    per model and tier: queued jobs and the oldest one's wait and urgency
    pool_queues per pool and tier: jobs dispatched (its broker queue) and running
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.jobs.workers import LIVE_DEPTH_SQL, WORKER_STALE_S, effective_dispatch_limit

# SLO attainment looks at jobs that started in this window.
ATTAINMENT_WINDOW_S = 3600
RECENT_FAILURES = 20


@dataclass
class TierStatus:
    name: str
    rank: int
    slo_s: float
    queued: int
    dispatched: int
    running: int
    oldest_wait_s: float  # 0 when nothing is queued
    urgency: float  # oldest_wait_s / slo_s
    started_last_hour: int
    within_slo_last_hour: int
    queued_past_slo: int
    attainment: float | None  # None: nothing started or overdue in the window


@dataclass
class PoolStatus:
    id: str
    name: str  # <cluster>.<model>, the prefix of its queues
    cluster: str
    cluster_kind: str
    model: str
    enabled: bool
    dispatch_limit: int
    effective_limit: int
    live_workers: int
    dispatched: int
    running: int


@dataclass
class WorkerStatus:
    id: str
    pool: str | None
    device: str
    state: str
    current_job_id: str | None
    loaded: list[str]  # "<model> v<number>"
    heartbeat_age_s: float
    stale: bool


@dataclass
class FailureStatus:
    id: str
    tier: str
    model: str
    code: str | None
    message: str | None
    finished_at: str | None


@dataclass
class QueueStatus:
    """Queued jobs of one model and tier: any pool serving the model may take them."""

    model: str
    tier: str
    queued: int
    oldest_wait_s: float
    urgency: float  # oldest_wait_s / the tier's W


@dataclass
class PoolQueueStatus:
    """One pool's jobs of one tier: dispatched = the messages in its broker queue <pool>.<tier>."""

    pool: str
    tier: str
    dispatched: int
    running: int


@dataclass
class Snapshot:
    taken_at: str
    tiers: list[TierStatus] = field(default_factory=list)
    pools: list[PoolStatus] = field(default_factory=list)
    workers: list[WorkerStatus] = field(default_factory=list)
    failures: list[FailureStatus] = field(default_factory=list)
    queues: list[QueueStatus] = field(default_factory=list)  # per (model, tier) with queued jobs
    pool_queues: list[PoolQueueStatus] = field(default_factory=list)  # per (pool, tier) with jobs in flight

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_TIERS = text(
    """
    SELECT t.name, t.rank, t.slo_s,
           count(j.id) FILTER (WHERE j.state = 'queued') AS queued,
           count(j.id) FILTER (WHERE j.state = 'dispatched') AS dispatched,
           count(j.id) FILTER (WHERE j.state = 'running') AS running,
           COALESCE(EXTRACT(EPOCH FROM now() - min(j.created_at) FILTER (WHERE j.state = 'queued')), 0) AS oldest_wait_s,
           count(j.id) FILTER (WHERE j.state = 'queued'
                               AND j.created_at < now() - make_interval(secs => t.slo_s)) AS queued_past_slo
    FROM tiers t
    LEFT JOIN jobs j ON j.tier = t.name AND j.state IN ('queued', 'dispatched', 'running')
    GROUP BY t.name, t.rank, t.slo_s
    ORDER BY t.rank
    """
)

_ATTAINMENT = text(
    """
    SELECT j.tier, count(*) AS started,
           count(*) FILTER (WHERE j.started_at - j.created_at <= make_interval(secs => t.slo_s)) AS within
    FROM jobs j JOIN tiers t ON t.name = j.tier
    WHERE j.started_at > now() - make_interval(secs => :window)
    GROUP BY j.tier
    """
)

_POOLS = text(
    f"""
    SELECT p.id, c.name AS cluster, c.kind AS cluster_kind, m.name AS model, p.dispatch_limit,
           (p.enabled AND c.enabled) AS enabled,
           (SELECT count(*) FROM workers w WHERE w.pool_id = p.id AND w.state IN ('idle', 'busy')
                AND w.heartbeat_at > now() - make_interval(secs => :stale)) AS live_workers,
           {LIVE_DEPTH_SQL} AS live_depth,
           (SELECT count(*) FROM jobs j WHERE j.pool_id = p.id AND j.state = 'dispatched') AS dispatched,
           (SELECT count(*) FROM jobs j WHERE j.pool_id = p.id AND j.state = 'running') AS running
    FROM pools p JOIN clusters c ON c.id = p.cluster_id JOIN models m ON m.id = p.model_id
    ORDER BY c.name, m.name
    """
)

_QUEUES = text(
    """
    SELECT m.name AS model, j.tier, t.slo_s, count(*) AS queued,
           EXTRACT(EPOCH FROM now() - min(j.created_at)) AS oldest_wait_s
    FROM jobs j JOIN models m ON m.id = j.model_id JOIN tiers t ON t.name = j.tier
    WHERE j.state = 'queued'
    GROUP BY m.name, j.tier, t.slo_s, t.rank
    ORDER BY m.name, t.rank
    """
)

_POOL_QUEUES = text(
    """
    SELECT c.name || '.' || m.name AS pool, j.tier,
           count(*) FILTER (WHERE j.state = 'dispatched') AS dispatched,
           count(*) FILTER (WHERE j.state = 'running') AS running
    FROM jobs j JOIN pools p ON p.id = j.pool_id JOIN clusters c ON c.id = p.cluster_id
    JOIN models m ON m.id = p.model_id
    WHERE j.state IN ('dispatched', 'running')
    GROUP BY c.name, m.name, j.tier
    ORDER BY 1, 2
    """
)

_WORKERS = text(
    """
    SELECT w.id, c.name || '.' || m.name AS pool, w.device, w.state, w.current_job_id,
           COALESCE(w.info -> 'loaded', '[]'::jsonb) AS loaded,
           EXTRACT(EPOCH FROM now() - w.heartbeat_at) AS heartbeat_age_s
    FROM workers w
    LEFT JOIN pools p ON p.id = w.pool_id
    LEFT JOIN clusters c ON c.id = p.cluster_id
    LEFT JOIN models m ON m.id = p.model_id
    WHERE w.heartbeat_at > now() - interval '1 hour'
    ORDER BY w.id
    """
)

_VERSIONS = text(
    "SELECT v.digest, m.name, v.number FROM model_versions v JOIN models m ON m.id = v.model_id "
    "WHERE v.digest = ANY(:digests)"
)

_FAILURES = text(
    """
    SELECT j.id, j.tier, m.name AS model, j.failure_code, j.failure_message, j.finished_at
    FROM jobs j JOIN models m ON m.id = j.model_id
    WHERE j.state = 'failed' AND j.finished_at > now() - interval '1 day'
    ORDER BY j.finished_at DESC
    LIMIT :limit
    """
)


def take_snapshot(session: Session) -> Snapshot:
    now = session.execute(text("SELECT now()")).scalar_one()
    snapshot = Snapshot(taken_at=now.isoformat())
    attained = {r.tier: (r.started, r.within) for r in session.execute(_ATTAINMENT, {"window": ATTAINMENT_WINDOW_S})}
    for row in session.execute(_TIERS):
        started, within = attained.get(row.name, (0, 0))
        denominator = started + row.queued_past_slo
        snapshot.tiers.append(
            TierStatus(
                name=row.name,
                rank=row.rank,
                slo_s=float(row.slo_s),
                queued=row.queued,
                dispatched=row.dispatched,
                running=row.running,
                oldest_wait_s=round(float(row.oldest_wait_s), 3),
                urgency=round(float(row.oldest_wait_s) / float(row.slo_s), 4),
                started_last_hour=started,
                within_slo_last_hour=within,
                queued_past_slo=row.queued_past_slo,
                attainment=round(within / denominator, 4) if denominator else None,
            )
        )
    for row in session.execute(_POOLS, {"stale": WORKER_STALE_S}):
        snapshot.pools.append(
            PoolStatus(
                id=str(row.id),
                name=f"{row.cluster}.{row.model}",
                cluster=row.cluster,
                cluster_kind=row.cluster_kind,
                model=row.model,
                enabled=bool(row.enabled),
                dispatch_limit=row.dispatch_limit,
                effective_limit=effective_dispatch_limit(row.dispatch_limit, row.live_depth, bool(row.enabled)),
                live_workers=row.live_workers,
                dispatched=row.dispatched,
                running=row.running,
            )
        )
    for row in session.execute(_QUEUES):
        wait = float(row.oldest_wait_s or 0)
        snapshot.queues.append(
            QueueStatus(
                model=row.model,
                tier=row.tier,
                queued=row.queued,
                oldest_wait_s=round(wait, 3),
                urgency=round(wait / float(row.slo_s), 4),
            )
        )
    for row in session.execute(_POOL_QUEUES):
        snapshot.pool_queues.append(
            PoolQueueStatus(pool=row.pool, tier=row.tier, dispatched=row.dispatched, running=row.running)
        )
    workers = session.execute(_WORKERS).all()
    digests = sorted({d for w in workers for d in w.loaded})
    names = (
        {r.digest: f"{r.name} v{r.number}" for r in session.execute(_VERSIONS, {"digests": digests})} if digests else {}
    )
    for row in workers:
        age = float(row.heartbeat_age_s)
        snapshot.workers.append(
            WorkerStatus(
                id=row.id,
                pool=row.pool,
                device=row.device,
                state=row.state,
                current_job_id=str(row.current_job_id) if row.current_job_id else None,
                loaded=[names.get(d, d[:19]) for d in row.loaded],
                heartbeat_age_s=round(age, 1),
                stale=age > WORKER_STALE_S,
            )
        )
    for row in session.execute(_FAILURES, {"limit": RECENT_FAILURES}):
        snapshot.failures.append(
            FailureStatus(
                id=str(row.id),
                tier=row.tier,
                model=row.model,
                code=row.failure_code,
                message=(row.failure_message or "")[:300] or None,
                finished_at=row.finished_at.isoformat() if isinstance(row.finished_at, dt.datetime) else None,
            )
        )
    return snapshot
