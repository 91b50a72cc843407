"""/metrics against real Postgres, Redis and Celery workers: its numbers are the state the test made.

Each test that counts queued jobs makes its own tier, so the gauges it reads start at zero and no
other test's jobs can move them. Counters are compared before/after (they are cumulative over
the session and over processes: the session runs in multiprocess mode, see tests/conftest.py).
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import requests
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from app.db.models import JobState
from app.db.session import transaction
from app.jobs.transitions import NOW, transition
from app.observability import metrics
from app.observability.snapshot import take_snapshot
from tests.support.factories import auth, create_tier, create_user

ROOT = Path(__file__).resolve().parents[3]


class Scrape:
    def __init__(self, body: str):
        self.samples = [(s.name, s.labels, s.value) for f in text_string_to_metric_families(body) for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
        return sum(v for n, lab, v in self.samples if n == name and all(lab.get(k) == w for k, w in labels.items()))

    def has(self, name: str, **labels: str) -> bool:
        return any(n == name and all(lab.get(k) == w for k, w in labels.items()) for n, lab, _ in self.samples)


def scrape(client, key: str) -> Scrape:
    metrics.SNAPSHOT.invalidate()  # the 1 s cache would hide what the test just changed
    response = client.get("/metrics", headers=auth(key))
    assert response.status_code == 200, response.data[:500]
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    return Scrape(response.get_data(as_text=True))


def submit(client, key: str, model: str = "parked", **headers):
    return client.post(
        "/v1/generations", json={"prompt": "a red circle", "model": model}, headers={**auth(key), **headers}
    )


def finish(job_ids) -> None:
    """Take a test's parked jobs out of every gauge (they would never run)."""
    with transaction() as session:
        session.execute(
            text(
                "UPDATE jobs SET state = 'cancelled', finished_at = now() WHERE id = ANY(:ids) "
                "AND state IN ('queued', 'dispatched', 'running')"
            ),
            {"ids": [str(i) for i in job_ids]},
        )


@pytest.fixture()
def admin_key(stack_env):
    return create_user("enterprise", scopes=("user", "admin"))[1]


def test_metrics_needs_an_admin_key_and_speaks_the_text_format(client, admin_key, make_user):
    _, user_key = make_user("api")
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=auth(user_key)).status_code == 403
    body = scrape(client, admin_key)
    assert body.value("dreamq_snapshot_up") == 1
    # Every tier has its gauges, even with nothing queued.
    for tier in ("api", "enterprise", "unlimited", "light", "free"):
        assert body.has("dreamq_queue_depth", tier=tier) and body.has("dreamq_tier_slo_seconds", tier=tier)
    assert body.value("dreamq_tier_slo_seconds", tier="api") == 60


def test_queue_depth_and_oldest_urgency_follow_the_jobs(client, admin_key, parked_model):
    tier = create_tier(slo_s=100)
    _, key = create_user(tier)
    assert scrape(client, admin_key).value("dreamq_queue_depth", tier=tier) == 0
    ids = [submit(client, key).json["id"] for _ in range(3)]
    try:
        body = scrape(client, admin_key)
        assert body.value("dreamq_queue_depth", tier=tier) == 3
        assert body.value("dreamq_jobs", tier=tier, state="queued") == 3
        assert body.value("dreamq_model_queue_depth", model="parked", tier=tier) == 3
        assert body.value("dreamq_queue_oldest_urgency", tier=tier) < 1

        with transaction() as session:
            session.execute(
                text("UPDATE jobs SET created_at = now() - interval '200 seconds' WHERE id = :id"), {"id": ids[0]}
            )
        body = scrape(client, admin_key)
        assert body.value("dreamq_queue_oldest_urgency", tier=tier) >= 2
        assert body.value("dreamq_queue_oldest_wait_seconds", tier=tier) >= 200
        assert body.value("dreamq_model_queue_oldest_urgency", model="parked", tier=tier) >= 2
        assert body.value("dreamq_queue_past_slo", tier=tier) == 1
        # Nothing started and one job is past W: attainment 0 out of 1.
        assert body.value("dreamq_slo_attainment_ratio", tier=tier) == 0

        # The same numbers as the snapshot the dashboard and `dreamq status` read.
        with transaction() as session:
            snap = {t.name: t for t in take_snapshot(session).tiers}
        for name, status in snap.items():
            assert body.value("dreamq_queue_depth", tier=name) == status.queued, name
            assert body.value("dreamq_jobs", tier=name, state="running") == status.running, name
    finally:
        finish(ids)
    assert scrape(client, admin_key).value("dreamq_queue_depth", tier=tier) == 0


def test_pool_gauges_are_the_database_values(client, admin_key, parked_model):
    tier = create_tier()
    _, key = create_user(tier)
    job_id = submit(client, key).json["id"]
    with transaction() as session:
        pool_id, limit = session.execute(
            text(
                "SELECT p.id, p.dispatch_limit FROM pools p JOIN models m ON m.id = p.model_id "
                "JOIN clusters c ON c.id = p.cluster_id WHERE m.name = 'parked' AND c.name = 'local'"
            )
        ).one()
    before = scrape(client, admin_key)
    try:
        assert before.value("dreamq_pool_dispatch_limit", pool="local.parked", cluster="local", model="parked") == limit
        assert before.value("dreamq_pool_live_workers", pool="local.parked") == 0
        assert before.value("dreamq_pool_effective_limit", pool="local.parked") == 0  # no worker, no room
        with transaction() as session:
            session.execute(text("UPDATE pools SET dispatch_limit = :l WHERE id = :p"), {"l": limit + 5, "p": pool_id})
            # As the dispatcher leaves it: dispatched to the pool, its message in <pool>.<tier>.
            session.execute(
                text(
                    "UPDATE jobs SET state = 'dispatched', pool_id = :p, dispatched_at = now(), "
                    "dispatch_seq = dispatch_seq + 1 WHERE id = :id"
                ),
                {"p": pool_id, "id": job_id},
            )
        after = scrape(client, admin_key)
        assert after.value("dreamq_pool_dispatch_limit", pool="local.parked") == limit + 5
        assert after.value("dreamq_pool_queue_depth", pool="local.parked", tier=tier) == 1
        assert (
            after.value("dreamq_pool_in_flight", pool="local.parked")
            == before.value("dreamq_pool_in_flight", pool="local.parked") + 1
        )
        assert after.value("dreamq_jobs", tier=tier, state="dispatched") == 1
    finally:
        with transaction() as session:
            session.execute(text("UPDATE pools SET dispatch_limit = :l WHERE id = :p"), {"l": limit, "p": pool_id})
        finish([job_id])


def test_rate_limit_and_quota_refusals_are_counted(client, admin_key, parked_model):
    limited = create_tier(rate_per_min=1, burst=2)
    _, key = create_user(limited)
    quota = create_tier(monthly_quota=1)
    _, quota_key = create_user(quota)
    before = scrape(client, admin_key)
    statuses = [submit(client, key).status_code for _ in range(4)]
    assert statuses == [202, 202, 429, 429]
    assert [submit(client, quota_key).status_code for _ in range(2)] == [202, 429]
    after = scrape(client, admin_key)
    name = "dreamq_submission_rejections_total"
    assert after.value(name, tier=limited, reason="rate_limited_user") - before.value(name, tier=limited) == 2
    assert after.value(name, tier=quota, reason="quota_exceeded") - before.value(name, tier=quota) == 1
    # The refused requests are in the request counter by route and status, never by path.
    assert (
        after.value("dreamq_http_requests_total", route="/v1/generations", method="POST", status="429")
        - before.value("dreamq_http_requests_total", route="/v1/generations", method="POST", status="429")
        == 3
    )
    routes = {lab["route"] for n, lab, _ in after.samples if n == "dreamq_http_requests_total"}
    assert "/v1/generations" in routes and not any(re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-", r) for r in routes)
    with transaction() as session:
        ids = session.execute(text("SELECT id FROM jobs WHERE tier = ANY(:t)"), {"t": [limited, quota]}).scalars().all()
    finish(ids)


def test_outcomes_are_counted_once_per_winning_transition(client, admin_key, parked_model):
    tier = create_tier()
    _, key = create_user(tier)
    failed, cancelled = submit(client, key).json["id"], submit(client, key).json["id"]
    name = "dreamq_job_outcomes_total"
    before = scrape(client, admin_key)
    for _ in range(2):  # the second call loses (the job is no longer queued) and counts nothing
        with transaction() as session:
            transition(
                session,
                failed,
                JobState.queued,
                JobState.failed,
                failure_code="model_error",
                failure_message="boom",
                finished_at=NOW,
            )
    assert client.post(f"/v1/generations/{cancelled}/cancel", headers=auth(key)).status_code == 202
    after = scrape(client, admin_key)
    assert (
        after.value(name, tier=tier, state="failed", reason="model_error")
        - before.value(name, tier=tier, state="failed")
        == 1
    )
    assert (
        after.value(name, tier=tier, state="cancelled", reason="none")
        - before.value(name, tier=tier, state="cancelled")
        == 1
    )
    assert after.value(name, tier=tier, state="succeeded") == before.value(name, tier=tier, state="succeeded")


@pytest.mark.slow
def test_a_finished_job_counts_its_wait_outcome_dispatch_and_model_load(client, admin_key, workers, make_user):
    """The wait and the load are observed in the GPU worker, the outcome in the CPU worker (both
    subprocesses), the dispatch in the control worker: one scrape of the API sums them."""
    _, key = make_user("enterprise")
    before = scrape(client, admin_key)
    response = submit(client, key, model="tiny", Prefer="wait=60")
    assert response.status_code == 202 and response.json["state"] == "succeeded", response.json
    # The CPU worker counts the outcome just after its commit, which the API may see first.
    deadline = time.monotonic() + 10
    while True:
        after = scrape(client, admin_key)
        name = "dreamq_job_outcomes_total"
        if (
            after.value(name, tier="enterprise", state="succeeded")
            > before.value(name, tier="enterprise", state="succeeded")
            or time.monotonic() > deadline
        ):
            break
        time.sleep(0.2)

    def delta(name, **labels):
        return after.value(name, **labels) - before.value(name, **labels)

    assert delta("dreamq_job_outcomes_total", tier="enterprise", state="succeeded", reason="none") == 1
    assert delta("dreamq_job_wait_seconds_count", tier="enterprise") == 1
    wait = delta("dreamq_job_wait_seconds_sum", tier="enterprise")
    assert 0 <= wait < 60
    # The observation sits in every bucket at or above it (cumulative buckets).
    assert delta("dreamq_job_wait_seconds_bucket", tier="enterprise", le="+Inf") == 1
    assert delta("dreamq_job_wait_seconds_bucket", tier="enterprise", le="60.0") == 1
    assert delta("dreamq_dispatch_released_total", tier="enterprise") >= 1
    assert after.value("dreamq_dispatch_passes_total") > 0
    assert after.value("dreamq_model_load_seconds_count", model="tiny") >= 1  # the worker's preload
    # The workers as the snapshot sees them: live, in their pool, with the version they hold.
    assert after.value("dreamq_pool_live_workers", pool="local.tiny") >= 1
    tiny_workers = [
        lab["worker"] for n, lab, _ in after.samples if n == "dreamq_worker_info" and lab["pool"] == "local.tiny"
    ]
    assert tiny_workers
    assert any(after.has("dreamq_worker_loaded_version", worker=w) for w in tiny_workers)
    assert after.value("dreamq_jobs", tier="enterprise", state="running") == sum(
        after.value("dreamq_pool_running_jobs", pool=p, tier="enterprise")
        for p in {lab["pool"] for n, lab, _ in after.samples if n == "dreamq_pool_running_jobs"}
    )


def _healthz(url: str) -> int:
    return requests.get(url, timeout=10).status_code


def _per_process(directory: Path, tmp: Path) -> dict[str, float]:
    """/healthz requests counted by each process alone: each process's file read on its own."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    counts = {}
    tmp.mkdir()
    for file in directory.glob("counter_*.db"):
        alone = tmp / file.stem
        alone.mkdir()
        shutil.copy(file, alone / file.name)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(alone))
        counts[file.stem] = (
            registry.get_sample_value(
                "dreamq_http_requests_total", {"route": "/healthz", "method": "GET", "status": "200"}
            )
            or 0
        )
    return counts


@pytest.mark.slow
def test_gunicorn_workers_counters_are_summed_in_every_scrape(stack_env, admin_key, tmp_path):
    """Two gunicorn processes, one metrics directory: whichever process answers a scrape, it
    reports the requests both served (multiprocess mode), exactly once."""
    from app.stack.process import ManagedProcess, find_free_port

    directory = tmp_path / "prom"
    directory.mkdir()
    port = find_free_port(None)
    base = f"http://127.0.0.1:{port}"
    api = ManagedProcess(
        "api",
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "python:app.gunicorn_conf",
            "-w",
            "2",
            "-b",
            f"127.0.0.1:{port}",
            "app.api:create_app()",
        ],
        env={**os.environ, **stack_env.env, "PROMETHEUS_MULTIPROC_DIR": str(directory)},
        cwd=str(ROOT),
        log_path=tmp_path / "api.log",
        ready=lambda: _ok(f"{base}/healthz"),
    )
    api.start()
    try:
        api.wait_ready(60)
        # Both workers have imported the app once each has its counter file (the first may
        # answer alone while the second still boots on a busy machine).
        deadline = time.monotonic() + 60
        while len(list(directory.glob("counter_*.db"))) < 2:
            assert time.monotonic() < deadline, (tmp_path / "api.log").read_text()[-2000:]
            time.sleep(0.2)
        baseline = _scrape_http(base, admin_key).value("dreamq_http_requests_total", route="/healthz")
        served = 0
        # Concurrent connections, so both sync workers take some of them.
        for _ in range(5):
            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                assert set(pool.map(_healthz, [f"{base}/healthz"] * 60)) == {200}
            served += 60
            per_process = _per_process(directory, tmp_path / f"after-{served}")
            if len([c for c in per_process.values() if c > 0]) == 2:
                break
        totals = {_scrape_http(base, admin_key).value("dreamq_http_requests_total", route="/healthz") for _ in range(6)}
    finally:
        api.stop(5)
    assert totals == {baseline + served}
    assert len([c for c in per_process.values() if c > 0]) == 2, per_process
    assert sum(per_process.values()) == baseline + served


def _scrape_http(base: str, key: str) -> Scrape:
    response = requests.get(f"{base}/metrics", headers=auth(key), timeout=30)
    assert response.status_code == 200, response.text[:500]
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    return Scrape(response.text)


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False
