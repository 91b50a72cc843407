"""workers/phases.py: the opt-in per-job timings bench/gpu_busy.py reads from a GPU worker."""

from __future__ import annotations

import json

import pytest
import torch

from workers import phases


def test_union_counts_overlapping_time_once():
    # Overlap (0-1 with 0.5-2), nesting (3.2-3.5 inside 3-4), a gap, and input out of order.
    assert phases.union_s([(3.0, 4.0), (0.5, 2.0), (0.0, 1.0), (3.2, 3.5)]) == pytest.approx(3.0)
    assert phases.union_s([(0.0, 2.0), (0.5, 1.0), (1.5, 3.0)]) == pytest.approx(3.0)
    assert phases.union_s([]) == 0.0


def test_off_unless_a_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(phases, "_PATH", None)
    timings = phases.for_job("job", 1.0)
    assert timings is phases.OFF

    def on_step(done, total):
        return True

    # The reporter itself goes to the model, no wrapper around it; nothing is recorded.
    assert timings.timed_calls("progress", on_step) is on_step
    with timings.model(torch.device("cpu")), timings.timed("upload"):
        timings.mark("run")
    timings.write("loop")
    assert not hasattr(timings, "marks") and list(tmp_path.iterdir()) == []


def test_a_job_writes_its_marks_and_durations(monkeypatch, tmp_path):
    path = tmp_path / "phases.jsonl"
    monkeypatch.setattr(phases, "_PATH", str(path))
    timings = phases.for_job("job-1", 10.0)
    timings.mark("run")
    calls = []

    def on_step(done, total):
        calls.append(done)
        if done == 3:
            raise RuntimeError("cancelled")
        return done < 2

    timed = timings.timed_calls("progress", on_step)
    with timings.model(torch.device("cpu")):
        assert timed(1, 3) is True and timed(2, 3) is False  # the reporter's answers reach the model
        with pytest.raises(RuntimeError, match="cancelled"):
            timed(3, 3)
    with timings.timed("upload"):
        pass
    timings.write("loop")
    timings.mark("tail_end")
    timings.write("tail")

    loop, tail = (json.loads(line) for line in path.read_text().splitlines())
    assert calls == [1, 2, 3]
    assert loop["job"] == "job-1" and loop["part"] == "loop" and loop["device"] == "cpu"
    marks = loop["marks"]
    assert marks["claimed"] == 10.0 and marks["run"] <= marks["generate_start"] <= marks["generate_end"]
    assert set(loop["seconds"]) == {"progress", "upload"} and loop["seconds"]["progress"] >= 0
    assert "tail_end" not in marks and tail["part"] == "tail" and tail["marks"]["tail_end"] >= marks["generate_end"]


def test_device_time_is_the_union_of_the_profiled_intervals():
    # On CUDA the worker takes the device's kernels; the same code, asked for CPU ops here.
    x = torch.randn(256, 256)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(20):
            x = torch.tanh(x @ x / 256)
    cpu = torch.autograd.DeviceType.CPU
    intervals = [(e.time_range.start, e.time_range.end) for e in profiler.events() if e.device_type == cpu]
    busy = phases.device_busy_s(profiler, cpu)
    assert 0 < busy * 1e6 == pytest.approx(phases.union_s(intervals))
    # Ops nest (aten::matmul contains aten::mm): the union is less than their sum.
    assert busy * 1e6 < sum(end - start for start, end in intervals)
    assert phases.device_busy_s(profiler) == 0.0  # no CUDA activity in a CPU trace
