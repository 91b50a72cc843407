"""A push run in a spawned process on the test's signal, for races between pushers.

Not a test module: `test_model_repository.py` starts it with multiprocessing (spawn), so it must be
importable by name in the child.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def push_when_told(env: dict[str, str], bundle: str, name: str, number: int, ready: Any, go: Any, report: Any) -> None:
    """Push `bundle` as `name` v`number` once `go` is set; put what happened on `report`.

    `report` gets {"backend": pid} when the push checks out its database connection (the test
    watches that backend's locks), then {"outcome": "ok" or the error, "started", "ended" (the
    push's time.monotonic() interval: CLOCK_MONOTONIC, one clock for every process of the
    machine), "uploaded" (bytes the push sent to object storage)}.
    """
    os.environ.update(env)
    from sqlalchemy import event

    from app.db.session import get_engine, transaction
    from workers.repository import push_version

    def checked_out(dbapi_connection, record, proxy) -> None:
        report.put({"backend": dbapi_connection.info.backend_pid})

    event.listen(get_engine(), "checkout", checked_out)
    uploaded = 0

    def progress(sent: int) -> None:
        nonlocal uploaded
        uploaded += sent

    ready.set()  # imports done: the test's deadlines then time the push, not the interpreter's start
    go.wait()
    started = time.monotonic()
    try:
        with transaction() as session:
            push_version(session, Path(bundle), name, created_by=f"pid {os.getpid()}", number=number, progress=progress)
        outcome = "ok"
    except Exception as exc:  # reported, whatever it is: the test must see an unexpected error, not hang
        outcome = f"{type(exc).__name__}: {exc}"
    report.put({"outcome": outcome, "started": started, "ended": time.monotonic(), "uploaded": uploaded})
