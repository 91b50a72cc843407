"""The Celery app: every setting that matters for long GPU jobs, in one place.

Queue names and the order workers consume them: app/core/queues.py.

Why these settings:
- JSON only: a pickle payload from anyone who can write to the broker would be code execution.
- acks_late + prefetch 1 + concurrency 1 per GPU: a message is acknowledged only after the job
  ends, and a worker never holds a second job it cannot start (which would also hide it from
  the dispatcher's back-pressure count).
- Redis visibility_timeout above the hard time limit: Redis redelivers an unacknowledged message
  after the visibility timeout, so a shorter one would run a long job twice. Postgres guards
  against that too (compare-and-set claim), but the GPU time would still be wasted.
- task_reject_on_worker_lost: when the child running a job dies (OOM kill, segfault in a CUDA
  kernel) the message goes back to the queue instead of being acknowledged and forgotten; the
  claim counts an attempt in Postgres so a job that kills its worker every time ends failed.
- queue_order_strategy=priority: kombu's Redis transport BRPOPs the queues in the order given
  instead of rotating them, so a worker takes api work before free work.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

# The worker's lifecycle hooks (logging, fork safety, heartbeat, preload) must be connected
# before a worker boots: every worker process starts from this module.
import workers.lifecycle  # noqa: F401
from app.core.config import ConfigError, get_settings
from app.core.queues import CONTROL_QUEUE, CPU_QUEUE
from app.wiring import connect_listeners


def _broker_transport_options(settings) -> dict:
    return {
        "visibility_timeout": settings.broker_visibility_timeout_s,
        "queue_order_strategy": "priority",
    }


def check_time_limits(settings) -> None:
    """soft < hard < visibility timeout, or a long job could be redelivered while it still runs."""
    soft, hard, visibility = (
        settings.job_soft_time_limit_s,
        settings.job_hard_time_limit_s,
        settings.broker_visibility_timeout_s,
    )
    if not soft < hard < visibility:
        raise ConfigError(
            "need DREAMQ_JOB_SOFT_TIME_LIMIT_S < DREAMQ_JOB_HARD_TIME_LIMIT_S < DREAMQ_VISIBILITY_TIMEOUT_S, "
            f"got {soft} / {hard} / {visibility}"
        )


def make_celery() -> Celery:
    settings = get_settings()
    check_time_limits(settings)
    broker = settings.broker_url or "redis://127.0.0.1:6379/0"
    # Task modules are imported by the worker and by beat (include=, at their init; the periodic
    # tasks declare their beat entries there); publishers send by task name and never import them,
    # which keeps the API process free of worker code.
    app = Celery(
        "dreamq",
        broker=broker,
        set_as_current=True,
        include=[
            "tasks.dispatch",
            "tasks.generate",
            "tasks.finalize",
            "tasks.webhooks",
            "tasks.maintenance",
            "tasks.burst",
        ],
    )
    direct = Exchange("", type="direct")
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        # Results live in Postgres (the job row); the broker carries no result traffic.
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=_broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        broker_pool_limit=10,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_default_queue=CPU_QUEUE,
        task_queues=[
            Queue(CONTROL_QUEUE, direct, routing_key=CONTROL_QUEUE),
            Queue(CPU_QUEUE, direct, routing_key=CPU_QUEUE),
        ],
        # Pool queues are not declared up front: there is one per pool and tier, created by the
        # dispatcher's publish and by the workers that consume them.
        task_create_missing_queues=True,
        task_routes={
            "dreamq.dispatch": {"queue": CONTROL_QUEUE},
            "dreamq.maintenance.*": {"queue": CONTROL_QUEUE},
            "dreamq.finalize": {"queue": CPU_QUEUE},
            "dreamq.webhooks.*": {"queue": CPU_QUEUE},
        },
        # CPU tasks: soft limit raises inside the task so it can clean up; hard limit kills.
        task_soft_time_limit=300,
        task_time_limit=360,
        timezone="UTC",
        enable_utc=True,
        # Each periodic task is declared here next to the routing it needs; the tasks themselves
        # are idempotent, so a late or doubled tick is harmless.
        beat_schedule={
            # Safety net under event-driven dispatch: a lost request costs at most one interval.
            "dispatch-safety-tick": {
                "task": "dreamq.dispatch",
                "schedule": 5.0,
                "options": {"queue": CONTROL_QUEUE, "expires": 5},
            },
        },
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # A GPU worker's child loads the pool's model before it reports up (workers/lifecycle.py
        # _preload): seconds on this CPU when the machine is busy, minutes for a video model.
        # Celery's default of 4 s kills such a child and starts another, over and over.
        worker_proc_alive_timeout=300,
    )
    return app


celery_app = make_celery()
# Webhooks and metrics hear of every transition a worker, beat or a publishing process makes.
connect_listeners()
