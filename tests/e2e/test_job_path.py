"""The whole job path on real services and real Celery workers (subprocesses, no eager mode).

POST -> Postgres -> dispatcher (control worker) -> pool tier queue -> GPU worker (CPU device)
running the real demo model -> cpu worker encoding H.264 + thumbnail -> S3 -> pre-signed URLs.
"""

from __future__ import annotations

import io
import math
import os
import time
import uuid

import av
import numpy as np
import pytest
import requests
from PIL import Image
from sqlalchemy import select, text

from app.core.config import get_settings
from app.core.storage import s3_client
from app.db.models import JobEvent
from app.db.session import transaction
from app.jobs import execution
from tests.support.factories import auth
from tests.support.frames import dominant_colour, motion_direction
from tests.support.jobs import wait_done
from tests.support.media import moving_square_mp4
from tests.support.stack import SESSION_STEP_S
from workers.repository import version_prefix

pytestmark = pytest.mark.slow


def decode(url: str) -> np.ndarray:
    data = requests.get(url, timeout=30).content
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])


@pytest.fixture()
def user(make_user, workers):
    return make_user("api")


@pytest.mark.parametrize(
    ("prompt", "colour", "direction"),
    [
        ("a red circle moving right", "red", "right"),
        ("a blue square moving up", "blue", "up"),
    ],
)
def test_text_to_video_follows_the_prompt(client, user, prompt, colour, direction):
    _, key = user
    response = client.post("/v1/generations", json={"prompt": prompt, "model": "demo", "seed": 3}, headers=auth(key))
    assert response.status_code == 202, response.json
    job = wait_done(client, key, response.json["id"])
    assert job["state"] == "succeeded", job
    assert job["progress"] == 1.0 and job["attempts"] == 1
    params = job["params"]
    frames = decode(job["assets"]["video"])
    assert frames.shape == (params["num_frames"], params["height"], params["width"], 3)
    assert dominant_colour(frames) == colour
    assert motion_direction(frames) == direction
    thumb = Image.open(io.BytesIO(requests.get(job["assets"]["thumbnail"], timeout=30).content))
    assert thumb.format == "JPEG" and max(thumb.size) <= 320
    timings = job["timings"]
    assert timings["created_at"] <= timings["dispatched_at"] <= timings["started_at"] <= timings["finished_at"]
    with transaction() as session:
        states = session.scalars(
            select(JobEvent.to_state).where(JobEvent.job_id == uuid.UUID(job["id"])).order_by(JobEvent.id)
        ).all()
    assert states[:3] == ["queued", "dispatched", "running"] and states[-1] == "succeeded"


def test_custom_size_and_frame_count(client, user):
    _, key = user
    response = client.post(
        "/v1/generations",
        json={
            "prompt": "a green triangle moving left",
            "model": "demo",
            "width": 96,
            "height": 64,
            "num_frames": 10,
            "fps": 10,
        },
        headers=auth(key),
    )
    job = wait_done(client, key, response.json["id"])
    assert job["state"] == "succeeded", job
    frames = decode(job["assets"]["video"])
    assert frames.shape == (10, 64, 96, 3)
    assert motion_direction(frames) == "left"


def test_modify_video_recolours_the_uploaded_clip(client, user):
    _, key = user
    clip = moving_square_mp4(frames=16, size=64, colour=(230, 30, 30), direction="right")
    upload = client.post("/v1/uploads", data=clip, headers={**auth(key), "Content-Type": "video/mp4"})
    assert upload.status_code == 201, upload.json
    response = client.post(
        "/v1/generations",
        json={"prompt": "make it blue", "model": "demo", "type": "modify_video", "upload_id": upload.json["id"]},
        headers=auth(key),
    )
    job = wait_done(client, key, response.json["id"])
    assert job["state"] == "succeeded", job
    frames = decode(job["assets"]["video"])
    assert dominant_colour(frames) == "blue"
    assert motion_direction(frames) == "right"


def test_prefer_wait_holds_the_post_until_done(client, user):
    _, key = user
    started = time.monotonic()
    response = client.post(
        "/v1/generations", json={"prompt": "quick", "model": "tiny"}, headers={**auth(key), "Prefer": "wait=30"}
    )
    assert response.status_code == 202
    assert response.json["state"] == "succeeded", response.json
    assert time.monotonic() - started < 30


def test_a_crash_in_model_code_fails_that_job_and_the_worker_keeps_serving(client, user):
    _, key = user
    bad = client.post("/v1/generations", json={"prompt": "please explode", "model": "tiny"}, headers=auth(key)).json
    job = wait_done(client, key, bad["id"])
    assert job["state"] == "failed"
    assert job["failure"] == {"code": "model_error", "message": "RuntimeError: tiny model exploded on purpose"}
    good = client.post("/v1/generations", json={"prompt": "fine", "model": "tiny"}, headers=auth(key)).json
    assert wait_done(client, key, good["id"])["state"] == "succeeded"


def test_a_gpu_out_of_memory_fails_that_job_and_the_worker_keeps_serving(client, user):
    _, key = user
    bad = client.post("/v1/generations", json={"prompt": "out of memory", "model": "tiny"}, headers=auth(key)).json
    job = wait_done(client, key, bad["id"])
    assert job["state"] == "failed"
    assert job["failure"]["code"] == "gpu_out_of_memory"
    assert "CUDA out of memory" in job["failure"]["message"]
    good = client.post("/v1/generations", json={"prompt": "fine", "model": "tiny"}, headers=auth(key)).json
    assert wait_done(client, key, good["id"])["state"] == "succeeded"


def test_a_version_whose_weights_were_corrupted_fails_with_a_clear_error(client, user, tiny_model, tmp_path):
    import shutil

    from tests.support.stack import TINY_BUNDLE, push_fixture_model

    _, key = user
    # A file no other version has: the cache shares identical files between versions, so a
    # corrupted copy of a shared file would never be read (it is already cached, verified).
    bundle = tmp_path / "bundle"
    shutil.copytree(TINY_BUNDLE, bundle)
    (bundle / "weights" / "own.safetensors").write_bytes(os.urandom(64))
    pushed = push_fixture_model("tiny", bundle, dispatch_limit=4, force=True)
    assert pushed["version"] > tiny_model["version"]
    s3_client().put_object(
        Bucket=get_settings().models_bucket,
        Key=version_prefix("tiny", pushed["version"]) + "weights/own.safetensors",
        Body=b"\x00" * 176,
    )
    response = client.post(
        "/v1/generations", json={"prompt": "x", "model": "tiny", "model_version": pushed["version"]}, headers=auth(key)
    )
    job = wait_done(client, key, response.json["id"])
    assert job["state"] == "failed"
    assert job["failure"]["code"] == "model_integrity"
    assert "weights/own.safetensors has sha256" in job["failure"]["message"]
    # The intact version still serves.
    ok = client.post(
        "/v1/generations",
        json={"prompt": "x", "model": "tiny", "model_version": tiny_model["version"]},
        headers=auth(key),
    ).json
    assert wait_done(client, key, ok["id"])["state"] == "succeeded"


def cancel_mid_run(client, key: str, model: str, num_frames: int) -> tuple[int, int]:
    """Cancel a running job once it has reported a step; (the step it had reported when the cancel
    was recorded, the step it stopped at).

    The cancel endpoint locks the job row, sets cancel_requested and answers with the row as it
    holds it, and every progress report is an UPDATE of that row: so the progress in the answer
    is the last step reported before the cancel committed, and every report after it sees the
    cancel. Steps report progress 0.9 * done / total (app/jobs/execution.py)."""
    job = client.post(
        "/v1/generations", json={"prompt": "slow", "model": model, "num_frames": num_frames}, headers=auth(key)
    ).json
    deadline = time.monotonic() + 60
    while True:
        current = client.get(f"/v1/generations/{job['id']}", headers=auth(key)).json
        if current["state"] == "running" and current["progress"] > 0:
            break
        assert current["state"] in ("queued", "dispatched", "running") and time.monotonic() < deadline, current
        time.sleep(0.05)
    response = client.post(f"/v1/generations/{job['id']}/cancel", headers=auth(key))
    assert response.status_code == 202 and response.json["cancel_requested"] is True, response.json
    reported = round(response.json["progress"] * num_frames / 0.9)
    assert 1 <= reported < num_frames, response.json  # cancelled mid-run, not after the last step
    done = wait_done(client, key, job["id"])
    assert done["state"] == "cancelled", done
    with transaction() as session:
        detail = session.execute(
            text("SELECT detail FROM job_events WHERE job_id = :id AND to_state = 'cancelled'"), {"id": job["id"]}
        ).scalar_one()
    return reported, detail["at_step"]


# A model step longer than the progress interval: every step reports, so every step checks.
SLOW_STEP_S = 0.3


@pytest.fixture()
def slow_steps_model(stack_env, workers, tmp_path_factory):
    """The tiny model as model `slowsteps`, on a worker of its own whose steps take SLOW_STEP_S (the
    session's workers step every 50 ms, faster than progress is reported)."""
    from tests.support.stack import TINY_BUNDLE, push_fixture_model, running_workers

    assert SLOW_STEP_S > execution.PROGRESS_INTERVAL_S
    push_fixture_model("slowsteps", TINY_BUNDLE, dispatch_limit=2)
    with running_workers(
        stack_env,
        tmp_path_factory.mktemp("slowsteps-logs"),
        models=["slowsteps"],
        control=0,  # the session's control worker dispatches
        tag="ss",
        extra_env={"DREAMQ_TINY_STEP_S": str(SLOW_STEP_S)},
    ):
        yield "slowsteps"


def test_cancel_a_running_job_stops_it_at_the_next_step(client, user, slow_steps_model):
    # The model runs step `reported + 1` while the cancel lands; it stops at that step's end,
    # before running another. One step is the feature's whole allowance: a step in flight is not
    # interrupted, and none starts after the cancel is seen.
    _, key = user
    reported, at_step = cancel_mid_run(client, key, slow_steps_model, num_frames=40)
    print(f"\ncancel recorded after step {reported}; stopped at step {at_step} ({SLOW_STEP_S}s steps)")
    assert at_step == reported + 1


def test_a_cancel_between_progress_reports_stops_at_the_next_report(client, user):
    # The session's tiny model steps every 50 ms, faster than progress is reported
    # (PROGRESS_INTERVAL_S): a step reports, and so checks for a cancel, when the interval has
    # passed since the last report. The job stops at the first report after the cancel, at most
    # that many steps on (load only makes steps longer, so fewer of them fit in the interval).
    _, key = user
    reported, at_step = cancel_mid_run(client, key, "tiny", num_frames=64)
    steps_per_report = math.ceil(execution.PROGRESS_INTERVAL_S / SESSION_STEP_S)
    print(f"\ncancel recorded after step {reported}; stopped at step {at_step} (a report every <= {steps_per_report})")
    assert reported + 1 <= at_step <= reported + steps_per_report


def test_a_busy_worker_takes_the_api_queue_before_the_free_queue(client, make_user, workers):
    """GPU workers consume their pool's tier queues in tier order (kombu priority strategy)."""
    _, api_key = make_user("api")
    _, free_key = make_user("free")
    long_job = client.post(
        "/v1/generations", json={"prompt": "long", "model": "tiny", "num_frames": 40}, headers=auth(api_key)
    ).json
    deadline = time.monotonic() + 30
    while client.get(f"/v1/generations/{long_job['id']}", headers=auth(api_key)).json["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Both wait in the broker behind the running job; free was queued first.
    free = client.post("/v1/generations", json={"prompt": "free", "model": "tiny"}, headers=auth(free_key)).json
    time.sleep(0.3)
    api = client.post("/v1/generations", json={"prompt": "api", "model": "tiny"}, headers=auth(api_key)).json
    done = {job["id"]: wait_done(client, key, job["id"]) for job, key in ((free, free_key), (api, api_key))}
    started = {tier: done[job["id"]]["timings"]["started_at"] for tier, job in (("free", free), ("api", api))}
    assert started["api"] < started["free"], started
