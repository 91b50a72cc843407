"""celery beat maintenance: each periodic task is declared here, next to its code.

Postgres is the source of truth and the broker is only transport, so these tasks turn every
failure of a worker, the broker or the dispatcher into a job that is queued again (or failed with
a reason):

    dreamq.maintenance.reap_expired_leases   running jobs whose process stopped renewing the lease
                                             (app/jobs/lease.py), and dispatched jobs routed to a
                                             worker that stopped heartbeating or waiting in a pool
                                             no live worker serves -> queued, or failed
                                             `worker_lost` after max attempts
    dreamq.maintenance.reconcile_broker      dispatched jobs (and finalize hand-offs) the broker
                                             no longer holds, e.g. after a wiped Redis -> queued
                                             (finalize: the message is sent again)
    dreamq.maintenance.time_out_overdue      running past the hard time limit -> failed `timeout`
                                             (a hard kill acknowledges the message and says
                                             nothing to Postgres)
    dreamq.maintenance.expire_retention      outputs and uploads past their tier's retention:
                                             S3 objects deleted, rows updated/deleted
    dreamq.dispatch (every 5 s)              the dispatch safety tick, declared in celery_app

The bodies are the domain's (app/jobs/recovery.py, app/jobs/retention.py); this module adds the
schedule, the lock and the broker reader (broker_task_ids, the one part that knows Redis).

Each task runs under a Postgres advisory lock of its own, taken with try-lock on a dedicated
connection: a second beat, a manual run or a slow previous run makes the new run skip, never
overlap, and the lock dies with the connection if the process does. Every change is a guarded
compare-and-set transition, so running a task twice (or concurrently with a worker finishing the
same job) changes nothing the second time. They run on the `control` queue and show in Flower
under their names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import zlib
from typing import Any, Callable, Iterator

from sqlalchemy import text

from app.core.config import get_settings
from app.core.queues import CONTROL_QUEUE
from app.db.session import get_engine
from app.jobs import recovery, retention
from tasks.celery_app import celery_app

log = logging.getLogger(__name__)

# A job that has been generated and waits for the cpu queue's finalize has no process renewing
# its lease while the cpu queue is backed up: it gets this many leases before it is re-run.
FINALIZE_LEASES = 10
# Rows handled per run (per kind): a backlog of stuck jobs is worked off over several runs.
BATCH = 500


@contextlib.contextmanager
def maintenance_lock(name: str) -> Iterator[bool]:
    """Try-lock `name` for as long as the block runs; yields False when another run holds it."""
    key = zlib.crc32(f"dreamq.maintenance.{name}".encode())
    with get_engine().connect() as conn:
        got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
        conn.commit()
        try:
            yield got
        finally:
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()


def periodic(name: str, every_s: Callable[[], float]):
    """Register `fn` as task dreamq.maintenance.<name>, lock-guarded, scheduled by celery beat."""

    def wrap(fn: Callable[[], dict[str, int]]):
        def run() -> dict[str, Any]:
            with maintenance_lock(name) as got:
                if not got:
                    log.info("maintenance run skipped: another run holds the lock", extra={"task": name})
                    return {"skipped": 1}
                started = time.perf_counter()
                counts = fn()
            if any(counts.values()):
                log.info(
                    "maintenance",
                    extra={"task": name, **counts, "ms": round((time.perf_counter() - started) * 1000, 1)},
                )
            return counts

        run.__name__ = run.__qualname__ = fn.__name__
        run.__doc__ = fn.__doc__
        task = celery_app.task(
            name=f"dreamq.maintenance.{name}", ignore_result=True, acks_late=False, soft_time_limit=120, time_limit=150
        )(run)
        interval = every_s()
        # expires: a tick that waited longer than one interval is dropped, the next one follows.
        celery_app.conf.beat_schedule[f"maintenance-{name}"] = {
            "task": task.name,
            "schedule": interval,
            "options": {"queue": CONTROL_QUEUE, "expires": interval},
        }
        return task

    return wrap


def _interval() -> float:
    return get_settings().maintenance_interval_s


# --- the broker's view (Redis transport) --------------------------------------------------------


def broker_task_ids(prefixes: list[str], *, unacked_within_s: float | None = None) -> set[str] | None:
    """Task ids of the messages the Redis broker holds for these queue prefixes (None: not Redis).

    Ready messages are in one list per queue (kombu adds a suffix per priority level); delivered,
    unacknowledged ones are in the `unacked` hash, with their delivery time in `unacked_index`.
    With `unacked_within_s`, a message delivered longer ago than that does not count: a worker
    claims a job within milliseconds of receiving it (and then renews its lease), so a delivery
    that old whose job is still `dispatched` went to a consumer that died holding it (it would
    sit there until the visibility timeout, hours). The lists are short: the dispatch limit
    bounds how many jobs are in the broker at once.
    """
    import redis

    url = get_settings().broker_url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    client = redis.Redis.from_url(url)
    try:
        ids: set[str] = set()
        keys = {key for prefix in prefixes for key in client.scan_iter(match=f"{prefix}*", count=1000)}
        for key in keys:
            if client.type(key) != b"list":
                continue
            for raw in client.lrange(key, 0, -1):
                ids.add(_task_id(raw))
        delivered_at = dict(client.zrange("unacked_index", 0, -1, withscores=True))  # type: ignore[arg-type]  # withscores=True: (member, score) pairs
        oldest = time.time() - unacked_within_s if unacked_within_s is not None else None
        for tag, raw in client.hgetall("unacked").items():
            if oldest is not None and delivered_at.get(tag, 0.0) < oldest:
                continue
            try:
                ids.add(_task_id(json.loads(raw)[0]))
            except (ValueError, IndexError, TypeError):
                continue
        ids.discard("")
        return ids
    finally:
        client.close()


def _task_id(message: Any) -> str:
    try:
        if isinstance(message, (bytes, str)):
            message = json.loads(message)
        return str(message.get("headers", {}).get("id", ""))
    except (ValueError, AttributeError):
        return ""


# --- the periodic tasks -----------------------------------------------------------------------


@periodic("reap_expired_leases", _interval)
def reap_expired_leases() -> dict[str, int]:
    """Requeue (or fail after max attempts) jobs whose worker is gone."""
    return recovery.reap_expired_leases()


@periodic("reconcile_broker", _interval)
def reconcile_broker() -> dict[str, int]:
    """Requeue dispatched jobs (and resend finalize hand-offs) that the broker no longer holds."""
    return recovery.reconcile_broker(broker_task_ids)


@periodic("time_out_overdue", _interval)
def time_out_overdue() -> dict[str, int]:
    """Fail jobs running past the hard time limit (plus one lease for the worker to say so itself)."""
    return recovery.time_out_overdue()


def _retention_interval() -> float:
    return get_settings().retention_interval_s


@periodic("expire_retention", _retention_interval)
def expire_retention() -> dict[str, int]:
    """Delete outputs and uploads past their tier's retention (S3 objects first, then rows)."""
    return retention.expire_retention()
