"""Job lifecycle -> webhook deliveries.

Events a callback can subscribe to (`webhook_events` at submission):

    started     the job moved to running (a worker began it; again after a requeue)
    progress    while running, at most every DREAMQ_WEBHOOK_PROGRESS_INTERVAL_S per job
    completed   the job ended: succeeded, failed or cancelled (`job.state` says which)

Default: started and completed. Progress is opt-in because it is the chatty one.

Each event writes a webhook_deliveries row holding the job object as GET /v1/generations/<id>
returns it at that moment, in the same transaction as the change it reports (so a rolled back
change sends nothing), and publishes the delivery task only after that commit.
"""

from __future__ import annotations

import logging
import time
import uuid

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.core.queues import CPU_QUEUE
from app.core.signals import Transition, job_progressed, job_transitioned
from app.db.models import TERMINAL_STATES, Job, JobState, WebhookDelivery
from app.db.session import after_commit
from app.dream_machine.generations import callback_payload
from app.jobs.submit import DEFAULT_EVENTS
from app.jobs.views import load_job_views
from app.messaging import get_publisher

log = logging.getLogger(__name__)


def event_for(from_state: str, to: JobState) -> str | None:
    if to is JobState.running and from_state != JobState.running.value:
        return "started"
    if to in TERMINAL_STATES:
        return "completed"
    return None


def on_transition(sender, *, session: Session, change: Transition) -> None:
    """Listener of job_transitioned (app/core/signals.py): the delivery row in the same transaction."""
    if change.to_state != JobState.running.value:
        _progress.pop(str(change.job_id), None)  # the job left running: its progress throttle goes
    if change.callback_url is None:
        return
    event = event_for(change.from_state, JobState(change.to_state))
    if event is not None and event in (change.webhook_events or DEFAULT_EVENTS):
        emit(session, change.job_id, event, change.callback_url)


# Per running job in this process: its progress throttle (ProgressWebhooks), dropped when it
# leaves running here. A job handed to the cpu queue leaves running in another process, so the
# oldest entries also go past a bound (a GPU worker runs one job at a time).
_progress: dict[str, ProgressWebhooks] = {}
_PROGRESS_KEPT = 64


def on_progress(sender, *, session: Session, job_id: uuid.UUID | str) -> None:
    """Listener of job_progressed: a `progress` event at most every interval, if subscribed."""
    key = str(job_id)
    webhooks = _progress.get(key)
    if webhooks is None:
        while len(_progress) >= _PROGRESS_KEPT:
            _progress.pop(next(iter(_progress)))
        webhooks = _progress[key] = ProgressWebhooks(job_id)
    webhooks.report(session)


def connect() -> None:
    job_transitioned.connect(on_transition, weak=False)
    job_progressed.connect(on_progress, weak=False)


def emit(session: Session, job_id: uuid.UUID | str, event: str, url: str) -> uuid.UUID:
    """Write the delivery row with the job as it is now; publish its task after commit.

    A job made through /dream-machine/v1 gets Luma's callback body instead (the generation
    object itself), with the same headers, signature, retries and address checks."""
    # populate_existing: the state change was a raw UPDATE the identity map has not seen.
    job = session.scalars(select(Job).where(Job.id == job_id).execution_options(populate_existing=True)).one()
    payload = callback_payload(session, job) or {"event": event, "job": load_job_views(session, [job])[0]}
    delivery = WebhookDelivery(id=uuid.uuid4(), job_id=job.id, event=event, url=url, payload=payload)
    session.add(delivery)
    session.flush()
    delivery_id = delivery.id
    after_commit(session, lambda: enqueue(delivery_id))
    return delivery_id


def enqueue(delivery_id: uuid.UUID | str, countdown: float | None = None) -> None:
    get_publisher().send("dreamq.webhooks.deliver", [str(delivery_id)], queue=CPU_QUEUE, countdown=countdown)


class ProgressWebhooks:
    """Per running job: emits `progress` at most every interval, only if the job subscribed."""

    def __init__(self, job_id: uuid.UUID | str, interval_s: float | None = None):
        self.job_id = job_id
        self.interval_s = get_settings().webhook_progress_interval_s if interval_s is None else interval_s
        self._subscribed: str | None | bool = None  # callback URL once known, False when not subscribed
        self._last = float("-inf")

    def report(self, session: Session) -> None:
        """Call inside the transaction that wrote the job's progress."""
        if self._subscribed is False:
            return
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        if self._subscribed is None:
            row = session.execute(
                text("SELECT callback_url, webhook_events FROM jobs WHERE id = :id"), {"id": str(self.job_id)}
            ).first()
            wanted = row is not None and row[0] and "progress" in (row[1] or DEFAULT_EVENTS)
            self._subscribed = row[0] if wanted else False  # type: ignore[index]  # wanted: row is not None
            if not wanted:
                return
        self._last = now
        emit(session, self.job_id, "progress", self._subscribed)  # type: ignore[arg-type]  # the callback URL by now
