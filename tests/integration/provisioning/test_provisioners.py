"""Provisioners on real services: local processes and a real single-node Slurm.

Each starts a burst worker for pool <cluster>.bursty, which must heartbeat, run a job, retire
(finish, take nothing new) and stop (warm shutdown) through the same interface.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text

from app.db.session import transaction
from app.jobs.workers import worker_rows
from app.provisioning import get_provisioner
from app.provisioning.base import wait_until
from tests.support.factories import auth, create_user
from tests.support.jobs import wait_done
from tests.support.stack import TINY_BUNDLE, push_fixture_model, running_workers

pytestmark = pytest.mark.slow

# The worker's log (in tmp_path) is what tells why a burst worker did not come up.
WORKER_ENV = {"DREAMQ_LOG_LEVEL": "INFO"}


@pytest.fixture(scope="module")
def bursty(stack_env, tmp_path_factory):
    """Model `bursty` with a pool in each burst cluster and no standing worker; a control+cpu
    worker dispatches and finalizes its jobs."""
    from app.seed import ensure_pool

    push_fixture_model("bursty", TINY_BUNDLE, dispatch_limit=4)
    with transaction() as session:
        for cluster in ("burstlocal", "burstslurm"):
            ensure_pool(session, cluster, "bursty", 4)
            session.execute(text("UPDATE clusters SET kind = 'burst' WHERE name = :c"), {"c": cluster})
    with running_workers(stack_env, tmp_path_factory.mktemp("burst-control"), models=[], control=1, tag="bp"):
        yield "bursty"


def exercise(provisioner, cluster: str, client, tmp_path) -> dict:
    try:
        return _exercise(provisioner, cluster, client, tmp_path)
    finally:
        for leftover in provisioner.list(cluster, "bursty"):
            provisioner.kill(leftover)


def _exercise(provisioner, cluster: str, client, tmp_path) -> dict:
    started = time.monotonic()
    [worker] = provisioner.start(cluster, "bursty", 1)
    assert [w.name for w in provisioner.list(cluster, "bursty")] == [worker.name]
    assert wait_until(lambda: any(r["state"] == "idle" for r in worker_rows(worker.node_prefix())), 120), (
        f"burst worker never heartbeated; log in {tmp_path}"
    )
    ready_s = time.monotonic() - started
    _, key = create_user("api")
    job = client.post("/v1/generations", json={"prompt": "burst", "model": "bursty"}, headers=auth(key)).json
    done = wait_done(client, key, job["id"], timeout=60)
    assert done["state"] == "succeeded", done
    provisioner.retire(worker)
    assert {r["state"] for r in worker_rows(worker.node_prefix())} == {"retiring"}
    provisioner.stop(worker)
    assert wait_until(lambda: not provisioner.list(cluster, "bursty"), 30)
    return {"ready_s": round(ready_s, 1)}


def test_local_provisioner_starts_lists_retires_and_stops_a_worker(bursty, client, tmp_path):
    provisioner = get_provisioner("local", root=tmp_path, extra_env=WORKER_ENV)
    figures = exercise(provisioner, "burstlocal", client, tmp_path)
    print(f"\nlocal burst worker: ready in {figures['ready_s']}s")


def test_slurm_provisioner_runs_a_worker_as_a_batch_job(bursty, client, tmp_path):
    from tests.support.slurm import require_slurm

    require_slurm()  # this process's private Slurm; SLURM_CONF, which sbatch/squeue/scancel read, names it
    provisioner = get_provisioner("slurm", log_dir=tmp_path, extra_env=WORKER_ENV)
    figures = exercise(provisioner, "burstslurm", client, tmp_path)
    print(f"\nslurm burst worker: ready in {figures['ready_s']}s")
