"""Metrics that follow the job's life: connected to the job signals by app/wiring.py."""

from __future__ import annotations

import functools

from sqlalchemy.orm import Session

from app.core.signals import Transition, job_started, job_transitioned, limiter_unavailable, submission_refused
from app.db.session import after_commit
from app.observability.metrics import count_limiter_unavailable, count_rejection, count_transition, observe_wait


def on_transition(sender, *, session: Session, change: Transition) -> None:
    # Outcome and requeue counters (/metrics): only for a transition that won and committed.
    after_commit(
        session,
        functools.partial(count_transition, change.tier, change.from_state, change.to_state, change.failure_code),
    )


def on_start(sender, *, tier: str, wait_s: float) -> None:
    # The wait from submission to this start, against the tier's W.
    observe_wait(tier, wait_s)


def on_refusal(sender, *, tier: str, reason: str) -> None:
    count_rejection(tier, reason)


def on_limiter_unavailable(sender) -> None:
    count_limiter_unavailable()


def connect() -> None:
    job_transitioned.connect(on_transition, weak=False)
    job_started.connect(on_start, weak=False)
    submission_refused.connect(on_refusal, weak=False)
    limiter_unavailable.connect(on_limiter_unavailable, weak=False)
