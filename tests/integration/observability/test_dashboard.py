"""/dashboard's login, its cookie and /v1/admin/status, in-process against the real database.

The browser test (tests/e2e/test_dashboard_browser.py) drives the page itself; this covers the
auth edges a browser test would be slow to reach: bad keys, revoked keys, cross-site posts, a
missing secret, and the cookie's attributes.
"""

from __future__ import annotations

import datetime as dt
import re

import pytest
from sqlalchemy import text

from app.admin.keys import hash_key
from app.api.schemas import StatusOut
from app.db.models import ApiKey
from app.db.session import transaction
from tests.support.factories import auth


@pytest.fixture()
def dashboard(flask_app, monkeypatch):
    monkeypatch.setattr(flask_app, "secret_key", "dashboard-test-secret")
    return flask_app.test_client()


@pytest.fixture()
def admin_key(make_user):
    return make_user("api", scopes=("admin",))[1]


def login(client, key, **headers):
    return client.post("/dashboard/login", data={"key": key}, headers=headers)


def test_logging_in_sets_a_strict_httponly_cookie_that_opens_the_page_and_its_json(dashboard, admin_key):
    assert dashboard.get("/dashboard").headers["Location"].endswith("/dashboard/login")
    form = dashboard.get("/dashboard/login")
    assert form.status_code == 200 and 'name="key"' in form.text and "text/html" in form.content_type
    response = login(dashboard, admin_key)
    assert response.status_code == 303 and response.headers["Location"].endswith("/dashboard")
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("dreamq_dashboard=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert admin_key not in cookie and hash_key(admin_key) not in cookie

    page = dashboard.get("/dashboard")
    assert page.status_code == 200 and 'id="tiers"' in page.text
    csp = page.headers["Content-Security-Policy"]
    nonce = re.search(r"'nonce-([^']+)'", csp).group(1)
    assert f'<script nonce="{nonce}">' in page.text and "default-src 'none'" in csp
    assert page.headers["Cache-Control"] == "no-store" and page.headers["X-Frame-Options"] == "DENY"

    status = dashboard.get("/v1/admin/status")
    assert status.status_code == 200
    assert {"taken_at", "tiers", "pools", "workers", "failures"} <= status.json.keys()
    assert {t["name"] for t in status.json["tiers"]} >= {"api", "enterprise", "unlimited", "light", "free"}

    assert dashboard.post("/dashboard/logout").status_code == 303
    assert dashboard.get("/v1/admin/status").status_code == 401
    assert dashboard.get("/dashboard").status_code == 303


def test_status_answers_a_bearer_admin_key_and_refuses_a_user_key(client, admin_key, make_user):
    _, user_key = make_user("api")
    assert client.get("/v1/admin/status", headers=auth(admin_key)).status_code == 200
    assert client.get("/v1/admin/status", headers=auth(user_key)).status_code == 403
    # A page opened with a Bearer key works too (scripts, a proxy that adds the header).
    assert client.get("/dashboard", headers=auth(admin_key)).status_code == 200
    assert client.get("/dashboard", headers=auth(user_key)).status_code == 403


def test_login_refuses_user_keys_unknown_keys_and_cross_site_posts(dashboard, admin_key, make_user):
    _, user_key = make_user("api")
    for key, status, says in [
        (user_key, 403, "no admin scope"),
        ("dq_" + "x" * 43, 401, "not valid"),
        ("", 401, "not valid"),
    ]:
        response = login(dashboard, key)
        assert response.status_code == status and says in response.text
        assert "Set-Cookie" not in response.headers
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}):
        response = login(dashboard, admin_key, **headers)
        assert response.status_code == 403 and "Set-Cookie" not in response.headers, headers
    assert (
        login(dashboard, admin_key, Origin="http://localhost", **{"Sec-Fetch-Site": "same-origin"}).status_code == 303
    )


def test_revoking_the_key_ends_its_session_at_the_next_request(dashboard, admin_key):
    assert login(dashboard, admin_key).status_code == 303
    assert dashboard.get("/v1/admin/status").status_code == 200
    with transaction() as session:
        session.execute(
            ApiKey.__table__.update()
            .where(ApiKey.key_hash == hash_key(admin_key))
            .values(revoked_at=dt.datetime.now(dt.timezone.utc))
        )
    response = dashboard.get("/v1/admin/status")
    assert response.status_code == 401 and "session has ended" in response.json["error"]["message"]
    assert dashboard.get("/dashboard").status_code == 303


def test_a_cookie_signed_with_another_secret_is_ignored(dashboard, flask_app, admin_key, monkeypatch):
    assert login(dashboard, admin_key).status_code == 303
    monkeypatch.setattr(flask_app, "secret_key", "a-rotated-secret")
    assert dashboard.get("/v1/admin/status").status_code == 401


def test_without_a_secret_login_is_off_but_bearer_keys_still_work(client, flask_app, admin_key, monkeypatch):
    monkeypatch.setattr(flask_app, "secret_key", None)
    assert "DREAMQ_SECRET_KEY" in client.get("/dashboard/login").text
    response = login(client, admin_key)
    assert response.status_code == 503 and "Set-Cookie" not in response.headers
    assert client.post("/dashboard/logout").status_code == 303
    assert client.get("/dashboard", headers=auth(admin_key)).status_code == 200


def test_status_json_is_the_snapshot(client, admin_key, make_user, parked_model):
    _, user_key = make_user("light")
    for _ in range(2):
        assert (
            client.post("/v1/generations", json={"prompt": "p", "model": "parked"}, headers=auth(user_key)).status_code
            == 202
        )
    body = client.get("/v1/admin/status", headers=auth(admin_key)).json
    assert set(body) == set(StatusOut.model_fields)  # the documented schema names every field
    with transaction() as session:
        queued = session.execute(
            text("SELECT count(*) FROM jobs WHERE tier = 'light' AND state = 'queued'")
        ).scalar_one()
        limit = session.execute(
            text(
                "SELECT p.dispatch_limit FROM pools p JOIN models m ON m.id = p.model_id "
                "JOIN clusters c ON c.id = p.cluster_id WHERE m.name = 'parked' AND c.name = 'local'"
            )
        ).scalar_one()
    light = next(t for t in body["tiers"] if t["name"] == "light")
    assert light["queued"] == queued >= 2 and light["oldest_wait_s"] >= 0
    parked = next(p for p in body["pools"] if p["name"] == "local.parked")
    assert parked["dispatch_limit"] == limit and parked["live_workers"] == 0 and parked["effective_limit"] == 0
