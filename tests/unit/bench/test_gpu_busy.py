"""bench/gpu_busy.py: the arithmetic of the busy fraction and the DiT bundle it pushes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def gpu_busy():
    spec = importlib.util.spec_from_file_location("gpu_busy_under_test", ROOT / "bench" / "gpu_busy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def job(name, claimed, *, gen=(1.0, 2.0), progress=0.1, tail_call=2.1, returned=2.2, device="cpu", **seconds):
    loop = {
        "job": name,
        "part": "loop",
        "device": device,
        "marks": {
            "claimed": claimed,
            "run": claimed + 0.05,
            "generate_start": claimed + gen[0],
            "generate_end": claimed + gen[1],
            "tail_call": claimed + tail_call,
            "tail_returned": claimed + returned,
        },
        "seconds": {"progress": progress, **seconds},
    }
    tail = {
        "job": name,
        "part": "tail",
        "marks": {"tail_start": claimed + tail_call, "tail_end": claimed + tail_call + 0.4},
        "seconds": {"staging": 0.1, "upload": 0.2, "hand_off": 0.05},
    }
    return loop, tail


def test_busy_is_model_time_over_the_window_between_claims(gpu_busy):
    # Three counted jobs claimed every 2.5 s, a fourth whose claim closes the window; listed out
    # of order (the bench sorts by claim). On CPU the model's time is generate() less on_step.
    jobs = [job(f"j{i}", 100.0 + 2.5 * i) for i in (3, 0, 2, 1)]
    result = gpu_busy.measure([j[0] for j in jobs], {j[0]["job"]: j[1] for j in jobs}, 3)
    assert result["wall_s"] == pytest.approx(7.5)
    assert result["busy"] == pytest.approx(3 * 0.9 / 7.5)
    p = result["phases_s"]
    assert p["model"] == pytest.approx(0.9) and p["progress"] == pytest.approx(0.1)
    assert p["claim"] == pytest.approx(1.0) and p["after_model"] == pytest.approx(0.1)
    assert p["tail_in_loop"] == pytest.approx(0.1) and p["between_jobs"] == pytest.approx(2.5 - 2.2)
    # The loop's phases are the whole period: nothing unaccounted for.
    loop = ("claim", "model", "progress", "after_model", "tail_in_loop", "between_jobs")
    assert sum(p[k] for k in loop) == pytest.approx(p["period"]) and p["period"] == pytest.approx(2.5)
    assert p["tail"] == pytest.approx(0.4) and p["tail_upload"] == pytest.approx(0.2)
    assert "tail_encode" not in p  # no job finished inline: no such phase, rather than a zero


def test_on_cuda_the_kernels_count_and_the_profiler_is_not_the_loops_time(gpu_busy):
    jobs = [
        job(f"j{i}", 10.0 * i, device="cuda:0", kernels=0.7, gpu_span=0.95, profiler_start=0.02, profiler_stop=0.08)
        for i in range(3)
    ]
    result = gpu_busy.measure([j[0] for j in jobs], {j[0]["job"]: j[1] for j in jobs}, 2)
    wall = 20.0 - 2 * (0.02 + 0.08)
    assert result["wall_s"] == pytest.approx(wall)
    assert result["busy"] == pytest.approx(2 * 0.7 / wall)
    assert result["gpu_span_fraction"] == pytest.approx(2 * 0.95 / wall)
    p = result["phases_s"]
    assert p["after_model"] == pytest.approx(0.1 - 0.08) and p["profiler"] == pytest.approx(0.1)
    assert p["gpu_idle_in_generate"] == pytest.approx(1.0 - 0.02 - 0.7 - 0.1)
    loop = ("claim", "model", "progress", "after_model", "tail_in_loop", "between_jobs", "gpu_idle_in_generate")
    assert sum(p[k] for k in loop) == pytest.approx(p["period"])


def test_jobs_on_two_devices_are_refused(gpu_busy):
    jobs = [job("a", 0.0), job("b", 3.0, device="cuda:0"), job("c", 6.0)]
    with pytest.raises(RuntimeError, match="several devices"):
        gpu_busy.measure([j[0] for j in jobs], {j[0]["job"]: j[1] for j in jobs}, 2)


def test_the_dit_bundle_is_a_model_version_the_worker_runs(gpu_busy, tmp_path):
    import torch

    from workers.loading import load_safetensors
    from workers.repository import build_manifest
    from workers.runtime import _import_entrypoint

    net = {"dim": 64, "layers": 1, "heads": 2, "decoder_ch": 8}
    bundle, info = gpu_busy.build_dit(tmp_path, net, steps=3, cuda=True)  # bf16, as on a GPU
    assert info["dtype"] == "bfloat16" and info["parameters"] > 0
    manifest, _uploads = build_manifest(bundle, "dit", 1, "test")
    entrypoint = json.loads(manifest)["model"]["entrypoint"]
    lock = (bundle / "env" / "requirements.lock").read_text()
    assert gpu_busy._lock_satisfied(bundle / "env" / "requirements.lock"), lock

    cls = _import_entrypoint(bundle, entrypoint, "sha256:" + "d" * 64)
    model = cls.load(bundle, torch.device("cpu"), load_weights=load_safetensors)
    steps = []
    frames = model.generate(
        "x", width=64, height=64, num_frames=5, seed=1, on_step=lambda d, t: steps.append(d) or True
    )
    assert frames.shape == (5, 64, 64, 3) and frames.dtype == np.uint8 and steps == [1, 2, 3]
    # The runtime finds the bundle's GenerationCancelled in its package (workers/runtime.py _load).
    cancelled = sys.modules[cls.__module__.split(".")[0]].GenerationCancelled
    with pytest.raises(cancelled, match="cancelled after step 1 of 3"):
        model.generate("x", width=64, height=64, num_frames=5, seed=1, on_step=lambda d, t: False)
