"""/dream-machine/v1 through Luma's own Python client (`lumaai`, unmodified), in-process.

The client talks HTTP to the real Flask app through httpx's WSGI transport: everything below the
socket is real (Postgres, Redis buckets, S3, the address rule). Jobs go to model `parked` (a pool
with no worker), so they stay queued: this file is about the API contract and every refusal; the
run to a decoded video, modify-video and callbacks through real workers and gunicorn are in
tests/e2e/test_dream_machine_client.py.
"""

from __future__ import annotations

import uuid

import httpx
import lumaai
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from app.cli import main as cli
from app.db.models import DreamMachineModel, Job
from app.db.session import transaction
from tests.support.factories import auth, create_tier
from tests.support.media import media_server, moving_square_mp4

BASE = "http://dreamq.test/dream-machine/v1"


@pytest.fixture()
def admin_key(make_user):
    return make_user("api", scopes=("user", "admin"))[1]


@pytest.fixture()
def mapped(client, admin_key, parked_model):
    """ray-2 -> parked (jobs stay queued), through the admin route."""
    response = client.put(
        "/v1/admin/dream-machine/models/ray-2", json={"model": "parked", "note": "tests"}, headers=auth(admin_key)
    )
    assert response.status_code == 200, response.json
    return response.json


@pytest.fixture()
def luma(flask_app):
    """Factory: Luma's client for a key, no retries (a 429 must surface, not be waited out)."""
    made = []

    def make(key: str) -> lumaai.LumaAI:
        http = httpx.Client(transport=httpx.WSGITransport(app=flask_app), base_url=BASE)
        made.append(http)
        return lumaai.LumaAI(auth_token=key, base_url=BASE, http_client=http, max_retries=0)

    yield make
    for http in made:
        http.close()


@pytest.fixture()
def user(make_user):
    return make_user("api")


def job_row(generation_id: str) -> Job:
    with transaction() as session:
        job = session.get(Job, uuid.UUID(generation_id))
        session.expunge(job)
        return job


def test_ping_and_credits(luma, user, make_user, mapped):
    client = luma(user[1])
    assert client.ping.check().message == "pong"
    assert client.credits.get().credit_balance == 2**53 - 1  # the api tier has no monthly quota
    free = luma(make_user("free")[1])
    before = free.credits.get().credit_balance
    assert before == 30  # the free tier's monthly quota, none used yet
    free.generations.create(model="ray-2", prompt="a red circle moving right")
    assert free.credits.get().credit_balance == before - 1


def test_create_get_list_delete(luma, user, mapped, client):
    luma_client = luma(user[1])
    created = luma_client.generations.create(
        model="ray-2", prompt="a red circle moving right", aspect_ratio="16:9", resolution="32p", duration="2s"
    )
    assert isinstance(created, lumaai.types.Generation)
    assert created.state == "queued" and created.generation_type == "video" and created.model == "ray-2"
    assert created.assets is None and created.failure_reason is None and created.created_at is not None
    assert created.request.model == "ray-2" and created.request.aspect_ratio == "16:9"
    assert created.request.resolution == "32p" and created.request.duration == "2s"
    # Same job as /v1 sees it: 32p at 16:9 on the parked (tiny) model, 2 s at its 8 fps.
    job = client.get(f"/v1/generations/{created.id}", headers=auth(user[1])).json
    assert (job["params"]["width"], job["params"]["height"], job["params"]["num_frames"]) == (56, 32, 16)
    assert job["model"]["name"] == "parked" and job["state"] == "queued"

    fetched = luma_client.generations.get(created.id)
    assert fetched.id == created.id and fetched.state == "queued"
    second = luma_client.generations.video.create(model="ray-2", prompt="a blue square moving up")
    page = luma_client.generations.list(limit=1)
    assert [g.id for g in page.generations] == [second.id] and page.has_more and page.count == 1
    page = luma_client.generations.list(limit=1, offset=1)
    assert [g.id for g in page.generations] == [created.id]

    assert luma_client.generations.delete(created.id) is None
    with pytest.raises(lumaai.NotFoundError):
        luma_client.generations.get(created.id)
    with pytest.raises(lumaai.NotFoundError):
        luma_client.generations.delete(created.id)
    assert created.id not in [g.id for g in luma_client.generations.list(limit=100).generations]
    # Deleting cancelled the queued job; the row stays for quotas and audit.
    assert job_row(created.id).state == "cancelled"


def test_another_users_generation_is_not_found(luma, user, make_user, mapped):
    mine = luma(user[1]).generations.create(model="ray-2", prompt="a red circle moving right")
    other = luma(make_user("api")[1])
    with pytest.raises(lumaai.NotFoundError):
        other.generations.get(mine.id)
    with pytest.raises(lumaai.NotFoundError):
        other.generations.delete(mine.id)
    with pytest.raises(lumaai.NotFoundError):
        other.generations.get("not-a-uuid")
    assert luma(user[1]).generations.get(mine.id).state == "queued"


def _error(excinfo) -> str:
    body = excinfo.value.body
    assert isinstance(body, dict) and body["detail"] == body["error"]["message"], body
    return body["detail"]


@pytest.mark.parametrize(
    ("options", "field", "words"),
    [
        ({"model": "ray-9"}, "model", "'ray-9' is not a model this server serves"),
        ({"loop": True}, "loop", "looping videos are not supported by model 'ray-2' (dreamq model 'parked')"),
        (
            {"keyframes": {"frame0": {"type": "image", "url": "https://example.com/a.jpg"}}},
            "keyframes",
            "not supported",
        ),
        (
            {"keyframes": {"frame1": {"type": "generation", "id": "7b0e6a4c-5b8c-4f5e-9d7a-2c1b3a4d5e6f"}}},
            "keyframes",
            "not supported",
        ),
        ({"concepts": [{"key": "dolly_zoom"}]}, "concepts", "not supported"),
        ({"prompt": None}, "prompt", "a prompt is required"),
        ({"prompt": "ab"}, "prompt", "too short"),
        # The parked (tiny) model allows at most 256 px and 64 frames.
        (
            {"resolution": "720p", "aspect_ratio": "16:9"},
            "resolution",
            "720p at 16:9 is 1280x720 pixels; model 'ray-2' "
            "(dreamq model 'parked') needs width must be at most 256 for this model (got 1280)",
        ),
        ({"aspect_ratio": "21:9", "resolution": "200p"}, "resolution", "is 466x200 pixels"),
        (
            {"duration": "9s"},
            "duration",
            "9s at 8 fps is 72 frames; model 'ray-2' (dreamq model 'parked') needs num_frames must be at most 64",
        ),
        ({"callback_url": "http://127.0.0.1:9/hook"}, "callback_url", "loopback"),
    ],
)
def test_options_the_model_cannot_honour_are_400s_naming_them(luma, user, mapped, options, field, words):
    request = {"model": "ray-2", "prompt": "a red circle moving right", **options}
    with pytest.raises(lumaai.BadRequestError) as excinfo:
        luma(user[1]).generations.create(**{k: v for k, v in request.items() if v is not None})
    message = _error(excinfo)
    assert message.startswith(f"{field}: ") and words in message, message
    assert excinfo.value.body["error"]["fields"][0]["field"] == field
    with transaction() as session:
        assert session.scalar(select(Job).where(Job.user_id == user[0])) is None, "nothing was stored"


@pytest.mark.parametrize(
    "options",
    [
        {"aspect_ratio": "2:1"},
        {"resolution": "big"},
        {"duration": "forever"},
        {"duration": "0s"},
        {"loop": "sometimes"},
        {"keyframes": {"frame0": {"type": "video", "url": "https://example.com/a.mp4"}}},
        {"generation_type": "image"},
        {"callback_url": "ftp://example.com/hook"},
    ],
)
def test_malformed_requests_are_422s(luma, user, mapped, options):
    with pytest.raises(lumaai.UnprocessableEntityError) as excinfo:
        luma(user[1]).generations.create(model="ray-2", prompt="a red circle moving right", **options)
    assert _error(excinfo)


def test_unknown_fields_and_bad_json_are_refused(luma, user, mapped, client):
    with pytest.raises(lumaai.UnprocessableEntityError) as excinfo:
        luma(user[1]).generations.create(model="ray-2", prompt="a red circle", extra_body={"negative_prompt": "x"})
    assert "unknown field" in _error(excinfo)
    response = client.post(
        "/dream-machine/v1/generations/video", data=b"{", headers={**auth(user[1]), "Content-Type": "application/json"}
    )
    assert response.status_code == 400 and response.json["detail"].startswith("request body is not valid JSON")


def test_a_bad_key_is_an_authentication_error(luma, mapped):
    with pytest.raises(lumaai.AuthenticationError) as excinfo:
        luma("dq_not-a-key").ping.check()
    assert "API key is not valid" in _error(excinfo)


def test_rate_limited_submissions_are_429_with_retry_after(luma, make_user, mapped):
    _, key = make_user(create_tier(rate_per_min=1, burst=1))
    client = luma(key)
    client.generations.create(model="ray-2", prompt="a red circle moving right")
    with pytest.raises(lumaai.RateLimitError) as excinfo:
        client.generations.create(model="ray-2", prompt="a red circle moving right")
    assert int(excinfo.value.response.headers["Retry-After"]) >= 1
    assert len(client.generations.list().generations) == 1


def test_features_without_a_model_here_are_400s(luma, user, mapped):
    client = luma(user[1])
    with pytest.raises(lumaai.BadRequestError) as excinfo:
        client.generations.image.create(model="photon-1", prompt="a cat")
    assert "image generation is not offered" in _error(excinfo)
    created = client.generations.create(model="ray-2", prompt="a red circle moving right")
    with pytest.raises(lumaai.BadRequestError):
        client.generations.upscale(created.id, resolution="1080p")
    assert client.generations.concepts.list() == []


@pytest.fixture()
def allow(client, admin_key):
    created = []

    def add(**entry):
        response = client.post("/v1/admin/webhooks/allowlist", json=entry, headers=auth(admin_key))
        assert response.status_code == 201, response.json
        created.append(response.json["id"])

    yield add
    for entry_id in created:
        client.delete(f"/v1/admin/webhooks/allowlist/{entry_id}", headers=auth(admin_key))


def modify(client: lumaai.LumaAI, url: str, **options):
    return client.generations.video.modify(
        generation_type="modify_video",
        media={"url": url},
        mode="adhere_1",
        model="ray-2",
        prompt="make it blue",
        **options,
    )


def test_media_urls_obey_the_address_and_size_rules_of_uploads(luma, user, mapped, allow):
    client = luma(user[1])
    for url, words in [
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://10.0.0.8/clip.mp4", "private"),
        ("http://[::ffff:127.0.0.1]/clip.mp4", "loopback"),
    ]:
        with pytest.raises(lumaai.BadRequestError) as excinfo:
            modify(client, url)
        assert _error(excinfo).startswith("media.url: ") and words in _error(excinfo)
    clip = moving_square_mp4(frames=12, size=48)
    with media_server(clip) as port:
        with pytest.raises(lumaai.BadRequestError) as excinfo:
            modify(client, f"http://127.0.0.1:{port}/clip.mp4")  # not allow-listed yet
        assert "loopback" in _error(excinfo)
        allow(network="127.0.0.1/32", port=port, note="media host")
        created = modify(client, f"http://127.0.0.1:{port}/clip.mp4")
        assert created.state == "queued" and created.request.generation_type == "modify_video"
        assert created.request.mode == "adhere_1" and created.request.media.url.endswith("/clip.mp4")
        with pytest.raises(lumaai.BadRequestError) as excinfo:
            modify(client, f"http://127.0.0.1:{port}/clip.mp4", first_frame={"url": "https://example.com/a.jpg"})
        assert _error(excinfo).startswith("first_frame: ")
    job = job_row(created.id)
    assert job.kind == "modify_video" and job.upload_id is not None
    assert (job.params["width"], job.params["height"], job.params["num_frames"]) == (48, 48, 12)
    with media_server(b"not a video at all") as port:
        allow(network="127.0.0.1/32", port=port)
        with pytest.raises(lumaai.BadRequestError) as excinfo:
            modify(client, f"http://127.0.0.1:{port}/x.mp4")
        assert "not a readable video" in _error(excinfo)
    with media_server(b"", headers={"Content-Length": str(10**10)}) as port:
        allow(network="127.0.0.1/32", port=port)
        with pytest.raises(lumaai.APIStatusError) as excinfo:
            modify(client, f"http://127.0.0.1:{port}/huge.mp4")
        assert excinfo.value.status_code == 413 and "bytes are accepted" in _error(excinfo)
    with media_server(b"", status=302, headers={"Location": "http://169.254.169.254/"}) as port:
        allow(network="127.0.0.1/32", port=port)
        with pytest.raises(lumaai.BadRequestError) as excinfo:
            modify(client, f"http://127.0.0.1:{port}/moved.mp4")
        assert "redirects are not followed" in _error(excinfo)


def test_admin_routes_edit_the_model_table(client, admin_key, user, parked_model, luma, mapped):
    headers = auth(admin_key)
    name = f"ray-test-{uuid.uuid4().hex[:6]}"
    assert (
        client.put(f"/v1/admin/dream-machine/models/{name}", json={"model": "no-such"}, headers=headers).status_code
        == 422
    )
    assert (
        client.put(
            f"/v1/admin/dream-machine/models/{name}", json={"model": "parked"}, headers=auth(user[1])
        ).status_code
        == 403
    )
    made = client.put(f"/v1/admin/dream-machine/models/{name}", json={"model": "parked", "note": "n"}, headers=headers)
    assert made.status_code == 200 and made.json["model"] == "parked" and made.json["updated_by"].endswith(")")
    listed = client.get("/v1/admin/dream-machine/models", headers=headers).json["data"]
    assert {"name": name, "model": "parked"}.items() <= next(r for r in listed if r["name"] == name).items()
    created = luma(user[1]).generations.create(model=name, prompt="a red circle moving right")
    assert created.model == name
    assert client.delete(f"/v1/admin/dream-machine/models/{name}", headers=headers).status_code == 204
    assert client.delete(f"/v1/admin/dream-machine/models/{name}", headers=headers).status_code == 404
    with pytest.raises(lumaai.BadRequestError):
        luma(user[1]).generations.create(model=name, prompt="a red circle moving right")
    # A generation made under the old name still reads as it was asked for.
    assert luma(user[1]).generations.get(created.id).model == name


def test_cli_lists_sets_and_removes_mappings(parked_model, stack_env):
    runner = CliRunner()
    name = f"ray-cli-{uuid.uuid4().hex[:6]}"

    def invoke(*args: str):
        return runner.invoke(cli, ["dream-machine", "models", *args], catch_exceptions=False)

    assert invoke("set", name, "parked", "--note", "from the CLI").exit_code == 0
    listed = invoke("list")
    assert listed.exit_code == 0 and any(line.split()[:2] == [name, "parked"] for line in listed.output.splitlines())
    refused = invoke("set", name, "no-such-model")
    assert refused.exit_code != 0 and "model: no dreamq model named 'no-such-model'" in refused.output
    assert invoke("remove", name).exit_code == 0
    with transaction() as session:
        assert session.get(DreamMachineModel, name) is None
    assert invoke("remove", name).exit_code != 0


def test_the_luma_surface_is_left_out_of_the_v1_openapi_document(client):
    paths = client.get("/v1/openapi.json").json["paths"]
    assert not [p for p in paths if p.startswith("/dream-machine")]
    assert "/v1/admin/dream-machine/models/{name}" in paths


def test_a_fresh_stack_is_seeded_once_and_a_removed_name_stays_removed(parked_model):
    from sqlalchemy import delete
    from sqlalchemy.orm import Session

    from app.admin.dream_machine import SEED_NAMES, seed_mappings
    from app.db.session import get_engine

    # In a transaction rolled back at the end: the table is shared with the other tests.
    with Session(get_engine()) as session:
        session.execute(delete(DreamMachineModel))
        assert seed_mappings(session, "no-such-model") == []  # nothing to point at yet
        assert seed_mappings(session, "parked") == list(SEED_NAMES)
        rows = session.execute(select(DreamMachineModel.name, DreamMachineModel.note)).all()
        assert sorted(rows) == sorted((name, "seed") for name in SEED_NAMES)
        session.execute(delete(DreamMachineModel).where(DreamMachineModel.name == "ray-1-6"))
        assert seed_mappings(session, "parked") == []  # not empty: an admin's removal stands
        assert session.get(DreamMachineModel, "ray-1-6") is None
        session.rollback()


def test_a_modify_refused_after_the_download_leaves_no_upload_behind(luma, make_user, mapped, allow):
    from app.core.config import get_settings
    from app.core.storage import s3_client
    from app.db.models import Upload

    user_id, key = make_user(create_tier(monthly_quota=1))
    client = luma(key)
    with media_server(moving_square_mp4(frames=8, size=32)) as port:
        allow(network="127.0.0.1/32", port=port)
        created = modify(client, f"http://127.0.0.1:{port}/clip.mp4")
        with pytest.raises(lumaai.RateLimitError) as excinfo:
            modify(client, f"http://127.0.0.1:{port}/clip.mp4")
    assert excinfo.value.body["error"]["code"] == "quota_exceeded"
    with transaction() as session:
        uploads = session.scalars(select(Upload).where(Upload.user_id == user_id)).all()
    assert [u.id for u in uploads] == [job_row(created.id).upload_id]
    listed = s3_client().list_objects_v2(Bucket=get_settings().media_bucket, Prefix=f"uploads/{user_id}/")
    assert [o["Key"] for o in listed.get("Contents", [])] == [uploads[0].object_key]
    assert client.credits.get().credit_balance == 0


def test_no_body_makes_a_server_error(client, user, mapped):
    """Generated bodies around the documented shape (right keys, wrong and edge values): every
    answer is a 2xx or a 4xx with Luma's `detail`, never a 5xx."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**63),
        st.floats(allow_nan=False),
        st.text(max_size=30),
        st.sampled_from(
            ["ray-2", "16:9", "540p", "5s", "4k", "9:21", "0s", "http://127.0.0.1/", "http://10.0.0.1/a.mp4"]
        ),
    )
    values = st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.dictionaries(st.sampled_from(["type", "url", "id", "key"]), inner, max_size=3),
        ),
        max_leaves=6,
    )
    keys = [
        "model",
        "prompt",
        "aspect_ratio",
        "resolution",
        "duration",
        "loop",
        "keyframes",
        "concepts",
        "callback_url",
        "generation_type",
        "media",
        "mode",
        "first_frame",
    ]
    bodies = st.dictionaries(st.sampled_from(keys), values, max_size=6)
    paths = st.sampled_from(
        [
            "/dream-machine/v1/generations/video",
            "/dream-machine/v1/generations/video/modify",
            "/dream-machine/v1/generations",
        ]
    )
    seen = []

    @settings(max_examples=150, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(path=paths, body=bodies)
    def run(path, body):
        body.setdefault("model", "ray-2")
        response = client.post(path, json=body, headers=auth(user[1]))
        seen.append(response.status_code)
        assert response.status_code < 500, (path, body, response.json)
        if response.status_code >= 400:
            assert response.json["detail"], response.json

    run()
    assert set(seen) >= {400, 422}, seen
