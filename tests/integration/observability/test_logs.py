"""Structured JSON logs: every line about a job names the job, its user and its tier, in the API,
the dispatcher and the workers (real Postgres, Redis and S3; the tasks run in this process)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import uuid
from typing import Iterator

import numpy as np
import pytest
from sqlalchemy import text

from app.core.config import get_settings
from app.core.logging_setup import JsonFormatter, job_context
from app.core.storage import put_bytes
from app.db.session import transaction
from app.messaging import Release
from tests.support.factories import auth, create_user

pytestmark = pytest.mark.usefixtures("parked_model")


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter("test"))
        self.lines: list[dict] = []

    def emit(self, record):
        self.lines.append(json.loads(self.format(record)))


@contextlib.contextmanager
def captured() -> Iterator[list[dict]]:
    capture = _Capture()
    root = logging.getLogger()
    level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    try:
        yield capture.lines
    finally:
        root.removeHandler(capture)
        root.setLevel(level)


def submit(client, key) -> str:
    response = client.post("/v1/generations", json={"prompt": "a red circle", "model": "parked"}, headers=auth(key))
    assert response.status_code == 202, response.json
    return response.json["id"]


def assert_job_lines(lines: list[dict], job_id: str, user_id, tier: str, at_least: int = 1) -> list[dict]:
    about = [line for line in lines if line.get("job_id") == job_id]
    assert len(about) >= at_least, lines
    for line in about:
        assert line.get("user_id") == str(user_id) and line.get("tier") == tier, line
    return about


def make_running(job_id: str, *, state: str = "running", attempts: int = 1) -> int:
    with transaction() as session:
        return session.execute(
            text(
                "UPDATE jobs SET state = :s, attempts = :a, dispatch_seq = dispatch_seq + 1, started_at = now(), "
                "pool_id = (SELECT p.id FROM pools p JOIN models m ON m.id = p.model_id WHERE m.name = 'parked') "
                "WHERE id = :id RETURNING dispatch_seq"
            ),
            {"s": state, "a": attempts, "id": job_id},
        ).scalar_one()


def test_api_request_lines_carry_the_job_its_user_and_tier(client, make_user):
    user_id, key = make_user("light")
    _, admin_key = create_user("enterprise", scopes=("user", "admin"))
    with captured() as lines:
        job_id = submit(client, key)
        assert client.get(f"/v1/generations/{job_id}", headers=auth(key)).status_code == 200
        # An admin reading the job: the line names the job's owner and tier, not the admin's.
        assert client.get(f"/v1/generations/{job_id}", headers=auth(admin_key)).status_code == 200
        assert client.post(f"/v1/generations/{job_id}/cancel", headers=auth(key)).status_code == 202
        assert client.get("/v1/generations", headers=auth(key)).status_code == 200
        assert client.get("/v1/openapi.json").status_code == 200
        logging.getLogger("app.test").info("after the requests")
    requests = [line for line in lines if line["msg"] == "request"]
    created = next(r for r in requests if r["method"] == "POST" and r["path"] == "/v1/generations")
    assert created["status"] == 202 and created["request_id"]
    about = assert_job_lines(lines, job_id, user_id, "light", at_least=4)
    assert created in about
    assert {r["path"] for r in about if r["msg"] == "request"} == {
        f"/v1/generations/{job_id}",
        f"/v1/generations/{job_id}/cancel",
        "/v1/generations",
    }
    listed = next(r for r in requests if r["method"] == "GET" and r["path"] == "/v1/generations")
    assert listed["user_id"] == str(user_id) and listed["tier"] == "light" and "job_id" not in listed
    # Nothing bound by one request reaches the next one, or a line outside any request.
    public = next(r for r in requests if r["path"] == "/v1/openapi.json")
    assert not {"job_id", "user_id", "tier"} & set(public)
    outside = next(line for line in lines if line["msg"] == "after the requests")
    assert not {"job_id", "user_id", "tier", "request_id"} & set(outside)


def test_dispatcher_lines_about_a_returned_job_carry_its_user_and_tier(client, make_user):
    from tasks.dispatch import return_to_queue

    user_id, key = make_user("free")
    job_id = submit(client, key)
    seq = make_running(job_id, state="dispatched", attempts=0)
    with captured() as lines:
        assert return_to_queue([Release(uuid.UUID(job_id), "local.parked.free", seq, "free", user_id)]) == 1
    (line,) = assert_job_lines(lines, job_id, user_id, "free")
    assert line["level"] == "warning" and line["dispatch_seq"] == seq
    with transaction() as session:
        session.execute(text("UPDATE jobs SET state = 'cancelled', finished_at = now() WHERE id = :id"), {"id": job_id})


def test_worker_lines_carry_the_job_its_user_and_tier(client, make_user):
    """The claim (GPU task) and finalize (CPU task) bind user and tier as soon as they read the job."""
    from app.jobs.execution import claim
    from app.jobs.outputs import staging_key
    from tasks.finalize import finalize

    user_id, key = make_user("unlimited")
    lost = submit(client, key)
    with transaction() as session:
        max_attempts = session.execute(text("SELECT max_attempts FROM jobs WHERE id = :id"), {"id": lost}).scalar_one()
    seq = make_running(lost, state="dispatched", attempts=max_attempts)
    with captured() as lines, job_context(job_id=lost):  # as the task does
        assert claim(lost, seq, "test-worker@h") is None  # one attempt too many: it fails the job
    (line,) = [line for line in assert_job_lines(lines, lost, user_id, "unlimited") if line["level"] == "warning"]
    assert line["msg"].startswith("job failed")

    done = submit(client, key)
    seq = make_running(done)
    frames = np.zeros((6, 32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    np.save(buffer, frames, allow_pickle=False)
    key_ = staging_key(uuid.UUID(done), seq)
    put_bytes(get_settings().media_bucket, key_, buffer.getvalue())
    with captured() as lines:
        finalize(done, seq, key_)
    about = assert_job_lines(lines, done, user_id, "unlimited")
    assert any(line["msg"] == "finalized" and line["succeeded"] for line in about)
    with transaction() as session:
        assert session.execute(text("SELECT state FROM jobs WHERE id = :id"), {"id": done}).scalar_one() == "succeeded"
