"""Cancelling a job: queued or dispatched ones at once, running ones at the next model step.

A dispatched message still in the broker finds the job cancelled and claims nothing; a running
job's worker sees `cancel_requested` at its next progress step and ends it `cancelled`.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.db.models import Job, JobState
from app.jobs.transitions import NOW, transition
from app.messaging import get_publisher


def request_cancel(session: Session, job: Job, *, by: str) -> bool:
    """Cancel `job` (locked by the caller); False when it had already finished."""
    state = JobState(job.state)
    if state.terminal:
        return False
    if state in (JobState.queued, JobState.dispatched):
        transition(
            session, job.id, state, JobState.cancelled, detail={"by": by}, finished_at=NOW, cancel_requested=True
        )
        get_publisher().request_dispatch(session)  # its pool slot or concurrency slot is free now
    else:
        session.execute(
            Job.__table__.update()  # type: ignore[attr-defined]  # __table__ is a Table
            .where(Job.id == job.id, Job.state == JobState.running.value)
            .values(cancel_requested=True)
        )
    return True
