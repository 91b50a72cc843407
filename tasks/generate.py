"""The GPU task: claim the job, run it on this worker, and let the next one start.

A message names (job, dispatch_seq); the claim (app/jobs/execution.py) turns it into a running
job or, for a stale or duplicate message, into nothing. The model and the job's tail run in
workers/executor.py; the task adds the lease and Celery's time limit.
"""

from __future__ import annotations

from billiard.exceptions import SoftTimeLimitExceeded

from app.core.config import get_settings
from app.core.logging_setup import job_context
from app.jobs import execution
from app.jobs.lease import JobLease
from app.messaging import get_publisher
from tasks.celery_app import celery_app
from workers import executor

_settings = get_settings()


@celery_app.task(
    name="dreamq.generate",
    bind=True,
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=_settings.job_soft_time_limit_s,
    time_limit=_settings.job_hard_time_limit_s,
)
def generate(self, job_id: str, dispatch_seq: int) -> None:
    worker_id = self.request.hostname or "unknown"
    with job_context(job_id=job_id):
        job = execution.claim(job_id, dispatch_seq, worker_id)
        if job is None:
            return
        # A slot under the dispatch limit just freed up (dispatched -> running).
        get_publisher().request_dispatch()
        with job_context(job_id=job_id, user_id=str(job.user_id), tier=job.tier), JobLease(job.id, job.dispatch_seq):
            try:
                executor.run(job, worker_id, passthrough=(SoftTimeLimitExceeded,))
            except SoftTimeLimitExceeded:
                execution.fail(
                    job, worker_id, "timeout", f"the job exceeded its time limit of {_settings.job_soft_time_limit_s} s"
                )
