"""The Luma request -> dreamq job mapping: sizes, durations, modify-video outputs, refusals (pure)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.core.media import VideoInfo
from app.dream_machine.generations import STATES, generation_object
from app.dream_machine.requests import (
    Unsupported,
    VideoCreate,
    VideoModify,
    frames_for,
    modify_params,
    size_for,
    unsupported_options,
)

DEMO = {
    "model": {
        "defaults": {"width": 128, "height": 128, "num_frames": 24, "fps": 12},
        "limits": {
            "width": {"min": 32, "max": 512, "multiple_of": 2},
            "height": {"min": 32, "max": 512, "multiple_of": 2},
            "num_frames": {"min": 1, "max": 120},
            "fps": {"min": 1, "max": 60},
        },
    }
}


@pytest.mark.parametrize(
    ("resolution", "aspect", "size"),
    [
        (None, None, None),  # the model's own default
        ("540p", "16:9", (960, 540)),  # Luma's sizes, exactly
        ("540p", "9:16", (540, 960)),
        ("540p", "21:9", (1260, 540)),
        ("720p", "4:3", (960, 720)),
        ("4k", "1:1", (2160, 2160)),
        ("540p", None, (540, 540)),  # the model's default shape (square)
        (None, "16:9", (228, 128)),  # the model's default short side, rounded to its multiple
        (None, "9:21", (128, 298)),
    ],
)
def test_resolution_is_the_short_side_and_aspect_ratio_the_shape(resolution, aspect, size):
    assert size_for(DEMO, resolution, aspect) == size


def test_duration_is_seconds_at_the_models_default_frame_rate():
    assert frames_for(DEMO, None) is None
    assert frames_for(DEMO, "5s") == (60, 12)
    assert frames_for({}, "2s") == (24, 12)  # a manifest without defaults: the fallback 12 fps


def test_modify_keeps_the_inputs_shape_and_duration_within_the_models_limits():
    small = VideoInfo("mov,mp4,m4a,3gp,3g2,mj2", "h264", 64, 48, 16, 2.0, 8.0)
    assert modify_params(DEMO, small) == {"width": 64, "height": 48, "num_frames": 16, "fps": 8}
    big = VideoInfo("mov,mp4,m4a,3gp,3g2,mj2", "h264", 1920, 1080, 300, 10.0, 30.0)
    # 512 wide keeps 16:9; 300 frames at 30 fps become 120 at 12 fps: still 10 s.
    assert modify_params(DEMO, big) == {"width": 512, "height": 288, "num_frames": 120, "fps": 12}


def test_options_no_model_runs_are_refused_by_name():
    base = {"model": "ray-2", "prompt": "a red circle moving right"}
    for extra, field in [
        ({"loop": True}, "loop"),
        ({"concepts": [{"key": "orbit"}]}, "concepts"),
        ({"keyframes": {"frame0": {"type": "generation", "id": "x"}}}, "keyframes"),
        ({"prompt": None}, "prompt"),
        ({"prompt": "hi"}, "prompt"),
    ]:
        with pytest.raises(Unsupported) as excinfo:
            unsupported_options(VideoCreate.model_validate({**base, **extra}), "model 'ray-2'")
        assert excinfo.value.field == field
    unsupported_options(VideoCreate.model_validate({**base, "loop": False, "keyframes": {}}), "m")
    modify = {
        "generation_type": "modify_video",
        "model": "ray-2",
        "mode": "reimagine_3",
        "prompt": "make it blue",
        "media": {"url": "https://example.com/in.mp4"},
    }
    unsupported_options(VideoModify.model_validate(modify), "m")
    with pytest.raises(Unsupported):
        unsupported_options(
            VideoModify.model_validate({**modify, "first_frame": {"url": "https://example.com/a.png"}}), "m"
        )


@pytest.mark.parametrize(
    "bad",
    [
        {"aspect_ratio": "2:1"},
        {"resolution": "hd"},
        {"resolution": "5p"},
        {"duration": "0s"},
        {"duration": "61s"},
        {"duration": "5"},
        {"callback_url": "gopher://x"},
        {"callback_url": "http://user:pw@example.com/"},
        {"keyframes": {"frame0": {"type": "image"}}},
        {"unknown": 1},
        {"model": ""},
    ],
)
def test_malformed_bodies_fail_validation(bad):
    with pytest.raises(ValidationError):
        VideoCreate.model_validate({"model": "ray-2", "prompt": "a red circle", **bad})


class _Row:
    generation_type, model_name, request = "modify_video", "ray-2", {"model": "ray-2"}


def _view(state, **extra):
    return {
        "id": "j",
        "state": state,
        "timings": {"created_at": "2026-11-27T08:00:00+00:00"},
        "assets": None,
        "failure": None,
        **extra,
    }


def test_states_and_assets_as_the_clients_parse_them():
    assert {s: STATES[s] for s in ("queued", "dispatched", "running", "succeeded")} == {
        "queued": "queued",
        "dispatched": "queued",
        "running": "dreaming",
        "succeeded": "completed",
    }
    done = generation_object(_view("succeeded", assets={"video": "v", "thumbnail": "t", "expires_at": "x"}), _Row())
    assert done["assets"] == {"video": "v", "image": "t", "progress_video": None} and done["generation_type"] == "video"
    failed = generation_object(_view("failed", failure={"code": "model_error", "message": "boom"}), _Row())
    assert (failed["state"], failed["failure_reason"], failed["assets"]) == ("failed", "boom", None)
    assert generation_object(_view("cancelled"), _Row())["failure_reason"] == "cancelled"
