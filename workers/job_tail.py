"""A GPU job's tail on its own thread, so the GPU starts the next job at once.

When the model returns, what is left of a job on the GPU worker is host work: stage the frames
in object storage, record `generated`, hand the job to the cpu queue for encoding. Done in line,
the GPU idles through it; here it runs while the task returns and the worker claims and runs its
next job. What that is worth is measured on the shipped loop by bench/gpu_busy.py (tail in line
with DREAMQ_OVERLAP_TAIL=0 against this): not yet on a GPU for this code; on the 2-core CPU VM
the tail left the loop (33-57 ms a job in line, 0.2-1.2 ms here) but competes with the model for
the CPU (docs/benchmarks.md, GPU busy fraction).

The rules that keep jobs safe (docs/architecture.md) hold:

* The job stays `running`, its lease renewed by a JobLease on this thread, until the hand-off
  commits. The Celery message is acknowledged when the task returns, so if the process dies in
  the tail it is the lease that recovers the job: it runs out and the reaper requeues it, as for
  a death during generation.
* One tail at a time per process: a job that finishes while the previous tail still runs waits
  for it. Memory stays bounded by one clip, and tails commit in job order.
* The process waits for its tail before it exits (worker_process_shutdown in a prefork child,
  worker_shutdown for the solo pool, atexit as the last resort), so a warm shutdown never drops
  a finished job.

DREAMQ_OVERLAP_TAIL=0 runs the tail in line, inside the task, as before.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

log = logging.getLogger(__name__)

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_pending: Future | None = None
# A tail longer than this at shutdown is abandoned: its job's lease will requeue it.
FLUSH_TIMEOUT_S = 120.0


def enabled() -> bool:
    return os.environ.get("DREAMQ_OVERLAP_TAIL", "1") != "0"


def run(tail: Callable[[], None]) -> None:
    """Run `tail` on the tail thread, after the previous tail has finished; in line when
    overlapping is off. `tail` handles its own errors (an exception here is only logged)."""
    global _executor, _pending
    if not enabled():
        tail()
        return
    with _lock:
        if _pending is not None:
            _wait(_pending, None)
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-tail")
        _pending = _executor.submit(tail)


def flush(timeout: float | None = FLUSH_TIMEOUT_S) -> None:
    """Wait for the tail in flight, if any (before the process exits, and in tests)."""
    with _lock:
        pending = _pending
    if pending is not None:
        _wait(pending, timeout)


def reset_after_fork() -> None:
    """A forked child has no tail thread: drop the parent's executor object."""
    global _executor, _pending
    _executor, _pending = None, None


def _wait(future: Future, timeout: float | None) -> None:
    try:
        future.result(timeout=timeout)
    except Exception:  # the tail logs its own failures; a timeout leaves the job to its lease
        log.exception("job tail did not finish cleanly")


atexit.register(flush)
