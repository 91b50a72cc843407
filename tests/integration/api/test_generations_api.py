"""The /v1/generations contract against real Postgres, Redis and S3 (Flask in-process).

Every bad input gets JSON naming the field and reason, the right status, and changes nothing.
"""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select, text

from app.api import schemas
from app.db.models import Job, JobEvent
from app.db.session import transaction
from tests.support.factories import auth


def job_count(user_id) -> int:
    with transaction() as session:
        return session.scalar(select(func.count()).select_from(Job).where(Job.user_id == user_id))


@pytest.fixture()
def user(make_user, parked_model):
    return make_user("api")


def post(client, key, body, **headers):
    return client.post("/v1/generations", json=body, headers={**auth(key), **headers})


def test_submit_returns_202_with_location_and_a_durable_job(client, user, parked_model):
    user_id, key = user
    response = post(client, key, {"prompt": "a red circle moving right", "model": "parked", "seed": 7})
    assert response.status_code == 202, response.json
    body = response.json
    schemas.Job.model_validate(body)
    assert response.headers["Location"] == f"/v1/generations/{body['id']}"
    assert body["state"] in ("queued", "dispatched", "running")
    assert body["tier"] == "api" and body["slo_s"] == 60.0
    assert body["model"] == {"name": "parked", "version": parked_model["version"], "digest": parked_model["digest"]}
    assert body["params"] == {"width": 32, "height": 32, "num_frames": 4, "fps": 8, "seed": 7}
    # 202 means committed: a fresh transaction sees the row and its creation event.
    with transaction() as session:
        job = session.get(Job, uuid.UUID(body["id"]))
        assert job is not None and job.user_id == user_id
        events = session.scalars(select(JobEvent.to_state).where(JobEvent.job_id == job.id)).all()
        assert events[0] == "queued"
    got = client.get(response.headers["Location"], headers=auth(key))
    assert got.status_code == 200 and got.json["id"] == body["id"]


BAD_BODIES = [
    ({"model": "parked"}, "prompt", "field required"),
    ({"prompt": "x", "model": "parked", "colour": "red"}, "colour", "unknown field"),
    ({"prompt": "", "model": "parked"}, "prompt", "must not be empty"),
    ({"prompt": "   ", "model": "parked"}, "prompt", "must not be empty"),
    ({"prompt": "x" * 2001, "model": "parked"}, "prompt", "at most 2000 characters"),
    ({"prompt": "bad\x00byte", "model": "parked"}, "prompt", "control characters"),
    ({"prompt": "x", "model": "parked", "width": 33}, "width", "multiple of 2"),
    ({"prompt": "x", "model": "parked", "width": 1000}, "width", "at most 256"),
    ({"prompt": "x", "model": "parked", "width": 99999}, "width", "less than or equal to 4096"),
    ({"prompt": "x", "model": "parked", "num_frames": 0}, "num_frames", "greater than or equal to 1"),
    ({"prompt": "x", "model": "parked", "num_frames": 65}, "num_frames", "at most 64"),
    ({"prompt": "x", "model": "parked", "fps": "fast"}, "fps", "valid integer"),
    ({"prompt": "x", "model": "parked", "seed": -1}, "seed", "greater than or equal to 0"),
    ({"prompt": "x", "model": "no-such-model"}, "model", "unknown model"),
    ({"prompt": "x", "model": "Tiny Model!"}, "model", "should match pattern"),
    ({"prompt": "x", "model": "parked", "model_version": 999}, "model_version", "no version 999"),
    ({"prompt": "x", "model": "parked", "type": "modify_video"}, "body", "upload_id is required"),
    (
        {"prompt": "x", "model": "parked", "upload_id": str(uuid.uuid4())},
        "body",
        "only allowed when type is modify_video",
    ),
    (
        {"prompt": "x", "model": "parked", "type": "modify_video", "upload_id": str(uuid.uuid4())},
        "upload_id",
        "no such upload",
    ),
    ({"prompt": "x", "model": "parked", "type": "image"}, "type", "Input should be"),
]


@pytest.mark.parametrize(("body", "field", "reason"), BAD_BODIES, ids=[f"{f}:{r[:20]}" for _, f, r in BAD_BODIES])
def test_bad_fields_are_422_naming_the_field_and_change_nothing(client, user, body, field, reason):
    user_id, key = user
    response = post(client, key, body)
    assert response.status_code == 422, response.json
    error = response.json["error"]
    assert error["code"] == "validation_error"
    assert error["request_id"] == response.headers["X-Request-Id"]
    matching = [f for f in error["fields"] if f["field"] == field]
    assert matching, error
    assert reason in matching[0]["reason"], matching
    assert job_count(user_id) == 0


def test_malformed_json_is_400(client, user):
    user_id, key = user
    response = client.post(
        "/v1/generations", data=b'{"prompt": "x",', headers={**auth(key), "Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json["error"]["code"] == "malformed_json"
    assert job_count(user_id) == 0


def test_json_that_is_not_an_object_is_422(client, user):
    user_id, key = user
    response = client.post("/v1/generations", json=["a red circle"], headers=auth(key))
    assert response.status_code == 422
    assert response.json["error"]["fields"][0]["field"] == "body"
    assert job_count(user_id) == 0


def test_wrong_content_type_is_415(client, user):
    user_id, key = user
    response = client.post(
        "/v1/generations", data="prompt=x", headers={**auth(key), "Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 415
    assert response.json["error"]["fields"][0]["field"] == "Content-Type"
    assert job_count(user_id) == 0


@pytest.mark.parametrize("header", [None, "Bearer", "Basic abc", "Bearer dq_not_a_real_key"])
def test_missing_or_bad_key_is_401(client, header):
    headers = {"Authorization": header} if header else {}
    response = client.post("/v1/generations", json={"prompt": "x"}, headers=headers)
    assert response.status_code == 401
    assert response.json["error"]["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_revoked_key_is_401_and_changes_nothing(client, user):
    user_id, key = user
    from app.admin.keys import hash_key

    with transaction() as session:
        session.execute(text("UPDATE api_keys SET revoked_at = now() WHERE key_hash = :h"), {"h": hash_key(key)})
    response = post(client, key, {"prompt": "x", "model": "parked"})
    assert response.status_code == 401
    assert "revoked" in response.json["error"]["message"]
    assert job_count(user_id) == 0


def test_key_without_user_scope_is_403(client, make_user, parked_model):
    user_id, key = make_user("api", scopes=())
    response = post(client, key, {"prompt": "x", "model": "parked"})
    assert response.status_code == 403
    assert "scope" in response.json["error"]["message"]
    assert job_count(user_id) == 0


def test_another_users_job_is_404_everywhere(client, user, make_user):
    _, key = user
    job_id = post(client, key, {"prompt": "mine", "model": "parked"}).json["id"]
    _, other_key = make_user("free")
    for response in (
        client.get(f"/v1/generations/{job_id}", headers=auth(other_key)),
        client.post(f"/v1/generations/{job_id}/cancel", headers=auth(other_key)),
        client.get(f"/v1/generations/{uuid.uuid4()}", headers=auth(key)),
        client.get("/v1/generations/not-a-uuid", headers=auth(key)),
    ):
        assert response.status_code == 404
        assert response.json["error"]["code"] == "not_found"
    listed = client.get("/v1/generations", headers=auth(other_key)).json
    assert listed["data"] == []
    # The owner's job is untouched by the other user's cancel.
    assert client.get(f"/v1/generations/{job_id}", headers=auth(key)).json["cancel_requested"] is False


def test_list_pages_with_a_cursor_and_filters_by_state(client, user):
    _, key = user
    ids = [post(client, key, {"prompt": f"job {i}", "model": "parked"}).json["id"] for i in range(5)]
    client.post(f"/v1/generations/{ids[0]}/cancel", headers=auth(key))
    seen, cursor, pages = [], None, 0
    while True:
        query = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/generations", query_string=query, headers=auth(key)).json
        schemas.JobList.model_validate(page)
        seen += [job["id"] for job in page["data"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids)) and pages == 3
    cancelled = client.get("/v1/generations", query_string={"state": "cancelled"}, headers=auth(key)).json["data"]
    assert [job["id"] for job in cancelled] == [ids[0]]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"state": "done"}, "state"),
        ({"cursor": "garbage"}, "cursor"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_list_queries_are_422(client, user, query, field):
    _, key = user
    response = client.get("/v1/generations", query_string=query, headers=auth(key))
    assert response.status_code == 422
    assert response.json["error"]["fields"][0]["field"] == field


def test_cancel_a_queued_job_then_again_is_409(client, make_user, parked_model):
    # No worker serves `parked`: the job is queued or dispatched, and either cancels at once.
    _, key = make_user("free")
    job = post(client, key, {"prompt": "cancel me", "model": "parked"}).json
    response = client.post(f"/v1/generations/{job['id']}/cancel", headers=auth(key))
    assert response.status_code == 202
    assert response.json["state"] == "cancelled"
    again = client.post(f"/v1/generations/{job['id']}/cancel", headers=auth(key))
    assert again.status_code == 409
    assert again.json["error"]["code"] == "job_finished"


def test_idempotency_key_returns_the_same_job_and_conflicts_on_a_different_body(client, user):
    user_id, key = user
    first = post(client, key, {"prompt": "once", "model": "parked", "seed": 1}, **{"Idempotency-Key": "abc-1"})
    again = post(client, key, {"prompt": "once", "model": "parked", "seed": 1}, **{"Idempotency-Key": "abc-1"})
    assert first.status_code == 202 and again.status_code == 200
    assert first.json["id"] == again.json["id"]
    different = post(client, key, {"prompt": "twice", "model": "parked", "seed": 1}, **{"Idempotency-Key": "abc-1"})
    assert different.status_code == 409
    assert different.json["error"]["code"] == "idempotency_conflict"
    assert job_count(user_id) == 1


def test_openapi_document_describes_every_route_from_the_schemas(client):
    doc = client.get("/v1/openapi.json").json
    assert doc["openapi"].startswith("3.1")
    create = doc["paths"]["/v1/generations"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/GenerationCreate")
    assert {"202", "401", "415", "422"} <= set(create["responses"])
    props = doc["components"]["schemas"]["GenerationCreate"]["properties"]
    assert {"prompt", "model", "width", "height", "num_frames", "upload_id"} <= set(props)
    assert "/v1/uploads" in doc["paths"] and "/v1/generations/{job_id}/cancel" in doc["paths"]
    assert doc["paths"]["/v1/generations/{job_id}"]["get"]["security"] == [{"bearer": []}]


def test_health_and_readiness(client):
    assert client.get("/healthz").json["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json["checks"] == {"database": "ok", "redis": "ok", "object_storage": "ok"}


def test_unknown_route_and_method_are_json(client):
    assert client.get("/v1/nope").json["error"]["code"] == "not_found"
    response = client.delete("/v1/generations")
    assert response.status_code == 405 and response.json["error"]["code"] == "method_not_allowed"
