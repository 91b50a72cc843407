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
import uuid

from app.db.session import after_commit, transaction
from app.observability.metrics import count_publish_failure, observe_dispatch_pass
from app.redis_client import get_redis
from app.scheduling.dispatcher import Dispatcher, LedgerStore, PassResult, Release
from kombu import Queue

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
        _dispatcher = Dispatcher(policy=os.environ.get("DREAMQ_POLICY", "slo"), ledger_store=LedgerStore(get_redis()),
                                 affinity=os.environ.get("DREAMQ_DISPATCH_AFFINITY", "1") != "0")
    return _dispatcher


def request_dispatch() -> None:
    redis = get_redis()
    if redis is not None:
        try:
            if not redis.set(PENDING_KEY, "1", nx=True, ex=PENDING_TTL_S):
                return
        except Exception:  # Redis down: fall through and publish; the dispatch itself is idempotent
            log.warning("dispatch coalescing unavailable", exc_info=True)
    # The light publish (see publish_releases): this runs on every job start and finish, in the
    # GPU worker and the API, and send_task's task-sent event and queue declaration tripled its
    # broker round trips (py-spy: request_dispatch was 9% of a noop job on the GPU worker).
    _publish_batch([("dreamq.dispatch", [], CONTROL_QUEUE, uuid.uuid4().hex)])


def publish_releases(releases: list[Release]) -> None:
    """Publish one `dreamq.generate` message per release: one producer, one kombu batch."""
    if not releases:
        return
    _publish_batch([("dreamq.generate", [str(r.job_id), r.dispatch_seq], r.queue, f"{r.job_id}-{r.dispatch_seq}")
                    for r in releases])


def _publish_batch(messages: list[tuple[str, list, str, str]]) -> None:
    """Publish (task name, args, queue, task id) messages: one producer, one kombu batch.

    This is `send_task` unrolled for the hot paths, with the same message protocol (Celery's own
    `create_task_message`), because per message `send_task` re-declares the queue and safe-reprs
    the arguments: measured 0.55 ms a message, most of a 512-job pass. Here each distinct queue
    is declared once per batch, argsrepr is built directly, and on Redis the whole batch goes out as one pipeline. No task-sent event
    is emitted (Flower shows a task from the moment a worker receives it; a job's own state
    lives in Postgres anyway).
    """
    amqp = celery_app.amqp
    declared: dict[str, Queue] = {}
    with celery_app.producer_or_acquire() as producer, producer.batch(max_size=len(messages) + 1):
        for name, args, queue, task_id in messages:
            headers, properties, body, _ = amqp.create_task_message(
                task_id, name, args, {}, argsrepr=repr(args), kwargsrepr="{}",
            )
            declare = []
            if queue not in declared:
                declared[queue] = Queue(queue, routing_key=queue)
                declare = [declared[queue]]
            producer.publish(
                body, exchange="", routing_key=queue, serializer="json", headers=headers,
                delivery_mode=2, declare=declare, retry=True, retry_policy=_RETRY_POLICY, **properties,
            )


# Broker hiccups are retried briefly; past that the batch goes back to the queue (see below).
_RETRY_POLICY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 1}


def return_to_queue(releases: list[Release]) -> int:
    from app.db.models import JobState
    from app.jobs.transitions import transition

    returned = 0
    with transaction() as session:
        for release in releases:
            if transition(session, release.job_id, JobState.dispatched, JobState.queued,
                          guard={"dispatch_seq": release.dispatch_seq}, detail={"reason": "publish_failed"}):
                returned += 1
                log.warning("publish failed: job returned to the queue", extra=_job_fields(release))
    return returned


def _job_fields(release: Release) -> dict:
    return {"job_id": str(release.job_id), "user_id": str(release.user_id) if release.user_id else None,
            "tier": release.tier, "queue": release.queue, "dispatch_seq": release.dispatch_seq}


def dispatch_once(dispatcher: Dispatcher | None = None) -> PassResult:
    """One pass: plan and apply in a transaction, then (after commit) publish and count."""
    dispatcher = dispatcher or get_dispatcher()
    with transaction() as session:
        result = dispatcher.run_pass(session)

        def _after() -> None:
            try:
                publish_releases(result.releases)
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
    redis = get_redis()
    if redis is not None:
        redis.delete(PENDING_KEY)
    dispatcher = get_dispatcher()
    total = 0
    for _ in range(MAX_PASSES):
        result = dispatch_once(dispatcher)
        total += len(result.releases)
        if result.releases:
            log.info("dispatched", extra={"released": len(result.releases), "per_tier": result.per_tier(),
                                          "room": result.room,
                                          "candidates": result.candidates, "reasons": result.reasons,
                                          "ms": round(result.ms, 1)})
        # Room left and a full batch: there is more to do right now.
        if result.planned < dispatcher.max_batch:
            break
    return total


