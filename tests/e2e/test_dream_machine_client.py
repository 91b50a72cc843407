"""Luma's official Python client (`lumaai`, unmodified) against a running dreamq.

The API runs under gunicorn (a real socket: the client changes only base_url and the key), jobs
run on the session's real Celery workers (the demo model on a CPU GPU-worker, finalize on the cpu
worker), and a callback receiver in the test checks every posted generation object and its
signature. What this covers: create, poll until completed, download and decode the video;
modify a video fetched from a URL; a failed generation; list, get, delete; ping and credits.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import time

import av
import lumaai
import numpy as np
import pytest
import requests
from PIL import Image

from tests.support.factories import auth
from tests.support.frames import dominant_colour, motion_direction
from tests.support.media import media_server, moving_square_mp4
from tests.support.webhooks import Receiver

pytestmark = pytest.mark.slow


@pytest.fixture()
def user(api_url, make_user):
    user_id, key = make_user("api")
    secret = requests.get(f"{api_url}/v1/webhooks/secret", headers=auth(key), timeout=10).json()["secret"]
    return key, secret


@pytest.fixture()
def luma(api_url, user, mapped):
    # The three lines the README shows: the official client, our URL, our key.
    client = lumaai.LumaAI(base_url=f"{api_url}/dream-machine/v1", auth_token=user[0])
    yield client
    client.close()


@pytest.fixture()
def allow(api_url, admin):
    created = []

    def add(port: int) -> None:
        response = requests.post(
            f"{api_url}/v1/admin/webhooks/allowlist",
            headers=admin,
            timeout=10,
            json={"network": "127.0.0.1/32", "port": port, "note": "dream machine e2e"},
        )
        assert response.status_code == 201, response.text
        created.append(response.json()["id"])

    yield add
    for entry_id in created:
        requests.delete(f"{api_url}/v1/admin/webhooks/allowlist/{entry_id}", headers=admin, timeout=10)


def poll(client: lumaai.LumaAI, generation_id: str, timeout: float = 120) -> lumaai.types.Generation:
    """What Luma's documentation tells clients to do: get until completed or failed."""
    deadline = time.monotonic() + timeout
    while True:
        generation = client.generations.get(generation_id)
        if generation.state in ("completed", "failed"):
            return generation
        assert time.monotonic() < deadline, f"{generation_id} still {generation.state}"
        time.sleep(0.3)


def decode(url: str) -> np.ndarray:
    response = requests.get(url, timeout=30)
    assert response.status_code == 200
    with av.open(io.BytesIO(response.content)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])


def callbacks(receiver: Receiver, secret: str, generation_id: str, count: int, timeout: float = 30) -> list[dict]:
    """The generation objects posted for one generation, each signature verified, in order."""
    deadline = time.monotonic() + timeout
    while True:
        bodies = []
        for request in receiver.requests:
            body = json.loads(request.body)
            if body.get("id") != generation_id:
                continue
            timestamp = request.headers["X-Dreamq-Timestamp"]
            expected = (
                "sha256="
                + hmac.new(secret.encode(), f"{timestamp}.".encode() + request.body, hashlib.sha256).hexdigest()
            )
            assert hmac.compare_digest(expected, request.headers["X-Dreamq-Signature"])
            assert abs(time.time() - int(timestamp)) < 300
            bodies.append(body)
        if len(bodies) >= count:
            return bodies
        assert time.monotonic() < deadline, f"{len(bodies)} of {count} callbacks: {bodies}"
        time.sleep(0.1)


def test_create_poll_download_and_decode_with_callbacks(luma, user, allow):
    with Receiver() as receiver:
        allow(receiver.port)
        created = luma.generations.create(
            model="ray-2",
            prompt="a red circle moving right",
            aspect_ratio="16:9",
            duration="2s",
            callback_url=receiver.url("/luma"),
        )
        assert created.state == "queued" and created.model == "ray-2"
        done = poll(luma, created.id)
        assert done.state == "completed", done
        assert done.failure_reason is None and done.request.prompt == "a red circle moving right"
        frames = decode(done.assets.video)
        # 16:9 from the demo model's 128 px default short side; 2 s at its 12 fps.
        assert frames.shape == (24, 128, 228, 3)
        assert dominant_colour(frames) == "red" and motion_direction(frames) == "right"
        image = Image.open(io.BytesIO(requests.get(done.assets.image, timeout=30).content))
        assert image.format == "JPEG"
        posted = callbacks(receiver, user[1], created.id, 2)
    # Luma's callback: the generation object when it starts dreaming and when it completes.
    assert [b["state"] for b in posted] == ["dreaming", "completed"]
    parsed = [lumaai.types.Generation.model_validate(b) for b in posted]
    assert all(p.id == created.id and p.model == "ray-2" and p.generation_type == "video" for p in parsed)
    assert parsed[0].assets is None and parsed[1].assets.video
    assert all(r.path == "/luma" and r.headers["X-Dreamq-Event"] in ("started", "completed") for r in receiver.requests)


def test_modify_a_video_fetched_from_its_url(luma, user, allow):
    clip = moving_square_mp4(frames=16, size=64, colour=(230, 30, 30), direction="right")
    with media_server(clip, headers={"Content-Type": "video/mp4"}) as port:
        allow(port)
        created = luma.generations.video.modify(
            generation_type="modify_video",
            model="ray-2",
            mode="flex_1",
            media={"url": f"http://127.0.0.1:{port}/input.mp4"},
            prompt="make it blue",
        )
    done = poll(luma, created.id)
    assert done.state == "completed", done
    assert done.request.generation_type == "modify_video" and done.request.mode == "flex_1"
    frames = decode(done.assets.video)
    assert frames.shape == (16, 64, 64, 3)  # the input's size and length
    assert dominant_colour(frames) == "blue" and motion_direction(frames) == "right"


def test_a_failed_generation_says_why_in_its_object_and_callback(luma, user, allow):
    with Receiver() as receiver:
        allow(receiver.port)
        created = luma.generations.create(model="ray-flash-2", prompt="please explode", callback_url=receiver.url())
        done = poll(luma, created.id)
        assert done.state == "failed" and done.failure_reason == "RuntimeError: tiny model exploded on purpose"
        assert done.assets is None
        posted = callbacks(receiver, user[1], created.id, 2)
    assert [b["state"] for b in posted] == ["dreaming", "failed"]
    assert posted[-1]["failure_reason"] == done.failure_reason


def test_list_get_delete_ping_and_credits(luma, api_url, user):
    assert luma.ping.check().message == "pong"
    assert luma.credits.get().credit_balance > 0
    first = luma.generations.create(model="ray-2", prompt="a green square moving left")
    second = luma.generations.create(model="ray-2", prompt="a blue triangle moving up")
    listed = luma.generations.list(limit=10)
    assert [g.id for g in listed.generations][:2] == [second.id, first.id] and listed.has_more is False
    done = poll(luma, first.id)
    assert done.state == "completed"
    video_url = done.assets.video
    assert requests.get(video_url, timeout=30).status_code == 200
    luma.generations.delete(first.id)
    with pytest.raises(lumaai.NotFoundError):
        luma.generations.get(first.id)
    assert [g.id for g in luma.generations.list().generations] == [second.id]
    # Its outputs are gone too; the job stays in /v1 (quotas, audit), without assets.
    assert requests.get(video_url, timeout=30).status_code == 404
    job = requests.get(f"{api_url}/v1/generations/{first.id}", headers=auth(user[0]), timeout=10).json()
    assert job["state"] == "succeeded" and job["assets"] is None
    with pytest.raises(lumaai.BadRequestError) as excinfo:
        luma.generations.create(model="ray-2", prompt="a red circle moving right", resolution="1080p")
    assert "1080p is 1080x1080 pixels" in excinfo.value.body["detail"]


def test_the_async_client_works_the_same_way(api_url, user, mapped):
    import asyncio

    async def run() -> lumaai.types.Generation:
        async with lumaai.AsyncLumaAI(base_url=f"{api_url}/dream-machine/v1", auth_token=user[0]) as client:
            created = await client.generations.create(model="ray-2", prompt="a yellow square moving down")
            deadline = time.monotonic() + 120
            while (generation := await client.generations.get(created.id)).state not in ("completed", "failed"):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.3)
            return generation

    done = asyncio.run(run())
    assert done.state == "completed", done
    frames = decode(done.assets.video)
    assert dominant_colour(frames) == "yellow" and motion_direction(frames) == "down"
