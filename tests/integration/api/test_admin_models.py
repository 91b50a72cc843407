"""Model aliases through the admin API on real S3 + Postgres: promote, canary split, rollback.

Jobs go to a model with a pool but no worker, so submissions only resolve versions.
"""

from __future__ import annotations

import math
import uuid

import pytest

from app.core.config import get_settings
from app.core.storage import s3_client
from tests.support.factories import auth, create_user
from tests.support.stack import TINY_BUNDLE, push_fixture_model
from workers.repository import version_prefix

# Jobs submitted under a 20% canary: the canary's count must be within 3 sigma of 400, i.e. 347-453
# (17.3-22.7%). Exact binomial odds of passing: 99.7% for a right 20% split, 0.2% for 15%, 0.8% for
# 25%, none for 10% or 30%. 1,000 jobs (half the ~13 s) would pass a 15% split one run in seven.
CANARY_JOBS = 2000


@pytest.fixture()
def admin(stack_env):
    return create_user("enterprise", scopes=("user", "admin"))[1]


@pytest.fixture()
def model_name(stack_env) -> str:
    name = f"alias-{uuid.uuid4().hex[:8]}"
    for _ in range(3):
        push_fixture_model(name, TINY_BUNDLE, dispatch_limit=0, force=True)
    return name


@pytest.fixture()
def submitter(stack_env):
    """A user in a tier with a big bucket, so 2,000 submissions are not rate limited."""
    from sqlalchemy import func, select

    from app.db.models import Tier
    from app.db.session import transaction

    name = f"bulk-{uuid.uuid4().hex[:6]}"
    with transaction() as session:
        rank = (session.scalar(select(func.max(Tier.rank))) or 0) + 1
        session.add(
            Tier(
                name=name,
                rank=rank,
                slo_s=600,
                rate_per_min=10**6,
                burst=10**5,
                concurrency_cap=1,
                min_share=0,
                retention_days=1,
            )
        )
    return create_user(name)[1]


def submit(client, key, model, **extra):
    response = client.post("/v1/generations", json={"prompt": "x", "model": model, **extra}, headers=auth(key))
    assert response.status_code == 202, response.json
    return response.json


def test_promote_canary_rollback_are_audited_and_steer_new_jobs_only(client, admin, submitter, model_name):
    url = f"/v1/admin/models/{model_name}"
    detail = client.get(url, headers=auth(admin)).json
    assert [v["version"] for v in detail["versions"]] == [1, 2, 3]
    assert detail["aliases"]["prod"]["version"] == 1
    assert all(v["digest"].startswith("sha256:") and v["environment"]["torch"] == "2.13.0" for v in detail["versions"])

    promoted = client.post(f"{url}/promote", json={"version": 2}, headers=auth(admin)).json
    assert promoted["aliases"]["prod"]["version"] == 2
    assert promoted["history"][0]["action"] == "promote" and promoted["history"][0]["from_version"] == 1
    assert admin[:11] in promoted["history"][0]["actor"]  # who: the key's display prefix, never the key
    on_v2 = submit(client, submitter, model_name)
    assert on_v2["model"]["version"] == 2
    assert submit(client, submitter, model_name, model_version=1)["model"]["version"] == 1

    canary = client.post(f"{url}/canary", json={"version": 3, "percent": 20}, headers=auth(admin)).json
    assert canary["aliases"]["canary"] == {**canary["aliases"]["canary"], "version": 3, "percent": 20}
    versions = [submit(client, submitter, model_name)["model"]["version"] for _ in range(CANARY_JOBS)]
    assert set(versions) == {2, 3}
    # Each job draws on its own (app/jobs/submit.py), so the canary's count is Binomial(n, 0.2).
    expected, sigma = CANARY_JOBS * 0.20, math.sqrt(CANARY_JOBS * 0.20 * 0.80)
    assert abs(versions.count(3) - expected) <= 3 * sigma, (versions.count(3), expected, sigma)

    rolled = client.post(f"{url}/rollback", headers=auth(admin)).json
    assert rolled["aliases"]["prod"]["version"] == 1 and "canary" not in rolled["aliases"]
    assert [e["action"] for e in rolled["history"][:2]] == ["clear", "rollback"]
    assert submit(client, submitter, model_name)["model"]["version"] == 1
    # An accepted job keeps the version it resolved: a rollback never changes it.
    assert client.get(f"/v1/generations/{on_v2['id']}", headers=auth(submitter)).json["model"]["version"] == 2
    again = client.post(f"{url}/rollback", headers=auth(admin))
    assert again.status_code == 409 and "no earlier prod version" in again.json["error"]["message"]


def test_bad_alias_moves_are_refused_with_the_field(client, admin, model_name):
    url = f"/v1/admin/models/{model_name}"
    cases = [
        (client.post(f"{url}/promote", json={"version": 9}, headers=auth(admin)), 404, "version"),
        (client.post(f"{url}/promote", json={"version": 1}, headers=auth(admin)), 409, "version"),
        (client.post(f"{url}/canary", json={"version": 2, "percent": 0}, headers=auth(admin)), 422, "percent"),
        (client.post(f"{url}/canary", json={"version": 1, "percent": 10}, headers=auth(admin)), 409, "version"),
        (client.delete(f"{url}/canary", headers=auth(admin)), 409, "alias"),
        (client.post("/v1/admin/models/nope/promote", json={"version": 1}, headers=auth(admin)), 404, "name"),
    ]
    for response, status, field in cases:
        assert response.status_code == status, response.json
        assert response.json["error"]["fields"][0]["field"] == field
    assert client.get(url, headers=auth(admin)).json["aliases"]["prod"]["version"] == 1


def test_model_routes_need_the_admin_scope(client, make_user, model_name):
    _, key = make_user("api")
    assert client.get(f"/v1/admin/models/{model_name}", headers=auth(key)).status_code == 403
    assert client.post(f"/v1/admin/models/{model_name}/rollback", headers=auth(key)).status_code == 403


def test_verify_rehashes_storage(client, admin, model_name):
    url = f"/v1/admin/models/{model_name}/versions/2/verify"
    assert client.post(url, headers=auth(admin)).json["ok"] is True
    s3_client().put_object(
        Bucket=get_settings().models_bucket,
        Key=version_prefix(model_name, 2) + "weights/tiny.safetensors",
        Body=b"\x01" * 176,
    )
    result = client.post(url, headers=auth(admin)).json
    assert result["ok"] is False and result["problems"][0].startswith("weights/tiny.safetensors")
