"""A job's life on its worker (app/jobs/execution.py) against real Postgres, in-memory publisher.

Submission, claim, progress (with cancel and drain), and each ending: stopped at a step,
requeued for a drain, handed off to finalize, completed (once only), failed. Every test makes
its own user, job and worker row on model `parked` (a pool no real worker consumes), and the
fixture `lane` takes its jobs and workers out of the way at the end: a live fake worker left
in local.parked would be capacity other tests (and any running dispatcher) would see.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import pytest
from sqlalchemy import event, text
from sqlalchemy.orm import Session

from app.api.auth import principal_for_key
from app.api.schemas import GenerationCreate
from app.core.logging_setup import job_context
from app.core.queues import CPU_QUEUE
from app.core.signals import job_started
from app.db.models import JobState
from app.db.session import transaction
from app.jobs import execution
from app.jobs.execution import (
    ProgressReporter,
    claim,
    complete,
    fail,
    hand_off,
    requeue_for_drain,
    stop_at_step,
)
from app.jobs.submit import submit
from app.jobs.transitions import INCREMENT, NOW, transition
from app.jobs.workers import heartbeat
from tests.support.factories import create_user

MODEL = "parked"
CLUSTER = "local"  # push_fixture_model gives `parked` the pool local.parked


def job_row(job_id) -> dict:
    with transaction() as session:
        return dict(session.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": str(job_id)}).mappings().one())


def events(job_id) -> list[dict]:
    with transaction() as session:
        return [
            dict(r)
            for r in session.execute(
                text("SELECT from_state, to_state, worker_id, detail FROM job_events WHERE job_id = :id ORDER BY id"),
                {"id": str(job_id)},
            ).mappings()
        ]


def worker_row(worker_id: str) -> dict:
    with transaction() as session:
        return dict(session.execute(text("SELECT * FROM workers WHERE id = :id"), {"id": worker_id}).mappings().one())


@contextlib.contextmanager
def at_commits(publisher, fail: bool = False):
    """What the publisher had recorded at each commit inside the block: (dispatch_requests,
    len(sent)). With `fail`, each commit raises instead (the transaction rolls back)."""
    seen: list[tuple[int, int]] = []

    def before_commit(session):
        seen.append((publisher.dispatch_requests, len(publisher.sent)))
        if fail:
            raise RuntimeError("commit refused by the test")

    event.listen(Session, "before_commit", before_commit)
    try:
        yield seen
    finally:
        event.remove(Session, "before_commit", before_commit)


class Lane:
    """One test's user, jobs and worker rows on the parked pool."""

    def __init__(self) -> None:
        self.job_ids: list[uuid.UUID] = []
        self.worker_ids: list[str] = []
        self.tier = "api"
        self.user_id, self.key = create_user(self.tier, name=f"exec-{uuid.uuid4().hex[:12]}")

    def principal(self, session):
        return principal_for_key(session, self.key, "user")

    def submit(self, session, prompt: str = "a red circle moving right"):
        job, version = submit(session, self.principal(session), GenerationCreate(prompt=prompt, model=MODEL))
        self.job_ids.append(job.id)
        return job, version

    def queued_job(self) -> uuid.UUID:
        with transaction() as session:
            job, _ = self.submit(session)
        return job.id

    def dispatched_job(self) -> tuple[uuid.UUID, int]:
        """A queued job moved to dispatched as the dispatcher does; returns (id, dispatch_seq)."""
        job_id = self.queued_job()
        with transaction() as session:
            pool_id = session.execute(
                text(
                    "SELECT p.id FROM pools p JOIN clusters c ON c.id = p.cluster_id JOIN models m ON m.id = p.model_id "
                    "WHERE c.name = :c AND m.name = :m"
                ),
                {"c": CLUSTER, "m": MODEL},
            ).scalar_one()
            left = transition(
                session,
                job_id,
                JobState.queued,
                JobState.dispatched,
                pool_id=pool_id,
                dispatched_at=NOW,
                dispatch_seq=INCREMENT,
            )
            assert left == "queued"
            seq = session.execute(
                text("SELECT dispatch_seq FROM jobs WHERE id = :id"), {"id": str(job_id)}
            ).scalar_one()
        return job_id, seq

    def worker(self) -> str:
        worker_id = f"exec-{uuid.uuid4().hex[:10]}@test-host"
        with transaction() as session:
            heartbeat(session, worker_id, CLUSTER, MODEL, "idle", fresh=True)
        self.worker_ids.append(worker_id)
        return worker_id

    def running_job(self) -> tuple[execution.ClaimedJob, str]:
        job_id, seq = self.dispatched_job()
        worker_id = self.worker()
        job = claim(str(job_id), seq, worker_id)
        assert job is not None and job_row(job_id)["state"] == "running"
        return job, worker_id

    def close(self) -> None:
        with transaction() as session:
            session.execute(
                text(
                    "UPDATE jobs SET state = 'cancelled', finished_at = now() WHERE id = ANY(CAST(:ids AS uuid[])) "
                    "AND state IN ('queued', 'dispatched', 'running')"
                ),
                {"ids": [str(i) for i in self.job_ids]},
            )
            session.execute(text("DELETE FROM workers WHERE id = ANY(:ids)"), {"ids": self.worker_ids})


@pytest.fixture()
def lane(stack_env, parked_model, publisher):
    # claim() binds the job's user and tier to this thread's log lines, inside the job_context
    # the GPU task opens around it; here the test opens it, so nothing leaks into later tests'
    # log lines (tests/integration/observability/test_logs.py checks lines outside any job).
    with job_context():
        lane = Lane()
        try:
            yield lane
        finally:
            lane.close()


def test_submit_publishes_one_dispatch_request_only_after_the_commit(lane, publisher, parked_model):
    with transaction() as session:
        job, version = lane.submit(session)
        session.flush()
        # Inside the transaction: recorded for after the commit, not yet published.
        assert publisher.dispatch_requests == 0
    assert publisher.dispatch_requests == 1
    assert publisher.releases == [] and publisher.sent == []
    assert version.number == parked_model["version"] and version.digest == parked_model["digest"]

    row = job_row(job.id)
    assert row["state"] == "queued" and row["user_id"] == lane.user_id and row["tier"] == lane.tier
    assert row["attempts"] == 0 and row["dispatch_seq"] == 0 and row["worker_id"] is None
    assert row["params"]["width"] > 0 and isinstance(row["params"]["seed"], int)
    assert events(job.id) == [
        {
            "from_state": None,
            "to_state": "queued",
            "worker_id": None,
            "detail": {"model": MODEL, "version": parked_model["version"]},
        }
    ]


def test_a_rolled_back_submission_stores_and_publishes_nothing(lane, publisher):
    class Boom(Exception):
        pass

    job_id = None
    with pytest.raises(Boom):
        with transaction() as session:
            job, _ = lane.submit(session)
            job_id = job.id
            raise Boom
    assert publisher.dispatch_requests == 0
    with transaction() as session:
        assert session.execute(text("SELECT count(*) FROM jobs WHERE id = :id"), {"id": str(job_id)}).scalar_one() == 0


def test_claim_runs_the_job_on_the_registered_worker_and_a_stale_seq_claims_nothing(lane, publisher):
    job_id, seq = lane.dispatched_job()
    assert seq == 1
    worker_id = lane.worker()
    worker = worker_row(worker_id)
    assert worker["state"] == "idle" and worker["current_job_id"] is None and worker["info"]["loaded"] == []
    with transaction() as session:
        pool_id = session.execute(text("SELECT pool_id FROM jobs WHERE id = :id"), {"id": str(job_id)}).scalar_one()
    assert worker["pool_id"] == pool_id is not None

    heard: list[dict] = []

    def on_start(sender, **kwargs):
        heard.append(kwargs)

    job_started.connect(on_start)
    try:
        # A message from another dispatch (wrong dispatch_seq): nothing changes.
        assert claim(str(job_id), seq + 1, worker_id) is None
        assert claim(str(job_id), seq - 1, worker_id) is None
        row = job_row(job_id)
        assert row["state"] == "dispatched" and row["attempts"] == 0 and row["started_at"] is None
        assert row["worker_id"] is None
        assert [e["to_state"] for e in events(job_id)] == ["queued", "dispatched"]
        assert worker_row(worker_id)["state"] == "idle" and worker_row(worker_id)["current_job_id"] is None
        assert heard == []

        job = claim(str(job_id), seq, worker_id)
    finally:
        job_started.disconnect(on_start)

    assert job is not None
    assert (job.id, job.user_id, job.tier, job.model, job.attempts, job.dispatch_seq) == (
        job_id,
        lane.user_id,
        lane.tier,
        MODEL,
        1,
        seq,
    )
    assert job.kind == "text_to_video" and job.upload_key is None and job.digest.startswith("sha256:")
    row = job_row(job_id)
    assert row["state"] == "running" and row["attempts"] == 1 and row["worker_id"] == worker_id
    assert row["progress"] == 0.0 and row["started_at"] is not None and row["dispatch_seq"] == seq
    assert events(job_id)[-1] == {
        "from_state": "dispatched",
        "to_state": "running",
        "worker_id": worker_id,
        "detail": {},
    }
    assert len(events(job_id)) == 3
    worker = worker_row(worker_id)
    assert worker["state"] == "busy" and worker["current_job_id"] == job_id
    assert len(heard) == 1 and heard[0]["tier"] == lane.tier and heard[0]["wait_s"] >= 0
    # The claim itself publishes nothing; only the submission's dispatch request is recorded.
    assert publisher.dispatch_requests == 1 and publisher.sent == []

    # The same message again in this process, which claimed it and still runs: a duplicate (the
    # job may be in this process's tail or waiting for finalize), not a lost child's redelivery.
    assert claim(str(job_id), seq, worker_id) is None
    assert job_row(job_id)["attempts"] == 1
    # The same message in a new child of this worker (Celery requeues it there when the child
    # running it dies; the new child has claimed nothing): running -> running, an attempt counted.
    execution._recent_claims.clear()
    again = claim(str(job_id), seq, worker_id)
    assert again is not None and again.attempts == 2
    assert job_row(job_id)["attempts"] == 2
    # ...but not from another worker while the lease is fresh.
    other = lane.worker()
    assert claim(str(job_id), seq, other) is None
    assert job_row(job_id)["worker_id"] == worker_id and job_row(job_id)["attempts"] == 2
    assert worker_row(other)["state"] == "idle"


def test_progress_is_throttled_and_a_cancel_stops_the_job_at_a_step(lane, publisher, monkeypatch):
    job, worker_id = lane.running_job()
    reporter = ProgressReporter(job.id, job.dispatch_seq, worker_id)

    assert reporter(5, 10) is True
    assert job_row(job.id)["progress"] == pytest.approx(0.45)
    # Within PROGRESS_INTERVAL_S and not the last step: no write.
    assert reporter(6, 10) is True
    assert job_row(job.id)["progress"] == pytest.approx(0.45)

    monkeypatch.setattr(execution, "PROGRESS_INTERVAL_S", 0.0)
    assert reporter(2, 3) is True
    assert job_row(job.id)["progress"] == pytest.approx(round(0.9 * 2 / 3, 4))

    with transaction() as session:
        session.execute(text("UPDATE jobs SET cancel_requested = true WHERE id = :id"), {"id": str(job.id)})
    assert reporter(7, 10) is False
    assert reporter.draining is False and reporter.steps == 4
    assert job_row(job.id)["progress"] == pytest.approx(0.63)

    before = publisher.dispatch_requests
    with at_commits(publisher) as seen:
        assert stop_at_step(job, worker_id, reporter.steps) is True
    assert seen == [(before, 0)] and publisher.dispatch_requests == before + 1
    row = job_row(job.id)
    assert row["state"] == "cancelled" and row["finished_at"] is not None
    assert events(job.id)[-1] == {
        "from_state": "running",
        "to_state": "cancelled",
        "worker_id": worker_id,
        "detail": {"at_step": 4},
    }
    worker = worker_row(worker_id)
    assert worker["state"] == "idle" and worker["current_job_id"] is None

    # The job has left running: progress writes stop, and a second stop changes nothing.
    assert reporter(8, 10) is False
    assert job_row(job.id)["progress"] == pytest.approx(0.63)
    n_events = len(events(job.id))
    assert stop_at_step(job, worker_id, reporter.steps) is False
    assert job_row(job.id)["state"] == "cancelled" and len(events(job.id)) == n_events


def test_a_draining_worker_stops_the_job_and_requeues_it_uncounted(lane, publisher):
    job, worker_id = lane.running_job()
    assert job.attempts == 1
    with transaction() as session:
        session.execute(text("UPDATE workers SET state = 'draining' WHERE id = :w"), {"w": worker_id})
    reporter = ProgressReporter(job.id, job.dispatch_seq, worker_id)
    assert reporter(1, 10) is False
    assert reporter.draining is True

    before = publisher.dispatch_requests
    with at_commits(publisher) as seen:
        requeue_for_drain(job, worker_id, reporter.steps)
    assert seen == [(before, 0)] and publisher.dispatch_requests == before + 1
    row = job_row(job.id)
    assert row["state"] == "queued" and row["attempts"] == 0 and row["progress"] == 0.0
    assert events(job.id)[-1] == {
        "from_state": "running",
        "to_state": "queued",
        "worker_id": worker_id,
        "detail": {"reason": "worker_draining", "at_step": 1},
    }
    worker = worker_row(worker_id)
    # Draining stays draining (no capacity again), but the job is no longer its.
    assert worker["state"] == "draining" and worker["current_job_id"] is None


def test_complete_succeeds_once_and_a_late_second_completion_loses(lane, publisher):
    job, worker_id = lane.running_job()
    video_key, thumb_key = f"outputs/{job.id}/video.mp4", f"outputs/{job.id}/thumb.jpg"
    before = publisher.dispatch_requests

    assert complete(job.id, job.dispatch_seq, video_key, thumb_key, {"step": "encoded"}, worker_id=worker_id, job_s=1.5)
    assert publisher.dispatch_requests == before + 1
    row = job_row(job.id)
    assert row["state"] == "succeeded" and row["progress"] == 1.0 and row["finished_at"] is not None
    assert (row["video_key"], row["thumbnail_key"]) == (video_key, thumb_key)
    assert events(job.id)[-1] == {
        "from_state": "running",
        "to_state": "succeeded",
        "worker_id": worker_id,
        "detail": {"step": "encoded"},
    }
    worker = worker_row(worker_id)
    assert worker["state"] == "idle" and worker["current_job_id"] is None
    assert float(worker["info"]["job_s"]) == 1.5

    # A duplicate finalize for the same dispatch: loses, its (other) outputs are discarded.
    n_events = len(events(job.id))
    assert not complete(
        job.id, job.dispatch_seq, f"outputs/{job.id}/late.mp4", f"outputs/{job.id}/late.jpg", {}, worker_id=worker_id
    )
    row = job_row(job.id)
    assert row["state"] == "succeeded" and (row["video_key"], row["thumbnail_key"]) == (video_key, thumb_key)
    assert len(events(job.id)) == n_events
    assert publisher.dispatch_requests == before + 2


def test_fail_records_the_code_and_a_truncated_message(lane, publisher):
    job, worker_id = lane.running_job()
    before = publisher.dispatch_requests
    with at_commits(publisher) as seen:
        fail(job, worker_id, "model_error", "x" * 3000, job_s=2.0)
    assert seen == [(before, 0)] and publisher.dispatch_requests == before + 1
    row = job_row(job.id)
    assert row["state"] == "failed" and row["failure_code"] == "model_error"
    assert row["failure_message"] == "x" * 2000 and row["finished_at"] is not None
    assert (events(job.id)[-1]["from_state"], events(job.id)[-1]["to_state"]) == ("running", "failed")
    worker = worker_row(worker_id)
    assert worker["state"] == "idle" and worker["current_job_id"] is None
    assert float(worker["info"]["job_s"]) == 2.0

    # A failure for a job that already ended changes nothing.
    fail(job, worker_id, "other", "y")
    assert job_row(job.id)["failure_code"] == "model_error"


def test_hand_off_stages_the_job_for_finalize_after_the_commit(lane, publisher):
    job, worker_id = lane.running_job()
    key = f"staging/{job.id}/frames.npz"
    before = publisher.dispatch_requests

    # A hand-off whose commit fails leaves nothing: no progress, no event, no finalize task.
    n_events = len(events(job.id))
    with at_commits(publisher, fail=True), pytest.raises(RuntimeError, match="refused by the test"):
        hand_off(job, worker_id, key, 24, 1.23456, 0.5, claimed_at=None)
    assert publisher.sent == [] and publisher.dispatch_requests == before
    assert job_row(job.id)["progress"] == 0.0 and len(events(job.id)) == n_events
    assert worker_row(worker_id)["state"] == "busy"

    with at_commits(publisher) as seen:
        hand_off(job, worker_id, key, 24, 1.23456, 0.5, claimed_at=None)
    assert seen == [(before, 0)]  # nothing sent before the commit
    assert publisher.sent == [
        (
            "dreamq.finalize",
            (str(job.id), job.dispatch_seq, key),
            CPU_QUEUE,
            None,
            f"{job.id}-{job.dispatch_seq}-finalize",
        )
    ]
    assert CPU_QUEUE == "cpu"
    assert publisher.dispatch_requests == before  # room opens when finalize completes, not here
    row = job_row(job.id)
    assert row["state"] == "running" and row["progress"] == pytest.approx(0.95)
    assert events(job.id)[-1] == {
        "from_state": "running",
        "to_state": "running",
        "worker_id": worker_id,
        "detail": {"step": "generated", "generate_s": 1.235, "model_load_s": 0.5},
    }
    worker = worker_row(worker_id)
    assert worker["state"] == "idle" and worker["current_job_id"] is None
    assert float(worker["info"]["job_s"]) >= 0
    assert len(events(job.id)) == n_events + 1


def test_since_claim_measures_from_the_last_claim_or_the_given_time(monkeypatch):
    monkeypatch.setattr(execution, "_claimed_at", None)
    assert execution.since_claim() is None and execution.claimed_at() is None
    assert 9.9 <= execution.since_claim(time.monotonic() - 10) < 11
    monkeypatch.setattr(execution, "_claimed_at", time.monotonic() - 5)
    assert 4.9 <= execution.since_claim() < 6
