"""Flower as `dreamq up` starts it, against real workers: it lists every worker and every queue.

Every pool and tier queue must be listed, including those of a pool that no worker consumes
(`local.parked`): Flower alone would only show queues that running workers report.
"""

from __future__ import annotations

import time

import pytest
import redis
import requests
from sqlalchemy import text

from app.db.session import transaction
from tests.support.flower import running_flower

pytestmark = pytest.mark.slow


@pytest.fixture()
def flower(stack_env, workers, parked_model, tmp_path):
    log = tmp_path / "flower.log"
    with running_flower(stack_env.env, log) as (base, credentials):
        yield base, credentials, log


def test_flower_lists_the_running_workers_and_every_pool_queue(flower, workers, stack_env):
    base, credentials, log = flower
    assert requests.get(f"{base}/api/workers", timeout=5).status_code == 401

    with transaction() as session:
        pools = (
            session.execute(
                text(
                    "SELECT c.name || '.' || m.name FROM pools p JOIN clusters c ON c.id = p.cluster_id "
                    "JOIN models m ON m.id = p.model_id"
                )
            )
            .scalars()
            .all()
        )
        tiers = session.execute(text("SELECT name FROM tiers ORDER BY rank")).scalars().all()
    expected = {"control", "cpu"} | {f"{pool}.{tier}" for pool in pools for tier in tiers}
    assert {"local.tiny.api", "local.demo.free", "local.parked.api"} <= expected

    # A message waiting in a queue no worker consumes (parked has a pool and no worker).
    waiting = "local.parked.light"
    broker = redis.Redis.from_url(stack_env.env["CELERY_BROKER_URL"])
    broker.lpush(waiting, b'{"flower-test": true}')
    try:
        # Workers answer Flower's inspect broadcast (refresh=1); allow a few tries on a busy machine.
        gpu_workers = set(workers["gpu_workers"])
        deadline = time.monotonic() + 60
        while True:
            listed = requests.get(f"{base}/api/workers", params={"refresh": 1}, auth=credentials, timeout=30)
            assert listed.status_code == 200, listed.text
            names = {name.split("@")[0] for name in listed.json()}
            if gpu_workers <= names:
                break
            assert time.monotonic() < deadline, (names, log.read_text()[-3000:])
            time.sleep(1)
        # The GPU workers report their pool's queues (and their own affinity queues) in tier order.
        tiny = next(info for name, info in listed.json().items() if name.startswith(workers["gpu_workers"][0] + "@"))
        consumed = [q["name"] for q in tiny.get("active_queues", [])]
        assert "local.tiny.api" in consumed and "local.tiny.free" in consumed

        lengths = requests.get(f"{base}/api/queues/length", auth=credentials, timeout=30)
        assert lengths.status_code == 200, lengths.text
        queues = {q["name"]: q["messages"] for q in lengths.json()["active_queues"]}
        missing = expected - set(queues)
        assert not missing, f"Flower does not list {sorted(missing)}"
        assert queues[waiting] == 1

        broker_page = requests.get(f"{base}/broker", auth=credentials, timeout=30)
        assert broker_page.status_code == 200 and "local.parked.free" in broker_page.text
    finally:
        broker.lrem(waiting, 0, b'{"flower-test": true}')
