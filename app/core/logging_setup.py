"""Structured JSON logs with the job id (and user, tier) bound on every line about a job.

`job_context(job_id=...)` binds fields in a contextvar; the formatter adds them, plus any
`extra={...}` a call passes. Secrets never reach a log line: API keys are logged by prefix only.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import os
import re
import sys
from typing import Any, Iterator

from app.core.config import get_settings

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("dreamq_log_context", default={})

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


@contextlib.contextmanager
def job_context(**fields: Any) -> Iterator[None]:
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


# Defence in depth: nothing logs keys by design, but a key pasted into a prompt, an exception
# message or a header dump must still not reach a line. An API key keeps its display prefix.
_SECRETS = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+|(dq_[A-Za-z0-9_-]{8})[A-Za-z0-9_-]{8,}")


def redact(text: str) -> str:
    return _SECRETS.sub(lambda m: (m.group(1) or m.group(2)) + "[redacted]", text)


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def bind(**fields: Any) -> None:
    _context.set({**_context.get(), **fields})


def open_context(**fields: Any) -> contextvars.Token:
    """`job_context` for hooks that cannot hold a with block (a request's before/teardown hooks):
    everything bound until `close_context(token)` (`bind()` included) is dropped there, so a
    thread that serves the next request starts clean. It starts clean too: a request is a unit of
    its own and never inherits what the thread had bound before it (in tests, or an in-process
    task that left fields behind)."""
    return _context.set({k: v for k, v in fields.items() if v is not None})


def close_context(token: contextvars.Token) -> None:
    try:
        _context.reset(token)
    except ValueError:  # set in another context (should not happen): leave an empty one
        _context.set({})


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str):
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "component": self.component,
            "msg": record.getMessage(),
        }
        payload.update(_context.get())
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(payload, default=str))


def configure_logging(component: str, level: str | None = None, json_logs: bool | None = None) -> None:
    settings = get_settings()
    level = level or settings.log_level
    json_logs = settings.log_json if json_logs is None else json_logs
    handler = logging.StreamHandler(sys.stderr)
    if json_logs:
        handler.setFormatter(JsonFormatter(component))
    else:
        handler.setFormatter(RedactingFormatter(f"%(asctime)s {component} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # Library chatter that would drown job lines at INFO.
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "PIL", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("DREAMQ_LOG_COMPONENT", component)
