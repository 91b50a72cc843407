"""A rollback while a job runs leaves that job on its version (docs/models.md, Aliases).

"A job resolves its version when it is submitted ... and records it: an alias move changes what
new jobs get, never what a queued or running job uses." tests/e2e/test_version_affinity.py proves
it for a promote; here prod is rolled back from version N to N-1 in the middle of a job on N, on
a real worker: the running job finishes on N (its recorded version, the version its worker had
loaded and kept, and N's code in the video it made) in the one attempt it started with, and the
job submitted after the rollback runs N-1 on the same worker, without a restart.

Which code made a video is visible in it: version N paints every frame black, N-1 the fixture's
gradient.
"""

from __future__ import annotations

import io
import shutil

import av
import numpy as np
import pytest
import requests
from sqlalchemy import text

from app.db.session import transaction
from tests.support.factories import auth, create_user
from tests.support.stack import TINY_BUNDLE, push_fixture_model, running_workers
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

MODEL = "rollback"
# 60 steps of 0.1 s: the job runs about 6 s, long enough to roll back in its middle on a loaded host.
STEP_S, FRAMES = 0.1, 60


def decode(url: str) -> np.ndarray:
    with av.open(io.BytesIO(requests.get(url, timeout=30).content)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def worker_row(worker_id: str):
    with transaction() as session:
        return session.execute(text("SELECT current_job_id, info FROM workers WHERE id = :id"), {"id": worker_id}).one()


def job_events(job_id: str) -> list[tuple[str | None, str, dict]]:
    with transaction() as session:
        return [
            tuple(row)
            for row in session.execute(
                text("SELECT from_state, to_state, detail FROM job_events WHERE job_id = :id ORDER BY id"),
                {"id": job_id},
            )
        ]


def test_a_rollback_while_a_job_runs_leaves_it_on_its_version_and_new_jobs_get_the_previous_one(
    client, stack_env, tmp_path_factory
):
    previous = push_fixture_model(MODEL, TINY_BUNDLE, dispatch_limit=2)
    bundle = tmp_path_factory.mktemp("rollback") / "bundle"
    shutil.copytree(TINY_BUNDLE, bundle)
    init = bundle / "code" / "tiny_model" / "__init__.py"
    init.write_text(init.read_text().replace("return np.stack(frames)", "return np.zeros_like(np.stack(frames))"))
    current = push_fixture_model(MODEL, bundle, dispatch_limit=2, force=True)
    assert current["version"] == previous["version"] + 1
    admin = auth(create_user("enterprise", scopes=("user", "admin"))[1])
    promoted = client.post(f"/v1/admin/models/{MODEL}/promote", json={"version": current["version"]}, headers=admin)
    assert promoted.status_code == 200, promoted.json
    _, key = create_user("api")

    def job(job_id: str) -> dict:
        return client.get(f"/v1/generations/{job_id}", headers=auth(key)).json

    with running_workers(
        stack_env,
        tmp_path_factory.mktemp("rollback-logs"),
        models=[MODEL],
        control=1,
        tag="rb",
        extra_env={"DREAMQ_TINY_STEP_S": str(STEP_S)},
    ) as handles:
        worker_id = wait_until(lambda: _worker_id(handles["gpu_workers"][0]), 30, "the GPU worker's row")
        running = client.post(
            "/v1/generations", json={"prompt": "long", "model": MODEL, "num_frames": FRAMES}, headers=auth(key)
        ).json
        assert running["model"]["version"] == current["version"]
        # Running and past its first steps: the model is loaded and generating.
        wait_until(
            lambda: job(running["id"])["state"] == "running" and job(running["id"])["progress"] > 0, 60, "a step"
        )

        rolled = client.post(f"/v1/admin/models/{MODEL}/rollback", headers=admin)
        assert rolled.status_code == 200, rolled.json
        assert rolled.json["aliases"]["prod"]["version"] == previous["version"]
        during = job(running["id"])
        assert during["state"] == "running", f"the job was no longer running at the rollback: {during['state']}"
        assert during["model"]["version"] == current["version"]
        current_job, info = worker_row(worker_id)
        assert str(current_job) == running["id"]
        assert current["digest"] in info["loaded"]  # the worker holds N while its job uses it
        loads_during = info["loads"]

        after = client.post("/v1/generations", json={"prompt": "after", "model": MODEL}, headers=auth(key)).json
        assert after["model"]["version"] == previous["version"]
        finished = {
            job_id: wait_until(
                lambda job_id=job_id: (j := job(job_id))["state"] in ("succeeded", "failed", "cancelled") and j,
                90,
                f"job {job_id} to finish",
            )
            for job_id in (running["id"], after["id"])
        }
        _, info_after = worker_row(worker_id)

    first, second = finished[running["id"]], finished[after["id"]]
    assert first["state"] == second["state"] == "succeeded", (first, second)
    assert first["model"]["version"] == current["version"] and second["model"]["version"] == previous["version"]
    # One attempt, never requeued or restarted by the rollback.
    events = job_events(running["id"])
    assert [to for _, to, detail in events if "step" not in (detail or {})] == [
        "queued",
        "dispatched",
        "running",
        "succeeded",
    ]
    assert decode(first["assets"]["video"]).max() <= 16  # N's code made it (black, H.264 noise)
    assert decode(second["assets"]["video"]).max() > 0  # N-1's code made the next one
    # The same worker loaded N-1 for the next job, without a restart.
    assert previous["digest"] in info_after["loaded"] and info_after["loads"] == loads_during + 1


def _worker_id(name: str) -> str | None:
    with transaction() as session:
        return session.execute(text("SELECT id FROM workers WHERE id LIKE :n"), {"n": f"{name}@%"}).scalar()
