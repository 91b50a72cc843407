"""Tiers are data an admin edits at run time; submissions obey their quota and rate buckets.

Each test makes its own tier (rank above the five real ones) so tuning it never changes the
behaviour other tests see.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys
import time
from pathlib import Path

import pytest
import requests
from sqlalchemy import func, select

from app.db.models import Job, Tier
from app.db.session import transaction
from tests.support.factories import auth, create_tier, create_user
from tests.support.loadgen import hammer_submissions

ROOT = Path(__file__).resolve().parents[3]


make_tier = create_tier


def jobs_of(user_id) -> int:
    with transaction() as session:
        return session.scalar(select(func.count()).select_from(Job).where(Job.user_id == user_id))


def submit(client, key, prompt="x"):
    return client.post("/v1/generations", json={"prompt": prompt, "model": "parked"}, headers=auth(key))


@pytest.fixture()
def admin_key(stack_env):
    return create_user("enterprise", scopes=("user", "admin"))[1]


def test_admin_lists_and_edits_tiers_and_new_jobs_see_the_change(client, admin_key, parked_model):
    tiers = client.get("/v1/admin/tiers", headers=auth(admin_key)).json["data"]
    by_name = {t["name"]: t for t in tiers}
    assert [by_name[n]["slo_s"] for n in ("api", "enterprise", "unlimited", "light", "free")] == [
        60,
        120,
        600,
        1800,
        7200,
    ]
    name = make_tier()
    response = client.patch(f"/v1/admin/tiers/{name}", json={"slo_s": 90, "monthly_quota": 50}, headers=auth(admin_key))
    assert response.status_code == 200, response.json
    assert response.json["slo_s"] == 90 and response.json["monthly_quota"] == 50
    user_id, key = create_user(name)
    job = submit(client, key).json
    assert job["tier"] == name and job["slo_s"] == 90
    cleared = client.patch(f"/v1/admin/tiers/{name}", json={"monthly_quota": None}, headers=auth(admin_key))
    assert cleared.json["monthly_quota"] is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"slo_s": 0}, "slo_s"),
        ({"min_share": 1.5}, "min_share"),
        ({"burst": 0}, "burst"),
        ({"rank": 0}, "rank"),
        ({"slo_s": None}, "body"),
        ({}, "body"),
        ({"concurrency_cap": "many"}, "concurrency_cap"),
    ],
)
def test_bad_tier_changes_are_422_and_change_nothing(client, admin_key, body, field):
    name = make_tier()
    response = client.patch(f"/v1/admin/tiers/{name}", json=body, headers=auth(admin_key))
    assert response.status_code == 422, response.json
    assert response.json["error"]["fields"][0]["field"] == field
    with transaction() as session:
        assert session.get(Tier, name).slo_s == 600


def test_floors_may_not_take_over_rank_order(client, admin_key):
    name = make_tier()
    response = client.patch(f"/v1/admin/tiers/{name}", json={"min_share": 0.45}, headers=auth(admin_key))
    assert response.status_code == 422
    assert "floors of all tiers would sum" in response.json["error"]["fields"][0]["reason"]


def test_tier_routes_need_the_admin_scope_and_unknown_tiers_are_404(client, admin_key, make_user):
    _, user_key = make_user("api")
    assert client.get("/v1/admin/tiers", headers=auth(user_key)).status_code == 403
    assert client.get("/v1/admin/tiers").status_code == 401
    assert client.patch("/v1/admin/tiers/gold", json={"slo_s": 5}, headers=auth(admin_key)).status_code == 404


def test_the_monthly_quota_refuses_with_a_clear_code_and_stores_nothing(client, parked_model):
    user_id, key = create_user(make_tier(monthly_quota=2))
    assert [submit(client, key).status_code for _ in range(2)] == [202, 202]
    refused = submit(client, key)
    assert refused.status_code == 429
    assert refused.json["error"]["code"] == "quota_exceeded"
    assert int(refused.headers["Retry-After"]) > 0
    assert jobs_of(user_id) == 2


def test_the_user_bucket_refuses_with_retry_after_and_bad_input_takes_no_token(client, parked_model):
    user_id, key = create_user(make_tier(rate_per_min=6, burst=3))
    # Invalid bodies are refused before the bucket: they cost no token.
    for _ in range(5):
        assert client.post("/v1/generations", json={"model": "parked"}, headers=auth(key)).status_code == 422
    assert [submit(client, key).status_code for _ in range(3)] == [202, 202, 202]
    refused = submit(client, key)
    assert refused.status_code == 429
    assert refused.json["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 10
    assert jobs_of(user_id) == 3


def test_the_tier_bucket_limits_all_users_of_the_tier_together(client, parked_model):
    tier = make_tier(tier_rate_per_min=1, tier_burst=4)
    users = [create_user(tier) for _ in range(3)]
    codes = [submit(client, users[i % 3][1]).status_code for i in range(7)]
    assert codes.count(202) == 4 and codes.count(429) == 3
    assert sum(jobs_of(user_id) for user_id, _ in users) == 4


def test_concurrent_submissions_through_gunicorn_never_exceed_the_bucket(stack_env, parked_model, tmp_path):
    """Several client processes against three gunicorn workers: one bucket, no overdraw."""
    from app.stack.process import ManagedProcess, find_free_port

    port = find_free_port(None)
    api = ManagedProcess(
        "api",
        [sys.executable, "-m", "gunicorn", "-w", "3", "-b", f"127.0.0.1:{port}", "app.api:create_app()"],
        env={**os.environ, **stack_env.env},
        cwd=str(ROOT),
        log_path=tmp_path / "api.log",
        ready=lambda: _ok(f"http://127.0.0.1:{port}/healthz"),
    )
    api.start()
    try:
        api.wait_ready(30)
        burst, rate_per_min = 10, 12
        user_id, key = create_user(make_tier(rate_per_min=rate_per_min, burst=burst))
        started = time.monotonic()
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(4, mp_context=spawn) as pool:
            results = list(pool.map(hammer_submissions, [f"http://127.0.0.1:{port}"] * 4, [key] * 4, [3.0] * 4))
        elapsed = time.monotonic() - started
    finally:
        api.stop(5)
    accepted = sum(r[0] for r in results)
    refused = sum(r[1] for r in results)
    assert refused > 0 and all(r[2] for r in results), "every 429 carries Retry-After"
    assert burst <= accepted <= burst + rate_per_min / 60 * elapsed + 1
    assert jobs_of(user_id) == accepted


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False
