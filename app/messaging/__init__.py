"""The messaging port: how the domain asks for work to happen elsewhere, without Celery.

Three things leave a process towards the broker:

    request_dispatch()          "run a dispatch pass soon" (coalesced; cheap to ask often)
    release(releases)           one `dreamq.generate` message per job the dispatcher released
    send(task, args, queue)     any other task by name (webhook deliveries, maintenance kicks)

and one control verb, `stop_consuming(queues, worker)`, for a burst worker being retired.

Every call takes an optional `session`: with one, the message goes out only after that
session's transaction commits (and never if it rolls back), so a caller cannot publish for a
change that did not happen. That is the default way to publish from inside a transaction.

The Celery adapter is `tasks.publisher.CeleryPublisher`; `InMemoryPublisher` records messages
for unit tests. A process installs its publisher with `set_publisher()`; when none was
installed, `get_publisher()` loads the one `DREAMQ_PUBLISHER` names (the Celery one by
default) by its dotted path, so the domain never imports the transport.
"""

from __future__ import annotations

import importlib
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.db.session import after_commit


@dataclass(frozen=True)
class Release:
    """A job the dispatcher moved to `dispatched`: publish it to `queue` carrying `dispatch_seq`."""

    job_id: uuid.UUID
    queue: str
    dispatch_seq: int
    tier: str
    user_id: uuid.UUID | None = None


class Publisher(Protocol):
    def request_dispatch(self, session: Session | None = None) -> None: ...

    def release(self, releases: Sequence[Release], session: Session | None = None) -> None: ...

    def send(
        self,
        task: str,
        args: Sequence[Any] = (),
        *,
        queue: str,
        countdown: float | None = None,
        task_id: str | None = None,
        session: Session | None = None,
    ) -> None: ...

    def stop_consuming(self, queues: Sequence[str], worker: str) -> None: ...


def deferred(session: Session | None, call) -> None:
    """Run `call` now, or after `session` commits when one is given (publishers' shared rule)."""
    if session is None:
        call()
    else:
        after_commit(session, call)


@dataclass
class InMemoryPublisher:
    """Records what would have been published, in order (unit tests and offline tools)."""

    dispatch_requests: int = 0
    releases: list[Release] = field(default_factory=list)
    sent: list[tuple[str, tuple, str, float | None, str | None]] = field(default_factory=list)
    stopped: list[tuple[str, str]] = field(default_factory=list)

    def request_dispatch(self, session: Session | None = None) -> None:
        def _record() -> None:
            self.dispatch_requests += 1

        deferred(session, _record)

    def release(self, releases: Sequence[Release], session: Session | None = None) -> None:
        deferred(session, lambda: self.releases.extend(releases))

    def send(
        self,
        task: str,
        args: Sequence[Any] = (),
        *,
        queue: str,
        countdown: float | None = None,
        task_id: str | None = None,
        session: Session | None = None,
    ) -> None:
        deferred(session, lambda: self.sent.append((task, tuple(args), queue, countdown, task_id)))

    def stop_consuming(self, queues: Sequence[str], worker: str) -> None:
        self.stopped.extend((queue, worker) for queue in queues)


_publisher: Publisher | None = None
_lock = threading.Lock()


def set_publisher(publisher: Publisher | None) -> Publisher | None:
    """Install this process's publisher (None: back to the configured default); returns the old one."""
    global _publisher
    with _lock:
        previous, _publisher = _publisher, publisher
    return previous


def get_publisher() -> Publisher:
    global _publisher
    if _publisher is None:
        with _lock:
            if _publisher is None:
                module, _, name = get_settings().publisher.partition(":")
                _publisher = getattr(importlib.import_module(module), name)()
    assert _publisher is not None
    return _publisher
