"""Signals of the job's life: how features (webhooks, metrics) react without being called.

The domain (app/jobs) sends them; app/wiring.py connects the listeners once per process
(create_app, the Celery app, the CLI). A listener must not fail the change it hears about.

    job_transitioned   inside the transaction of a state change that won its compare-and-set,
                       with `session` and `change` (a Transition). A listener that writes (the
                       webhook delivery row) writes in that same transaction, so a rolled-back
                       change leaves nothing; one that acts outside the database registers an
                       after-commit callback (metrics), so it only counts what committed.
    job_progressed     inside the transaction that wrote a running job's progress: `session`,
                       `job_id` (progress webhooks).
    job_started        after a claim committed: `tier`, `wait_s` from submission to start.
    submission_refused, limiter_unavailable   from app/jobs/limits.py (metrics).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Sequence

from blinker import Namespace

_signals = Namespace()

job_transitioned = _signals.signal("job-transitioned")
job_progressed = _signals.signal("job-progressed")
job_started = _signals.signal("job-started")
# A submission refused by a limit: `tier`, `reason` (quota_exceeded, rate_limited_<scope>).
submission_refused = _signals.signal("submission-refused")
# The rate limiter's Redis did not answer (the submission went on without it).
limiter_unavailable = _signals.signal("limiter-unavailable")


@dataclass(frozen=True)
class Transition:
    job_id: uuid.UUID | str
    from_state: str
    to_state: str
    tier: str
    failure_code: str | None
    callback_url: str | None
    webhook_events: Sequence[str] | None
