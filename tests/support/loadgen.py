"""Load generators run in separate processes (spawned: forking a threaded test process can
deadlock the child on a lock some other thread held at fork time)."""

from __future__ import annotations

import time

import requests


def hammer_submissions(base: str, key: str, seconds: float) -> tuple[int, int, bool]:
    """POST jobs as fast as possible for `seconds`: (accepted, refused, every 429 had Retry-After)."""
    accepted = refused = 0
    retry_after_always = True
    deadline = time.monotonic() + seconds
    with requests.Session() as http:
        while time.monotonic() < deadline:
            response = http.post(
                f"{base}/v1/generations",
                json={"prompt": "burst", "model": "parked"},
                headers={"Authorization": f"Bearer {key}"},
                timeout=10,
            )
            if response.status_code == 202:
                accepted += 1
            elif response.status_code == 429:
                refused += 1
                retry_after_always &= "Retry-After" in response.headers
            else:
                raise AssertionError(f"{response.status_code}: {response.text}")
    return accepted, refused, retry_after_always
