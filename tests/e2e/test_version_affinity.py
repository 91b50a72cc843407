"""Version affinity and live switching on real workers.

1. A mixed-version workload on two workers that can each hold one version in memory, run with the
   dispatcher's affinity off and on (DREAMQ_DISPATCH_AFFINITY), same jobs, same workers: the
   model loads the workers report are compared in the same test. The figures are printed.
2. The routing rule on the database: a worker is a holder of the version it will hold when it
   reaches the job, not of the one it holds now.
3. A promote while a worker runs a job: the running job finishes on the old version, the next
   job runs the new one, without restarting the worker.
"""

from __future__ import annotations

import io
import shutil
import time

import av
import numpy as np
import pytest
import requests
from sqlalchemy import text

from app.db.session import transaction
from app.scheduling.dispatcher import AFFINITY_DEPTH
from tests.support.factories import auth, create_user
from tests.support.stack import TINY_BUNDLE, push_fixture_model, running_workers

pytestmark = pytest.mark.slow


def wait_all(client, key, ids, timeout=120):
    deadline = time.monotonic() + timeout
    jobs = {}
    while time.monotonic() < deadline:
        jobs = {i: client.get(f"/v1/generations/{i}", headers=auth(key)).json for i in ids}
        if all(j["state"] in ("succeeded", "failed", "cancelled") for j in jobs.values()):
            return jobs
        time.sleep(0.2)
    raise AssertionError(f"not done: { {i: j['state'] for i, j in jobs.items()} }")


def worker_loads(tag: str) -> dict[str, int]:
    """Model loads per worker of this run, as the workers report them (workers.info.loads)."""
    with transaction() as session:
        rows = session.execute(
            text("SELECT id, COALESCE(CAST(info ->> 'loads' AS int), 0) FROM workers WHERE id LIKE :t ORDER BY id"),
            {"t": f"%-{tag}-%"},
        ).all()
    return {worker_id.split("@")[0]: loads for worker_id, loads in rows}


def versions_run(ids: list[str]) -> dict[str, str]:
    """Per worker, the versions of the jobs it started, in order (1 = first version, 2 = second)."""
    with transaction() as session:
        rows = session.execute(
            text(
                "SELECT e.worker_id, v.number FROM job_events e JOIN jobs j ON j.id = e.job_id "
                "JOIN model_versions v ON v.id = j.model_version_id "
                "WHERE e.job_id = ANY(CAST(:ids AS uuid[])) AND e.to_state = 'running' ORDER BY e.at, e.id"
            ),
            {"ids": ids},
        ).all()
    first = min(number for _, number in rows)
    runs: dict[str, str] = {}
    for worker_id, number in rows:
        name = worker_id.split("@")[0]
        runs[name] = runs.get(name, "") + str(number - first + 1)
    return runs


@pytest.fixture(scope="module")
def affinity_model(stack_env):
    name = "affinity"
    first = push_fixture_model(name, TINY_BUNDLE, dispatch_limit=4)
    second = push_fixture_model(name, TINY_BUNDLE, dispatch_limit=4, force=True)
    assert first["digest"] != second["digest"]  # two versions in memory, not one under two numbers
    return name, first["version"], second["version"]


WORKERS = 2
# Waves of one pair: one job of each version, released together to two idle workers. Without
# affinity which worker takes which is decided by who asks first, never by the version, so no
# schedule fits the Thue-Morse order below; with it, each job goes to its version's holder. (In
# waves of four pairs a version had more jobs than its holder's queue takes, AFFINITY_DEPTH; the
# rest go to the pool's queue by design, where the other worker may take one and load: 8 loads
# on waves 2-4 in 2 runs of 8, a measure of that trade-off rather than of the routing. In waves
# of two pairs each wave read a, b, b, a, and without affinity the worker that took b first
# often took the second b too: 6 loads in one run.)
WAVES = 24
PAIRS_PER_WAVE = 1
# Loads on waves 2 to WAVES (every worker already holds a version): with affinity at least this
# many fewer than without. Measured in 3 runs on a loaded 2-core machine: 0 with, 20 to 34 without.
AFFINITY_MARGIN = 6


def mixed_versions(versions: tuple[int, int]) -> list[int]:
    """The workload's versions in submission order: pairs of one job of each version, the order
    within pair k given by the Thue-Morse bit of k (the parity of its binary digits). Pairs keep
    the two versions balanced at every point of the queue, so routing by version can keep both
    workers busy on the version each holds. Thue-Morse has no period: under strict alternation
    two workers taking turns never reloaded (4 loads for 32 jobs without affinity, the luck that
    made the old comparison meaningless); on this order workers that take whatever comes next
    reload whichever way they interleave."""
    order: list[int] = []
    for k in range(WAVES * PAIRS_PER_WAVE):
        first, second = versions if bin(k).count("1") % 2 == 0 else versions[::-1]
        order.extend((first, second))
    return order


def run_mixed_workload(
    client, stack_env, logs, model, versions, *, affinity: bool
) -> tuple[list[int], dict[str, str], float]:
    """Loads after each wave (all workers of the run together), the versions each worker ran, and the time."""
    tag = f"aff{int(affinity)}"
    env = {
        # The dispatcher's switch (tasks/dispatch.py): off, every job goes to the pool's queue.
        "DREAMQ_DISPATCH_AFFINITY": "1" if affinity else "0",
        "DREAMQ_MAX_LOADED_MODELS": "1",
        "DREAMQ_PRELOAD": "0",
        "DREAMQ_TINY_STEP_S": "0.05",
    }
    order = mixed_versions(versions)
    wave_size = 2 * PAIRS_PER_WAVE
    with running_workers(stack_env, logs / tag, models=[model] * WORKERS, control=1, tag=tag, extra_env=env):
        _, key = create_user("api")
        started = time.monotonic()
        ids: list[str] = []
        loads: list[int] = []
        for wave in range(WAVES):
            for i, version in enumerate(order[wave * wave_size : (wave + 1) * wave_size]):
                ids.append(
                    client.post(
                        "/v1/generations",
                        json={"prompt": f"w{wave}-{i}", "model": model, "model_version": version},
                        headers=auth(key),
                    ).json["id"]
                )
            jobs = wait_all(client, key, ids)
            # A worker records a load (workers.info.loads) before the job that needed it runs.
            per_worker = worker_loads(tag)
            assert len(per_worker) == WORKERS, per_worker
            loads.append(sum(per_worker.values()))
        elapsed = time.monotonic() - started
        assert {j["state"] for j in jobs.values()} == {"succeeded"}
        return loads, versions_run(ids), elapsed


def test_affinity_saves_model_loads_on_a_mixed_version_workload(client, stack_env, affinity_model, tmp_path_factory):
    model, v1, v2 = affinity_model
    assert PAIRS_PER_WAVE <= AFFINITY_DEPTH  # a wave's jobs of a version fit in what their holder takes
    logs = tmp_path_factory.mktemp("affinity-logs")
    # Same workload, same number of workers (fresh ones for each run); only the dispatcher's
    # affinity switch differs.
    without, runs_without, t_without = run_mixed_workload(client, stack_env, logs, model, (v1, v2), affinity=False)
    with_affinity, runs_with, t_with = run_mixed_workload(client, stack_env, logs, model, (v1, v2), affinity=True)
    # Wave 1 is the cold start: no worker holds a version yet, so the first jobs go to the pool's
    # queue in either mode. From wave 2 on every worker holds one, and affinity has something to
    # route by.
    warm_without, warm_with = without[-1] - without[0], with_affinity[-1] - with_affinity[0]
    print(
        f"\nmodel loads, {WAVES} waves of {2 * PAIRS_PER_WAVE} jobs on 2 versions, {WORKERS} workers holding 1 version "
        f"each (after each wave): without affinity {without} ({t_without:.1f}s), with {with_affinity} ({t_with:.1f}s); "
        f"waves 2-{WAVES}: without {warm_without}, with {warm_with}\n"
        f"versions each worker ran, without: {runs_without}; with: {runs_with}"
    )
    # Routed by version, a worker keeps what it holds: after the cold start, a switch is needed
    # only where both workers ended it holding the same version (one of them changes, once).
    assert warm_with <= WORKERS - 1, (with_affinity, runs_with)
    # And in all, cold start included: each worker loads each of the 2 versions at most once.
    assert with_affinity[-1] <= 2 * WORKERS, (with_affinity, runs_with)
    assert warm_with + AFFINITY_MARGIN <= warm_without, (with_affinity, without)


def test_a_holder_about_to_load_another_version_is_routed_by_that_version(stack_env):
    """The dispatcher routes by what a worker will hold when it reaches the job: a worker that
    holds v1 but has claimed a v2 job (from the pool's queue) is loading v2 over v1, so a v1 job
    routed to it would load v1 again. Routed by what it held, two workers swapped versions on
    nearly every job in half the runs of an earlier form of the workload above (21 loads for 32
    jobs, against 18 without affinity)."""
    from app.core.queues import worker_queue
    from tests.support.lanes import Lane

    lane = Lane(dispatch_limit=4)
    user, _ = create_user("api")
    v2_id, _ = lane.add_version(2)
    lane.workers(1, state="busy")
    (running,) = lane.jobs(user, "api", 1, state="running")
    v1_job, v2_job = lane.jobs(user, "api", 2)
    with transaction() as session:
        worker = session.execute(
            text(
                "UPDATE workers SET info = jsonb_build_object('loaded', jsonb_build_array(CAST(:d AS text))) "
                "WHERE pool_id = :p RETURNING id"
            ),
            {"d": lane.version_digest, "p": lane.pool_id},
        ).scalar_one()
        session.execute(
            text(
                "UPDATE jobs SET model_version_id = :v, pool_id = :p, worker_id = :w, started_at = now() WHERE id = :id"
            ),
            {"v": v2_id, "p": lane.pool_id, "w": worker, "id": running},
        )
        session.execute(text("UPDATE jobs SET model_version_id = :v WHERE id = :id"), {"v": v2_id, "id": v2_job})
        releases = {r.job_id: r.queue for r in lane.dispatcher().run_pass(session).releases}
    own, shared = worker_queue(f"{lane.cluster}.{lane.model}", worker, "api"), f"{lane.cluster}.{lane.model}.api"
    assert releases == {v1_job: shared, v2_job: own}, releases


def decode(url: str) -> np.ndarray:
    with av.open(io.BytesIO(requests.get(url, timeout=30).content)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_a_promote_is_picked_up_by_a_running_worker_without_restart(client, stack_env, tmp_path_factory):
    name = "switch"
    old = push_fixture_model(name, TINY_BUNDLE, dispatch_limit=2)
    # The new version paints every frame black: which code produced a video is visible in it.
    bundle = tmp_path_factory.mktemp("switch") / "bundle"
    shutil.copytree(TINY_BUNDLE, bundle)
    init = bundle / "code" / "tiny_model" / "__init__.py"
    init.write_text(init.read_text().replace("return np.stack(frames)", "return np.zeros_like(np.stack(frames))"))
    new = push_fixture_model(name, bundle, dispatch_limit=2, force=True)
    admin = create_user("enterprise", scopes=("user", "admin"))[1]
    _, key = create_user("api")
    with running_workers(
        stack_env,
        tmp_path_factory.mktemp("switch-logs"),
        models=[name],
        control=1,
        tag="sw",
        extra_env={"DREAMQ_TINY_STEP_S": "0.1"},
    ):
        running = client.post(
            "/v1/generations", json={"prompt": "long", "model": name, "num_frames": 30}, headers=auth(key)
        ).json
        deadline = time.monotonic() + 30
        while client.get(f"/v1/generations/{running['id']}", headers=auth(key)).json["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        promoted = client.post(
            f"/v1/admin/models/{name}/promote", json={"version": new["version"]}, headers=auth(admin)
        )
        assert promoted.status_code == 200, promoted.json
        after = client.post("/v1/generations", json={"prompt": "after", "model": name}, headers=auth(key)).json
        jobs = wait_all(client, key, [running["id"], after["id"]])
    first, second = jobs[running["id"]], jobs[after["id"]]
    assert first["state"] == second["state"] == "succeeded"
    assert first["model"]["version"] == old["version"] and second["model"]["version"] == new["version"]
    assert decode(first["assets"]["video"]).max() > 0  # the old code ran the job that was running
    assert decode(second["assets"]["video"]).max() <= 16  # the new code ran the next one (black, H.264 noise)
