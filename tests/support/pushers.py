"""Pushes run in separate (spawned) processes, for races between pushers."""

from __future__ import annotations

import os
from pathlib import Path


def push_in_process(env: dict[str, str], bundle: str, name: str, number: int, start_at: float) -> str:
    """Push `bundle` as `name` v`number` once `start_at` (time.time()) arrives; 'ok' or the error."""
    import time

    os.environ.update(env)
    from app.db.session import transaction
    from workers.repository import RepositoryError, push_version

    time.sleep(max(0.0, start_at - time.time()))
    try:
        with transaction() as session:
            push_version(session, Path(bundle), name, created_by=f"pid {os.getpid()}", number=number)
        return "ok"
    except RepositoryError as exc:
        return f"{type(exc).__name__}: {exc}"
