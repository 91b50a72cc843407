"""The dispatcher: moves queued jobs from Postgres into their pool's tier queue.

Back pressure: a pool holds at most `dispatch_limit` jobs dispatched-but-not-started; the rest
waits in Postgres, where its priority can still change. Two dispatchers may run at once (several
control workers, the beat tick racing an event): each pool row is locked FOR UPDATE SKIP LOCKED,
so one dispatcher owns a pool's room at a time and the other skips it, and queued rows are taken
with SKIP LOCKED so no job is released twice.

Publishing happens only after the commit (see tasks/dispatch.py): a message never names a job
whose dispatch was rolled back.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session


@dataclass(frozen=True)
class Release:
    """A job released to a queue: what the publisher needs after commit."""

    job_id: uuid.UUID
    queue: str
    dispatch_seq: int
    tier: str


_POOLS_SQL = text(
    """
    SELECT p.id, c.name AS cluster, m.name AS model, p.model_id, p.dispatch_limit,
           (SELECT count(*) FROM jobs j WHERE j.pool_id = p.id AND j.state = 'dispatched') AS in_flight
    FROM pools p
    JOIN clusters c ON c.id = p.cluster_id
    JOIN models m ON m.id = p.model_id
    WHERE p.enabled AND c.enabled
    ORDER BY p.id
    FOR UPDATE OF p SKIP LOCKED
    """
)

_RELEASE_SQL = text(
    """
    WITH picked AS (
        SELECT j.id FROM jobs j
        JOIN tiers t ON t.name = j.tier
        WHERE j.state = 'queued' AND j.model_id = :model_id
          AND (SELECT count(*) FROM jobs u WHERE u.user_id = j.user_id AND u.state IN ('dispatched', 'running'))
              < t.concurrency_cap
        ORDER BY t.rank, j.created_at
        LIMIT :room
        FOR UPDATE OF j SKIP LOCKED
    ), upd AS (
        UPDATE jobs SET state = 'dispatched', pool_id = :pool_id, dispatched_at = now(), updated_at = now(),
            dispatch_seq = jobs.dispatch_seq + 1
        FROM picked WHERE jobs.id = picked.id
        RETURNING jobs.id, jobs.tier, jobs.dispatch_seq
    ), ev AS (
        INSERT INTO job_events (job_id, from_state, to_state, detail)
        SELECT id, 'queued', 'dispatched', jsonb_build_object('pool', CAST(:pool_name AS text)) FROM upd
    )
    SELECT id, tier, dispatch_seq FROM upd
    """
)


def release_batch(session: Session, *, max_per_pool: int = 256) -> list[Release]:
    releases: list[Release] = []
    for pool in session.execute(_POOLS_SQL).mappings().all():
        room = min(pool["dispatch_limit"] - pool["in_flight"], max_per_pool)
        if room <= 0:
            continue
        name = f"{pool['cluster']}.{pool['model']}"
        rows = session.execute(
            _RELEASE_SQL,
            {"model_id": pool["model_id"], "pool_id": pool["id"], "room": room, "pool_name": name},
        ).all()
        releases.extend(Release(row.id, f"{name}.{row.tier}", row.dispatch_seq, row.tier) for row in rows)
    return releases
