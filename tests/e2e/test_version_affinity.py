"""Version affinity and live switching on real workers.

1. A mixed-version workload on two workers that can each hold one version in memory: the model
   loads with affinity on and off are counted (reported by the workers), and affinity must save
   loads. The figures are printed for the closing note.
2. A promote while a worker runs a job: the running job finishes on the old version, the next
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


def worker_loads(tag: str) -> int:
    with transaction() as session:
        return session.execute(
            text("SELECT COALESCE(sum(CAST(info ->> 'loads' AS int)), 0) FROM workers WHERE id LIKE :t"),
            {"t": f"%-{tag}-%"},
        ).scalar_one()


@pytest.fixture(scope="module")
def affinity_model(stack_env):
    name = "affinity"
    first = push_fixture_model(name, TINY_BUNDLE, dispatch_limit=4)
    second = push_fixture_model(name, TINY_BUNDLE, dispatch_limit=4, force=True)
    return name, first["version"], second["version"]


def run_mixed_workload(client, stack_env, logs, model, versions, *, affinity: bool) -> tuple[int, float]:
    tag = f"aff{int(affinity)}"
    env = {
        "DREAMQ_DISPATCH_AFFINITY": "1" if affinity else "0",
        "DREAMQ_MAX_LOADED_MODELS": "1",
        "DREAMQ_PRELOAD": "0",
        "DREAMQ_TINY_STEP_S": "0.05",
    }
    with running_workers(stack_env, logs / tag, models=[model, model], control=1, tag=tag, extra_env=env):
        _, key = create_user("api")
        started = time.monotonic()
        # Four waves of eight jobs, versions interleaved: a worker that takes whatever comes
        # next keeps switching; one fed by version keeps what it holds.
        ids = []
        for wave in range(4):
            for i in range(8):
                version = versions[(i + wave) % 2]
                ids.append(
                    client.post(
                        "/v1/generations",
                        json={"prompt": f"w{wave}-{i}", "model": model, "model_version": version},
                        headers=auth(key),
                    ).json["id"]
                )
            wait_all(client, key, ids)
        elapsed = time.monotonic() - started
        jobs = wait_all(client, key, ids)
        assert {j["state"] for j in jobs.values()} == {"succeeded"}
        time.sleep(0.5)
        return worker_loads(tag), elapsed


def test_affinity_saves_model_loads_on_a_mixed_version_workload(client, stack_env, affinity_model, tmp_path_factory):
    model, v1, v2 = affinity_model
    logs = tmp_path_factory.mktemp("affinity-logs")
    without, t_without = run_mixed_workload(client, stack_env, logs, model, (v1, v2), affinity=False)
    with_affinity, t_with = run_mixed_workload(client, stack_env, logs, model, (v1, v2), affinity=True)
    print(
        f"\nmodel loads for 32 jobs, 2 versions, 2 workers holding 1 version each: "
        f"without affinity {without} ({t_without:.1f}s), with affinity {with_affinity} ({t_with:.1f}s)"
    )
    # Without affinity the count is luck: two workers that fall into lockstep with the
    # alternating versions never reload (seen 4), out of step they reload on most jobs (seen 9 to
    # 14). So the check is absolute: routing by version keeps loads to a handful (seen 2 to 6),
    # where taking jobs as they come averages one load every two to three jobs.
    assert with_affinity <= 8


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
