"""The demo "shapes" model bundle: loads like a worker loads it, and its clips show what the
prompt asks for, before and after the H.264 round trip every delivered video goes through."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.frames import (
    PALETTE,
    centroid_track,
    dominant_colour,
    h264_roundtrip,
    motion_direction,
)

TESTS = Path(__file__).resolve().parents[2]
BUNDLE = TESTS.parent / "workers" / "demo_models" / "shapes"
# Deliberately not "shapes_model": the worker imports each version under a digest-derived name,
# so the package must work through relative imports alone.
MODULE_NAME = "dreamq_model_0123456789abcdef_shapes_model"
W, H, T = 128, 128, 24


def _import_bundle_package(bundle: Path, name: str):
    info = json.loads((bundle / "model.json").read_text())
    top = info["entrypoint"].partition(":")[0].partition(".")[0]
    package_dir = bundle / "code" / top
    spec = importlib.util.spec_from_file_location(
        name, package_dir / "__init__.py", submodule_search_locations=[str(package_dir)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def package():
    module = _import_bundle_package(BUNDLE, MODULE_NAME)
    yield module
    for key in [k for k in sys.modules if k == MODULE_NAME or k.startswith(MODULE_NAME + ".")]:
        del sys.modules[key]


@pytest.fixture(scope="module")
def model(package):
    entry = json.loads((BUNDLE / "model.json").read_text())["entrypoint"]
    cls = getattr(package, entry.partition(":")[2])
    return cls.load(BUNDLE, torch.device("cpu"))


def _disc_clip(colour, direction, *, size=64, frames=16, radius=7, background=(12, 14, 28)):
    """A hand-drawn clip (no model) for testing the frame helpers on their own."""
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "none": (0, 0)}[direction]
    yy, xx = np.mgrid[0:size, 0:size]
    clip = np.empty((frames, size, size, 3), np.uint8)
    clip[:] = background
    for k in range(frames):
        cx = size / 2 + step[0] * (k - frames / 2) * 2
        cy = size / 2 + step[1] * (k - frames / 2) * 2
        clip[k][(xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2] = colour
    return clip


# -- the frame helpers themselves ------------------------------------------------------------


@pytest.mark.parametrize(
    "colour,direction",
    [("red", "right"), ("blue", "up"), ("green", "left"), ("yellow", "down"), ("orange", "none"), ("white", "left")],
)
def test_frame_helpers_survive_h264(colour, direction):
    clip = _disc_clip(PALETTE[colour], direction)
    for frames in (clip, h264_roundtrip(clip)):
        assert frames.shape == clip.shape
        assert dominant_colour(frames) == colour
        assert motion_direction(frames) == direction
    track = centroid_track(h264_roundtrip(clip))
    exact = centroid_track(clip)
    assert max(math.dist(a, b) for a, b in zip(track, exact)) < 0.75


def test_frame_helpers_on_an_empty_clip():
    empty = np.full((4, 32, 32, 3), 20, np.uint8)
    assert dominant_colour(empty) == "none"
    assert motion_direction(empty) == "none"
    assert all(math.isnan(x) for x, _ in centroid_track(empty))


# -- the bundle ------------------------------------------------------------------------------


def test_bundle_layout_and_pins():
    info = json.loads((BUNDLE / "model.json").read_text())
    assert info["name"] == "demo"
    assert info["entrypoint"] == "shapes_model:ShapesVideoModel"
    assert {"width", "height", "num_frames", "fps"} <= set(info["defaults"])
    assert info["limits"]["width"] == {"min": 32, "max": 512, "multiple_of": 2}
    assert info["limits"]["num_frames"] == {"min": 1, "max": 120}
    lock = (BUNDLE / "env" / "requirements.lock").read_text().split()
    assert lock == ["torch==2.13.0", "numpy==2.4.6", "safetensors==0.8.0"]
    files = [
        p
        for part in ("model.json", "code", "weights", "env")
        for p in ([BUNDLE / part] if (BUNDLE / part).is_file() else (BUNDLE / part).rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    ]
    assert sum(p.stat().st_size for p in files) < 8 * 1024 * 1024
    weights = [p for p in files if p.parent.name == "weights" and p.suffix not in {".json"}]
    assert [p.name for p in weights] == ["model.safetensors"]
    assert (BUNDLE / "weights" / "model.safetensors").stat().st_size < 4 * 1024 * 1024


def test_bundle_code_imports_only_torch_numpy_safetensors_and_stdlib():
    allowed = {"torch", "numpy", "safetensors", "__future__"} | set(sys.stdlib_module_names)
    for path in (BUNDLE / "code").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_loads_under_a_foreign_module_name(package, model):
    # Every submodule resolved relative to the foreign name (code/ is not on sys.path, so an
    # absolute "import shapes_model..." inside the package would have failed to import at all).
    assert type(model).__module__ == f"{MODULE_NAME}.model"
    assert sys.modules[f"{MODULE_NAME}.nets"] is sys.modules[type(model.generator).__module__]
    assert issubclass(package.GenerationCancelled, Exception)
    params = sum(p.numel() for p in model.generator.parameters()) + sum(p.numel() for p in model.recolour.parameters())
    assert params > 10_000  # a learned network, not a renderer with a couple of knobs


# -- text to video ---------------------------------------------------------------------------

PROMPTS = [
    ("a red circle moving right", "red", "right"),
    ("blue square moving up", "blue", "up"),
    ("a green triangle moving left", "green", "left"),
    ("yellow circle moving down", "yellow", "down"),
    ("A magenta triangle, moving UP!", "magenta", "up"),
    ("an orange square sliding left", "orange", "left"),
    ("white ball falling", "white", "down"),
    ("cyan box drifting east", "cyan", "right"),
    ("purple triangle moving downwards", "purple", "down"),
    ("pink circle rising", "pink", "up"),
]


@pytest.mark.parametrize("prompt,colour,direction", PROMPTS)
def test_prompt_colour_and_direction_before_and_after_h264(model, prompt, colour, direction):
    frames = model.generate(prompt, width=W, height=H, num_frames=T, seed=len(prompt))
    assert frames.shape == (T, H, W, 3) and frames.dtype == np.uint8
    for label, clip in (("raw", frames), ("h264", h264_roundtrip(frames, fps=12, crf=23))):
        assert dominant_colour(clip) == colour, label
        assert motion_direction(clip) == direction, label
    # It moves across a good part of the frame, not a token nudge.
    track = np.array(centroid_track(frames))
    axis = 0 if direction in ("left", "right") else 1
    assert abs(track[-1, axis] - track[0, axis]) > 0.35 * W


def test_the_object_is_sharp_and_the_background_dark(model):
    frames = model.generate("a white square moving right", width=W, height=H, num_frames=4, seed=1)
    assert frames[:, :4, :4].max() < 40  # corner far from the object is background
    # Almost every pixel is either background or object: few in-between (blurred) pixels.
    level = frames.astype(np.float32).mean(axis=-1)
    in_between = ((level > 60) & (level < 180)).sum() / ((level >= 180).sum() + 1)
    assert in_between < 0.25


@pytest.mark.parametrize(
    "width,height,num_frames", [(32, 32, 1), (64, 32, 5), (96, 160, 7), (256, 144, 12), (512, 512, 2)]
)
def test_any_even_size_and_frame_count(model, width, height, num_frames):
    frames = model.generate("red square moving down", width=width, height=height, num_frames=num_frames, seed=5)
    assert frames.shape == (num_frames, height, width, 3)
    assert frames.dtype == np.uint8 and frames.flags.c_contiguous
    assert dominant_colour(frames) == "red"
    if num_frames >= 5:
        assert motion_direction(frames) == "down"


@pytest.mark.parametrize("bad", [{"width": 33}, {"width": 16}, {"height": 514}, {"num_frames": 0}, {"num_frames": 121}])
def test_out_of_limits_parameters_are_refused(model, bad):
    params = {"width": 64, "height": 64, "num_frames": 4, **bad}
    with pytest.raises(ValueError):
        model.generate("red circle", seed=0, **params)


def test_on_step_reports_every_frame(model):
    calls = []
    model.generate(
        "blue circle moving left",
        width=64,
        height=64,
        num_frames=9,
        seed=0,
        on_step=lambda done, total: calls.append((done, total)) or True,
    )
    assert calls == [(i, 9) for i in range(1, 10)]


def test_on_step_false_cancels_at_that_step(model, package):
    calls = []

    def stop_at_three(done, total):
        calls.append(done)
        return done < 3

    with pytest.raises(package.GenerationCancelled):
        model.generate("blue circle moving left", width=64, height=64, num_frames=9, seed=0, on_step=stop_at_three)
    assert calls == [1, 2, 3]


def test_same_seed_same_clip_other_seed_other_clip(model):
    a = model.generate("green square moving up", width=W, height=H, num_frames=8, seed=42)
    b = model.generate("green square moving up", width=W, height=H, num_frames=8, seed=42)
    c = model.generate("green square moving up", width=W, height=H, num_frames=8, seed=43)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert dominant_colour(c) == "green" and motion_direction(c) == "up"
    # The seed moves the object's starting point.
    assert math.dist(centroid_track(a)[0], centroid_track(c)[0]) > 1.0


def test_unnamed_attributes_come_from_the_seed(model):
    picks = [model.resolve_prompt("something nice", seed) for seed in range(40)]
    assert {p["shape"] for p in picks} == {"circle", "square", "triangle"}
    assert {p["direction"] for p in picks} == {"left", "right", "up", "down"}
    assert len({p["colour"] for p in picks}) >= 6
    assert all(p["colour"] == "red" for p in (model.resolve_prompt("red", s) for s in range(10)))
    for seed in (3, 4):
        picked = model.resolve_prompt("", seed)
        frames = model.generate("", width=W, height=H, num_frames=12, seed=seed)
        assert dominant_colour(frames) == picked["colour"]
        assert motion_direction(frames) == picked["direction"]


def test_validate_prompt(model):
    assert model.validate_prompt("a red circle moving right") == []
    assert len(model.validate_prompt("hello")) == 4  # three picked from the seed + unknown word
    assert any("blue" in w for w in model.validate_prompt("turn the red circle blue moving up"))


def test_default_job_is_fast(model):
    model.generate("red circle moving right", width=W, height=H, num_frames=T, seed=0)
    started = time.perf_counter()
    model.generate("a yellow triangle moving left", width=W, height=H, num_frames=T, seed=1)
    assert time.perf_counter() - started < 3.0


# -- modify video ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source,prompt,colour,direction",
    [
        ("a red circle moving right", "make it blue", "blue", "right"),
        ("a green triangle moving up", "turn the triangle yellow", "yellow", "up"),
        ("a white square moving left", "paint it magenta", "magenta", "left"),
    ],
)
def test_modify_recolours_and_keeps_the_motion(model, source, prompt, colour, direction):
    clip = model.generate(source, width=W, height=H, num_frames=T, seed=3)
    upload = h264_roundtrip(clip)  # what the worker decodes from a user's upload
    out = model.generate(prompt, width=W, height=H, num_frames=T, seed=9, input_video=upload)
    assert out.shape == clip.shape and out.dtype == np.uint8
    for label, frames in (("raw", out), ("h264", h264_roundtrip(out))):
        assert dominant_colour(frames) == colour, label
        assert motion_direction(frames) == direction, label
    # Same object in the same places: centroids within a pixel, background untouched.
    drift = max(math.dist(a, b) for a, b in zip(centroid_track(out), centroid_track(upload)))
    assert drift < 1.0
    assert np.abs(out[:, :6, :6].astype(int) - upload[:, :6, :6]).max() <= 2


def test_modify_resamples_to_the_requested_size_and_length(model):
    clip = model.generate("a red circle moving down", width=W, height=H, num_frames=T, seed=2)
    out = model.generate("blue", width=160, height=96, num_frames=12, seed=0, input_video=h264_roundtrip(clip))
    assert out.shape == (12, 96, 160, 3)
    assert dominant_colour(out) == "blue"
    assert motion_direction(out) == "down"


def test_modify_reports_steps_and_cancels(model, package):
    clip = model.generate("a red circle moving right", width=64, height=64, num_frames=6, seed=0)
    calls = []
    model.generate(
        "green", width=64, height=64, num_frames=6, seed=0, input_video=clip, on_step=lambda d, t: calls.append((d, t))
    )  # None return: carry on
    assert calls == [(i, 6) for i in range(1, 7)]
    with pytest.raises(package.GenerationCancelled):
        model.generate("green", width=64, height=64, num_frames=6, seed=0, input_video=clip, on_step=lambda d, t: False)


def test_modify_is_deterministic_and_rejects_bad_input(model):
    clip = model.generate("a red circle moving right", width=64, height=64, num_frames=6, seed=0)
    a = model.generate("cyan", width=64, height=64, num_frames=6, seed=1, input_video=clip)
    b = model.generate("cyan", width=64, height=64, num_frames=6, seed=1, input_video=clip)
    assert np.array_equal(a, b)
    with pytest.raises(ValueError):
        model.generate("cyan", width=64, height=64, num_frames=6, seed=1, input_video=clip.astype(np.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(model, package):
    gpu = type(model).load(BUNDLE, torch.device("cuda"))
    cpu_frames = model.generate("a red circle moving right", width=W, height=H, num_frames=T, seed=7)
    gpu_frames = gpu.generate("a red circle moving right", width=W, height=H, num_frames=T, seed=7)
    assert np.abs(cpu_frames.astype(int) - gpu_frames).max() <= 3
    edited = gpu.generate("blue", width=W, height=H, num_frames=T, seed=7, input_video=cpu_frames)
    assert dominant_colour(edited) == "blue"
