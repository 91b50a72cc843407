"""A running job's lease: proof that a live process is still working on it.

The process doing a job's work (the GPU worker's child while the model runs, then the cpu
worker's finalize) renews the lease by touching `jobs.updated_at` every lease/3 seconds from a
background thread. A process that dies (kill -9, OOM kill, a lost host) stops renewing, so after
`job_lease_s` the job is visibly abandoned: the reaper (tasks/maintenance.py) requeues or fails
it, and a redelivered message may claim it (app/jobs/execution.py `claim`). While the lease is fresh
nobody else may take the job, which is what keeps a message that Redis redelivers to a second
worker from running a job twice.

Why updated_at: every state change and progress write already sets it, so a job that reports
progress renews its lease for free, and the reaper needs only the partial index on in-flight
jobs (ix_jobs_in_flight).
"""

from __future__ import annotations

import logging
import threading
import uuid

from sqlalchemy import text

from app.core.config import get_settings
from app.db.session import transaction

log = logging.getLogger(__name__)

_RENEW = text(
    "UPDATE jobs SET updated_at = now() WHERE id = :id AND state = 'running' AND dispatch_seq = :seq RETURNING id"
)

# SQL condition (for `transition(where=...)`): the job is not running, or its lease ran out.
LEASE_EXPIRED = "updated_at < now() - make_interval(secs => :lease_s)"


def lease_expired_where(lease_s: float | None = None) -> tuple[str, dict]:
    return LEASE_EXPIRED, {"lease_s": float(lease_s if lease_s is not None else get_settings().job_lease_s)}


class JobLease:
    """Context manager: renew the job's lease until the block ends (or the job leaves running)."""

    def __init__(self, job_id: uuid.UUID | str, dispatch_seq: int, *, lease_s: float | None = None):
        self.job_id = str(job_id)
        self.dispatch_seq = dispatch_seq
        self.interval_s = max(0.1, (lease_s if lease_s is not None else get_settings().job_lease_s) / 3)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{self.job_id[:8]}", daemon=True)
        self.lost = False  # set when the job left `running` under us (requeued, cancelled)

    def renew(self) -> bool:
        with transaction() as session:
            return session.execute(_RENEW, {"id": self.job_id, "seq": self.dispatch_seq}).first() is not None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self.renew():
                    self.lost = True
                    return
            except Exception:  # Postgres restarting: keep trying; the lease is generous
                log.warning("lease renewal failed", exc_info=True, extra={"job_id": self.job_id})

    def __enter__(self) -> "JobLease":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
