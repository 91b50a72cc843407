"""The baseline of the job-path benches: plain Celery + Redis with dreamq's own settings.

`app` is a Celery app configured from tasks.celery_app's configuration (JSON only, acks_late,
prefetch 1, reject_on_worker_lost, the broker transport options, task events on), minus
dreamq's queues, routes, beat schedule and signal handlers. Its one task does nothing but record
that it ran (and when) in Redis, in one pipelined round trip: what "recorded completion" costs
when nobody keeps a durable job record.

    celery -A bench.raw_celery:app worker -Q bench-raw -c 1 --prefetch-multiplier 1 -P prefork -E
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from celery import Celery  # noqa: E402

QUEUE = os.environ.get("DREAMQ_BENCH_RAW_QUEUE", "bench-raw")
# Settings copied from dreamq's app; anything about dreamq's own topology is left out.
_COPIED = (
    "task_serializer",
    "result_serializer",
    "accept_content",
    "event_serializer",
    "task_ignore_result",
    "result_backend",
    "task_acks_late",
    "task_reject_on_worker_lost",
    "task_acks_on_failure_or_timeout",
    "worker_prefetch_multiplier",
    "broker_transport_options",
    "broker_connection_retry_on_startup",
    "broker_pool_limit",
    "worker_hijack_root_logger",
    "worker_redirect_stdouts",
    "worker_send_task_events",
    "task_send_sent_event",
    "task_soft_time_limit",
    "task_time_limit",
    "timezone",
    "enable_utc",
    "worker_cancel_long_running_tasks_on_connection_loss",
    "worker_proc_alive_timeout",
)


def _make() -> Celery:
    from app.core.config import get_settings
    from tasks.celery_app import make_celery

    reference = make_celery().conf
    app = Celery("dreamq-bench-raw", broker=get_settings().broker_url, set_as_current=False)
    app.conf.update({key: reference[key] for key in _COPIED})
    app.conf.task_default_queue = QUEUE
    return app


app = _make()
_redis = None


def _client():
    global _redis
    if _redis is None:
        import redis

        _redis = redis.Redis.from_url(app.conf.broker_url)
    return _redis


@app.task(name="bench.noop", ignore_result=True)
def noop(counter: str, sent_at: float) -> None:
    started = time.time()
    pipe = _client().pipeline(transaction=False)
    pipe.rpush(f"{counter}:lat", f"{sent_at!r} {started!r} {time.time()!r}")
    pipe.set(f"{counter}:last", repr(started))
    pipe.incr(counter)
    pipe.execute()
