"""Job state changes: compare-and-set UPDATE plus a job_events row, in one round trip.

    queued -> dispatched -> running -> succeeded | failed | cancelled
    dispatched | running -> queued      (worker lost / broker lost the message; attempts counted)
    queued | dispatched -> cancelled    (user cancel before a worker claims it)

Every change names the state it expects. If the row is not in that state any more (a duplicate
delivery, a cancel that won the race, a reaper that requeued it), the UPDATE matches nothing and
the caller learns it lost: a job can never be completed twice.

This module writes jobs.state and job_events for every change of one job, and tells the
listeners (app/core/signals.py: webhooks, metrics) of each change that won. Two statements keep
their own SQL for speed and follow the same rule: a job is born `queued` with its first event
in one statement (app/jobs/submit.py INSERT_JOB_SQL), and the dispatcher moves a whole batch
queued -> dispatched in one compare-and-set statement with one event per job
(app/scheduling/dispatcher.py). Steps that change no state (generated, outputs expired) are
events too: record_event() and record_step().
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Iterable

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.core.signals import Transition, job_transitioned
from app.db.models import JobState

ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.queued: frozenset({JobState.dispatched, JobState.cancelled, JobState.failed}),
    JobState.dispatched: frozenset({JobState.running, JobState.queued, JobState.cancelled, JobState.failed}),
    # running -> running: the message was redelivered because the worker running it died; the
    # new claim counts another attempt.
    JobState.running: frozenset(
        {JobState.running, JobState.succeeded, JobState.failed, JobState.cancelled, JobState.queued}
    ),
    JobState.succeeded: frozenset(),
    JobState.failed: frozenset(),
    JobState.cancelled: frozenset(),
}

# Columns a transition may set besides state; names come from code, never from a request.
_SETTABLE = {
    "pool_id",
    "worker_id",
    "attempts",
    "progress",
    "dispatched_at",
    "started_at",
    "finished_at",
    "video_key",
    "thumbnail_key",
    "failure_code",
    "failure_message",
    "cancel_requested",
    "dispatch_seq",
}
# Values that are SQL expressions rather than bound parameters.
NOW = object()
INCREMENT = object()


class IllegalTransition(ValueError):
    pass


def transition(
    session: Session,
    job_id: uuid.UUID | str,
    expected: JobState | Iterable[JobState],
    to: JobState,
    *,
    worker_id: str | None = None,
    detail: dict[str, Any] | None = None,
    guard: dict[str, Any] | None = None,
    where: tuple[str, dict[str, Any]] | None = None,
    **values: Any,
) -> str | None:
    """Move a job from one of `expected` to `to`. Returns the state it left, or None if it lost.

    `values` set extra columns in the same UPDATE; pass NOW for `now()` and INCREMENT to add one.
    `guard` adds equality conditions (e.g. the dispatch_seq a message carries); `where` adds one
    SQL condition written in code (never from a request) with its parameters. `worker_id` names
    the worker in the event row; on a move to running it also becomes the job's owner
    (jobs.worker_id), which reapers and dashboards read.
    """
    expected_set = {expected} if isinstance(expected, JobState) else set(expected)
    for state in expected_set:
        if to not in ALLOWED[state]:
            raise IllegalTransition(f"{state.value} -> {to.value} is not a job transition")
    unknown = (set(values) | set(guard or {})) - _SETTABLE
    if unknown:
        raise ValueError(f"transition cannot set or guard {sorted(unknown)}")

    assignments = ["state = :to", "updated_at = now()"]
    if to is JobState.running and worker_id is not None and "worker_id" not in values:
        assignments.append("worker_id = :worker")
    params: dict[str, Any] = {
        "id": str(job_id),
        "expected": [s.value for s in expected_set],
        "to": to.value,
        "worker": worker_id,
        "detail": json.dumps(detail or {}),
    }
    for column, value in values.items():
        if value is NOW:
            assignments.append(f"{column} = now()")
        elif value is INCREMENT:
            assignments.append(f"{column} = j.{column} + 1")
        else:
            assignments.append(f"{column} = :v_{column}")
            params[f"v_{column}"] = str(value) if isinstance(value, uuid.UUID) else value
    conditions = ["id = :id", "state = ANY(:expected)"]
    for column, value in (guard or {}).items():
        conditions.append(f"{column} = :g_{column}")
        params[f"g_{column}"] = value
    if where is not None:
        conditions.append(f"({where[0]})")
        params.update(where[1])
    sql = text(
        f"""
        WITH old AS (
            SELECT id, state FROM jobs WHERE {" AND ".join(conditions)} FOR UPDATE
        ), upd AS (
            UPDATE jobs j SET {", ".join(assignments)}
            FROM old WHERE j.id = old.id
            RETURNING j.id, old.state AS from_state, j.callback_url, j.webhook_events, j.tier, j.failure_code
        ), ev AS (
            INSERT INTO job_events (job_id, from_state, to_state, worker_id, detail)
            SELECT id, from_state, :to, :worker, CAST(:detail AS jsonb) FROM upd
        )
        SELECT from_state, callback_url, webhook_events, tier, failure_code FROM upd
        """
    )
    row = session.execute(sql, params).first()
    if row is not None:
        # Listeners (webhooks, metrics: app/wiring.py) hear of a change that won, inside its
        # transaction; what they publish waits for the commit.
        job_transitioned.send(
            session,
            session=session,
            change=Transition(
                job_id=job_id,
                from_state=row[0],
                to_state=to.value,
                tier=row[3],
                failure_code=row[4],
                callback_url=row[1],
                webhook_events=row[2],
            ),
        )
    return row[0] if row else None


def unrelease(session: Session, job_id: uuid.UUID | str, dispatch_seq: int, **detail: Any) -> bool:
    """dispatched -> queued for this dispatch_seq: a released job nobody started goes back to the
    queue, no attempt used (its worker is gone or retiring, the broker lost or refused its
    message). A message for it that turns up later names the old dispatch_seq and claims nothing."""
    left = transition(
        session, job_id, JobState.dispatched, JobState.queued, guard={"dispatch_seq": dispatch_seq}, detail=detail
    )
    return left is not None


def record_step(session: Session, job_ids: list, step: str) -> None:
    """The same step for many jobs, each in its own state (e.g. their outputs expired)."""
    session.execute(
        text(
            "INSERT INTO job_events (job_id, from_state, to_state, detail) "
            "SELECT id, state, state, jsonb_build_object('step', CAST(:step AS text)) FROM jobs WHERE id = ANY(:ids)"
        ),
        {"ids": job_ids, "step": step},
    )


def record_event(
    session: Session,
    job_id: uuid.UUID | str,
    state: JobState,
    *,
    worker_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """A notable step that is not a state change (model loaded, frames generated, encoded)."""
    session.execute(
        text(
            "INSERT INTO job_events (job_id, from_state, to_state, worker_id, detail) "
            "VALUES (:id, :state, :state, :worker, CAST(:detail AS jsonb))"
        ),
        {"id": str(job_id), "state": state.value, "worker": worker_id, "detail": json.dumps(detail or {})},
    )
