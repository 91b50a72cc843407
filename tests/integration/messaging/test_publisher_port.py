"""The messaging port against real Postgres: publishing waits for the commit, never follows a
rollback, and a transition that lost its compare-and-set tells no listener."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text

from app.core.signals import job_transitioned
from app.db.models import JobState
from app.db.session import transaction
from app.jobs.transitions import transition
from app.messaging import Release


def test_publishing_inside_a_transaction_waits_for_its_commit(stack_env, publisher):
    release = Release(uuid.uuid4(), "local.tiny.api", 1, "api")
    with transaction() as session:
        session.execute(text("SELECT 1"))
        publisher.request_dispatch(session)
        publisher.release([release], session)
        publisher.send("dreamq.webhooks.deliver", ["d"], queue="cpu", session=session)
        assert (publisher.dispatch_requests, publisher.releases, publisher.sent) == (0, [], [])
    assert publisher.dispatch_requests == 1
    assert publisher.releases == [release]
    assert publisher.sent == [("dreamq.webhooks.deliver", ("d",), "cpu", None, None)]


def test_nothing_is_published_for_a_rolled_back_transaction(stack_env, publisher):
    with pytest.raises(RuntimeError), transaction() as session:
        publisher.request_dispatch(session)
        publisher.send("dreamq.finalize", ["j", 1, "k"], queue="cpu", task_id="j-1-finalize", session=session)
        raise RuntimeError("the change fails")
    assert publisher.dispatch_requests == 0 and publisher.sent == []
    publisher.request_dispatch()  # without a session: at once
    assert publisher.dispatch_requests == 1


def test_a_transition_that_lost_tells_no_listener(db_session):
    heard = []

    def listener(sender, **kwargs):
        heard.append(kwargs["change"])

    job_transitioned.connect(listener)
    try:
        # No such job: the compare-and-set matches nothing, so nothing changed and nobody hears of it.
        assert transition(db_session, uuid.uuid4(), JobState.queued, JobState.cancelled) is None
    finally:
        job_transitioned.disconnect(listener)
    assert heard == []
    assert db_session.execute(text("SELECT count(*) FROM job_events WHERE job_id IS NULL")).scalar() == 0


def test_the_rolled_back_session_keeps_its_writes_to_itself(db_session):
    name = f"savepoint-{uuid.uuid4().hex[:8]}"
    db_session.execute(text("INSERT INTO users (id, name, tier) VALUES (gen_random_uuid(), :n, 'api')"), {"n": name})
    db_session.commit()  # releases the savepoint only
    assert db_session.execute(text("SELECT count(*) FROM users WHERE name = :n"), {"n": name}).scalar() == 1
    with transaction() as other:
        assert other.execute(text("SELECT count(*) FROM users WHERE name = :n"), {"n": name}).scalar() == 0
