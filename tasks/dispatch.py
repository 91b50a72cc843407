"""Dispatch task and its triggers.

Dispatching is event-driven: a job created, started or finished asks for a dispatch with
`request_dispatch()`. Requests are coalesced through a Redis key so a burst of 1,000 submissions
produces a handful of dispatch runs, not 1,000; the key is cleared when a run starts, so an event
that arrives during a run always causes one more run. A beat tick is the safety net for a lost
request.
"""

from __future__ import annotations

import logging
import time

from app.db.session import after_commit, transaction
from app.redis_client import get_redis
from app.scheduling.dispatcher import Release, release_batch
from tasks.celery_app import CONTROL_QUEUE, celery_app

log = logging.getLogger(__name__)

PENDING_KEY = "dreamq:dispatch:pending"
# A pending flag older than this is stale (its message was lost): allow a new request.
PENDING_TTL_S = 10


def request_dispatch() -> None:
    redis = get_redis()
    if redis is not None:
        try:
            if not redis.set(PENDING_KEY, "1", nx=True, ex=PENDING_TTL_S):
                return
        except Exception:  # Redis down: fall through and publish; the dispatch itself is idempotent
            log.warning("dispatch coalescing unavailable", exc_info=True)
    celery_app.send_task("dreamq.dispatch", queue=CONTROL_QUEUE)


def request_dispatch_after_commit(session) -> None:
    after_commit(session, request_dispatch)


def publish_releases(releases: list[Release]) -> None:
    """One producer for the whole batch: one connection, no per-message pool round trip."""
    if not releases:
        return
    with celery_app.producer_or_acquire() as producer:
        for release in releases:
            celery_app.send_task(
                "dreamq.generate",
                args=[str(release.job_id), release.dispatch_seq],
                queue=release.queue,
                task_id=f"{release.job_id}-{release.dispatch_seq}",
                producer=producer,
            )


def dispatch_once() -> int:
    with transaction() as session:
        releases = release_batch(session)
        after_commit(session, lambda: publish_releases(releases))
    return len(releases)


@celery_app.task(name="dreamq.dispatch", ignore_result=True, soft_time_limit=60, time_limit=90, acks_late=False)
def dispatch() -> int:
    redis = get_redis()
    if redis is not None:
        redis.delete(PENDING_KEY)
    started = time.perf_counter()
    # One pass fills every pool to its dispatch limit; the next event or tick continues.
    total = dispatch_once()
    if total:
        log.info("dispatched", extra={"released": total, "ms": round((time.perf_counter() - started) * 1000, 1)})
    return total
