"""Dispatch task and its triggers.

Dispatching is event-driven: a job created, started or finished asks for a dispatch with
`request_dispatch()`. Requests are coalesced through a Redis key so a burst of 1,000 submissions
produces a handful of dispatch runs, not 1,000; the key is cleared when a run starts, so an event
that arrives during a run always causes one more run. A beat tick (tasks/celery_app.py) is the
safety net for a lost request.
"""

from __future__ import annotations

import logging
import os

from app.db.session import after_commit, transaction
from app.redis_client import get_redis
from app.scheduling.dispatcher import Dispatcher, LedgerStore, PassResult, Release
from tasks.celery_app import CONTROL_QUEUE, celery_app

log = logging.getLogger(__name__)

PENDING_KEY = "dreamq:dispatch:pending"
# A pending flag older than this is stale (its message was lost): allow a new request.
PENDING_TTL_S = 10
# Full batches in a row before yielding the worker to other control tasks.
MAX_PASSES = 20

_dispatcher: Dispatcher | None = None


def get_dispatcher() -> Dispatcher:
    global _dispatcher
    if _dispatcher is None:
        _dispatcher = Dispatcher(policy=os.environ.get("DREAMQ_POLICY", "slo"), ledger_store=LedgerStore(get_redis()))
    return _dispatcher


def request_dispatch() -> None:
    redis = get_redis()
    if redis is not None:
        try:
            if not redis.set(PENDING_KEY, "1", nx=True, ex=PENDING_TTL_S):
                return
        except Exception:  # Redis down: fall through and publish; the dispatch itself is idempotent
            log.warning("dispatch coalescing unavailable", exc_info=True)
    celery_app.send_task("dreamq.dispatch", queue=CONTROL_QUEUE)


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


def dispatch_once(dispatcher: Dispatcher | None = None) -> PassResult:
    """One pass: plan and apply in a transaction, then (after commit) publish and count."""
    dispatcher = dispatcher or get_dispatcher()
    with transaction() as session:
        result = dispatcher.run_pass(session)

        def _after() -> None:
            publish_releases(result.releases)
            dispatcher.ledger_store.record(result.now, result.per_tier())

        after_commit(session, _after)
    return result


@celery_app.task(name="dreamq.dispatch", ignore_result=True, soft_time_limit=60, time_limit=90, acks_late=False)
def dispatch() -> int:
    redis = get_redis()
    if redis is not None:
        redis.delete(PENDING_KEY)
    dispatcher = get_dispatcher()
    total = 0
    for _ in range(MAX_PASSES):
        result = dispatch_once(dispatcher)
        total += len(result.releases)
        if result.releases:
            log.info("dispatched", extra={"released": len(result.releases), "room": result.room,
                                          "candidates": result.candidates, "reasons": result.reasons,
                                          "ms": round(result.ms, 1)})
        # Room left and a full batch: there is more to do right now.
        if result.planned < dispatcher.max_batch:
            break
    return total


