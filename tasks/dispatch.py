"""The dispatch task: passes of the dispatcher, each published after its commit.

Dispatching is event-driven: a job created, started or finished asks for a dispatch through the
publisher (`get_publisher().request_dispatch()`, coalesced in tasks/publisher.py). A beat tick
(tasks/celery_app.py) is the safety net for a lost request.
"""

from __future__ import annotations

import logging
import os

from app.core.redis_client import get_redis
from app.db.session import after_commit, transaction
from app.jobs.transitions import unrelease
from app.messaging import Release, get_publisher
from app.observability.metrics import count_publish_failure, observe_dispatch_pass
from app.scheduling.dispatcher import Dispatcher, LedgerStore, PassResult
from tasks.celery_app import celery_app
from tasks.publisher import clear_dispatch_request

log = logging.getLogger(__name__)

# Full batches in a row before yielding the worker to other control tasks.
MAX_PASSES = 20

_dispatcher: Dispatcher | None = None


def get_dispatcher() -> Dispatcher:
    global _dispatcher
    if _dispatcher is None:
        _dispatcher = Dispatcher(
            policy=os.environ.get("DREAMQ_POLICY", "slo"),
            ledger_store=LedgerStore(get_redis()),
            affinity=os.environ.get("DREAMQ_DISPATCH_AFFINITY", "1") != "0",
        )
    return _dispatcher


def return_to_queue(releases: list[Release]) -> int:
    returned = 0
    with transaction() as session:
        for release in releases:
            if unrelease(session, release.job_id, release.dispatch_seq, reason="publish_failed"):
                returned += 1
                log.warning("publish failed: job returned to the queue", extra=_job_fields(release))
    return returned


def _job_fields(release: Release) -> dict:
    return {
        "job_id": str(release.job_id),
        "user_id": str(release.user_id) if release.user_id else None,
        "tier": release.tier,
        "queue": release.queue,
        "dispatch_seq": release.dispatch_seq,
    }


def dispatch_once(dispatcher: Dispatcher | None = None) -> PassResult:
    """One pass: plan and apply in a transaction, then (after commit) publish and count."""
    dispatcher = dispatcher or get_dispatcher()
    with transaction() as session:
        result = dispatcher.run_pass(session)

        def _after() -> None:
            try:
                get_publisher().release(result.releases)
            except Exception:
                # The broker refused: put the jobs back in the queue at once rather than leave
                # them dispatched with no message (holding pool room). A message that did get
                # out names a dispatch_seq the job no longer has, so it claims nothing.
                log.exception("publish failed; returning the batch to the queue", extra={"jobs": len(result.releases)})
                count_publish_failure()
                return_to_queue(result.releases)
                raise
            dispatcher.ledger_store.record(result.now, result.per_tier())
            observe_dispatch_pass(result.ms / 1000, result.per_tier(), result.reasons)
            if log.isEnabledFor(logging.DEBUG):  # one line per job, off at INFO (a pass releases hundreds)
                for release in result.releases:
                    log.debug("released", extra=_job_fields(release))

        after_commit(session, _after)
    return result


@celery_app.task(name="dreamq.dispatch", ignore_result=True, soft_time_limit=60, time_limit=90, acks_late=False)
def dispatch() -> int:
    clear_dispatch_request()
    dispatcher = get_dispatcher()
    total = 0
    for _ in range(MAX_PASSES):
        result = dispatch_once(dispatcher)
        total += len(result.releases)
        if result.releases:
            log.info(
                "dispatched",
                extra={
                    "released": len(result.releases),
                    "per_tier": result.per_tier(),
                    "room": result.room,
                    "candidates": result.candidates,
                    "reasons": result.reasons,
                    "ms": round(result.ms, 1),
                },
            )
        # Room left and a full batch: there is more to do right now.
        if result.planned < dispatcher.max_batch:
            break
    return total
