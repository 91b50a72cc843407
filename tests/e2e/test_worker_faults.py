"""Worker faults on real workers: a warm shutdown requeues the running job at once.

A video job can run for minutes; a worker asked to stop (deploy, scale-down, preemption) must not
hold the shutdown that long, and must not lose the job either. The worker is marked draining,
the model stops at its next step, the job goes back to the queue without counting an attempt,
and another worker finishes it.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text

from app.db.session import transaction
from tests.support.factories import auth, create_user
from tests.support.stack import TINY_BUNDLE, push_fixture_model, running_workers

pytestmark = pytest.mark.slow


def job_row(job_id: str):
    with transaction() as session:
        return session.execute(text("SELECT state, attempts, progress FROM jobs WHERE id = :id"), {"id": job_id}).one()


def test_a_warm_shutdown_requeues_the_running_job_at_once_and_another_worker_finishes_it(
    client, stack_env, tmp_path_factory
):
    push_fixture_model("drain", TINY_BUNDLE, dispatch_limit=2)
    _, key = create_user("api")
    logs = tmp_path_factory.mktemp("drain-logs")
    env = {"DREAMQ_TINY_STEP_S": "0.3"}
    with running_workers(stack_env, logs, models=["drain"], control=1, tag="dr1", extra_env=env) as first:
        # 60 steps of 0.3 s: 18 s of work if it ran to the end (the fixture allows 64 frames).
        response = client.post(
            "/v1/generations", json={"prompt": "long", "model": "drain", "num_frames": 60}, headers=auth(key)
        )
        assert response.status_code == 202, response.json
        job = response.json
        deadline = time.monotonic() + 30
        while job_row(job["id"]).state != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        started = time.monotonic()
        outcome = first["procs"][first["gpu_workers"][0]].stop(grace_s=15)  # SIGTERM: warm shutdown
        shutdown_s = time.monotonic() - started
        row = job_row(job["id"])
        assert outcome == "terminated"
        assert shutdown_s < 8, f"warm shutdown took {shutdown_s:.1f}s: it waited for the job"
        assert (row.state, row.attempts) == ("queued", 0)
        with transaction() as session:
            detail = session.execute(
                text(
                    "SELECT detail FROM job_events WHERE job_id = :id AND to_state = 'queued' ORDER BY id DESC LIMIT 1"
                ),
                {"id": job["id"]},
            ).scalar_one()
        assert detail["reason"] == "worker_draining" and detail["at_step"] < 60
    print(
        f"\nwarm shutdown with an 18 s job running: worker gone in {shutdown_s:.1f}s, job requeued "
        f"at step {detail['at_step']}"
    )
    with running_workers(
        stack_env, logs, models=["drain"], control=1, tag="dr2", extra_env={"DREAMQ_TINY_STEP_S": "0"}
    ):
        deadline = time.monotonic() + 60
        while job_row(job["id"]).state not in ("succeeded", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert tuple(job_row(job["id"]))[:2] == ("succeeded", 1)
