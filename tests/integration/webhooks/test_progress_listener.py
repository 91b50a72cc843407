"""The progress-webhook listener keeps one throttle per running job, and never more than its bound:
a job handed to the cpu queue leaves `running` in another process, so this one never hears it go."""

from __future__ import annotations

import uuid

from app.webhooks import events


def test_progress_throttles_are_bounded_and_dropped_when_a_job_leaves_running(db_session):
    events._progress.clear()
    jobs = [uuid.uuid4() for _ in range(events._PROGRESS_KEPT + 10)]
    for job_id in jobs:
        events.on_progress(None, session=db_session, job_id=job_id)
    assert len(events._progress) == events._PROGRESS_KEPT
    # The oldest went first; the newest are kept.
    assert str(jobs[0]) not in events._progress and str(jobs[-1]) in events._progress
    # A transition out of running drops the job's throttle.
    change = events.Transition(
        job_id=jobs[-1],
        from_state="running",
        to_state="succeeded",
        tier="api",
        failure_code=None,
        callback_url=None,
        webhook_events=None,
    )
    events.on_transition(None, session=db_session, change=change)
    assert str(jobs[-1]) not in events._progress
    events._progress.clear()
