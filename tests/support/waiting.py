"""Waiting on a state with a deadline, instead of sleeping and hoping.

job = wait_until(lambda: job_row(job_id) if job_row(job_id).state == "running" else None, 30, "the job to run")
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str, *, interval_s: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy (returned); fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(interval_s)
