"""The operator snapshot against real Postgres: its numbers are the database's numbers."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from app.db.session import transaction
from app.observability.snapshot import take_snapshot
from tests.support.factories import auth

pytestmark = pytest.mark.usefixtures("parked_model")


def snap():
    with transaction() as session:
        return take_snapshot(session)


def test_tier_counts_urgency_and_attainment_follow_the_jobs(client, make_user):
    before = {t.name: t for t in snap().tiers}
    ids = {}
    for tier in ("api", "free"):
        _, key = make_user(tier)
        ids[tier] = [
            client.post("/v1/generations", json={"prompt": "x", "model": "parked"}, headers=auth(key)).json["id"]
            for _ in range(3)
        ]
    with transaction() as session:
        slo = dict(session.execute(text("SELECT name, slo_s FROM tiers")).all())
        # One api job has waited twice its W; one started within W, one started late.
        session.execute(
            text("UPDATE jobs SET created_at = now() - make_interval(secs => :s) WHERE id = :id"),
            {"s": 2 * slo["api"], "id": ids["api"][0]},
        )
        session.execute(
            text(
                "UPDATE jobs SET state = 'running', attempts = 1, started_at = now(), "
                "created_at = now() - interval '1 second' WHERE id = :id"
            ),
            {"id": ids["api"][1]},
        )
        session.execute(
            text(
                "UPDATE jobs SET state = 'running', attempts = 1, started_at = now(), "
                "created_at = now() - make_interval(secs => :s) WHERE id = :id"
            ),
            {"s": 3 * slo["api"], "id": ids["api"][2]},
        )
    after = {t.name: t for t in snap().tiers}
    api, free = after["api"], after["free"]
    assert api.queued - before["api"].queued == 1 and api.running - before["api"].running == 2
    assert free.queued - before["free"].queued == 3
    assert api.urgency >= 2.0 and api.oldest_wait_s >= 2 * slo["api"]
    assert api.started_last_hour - before["api"].started_last_hour == 2
    assert api.within_slo_last_hour - before["api"].within_slo_last_hour == 1
    assert api.queued_past_slo - before["api"].queued_past_slo == 1
    assert api.attainment is not None and api.attainment < 1
    assert [t.name for t in snap().tiers][:2] == ["api", "enterprise"]  # by rank


def test_pools_workers_and_failures(client, make_user):
    _, key = make_user("api")
    job_id = client.post("/v1/generations", json={"prompt": "x", "model": "parked"}, headers=auth(key)).json["id"]
    with transaction() as session:
        session.execute(
            text(
                "UPDATE jobs SET state = 'failed', failure_code = 'model_error', "
                "failure_message = 'boom', finished_at = now() WHERE id = :id"
            ),
            {"id": job_id},
        )
        digest = session.execute(
            text(
                "SELECT v.digest FROM model_versions v JOIN models m ON m.id = v.model_id WHERE m.name = 'parked' "
                "ORDER BY v.number LIMIT 1"
            )
        ).scalar_one()
        session.execute(
            text(
                "INSERT INTO workers (id, pool_id, hostname, pid, device, state, info, heartbeat_at) VALUES "
                "('snap-w@h', (SELECT p.id FROM pools p JOIN models m ON m.id = p.model_id WHERE m.name = 'parked'), "
                "'h', 1, 'cuda:0 H100', 'draining', jsonb_build_object('loaded', jsonb_build_array(CAST(:d AS text))), now()) "
                "ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), state = 'draining'"
            ),
            {"d": digest},
        )
    snapshot = snap()
    pool = next(p for p in snapshot.pools if p.model == "parked")
    # Draining: listed, but not capacity (a live fake worker would let the dispatcher release
    # other tests' parked jobs).
    assert pool.name == "local.parked" and pool.live_workers == 0 and pool.effective_limit == 0
    assert pool.effective_limit == min(pool.dispatch_limit, 2 * pool.live_workers)
    worker = next(w for w in snapshot.workers if w.id == "snap-w@h")
    assert worker.loaded[0].startswith("parked v") and not worker.stale and worker.pool == "local.parked"
    assert worker.state == "draining" and worker.device == "cuda:0 H100"
    failure = next(f for f in snapshot.failures if f.id == job_id)
    assert (failure.code, failure.message, failure.model) == ("model_error", "boom", "parked")
    assert snapshot.to_dict()["pools"]  # JSON-ready
    with transaction() as session:
        session.execute(text("DELETE FROM workers WHERE id = 'snap-w@h'"))
