"""POST /v1/generations' common case runs without an ORM Session (app/api/generations.py,
`_create_generation_fast`): what it must keep from the general path when things fail."""

from __future__ import annotations

import uuid

from sqlalchemy import create_engine, func, select, text

import app.api.generations as generations
import app.jobs.submit as submission
from app.db.models import Job
from app.db.session import driver_connection, transaction
from tests.support.factories import auth, create_tier, create_user


def jobs_of(user_id) -> int:
    with transaction() as session:
        return session.scalar(select(func.count()).select_from(Job).where(Job.user_id == user_id))


def submit(client, key):
    return client.post("/v1/generations", json={"prompt": "x", "model": "parked"}, headers=auth(key))


def test_a_failed_insert_gives_its_token_back(client, parked_model, monkeypatch):
    user_id, key = create_user(create_tier(rate_per_min=6, burst=2))
    real = submission.insert_params

    def dangling_version(*args, **kwargs):
        params = real(*args, **kwargs)
        params["model_version_id"] = uuid.uuid4()  # the foreign key refuses the row
        return params

    monkeypatch.setattr(submission, "insert_params", dangling_version)
    try:
        failed = submit(client, key).status_code
    except Exception:  # the test app may propagate the IntegrityError instead of answering 500
        failed = 500
    assert failed == 500
    monkeypatch.setattr(submission, "insert_params", real)
    # The failed request stored nothing and cost nothing: the whole burst is still there.
    assert [submit(client, key).status_code for _ in range(3)] == [202, 202, 429]
    assert jobs_of(user_id) == 2


def test_an_unreachable_database_answers_503_with_retry_after(client, parked_model, monkeypatch):
    _, key = create_user("api")
    dead = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", connect_args={"connect_timeout": 2})
    monkeypatch.setattr(generations, "driver_connection", lambda: driver_connection(dead))
    response = submit(client, key)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.json["error"]["code"] == "unavailable"


def test_dropped_connections_answer_503_once_then_the_pool_reconnects(client, parked_model):
    user_id, key = create_user("api")
    assert submit(client, key).status_code == 202
    with transaction() as session:
        session.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'dreamq' AND pid <> pg_backend_pid()"
            )
        )
    codes = [submit(client, key).status_code for _ in range(3)]
    # A connection used within the last second is not pinged: its request may see the restart
    # (503, never a 500); the pool then drops every older connection and the next ones succeed.
    assert codes[0] in (202, 503) and codes[1:] == [202, 202]
    assert jobs_of(user_id) == 1 + codes.count(202)
