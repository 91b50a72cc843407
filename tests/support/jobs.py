"""Waiting on jobs through the API, as a client would."""

from __future__ import annotations

import time

from tests.support.factories import auth

TERMINAL = ("succeeded", "failed", "cancelled")


def wait_done(client, key, job_id, timeout=120) -> dict:
    """Hold on `Prefer: wait=5` reads until the job is terminal; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        job = client.get(f"/v1/generations/{job_id}", headers={**auth(key), "Prefer": "wait=5"}).json
        if job["state"] in TERMINAL:
            return job
    raise AssertionError(f"job {job_id} not done after {timeout}s: {job}")
