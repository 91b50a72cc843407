"""Operator commands and routes against real Postgres: users and keys, tiers, clusters and pools, status.

The CLI runs in-process (click's CliRunner) on the same database as the Flask test client; both
call the same app/admin functions, so each behaviour is checked through whichever surface is
cheaper and the other is checked to agree.
"""

from __future__ import annotations

import json
import uuid

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from app.cli import main as cli
from app.db.session import transaction
from app.observability.snapshot import take_snapshot
from app.scheduling.dispatcher import Dispatcher
from tests.support.factories import auth, create_user
from tests.support.stack import TINY_BUNDLE, push_fixture_model

pytestmark = pytest.mark.usefixtures("parked_model")


@pytest.fixture(scope="module")
def own_model(stack_env):
    """A model no other test submits to: pools of it can be given (fake) workers safely."""
    name = f"adm-{stack_env.run_id}"
    push_fixture_model(name, TINY_BUNDLE, dispatch_limit=1)  # also pool local.<name>, which has no worker
    return name


@pytest.fixture()
def admin_key(stack_env):
    return create_user("api", scopes=("admin",))[1]


@pytest.fixture()
def run():
    runner = CliRunner()

    def invoke(*args: str, ok: bool = True):
        result = runner.invoke(cli, list(args), catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return invoke


@pytest.fixture()
def cluster(run, own_model):
    """A cluster of its own with a pool of `own_model` (limit 1) and two fake live workers."""
    name = f"adm-{uuid.uuid4().hex[:8]}"
    run("clusters", "add", name, "--kind", "inference", "--max-workers", "4")
    run("pools", "add", name, own_model, "--dispatch-limit", "1")
    workers = [f"adm-fake-{uuid.uuid4().hex[:6]}@h" for _ in range(2)]
    with transaction() as session:
        for worker in workers:
            session.execute(
                text(
                    "INSERT INTO workers (id, pool_id, hostname, pid, device, state, info, heartbeat_at) VALUES (:id, "
                    "(SELECT p.id FROM pools p JOIN clusters c ON c.id = p.cluster_id WHERE c.name = :c), "
                    "'h', 1, 'cpu', 'idle', '{}'::jsonb, now())"
                ),
                {"id": worker, "c": name},
            )
    yield name, workers
    with transaction() as session:
        session.execute(text("DELETE FROM workers WHERE id = ANY(:ids)"), {"ids": workers})


def pool_row(cluster: str, model: str):
    with transaction() as session:
        return session.execute(
            text(
                "SELECT p.dispatch_limit, p.enabled FROM pools p JOIN clusters c ON c.id = p.cluster_id "
                "JOIN models m ON m.id = p.model_id WHERE c.name = :c AND m.name = :m"
            ),
            {"c": cluster, "m": model},
        ).one()


def snapshot_pool(name: str):
    with transaction() as session:
        return next(p for p in take_snapshot(session).pools if p.name == name)


def job_state(job_id: str) -> str:
    with transaction() as session:
        return session.execute(text("SELECT state FROM jobs WHERE id = :id"), {"id": job_id}).scalar_one()


def dispatch_pass(cluster: str) -> list[str]:
    with transaction() as session:
        return [str(r.job_id) for r in Dispatcher(clusters=[cluster], affinity=False).run_pass(session).releases]


def submit(client, key: str, model: str = "parked") -> dict:
    response = client.post("/v1/generations", json={"prompt": "admin test", "model": model}, headers=auth(key))
    assert response.status_code == 202, response.json
    return response.json


# --- users and keys ---------------------------------------------------------------------------


def test_cli_user_key_works_until_revoked_and_listings_never_show_it(client, run, admin_key):
    name = f"cli-{uuid.uuid4().hex[:8]}"
    created = run("users", "create", name, "--tier", "free")
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("dq_") and "shown once" in created.stderr
    assert client.get("/v1/generations", headers=auth(key)).status_code == 200

    listed = run("keys", "list", name).output
    assert key[:11] in listed and key[11:] not in listed
    users = client.get("/v1/admin/users", headers=auth(admin_key), query_string={"tier": "free", "limit": 1000})
    assert users.status_code == 200 and name in {u["name"] for u in users.json["data"]}
    assert key[11:] not in users.get_data(as_text=True)

    second = run("keys", "create", name, "--scope", "admin").stdout.strip().splitlines()[-1]
    assert client.get("/v1/admin/tiers", headers=auth(second)).status_code == 200
    assert client.get("/v1/admin/tiers", headers=auth(key)).status_code == 403

    revoked = run("keys", "revoke", key[:11])
    assert "revoked" in revoked.output
    response = client.get("/v1/generations", headers=auth(key))
    assert response.status_code == 401 and "revoked" in response.json["error"]["message"]
    assert client.get("/v1/generations", headers=auth(second)).status_code == 200  # only that key

    missing = run("keys", "revoke", "dq_nosuchkey", ok=False)
    assert missing.exit_code != 0 and "prefix" in missing.output


def test_routes_create_a_user_and_key_shown_once_and_revoke_fails_at_once(client, admin_key):
    name = f"route-{uuid.uuid4().hex[:8]}"
    created = client.post("/v1/admin/users", json={"name": name, "tier": "light"}, headers=auth(admin_key))
    assert created.status_code == 201, created.json
    key = created.json["key"]
    assert created.json["tier"] == "light" and created.json["key_prefix"] == key[:11]
    assert client.get("/v1/generations", headers=auth(key)).status_code == 200

    again = client.post("/v1/admin/users", json={"name": name, "tier": "light"}, headers=auth(admin_key))
    assert again.status_code == 409 and again.json["error"]["fields"][0]["field"] == "name"
    bad_tier = client.post("/v1/admin/users", json={"name": name + "x", "tier": "gold"}, headers=auth(admin_key))
    assert bad_tier.status_code == 422 and bad_tier.json["error"]["fields"][0]["field"] == "tier"

    extra = client.post(
        f"/v1/admin/users/{name}/keys", json={"scopes": ["user"], "name": "ci"}, headers=auth(admin_key)
    )
    assert extra.status_code == 201 and extra.json["key"].startswith("dq_")
    keys = client.get(f"/v1/admin/users/{name}/keys", headers=auth(admin_key))
    assert {k["prefix"] for k in keys.json["data"]} == {key[:11], extra.json["key"][:11]}
    for text_ in (
        keys.get_data(as_text=True),
        client.get(f"/v1/admin/users/{name}", headers=auth(admin_key)).get_data(as_text=True),
    ):
        assert key[11:] not in text_ and extra.json["key"][11:] not in text_

    revoked = client.post(f"/v1/admin/keys/{key[:11]}/revoke", headers=auth(admin_key))
    assert revoked.status_code == 200 and revoked.json["revoked_at"]
    assert client.get("/v1/generations", headers=auth(key)).status_code == 401
    assert client.get("/v1/generations", headers=auth(extra.json["key"])).status_code == 200
    unknown = client.post("/v1/admin/keys/dq_00000000/revoke", headers=auth(admin_key))
    assert unknown.status_code == 404 and unknown.json["error"]["fields"][0]["field"] == "prefix"

    disabled = client.patch(f"/v1/admin/users/{name}", json={"disabled": True}, headers=auth(admin_key))
    assert disabled.status_code == 200 and disabled.json["disabled"] is True
    assert client.get("/v1/generations", headers=auth(extra.json["key"])).status_code == 403


def test_set_tier_changes_the_tier_of_the_next_submission_only(client, run, admin_key):
    name = f"tier-{uuid.uuid4().hex[:8]}"
    key = run("users", "create", name, "--tier", "api").stdout.strip().splitlines()[-1]
    first = submit(client, key)
    assert first["tier"] == "api"

    run("users", "set-tier", name, "free")
    assert submit(client, key)["tier"] == "free"
    patched = client.patch(f"/v1/admin/users/{name}", json={"tier": "light"}, headers=auth(admin_key))
    assert patched.status_code == 200 and patched.json["tier"] == "light"
    assert submit(client, key)["tier"] == "light"
    # A job keeps the tier it was promised at submission.
    assert client.get(f"/v1/generations/{first['id']}", headers=auth(key)).json["tier"] == "api"

    bad = run("users", "set-tier", name, "gold", ok=False)
    assert bad.exit_code != 0 and "tier" in bad.output and "gold" in bad.output
    null = client.patch(f"/v1/admin/users/{name}", json={"tier": None}, headers=auth(admin_key))
    assert null.status_code == 422


def test_tier_routes_and_cli_cover_slo_and_limits(client, run, admin_key):
    tiers = {t["name"]: t for t in client.get("/v1/admin/tiers", headers=auth(admin_key)).json["data"]}
    light = tiers["light"]
    try:
        run("tiers", "set", "light", "--slo", "1700", "--rate", "19", "--cap", "4")
        after = {t["name"]: t for t in client.get("/v1/admin/tiers", headers=auth(admin_key)).json["data"]}["light"]
        assert (after["slo_s"], after["rate_per_min"], after["concurrency_cap"]) == (1700, 19, 4)
        assert "light" in run("tiers", "list").output
    finally:
        restored = client.patch(
            "/v1/admin/tiers/light",
            headers=auth(admin_key),
            json={k: light[k] for k in ("slo_s", "rate_per_min", "concurrency_cap")},
        )
        assert restored.status_code == 200


# --- clusters and pools -----------------------------------------------------------------------


def test_cluster_add_validates_kind_and_names(client, run, admin_key):
    name = f"adm-{uuid.uuid4().hex[:8]}"
    bad = client.post("/v1/admin/clusters", json={"name": name, "kind": "gpu"}, headers=auth(admin_key))
    assert bad.status_code == 422
    assert [f["field"] for f in bad.json["error"]["fields"]] == ["kind"]
    cli_bad = run("clusters", "add", name, "--kind", "gpu", ok=False)
    assert cli_bad.exit_code != 0 and "kind" in cli_bad.output

    dotted = client.post("/v1/admin/clusters", json={"name": "a.b", "kind": "burst"}, headers=auth(admin_key))
    assert dotted.status_code == 422 and dotted.json["error"]["fields"][0]["field"] == "name"

    made = client.post(
        "/v1/admin/clusters", json={"name": name, "kind": "burst", "max_workers": 8}, headers=auth(admin_key)
    )
    assert made.status_code == 201 and (made.json["kind"], made.json["max_workers"], made.json["enabled"]) == (
        "burst",
        8,
        True,
    )
    assert (
        client.post("/v1/admin/clusters", json={"name": name, "kind": "burst"}, headers=auth(admin_key)).status_code
        == 409
    )
    assert name in run("clusters", "list").output
    assert (
        client.patch(f"/v1/admin/clusters/{name}", json={"max_workers": None}, headers=auth(admin_key)).json[
            "max_workers"
        ]
        is None
    )

    no_cluster = client.post(
        "/v1/admin/pools",
        json={"cluster": "nope-" + name, "model": "parked", "dispatch_limit": 1},
        headers=auth(admin_key),
    )
    assert no_cluster.status_code == 422 and no_cluster.json["error"]["fields"][0]["field"] == "cluster"
    no_model = client.post(
        "/v1/admin/pools", json={"cluster": name, "model": "nope", "dispatch_limit": 1}, headers=auth(admin_key)
    )
    assert no_model.status_code == 422 and no_model.json["error"]["fields"][0]["field"] == "model"
    negative = client.post(
        "/v1/admin/pools", json={"cluster": name, "model": "parked", "dispatch_limit": -1}, headers=auth(admin_key)
    )
    assert negative.status_code == 422 and negative.json["error"]["fields"][0]["field"] == "dispatch_limit"


def test_pool_set_changes_the_limit_in_the_database_and_the_snapshot(client, run, admin_key, cluster, own_model):
    name, _ = cluster
    pool = f"{name}.{own_model}"
    assert snapshot_pool(pool).effective_limit == 1  # limit 1, two live workers
    run("pools", "set", name, own_model, "--dispatch-limit", "3")
    assert pool_row(name, own_model).dispatch_limit == 3
    assert snapshot_pool(pool).effective_limit == 3
    run("pools", "set", name, own_model, "--dispatch-limit", "10")
    # Two live workers hold at most 2 x 2 queued jobs, whatever the configured limit.
    assert snapshot_pool(pool).dispatch_limit == 10 and snapshot_pool(pool).effective_limit == 4

    patched = client.patch(f"/v1/admin/pools/{name}/{own_model}", json={"dispatch_limit": 2}, headers=auth(admin_key))
    assert patched.status_code == 200
    assert patched.json["effective_limit"] == snapshot_pool(pool).effective_limit == 2
    assert patched.json["queues"][0] == f"{pool}.api"
    listed = {p["name"]: p for p in client.get("/v1/admin/pools", headers=auth(admin_key)).json["data"]}
    assert listed[pool]["dispatch_limit"] == 2 and listed[pool]["live_workers"] == 2

    bad = client.patch(f"/v1/admin/pools/{name}/{own_model}", json={"dispatch_limit": "many"}, headers=auth(admin_key))
    assert bad.status_code == 422 and bad.json["error"]["fields"][0]["field"] == "dispatch_limit"
    assert (
        client.patch(f"/v1/admin/pools/{name}/nope", json={"dispatch_limit": 1}, headers=auth(admin_key)).status_code
        == 404
    )
    cli_bad = run("pools", "set", name, own_model, "--dispatch-limit", "-2", ok=False)
    assert cli_bad.exit_code != 0 and "dispatch_limit" in cli_bad.output


def test_pool_and_cluster_drain_stop_dispatch_and_enable_resumes_it(client, run, admin_key, cluster, own_model):
    name, workers = cluster
    _, key = create_user("api")

    run("pools", "drain", name, own_model)
    assert pool_row(name, own_model).enabled is False
    assert snapshot_pool(f"{name}.{own_model}").effective_limit == 0
    job = submit(client, key, own_model)["id"]
    assert job not in dispatch_pass(name) and job_state(job) == "queued"

    enabled = client.post(f"/v1/admin/pools/{name}/{own_model}/enable", headers=auth(admin_key))
    assert enabled.status_code == 200 and enabled.json["enabled"] is True
    dispatch_pass(name)  # (another dispatcher running for the session's workers may take it first)
    assert job_state(job) == "dispatched"

    drained = client.post(f"/v1/admin/clusters/{name}/drain", headers=auth(admin_key))
    assert drained.status_code == 200 and drained.json["enabled"] is False
    assert drained.json["workers_marked_draining"] == 0  # default: running jobs finish
    second = submit(client, key, own_model)["id"]
    assert second not in dispatch_pass(name) and job_state(second) == "queued"

    # --now: live workers are marked draining (their running jobs requeue at the next step).
    now = json.loads(run("clusters", "drain", name, "--now").output)
    assert now["workers_marked_draining"] == 2 and now["live_workers"] == 0 and now["draining_workers"] == 2
    with transaction() as session:
        states = session.execute(
            text("SELECT state, info ->> 'drained_by' FROM workers WHERE id = ANY(:ids)"), {"ids": workers}
        ).all()
    assert {s for s, _ in states} == {"draining"} and all(by and by.startswith("cli:") for _, by in states)

    run("clusters", "enable", name)
    with transaction() as session:
        assert set(
            session.execute(text("SELECT state FROM workers WHERE id = ANY(:ids)"), {"ids": workers}).scalars()
        ) == {"idle"}
    assert snapshot_pool(f"{name}.{own_model}").effective_limit > 0
    missing = client.post("/v1/admin/clusters/no-such-cluster/drain", headers=auth(admin_key))
    assert missing.status_code == 404 and missing.json["error"]["fields"][0]["field"] == "name"


# --- status -----------------------------------------------------------------------------------

VOLATILE = {"taken_at", "oldest_wait_s", "urgency", "heartbeat_age_s", "stale"}


def stable(value):
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def test_status_json_is_take_snapshot_and_the_text_shows_every_tier_and_pool(client, run, make_user):
    _, key = make_user("free")
    submit(client, key)
    # Other tests' workers may move a job between the two reads: compare until two agree.
    for _ in range(5):
        printed = json.loads(run("status", "--json").output)
        with transaction() as session:
            taken = take_snapshot(session).to_dict()
        if stable(printed) == stable(taken):
            break
    assert stable(printed) == stable(taken)
    assert {"taken_at", "tiers", "pools", "workers", "failures"} <= set(printed)

    screen = run("status").output
    for tier in taken["tiers"]:
        assert tier["name"] in screen
    for pool in taken["pools"]:
        assert pool["name"] in screen
    assert "[" in screen and "urgency" in screen
    bad = run("status", "--watch", "0", ok=False)
    assert bad.exit_code != 0
