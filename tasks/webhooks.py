"""CPU tasks: deliver one webhook attempt (and schedule the next), and the sweep that
re-publishes deliveries whose message was lost (publish failed after commit, broker wiped).

A retry is a new message with a countdown, not Celery's autoretry: the schedule and the attempt
count live in the delivery row (Postgres is the source of truth), so a lost message only delays
a delivery until the sweep finds it overdue, and two messages for one row never attempt it at
once (the claim is a compare-and-set UPDATE with a lease).
"""

from __future__ import annotations

import logging

from sqlalchemy import text

from app.core.logging_setup import job_context
from app.core.queues import CPU_QUEUE
from app.db.session import transaction
from app.webhooks.delivery import attempt
from app.webhooks.events import enqueue
from tasks.celery_app import celery_app

log = logging.getLogger(__name__)

# A pending delivery this far past its time has lost its message; the sweep publishes it again.
SWEEP_GRACE_S = 30
SWEEP_INTERVAL_S = 30.0
SWEEP_BATCH = 500


@celery_app.task(
    name="dreamq.webhooks.deliver", bind=True, ignore_result=True, acks_late=True, soft_time_limit=60, time_limit=90
)
def deliver(self, delivery_id: str) -> None:
    with job_context(delivery_id=delivery_id):
        wait = attempt(delivery_id)
        if wait is not None:
            enqueue(delivery_id, countdown=wait)


@celery_app.task(name="dreamq.webhooks.sweep", ignore_result=True, soft_time_limit=60, time_limit=90)
def sweep() -> int:
    with transaction() as session:
        ids = (
            session.execute(
                text(
                    "SELECT id FROM webhook_deliveries WHERE status = 'pending' "
                    "AND next_attempt_at < now() - make_interval(secs => :grace) ORDER BY next_attempt_at LIMIT :n"
                ),
                {"grace": SWEEP_GRACE_S, "n": SWEEP_BATCH},
            )
            .scalars()
            .all()
        )
    for delivery_id in ids:
        enqueue(delivery_id)
    if ids:
        log.warning("webhook deliveries re-published", extra={"count": len(ids)})
    return len(ids)


# Declared next to its code; beat imports this module (celery_app include=) before it schedules.
celery_app.conf.beat_schedule = {
    **(celery_app.conf.beat_schedule or {}),
    "webhooks-sweep": {
        "task": "dreamq.webhooks.sweep",
        "schedule": SWEEP_INTERVAL_S,
        "options": {"queue": CPU_QUEUE, "expires": SWEEP_INTERVAL_S},
    },
}
