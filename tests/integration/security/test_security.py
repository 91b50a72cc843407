"""Security properties users trust dreamq with, against real Postgres, Redis, S3 and Celery.

Tenancy (another tenant's ids are indistinguishable from missing ones), scopes on every route,
keys stored as hashes, JSON-only Celery, no pickled checkpoints, upload limits, no key in any log
line, expiring pre-signed URLs and Flower behind basic auth.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import logging
import re
import time
import uuid
from pathlib import Path

import pytest
import requests
from sqlalchemy import text

from app.admin.keys import display_prefix, hash_key
from app.api.routing import REGISTRY
from app.core import config
from app.core.logging_setup import JsonFormatter
from app.core.storage import presign_get, put_bytes
from app.db.models import ApiKey
from app.db.session import transaction
from tests.support.factories import auth
from tests.support.media import moving_square_mp4


@pytest.fixture()
def alice(make_user, parked_model):
    return make_user("api")


@pytest.fixture()
def bob(make_user, parked_model):
    return make_user("api")


def submit(client, key, **body):
    response = client.post(
        "/v1/generations", json={"prompt": "a red circle", "model": "parked", **body}, headers=auth(key)
    )
    assert response.status_code == 202, response.json
    return response.json["id"]


def without_request_id(body: dict) -> dict:
    return {**body, "error": {k: v for k, v in body["error"].items() if k != "request_id"}}


def sample_path(rule: str, job_id: str) -> str:
    """A concrete URL for a Flask rule: job ids get `job_id`, other parameters a plausible value."""

    def value(match: re.Match) -> str:
        name = match.group(1)
        if name == "job_id":
            return job_id
        if name == "number":
            return "1"
        if name.endswith("_id"):
            return str(uuid.uuid4())
        return "parked"

    return re.sub(r"<(?:[a-z]+(?:\([^)]*\))?:)?([a-z_]+)>", value, rule)


# --- tenancy ---------------------------------------------------------------------------------


def test_another_tenants_job_answers_exactly_like_a_missing_one(client, alice, bob):
    _, alice_key = alice
    _, bob_key = bob
    job_id = submit(client, alice_key)
    missing = str(uuid.uuid4())
    job_routes = [s for s in REGISTRY if "<job_id>" in s.rule]
    assert {"/v1/generations/<job_id>", "/v1/generations/<job_id>/cancel"} <= {s.rule for s in job_routes}
    for spec in job_routes:
        for method in spec.methods:
            foreign = client.open(sample_path(spec.rule, job_id), method=method, headers=auth(bob_key))
            absent = client.open(sample_path(spec.rule, missing), method=method, headers=auth(bob_key))
            assert foreign.status_code == absent.status_code == 404, (spec.rule, foreign.json)
            assert without_request_id(foreign.json) == without_request_id(absent.json), spec.rule
    # Bob's cancel changed nothing; Alice still sees her job queued, and Bob's list never shows it.
    mine = client.get(f"/v1/generations/{job_id}", headers=auth(alice_key))
    assert mine.status_code == 200 and mine.json["state"] == "queued" and not mine.json["cancel_requested"]
    assert job_id not in {j["id"] for j in client.get("/v1/generations", headers=auth(bob_key)).json["data"]}


def test_another_tenants_upload_cannot_be_used(client, alice, bob):
    _, alice_key = alice
    _, bob_key = bob
    upload = client.post(
        "/v1/uploads", data=moving_square_mp4(frames=6), headers={**auth(alice_key), "Content-Type": "video/mp4"}
    )
    assert upload.status_code == 201, upload.json

    def modify(upload_id: str):
        return client.post(
            "/v1/generations",
            headers=auth(bob_key),
            json={"prompt": "make it blue", "model": "parked", "type": "modify_video", "upload_id": upload_id},
        )

    foreign, absent = modify(upload.json["id"]), modify(str(uuid.uuid4()))
    assert foreign.status_code == absent.status_code == 422
    assert without_request_id(foreign.json) == without_request_id(absent.json)
    assert foreign.json["error"]["fields"][0]["field"] == "upload_id"


# --- scopes ----------------------------------------------------------------------------------


def test_every_route_declares_who_may_call_it(flask_app):
    declared = {(spec.rule, method) for spec in REGISTRY for method in spec.methods}
    for rule in flask_app.url_map.iter_rules():
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (rule.rule, method) in declared, f"{method} {rule.rule} registered outside endpoint()"
    public = {spec.rule for spec in REGISTRY if spec.auth == "public"}
    # The dashboard's login and logout forms are public HTML pages with their own checks (the key
    # itself; same origin), tested in tests/integration/observability/test_dashboard.py.
    assert public == {"/healthz", "/readyz", "/v1/openapi.json", "/dashboard/login", "/dashboard/logout"}
    assert all(spec.html for spec in REGISTRY if spec.auth == "public" and spec.rule.startswith("/dashboard"))


def test_every_route_refuses_missing_bad_or_revoked_keys_and_admin_routes_refuse_user_keys(client, alice, make_user):
    user_id, user_key = alice
    _, revoked_key = make_user("api")
    with transaction() as session:
        session.execute(
            ApiKey.__table__.update()
            .where(ApiKey.key_hash == hash_key(revoked_key))
            .values(revoked_at=dt.datetime.now(dt.timezone.utc))
        )
    bad_headers = [
        {},
        auth("dq_" + "A" * 43),
        {"Authorization": f"Basic {user_key}"},
        {"Authorization": "Bearer "},
        auth(revoked_key),
    ]
    checked = 0
    for spec in REGISTRY:
        if spec.auth == "public":
            continue
        for method in spec.methods:
            path = sample_path(spec.rule, str(uuid.uuid4()))
            for headers in bad_headers:
                response = client.open(path, method=method, headers=headers)
                if spec.login_redirect:
                    # A page (/dashboard) sends a browser without valid credentials to its login form.
                    assert response.status_code == 303, (method, path, headers, response.status_code)
                    assert response.headers["Location"].endswith(spec.login_redirect)
                    continue
                assert response.status_code == 401, (method, path, headers, response.json)
                assert response.json["error"]["code"] == "unauthorized" and response.json["error"]["request_id"]
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
            if spec.auth == "admin":
                response = client.open(path, method=method, headers=auth(user_key), json={})
                assert response.status_code == 403, (method, path, response.json)
                assert response.json["error"]["code"] == "forbidden"
            checked += 1
    assert checked >= 10


def test_a_dashboard_login_cookie_opens_only_the_admin_reads_that_declare_it(client, flask_app, make_user, monkeypatch):
    monkeypatch.setattr(flask_app, "secret_key", "security-test-secret")
    _, admin_key = make_user("api", scopes=("admin",))
    login = client.post("/dashboard/login", data={"key": admin_key})
    assert login.status_code == 303, login.text
    assert client.get("/v1/admin/status").status_code == 200
    assert all(
        spec.session_auth
        == (spec.auth == "admin" and spec.methods == ["GET"] and spec.rule in {"/dashboard", "/v1/admin/status"})
        for spec in REGISTRY
    )
    checked = 0
    for spec in REGISTRY:
        if spec.auth == "public" or spec.session_auth:
            continue
        for method in spec.methods:
            response = client.open(sample_path(spec.rule, str(uuid.uuid4())), method=method, json={})
            assert response.status_code == 401, (method, spec.rule, response.status_code)
            checked += 1
    assert checked >= 10


# --- keys ------------------------------------------------------------------------------------


def test_api_keys_are_stored_only_as_hashes(alice):
    user_id, key = alice
    secret_part = key[len(display_prefix(key)) :]
    with transaction() as session:
        rows = session.execute(
            text("SELECT k::text AS row, k.key_hash, k.prefix FROM api_keys k WHERE user_id = :u"), {"u": user_id}
        ).all()
        whole_table = session.execute(text("SELECT string_agg(k::text, '|') FROM api_keys k")).scalar_one()
    assert len(rows) == 1
    row, key_hash, prefix = rows[0]
    assert key_hash == hashlib.sha256(key.encode()).hexdigest() and prefix == display_prefix(key)
    assert key not in whole_table and secret_part not in whole_table
    # Shown once: nothing stored can give the key back (sha256 of 256 random bits).
    assert secret_part not in row and len(secret_part) >= 32


# --- Celery and checkpoints ------------------------------------------------------------------


class _Exploit:
    """Unpickling this creates the marker file: proof that a worker deserialized pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_celery_is_configured_for_json_only():
    from tasks.celery_app import celery_app

    conf = celery_app.conf
    assert list(conf.accept_content) == ["json"]
    assert conf.task_serializer == conf.result_serializer == conf.event_serializer == "json"
    assert conf.result_accept_content in (None, ["json"])


def test_a_pickled_message_reaches_a_real_worker_and_is_never_deserialized(stack_env, tmp_path):
    from celery.contrib.testing.worker import start_worker

    from tasks.celery_app import celery_app

    queue = f"security-{stack_env.run_id}"
    marker = tmp_path / "unpickled"
    # The threads pool: solo would send worker_process_init here, which drops this process's DB pool.
    with start_worker(
        celery_app,
        queues=[queue],
        pool="threads",
        concurrency=1,
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=10,
    ):
        celery_app.send_task("dreamq.dispatch", args=[_Exploit(marker)], serializer="pickle", queue=queue)
        with celery_app.connection_for_write() as conn:
            client = conn.default_channel.client
            deadline = time.monotonic() + 20
            while client.llen(queue) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert client.llen(queue) == 0, "the worker never took the message"
        time.sleep(0.5)
    assert not marker.exists(), "a pickle payload was deserialized by the worker"


# --- uploads (size/type/duration are in tests/integration/api/test_uploads_api.py) ---------


@pytest.fixture()
def limits(monkeypatch):
    def apply(**changes):
        monkeypatch.setattr(config, "_settings", dataclasses.replace(config.get_settings(), **changes))

    return apply


def test_body_over_the_servers_hard_cap_is_a_json_413(client, alice, flask_app):
    _, key = alice
    cap = flask_app.config["MAX_CONTENT_LENGTH"]
    response = client.post("/v1/uploads", data=b"\0" * (cap + 1), headers={**auth(key), "Content-Type": "video/mp4"})
    assert response.status_code == 413
    assert response.json["error"]["code"] == "payload_too_large"


def test_multipart_part_with_a_non_video_type_is_415(client, alice):
    _, key = alice
    response = client.post(
        "/v1/uploads",
        data={"file": (io.BytesIO(b"GIF89a" + b"0" * 50), "x.gif", "image/gif")},
        headers=auth(key),
        content_type="multipart/form-data",
    )
    assert response.status_code == 415
    assert response.json["error"]["fields"][0]["field"] == "Content-Type"


def test_multipart_upload_over_the_limit_is_413_and_stores_nothing(client, alice, limits):
    _, key = alice
    limits(max_upload_bytes=2000)
    response = client.post(
        "/v1/uploads",
        data={"file": (io.BytesIO(moving_square_mp4(frames=24)), "x.mp4", "video/mp4")},
        headers=auth(key),
        content_type="multipart/form-data",
    )
    assert response.status_code == 413
    assert response.json["error"]["code"] == "payload_too_large"


# --- logs ------------------------------------------------------------------------------------


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter("test"))
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


def test_no_key_or_secret_reaches_a_log_line(client, alice):
    _, key = alice
    wrong = "dq_" + "Z" * 43
    capture = _Capture()
    root = logging.getLogger()
    level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    try:
        job_id = submit(client, key, prompt=f"my key is {key}")  # a user pasting a key into a prompt
        assert client.get(f"/v1/generations/{job_id}", headers=auth(key)).status_code == 200
        assert client.get("/v1/generations", headers={**auth(wrong), "X-Request-Id": key}).status_code == 401
        assert client.get("/v1/generations", headers={"Authorization": f"Basic {key}"}).status_code == 401
        logging.getLogger("app.test").error("client sent Authorization: Bearer %s", key)
    finally:
        root.removeHandler(capture)
        root.setLevel(level)
    log = "\n".join(capture.lines)
    assert "request" in log  # the access log did run
    needles = [key, key[11:], wrong, wrong[11:], hash_key(key), config.get_settings().s3_secret_key]
    for needle in filter(None, needles):
        assert needle not in log


# --- pre-signed URLs -------------------------------------------------------------------------


def test_presigned_urls_expire(stack_env):
    bucket, key = config.get_settings().media_bucket, f"security/{uuid.uuid4()}.bin"
    put_bytes(bucket, key, b"secret video")
    url = presign_get(bucket, key, ttl_s=2)
    assert requests.get(url, timeout=10).content == b"secret video"
    time.sleep(3.5)
    expired = requests.get(url, timeout=10)
    assert expired.status_code == 403, expired.text
    tampered = requests.get(presign_get(bucket, key, ttl_s=60).replace(key, key + "x"), timeout=10)
    assert tampered.status_code == 403


# --- Flower ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_flower_refuses_requests_without_basic_auth(stack_env, tmp_path):
    from tests.support.flower import running_flower

    # The same command line `dreamq up` runs (app.stack.up.flower_command).
    with running_flower(stack_env.env, tmp_path / "flower.log") as (base, (user, password)):
        for path in ("/", "/api/workers", "/api/tasks", "/broker"):
            assert requests.get(base + path, timeout=5).status_code == 401, path
            assert requests.get(base + path, auth=(user, "wrong"), timeout=5).status_code == 401, path
        assert requests.get(base + "/", auth=(user, password), timeout=5).status_code == 200
