"""Per-job phase timings of a GPU worker, for bench/gpu_busy.py; off unless DREAMQ_JOB_PHASES_FILE is set.

With DREAMQ_JOB_PHASES_FILE=PATH the executor (workers/executor.py) appends two JSON lines per
finished job to PATH: `"part": "loop"` from the task's thread, when the task is about to return
(marks: claimed, run, generate_start, generate_end, tail_call, tail_returned; seconds: progress
and, on CUDA, gpu_span, kernels, profiler_start, profiler_stop) and `"part": "tail"` from the
thread that ran the job's tail (marks: tail_start, tail_end; seconds: staging, upload, hand_off,
or encode and complete).
Marks are time.monotonic(), one clock for every process of the host (CLOCK_MONOTONIC), so the
bench lines up the worker's jobs with each other and with the next job's claim.

On CUDA the model's GPU time is measured around generate(): CUDA events on the current stream
(`gpu_span`: from before its first launch to after its last), and with
DREAMQ_JOB_PHASES_KERNELS=1 also a torch.profiler trace of the device's activity (`kernels`: the
union of the intervals of its kernels and copies; `profiler_start` and `profiler_stop`: the host
time the profiler itself took, which the bench takes out of the wall time).

Off (the default), `for_job` returns one shared object whose methods do nothing: no clock is read
and nothing is written.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
import time
from typing import Any, Callable, Iterator

_PATH = os.environ.get("DREAMQ_JOB_PHASES_FILE") or None
_KERNELS = os.environ.get("DREAMQ_JOB_PHASES_KERNELS") == "1"
_lock = threading.Lock()


class Timings:
    """No timings (DREAMQ_JOB_PHASES_FILE unset): every method does nothing."""

    def mark(self, name: str) -> None:
        pass

    def timed(self, name: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def timed_calls(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        return fn

    def model(self, device: Any) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def write(self, part: str) -> None:
        pass


class JobPhases(Timings):
    """The marks and durations of one job; `write(part)` appends what it has to the file."""

    def __init__(self, path: str, job_id: str, claimed_at: float | None):
        self.path = path
        self.job_id = job_id
        self.marks: dict[str, float | None] = {"claimed": claimed_at}
        self.seconds: dict[str, float] = {}
        self.info: dict[str, Any] = {}
        # The task's thread and the tail thread both record into this job's dicts.
        self._guard = threading.Lock()

    def mark(self, name: str) -> None:
        now = time.monotonic()
        with self._guard:
            self.marks[name] = now

    def _add(self, name: str, seconds: float) -> None:
        with self._guard:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self._add(name, time.monotonic() - started)

    def timed_calls(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.timed(name):
                return fn(*args, **kwargs)

        return timed

    @contextlib.contextmanager
    def model(self, device: Any) -> Iterator[None]:
        self.info["device"] = str(device)
        if getattr(device, "type", None) != "cuda":
            self.mark("generate_start")
            try:
                yield
            finally:
                self.mark("generate_end")
            return
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.mark("generate_start")
        profiler = None
        if _KERNELS:
            starting = time.monotonic()
            try:
                # CPU and CUDA activities: the configuration the H100 measurements of this bench used.
                activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                profiler = torch.profiler.profile(activities=activities)
                profiler.start()
            except Exception as exc:  # the measurement must never fail the job
                self.info["profiler_error"] = f"{type(exc).__name__}: {exc}"
                profiler = None
            self._add("profiler_start", time.monotonic() - starting)
        start.record()
        try:
            yield
        finally:
            end.record()
            end.synchronize()
            self.mark("generate_end")
            self._add("gpu_span", start.elapsed_time(end) / 1000.0)
            if profiler is not None:
                stopping = time.monotonic()
                try:
                    profiler.stop()
                    self._add("kernels", device_busy_s(profiler))
                except Exception as exc:
                    self.info["profiler_error"] = f"{type(exc).__name__}: {exc}"
                self._add("profiler_stop", time.monotonic() - stopping)

    def write(self, part: str) -> None:
        with self._guard:
            record = {"job": self.job_id, "part": part, "pid": os.getpid(), "marks": dict(self.marks)}
            record.update(seconds=dict(self.seconds), **self.info)
        line = json.dumps(record)
        with _lock:
            # One write() of the whole line in append mode: the task's and the tail's lines never interleave.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)


OFF = Timings()


def for_job(job_id: Any, claimed_at: float | None) -> Timings:
    """The timings of this job: a JobPhases when DREAMQ_JOB_PHASES_FILE is set, else a no-op."""
    return OFF if _PATH is None else JobPhases(_PATH, str(job_id), claimed_at)


def union_s(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of (start, end) intervals."""
    total, cur_start, cur_end = 0.0, 0.0, float("-inf")
    for start, end in sorted(intervals):
        if start > cur_end:
            total += max(0.0, cur_end - cur_start)
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    return total + max(0.0, cur_end - cur_start)


def device_busy_s(profiler: Any, device_type: Any = None) -> float:
    """Seconds during which the device (default CUDA) ran at least one profiled kernel or copy."""
    import torch

    wanted = torch.autograd.DeviceType.CUDA if device_type is None else device_type
    intervals = [
        (e.time_range.start, e.time_range.end)
        for e in profiler.events()
        if e.device_type == wanted and e.time_range.elapsed_us() > 0
    ]
    return union_s(intervals) / 1e6
