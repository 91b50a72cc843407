"""/v1/uploads: real PyAV probing, real S3 storage, and every way an upload can be refused."""

from __future__ import annotations

import dataclasses
import io

import pytest
from sqlalchemy import func, select

from app.core import config
from app.core.storage import get_bytes
from app.db.models import Upload
from app.db.session import transaction
from tests.support.factories import auth
from tests.support.media import moving_square_mp4


def upload_count(user_id) -> int:
    with transaction() as session:
        return session.scalar(select(func.count()).select_from(Upload).where(Upload.user_id == user_id))


@pytest.fixture()
def user(make_user, parked_model):
    return make_user("light")


@pytest.fixture()
def limits(monkeypatch):
    def apply(**changes):
        monkeypatch.setattr(config, "_settings", dataclasses.replace(config.get_settings(), **changes))

    return apply


def test_raw_video_upload_is_probed_stored_and_usable_by_a_modify_job(client, user):
    user_id, key = user
    data = moving_square_mp4(frames=12)
    response = client.post("/v1/uploads", data=data, headers={**auth(key), "Content-Type": "video/mp4"})
    assert response.status_code == 201, response.json
    body = response.json
    assert (body["width"], body["height"], body["frames"]) == (64, 64, 12)
    assert body["duration_s"] == pytest.approx(1.5, abs=0.01)
    assert body["size_bytes"] == len(data)
    with transaction() as session:
        row = session.get(Upload, body["id"])
        assert get_bytes(config.get_settings().media_bucket, row.object_key) == data
    job = client.post(
        "/v1/generations",
        json={"prompt": "make it blue", "model": "parked", "type": "modify_video", "upload_id": body["id"]},
        headers=auth(key),
    )
    assert job.status_code == 202, job.json
    assert job.json["type"] == "modify_video" and job.json["upload_id"] == body["id"]


def test_multipart_upload_works_too(client, user):
    _, key = user
    data = moving_square_mp4(frames=6)
    response = client.post(
        "/v1/uploads",
        data={"file": (io.BytesIO(data), "clip.mp4", "video/mp4")},
        headers=auth(key),
        content_type="multipart/form-data",
    )
    assert response.status_code == 201, response.json
    assert response.json["frames"] == 6


@pytest.mark.parametrize(
    ("content_type", "data", "status", "field"),
    [
        ("image/png", b"\x89PNG\r\n\x1a\n" + b"0" * 100, 415, "Content-Type"),
        ("video/mp4", b"this is not a video at all" * 20, 415, "file"),
        ("video/mp4", b"", 422, "file"),
    ],
)
def test_non_videos_are_refused_and_store_nothing(client, user, content_type, data, status, field):
    user_id, key = user
    response = client.post("/v1/uploads", data=data, headers={**auth(key), "Content-Type": content_type})
    assert response.status_code == status, response.json
    assert response.json["error"]["fields"][0]["field"] == field
    assert upload_count(user_id) == 0


def test_truncated_mp4_is_refused(client, user):
    user_id, key = user
    data = moving_square_mp4(frames=12)
    response = client.post(
        "/v1/uploads", data=data[: len(data) // 3], headers={**auth(key), "Content-Type": "video/mp4"}
    )
    assert response.status_code == 415
    assert response.json["error"]["code"] == "invalid_media"
    assert upload_count(user_id) == 0


def test_oversized_upload_is_413(client, user, limits):
    user_id, key = user
    limits(max_upload_bytes=2000)
    response = client.post(
        "/v1/uploads", data=moving_square_mp4(frames=24), headers={**auth(key), "Content-Type": "video/mp4"}
    )
    assert response.status_code == 413
    assert response.json["error"]["code"] == "payload_too_large"
    assert upload_count(user_id) == 0


def test_too_long_video_is_422(client, user, limits):
    user_id, key = user
    limits(max_upload_duration_s=0.5)
    response = client.post(
        "/v1/uploads", data=moving_square_mp4(frames=12), headers={**auth(key), "Content-Type": "video/mp4"}
    )
    assert response.status_code == 422
    assert "longer than 0.5 s" in response.json["error"]["message"]
    assert upload_count(user_id) == 0


def test_upload_needs_a_key(client):
    assert client.post("/v1/uploads", data=b"x", headers={"Content-Type": "video/mp4"}).status_code == 401
