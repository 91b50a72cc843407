"""Connects the features' listeners to the job signals (app/core/signals.py), once per process.

Called by every entry point: create_app() (the API), the Celery app (workers, beat), the CLI,
and the test session. Connecting twice is harmless (a receiver is connected once).
"""

from __future__ import annotations

from app.observability import listeners as metrics_listeners
from app.webhooks import events as webhook_events


def connect_listeners() -> None:
    webhook_events.connect()
    metrics_listeners.connect()
