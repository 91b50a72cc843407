"""Flower started exactly as `dreamq up` starts it (app.stack.up.flower_command), for tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator

import requests

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def running_flower(env: dict[str, str], log: Path, user: str = "ops") -> Iterator[tuple[str, tuple[str, str]]]:
    """Yield (base URL, (user, password)) once /healthcheck answers; stop Flower afterwards."""
    from app.stack.process import find_free_port
    from app.stack.up import flower_command

    port, password = find_free_port(), uuid.uuid4().hex
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            flower_command(port, user, password),
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{base}/healthcheck", timeout=1).status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        yield base, (user, password)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
