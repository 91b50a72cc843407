"""Worker lifecycle: fork safety, logging, the GPU worker's heartbeat and model preload.

- worker_process_init (in each prefork child): drop DB connections and boto3 clients inherited
  from the parent, and only now touch the device (CUDA must not be initialised before fork).
- worker_ready (main process of a GPU worker): register in `workers` and heartbeat every few
  seconds from a thread, so the dispatcher knows the pool has capacity.
- worker_shutdown: mark the worker stopped, so its pool stops receiving work at once.
- worker_process_shutdown / worker_shutdown: wait for the job tail in flight (workers/job_tail.py).
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from celery import signals
from sqlalchemy import text

from app.core.logging_setup import configure_logging
from app.core.storage import reset_clients as reset_storage_clients
from app.db.session import dispose_after_fork, transaction
from app.jobs.workers import heartbeat
from app.jobs.workers import report_loaded as record_loaded
from app.messaging import get_publisher
from app.observability.metrics import mark_process_dead, serve_host_metrics
from workers import job_tail

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = float(os.environ.get("DREAMQ_HEARTBEAT_INTERVAL_S", "5"))


def gpu_worker_pool() -> tuple[str, str] | None:
    """(cluster, model) when this process is a GPU worker started by `dreamq worker`."""
    cluster, model = os.environ.get("DREAMQ_WORKER_CLUSTER"), os.environ.get("DREAMQ_WORKER_MODEL")
    return (cluster, model) if cluster and model else None


@signals.setup_logging.connect
def _setup_logging(**_kwargs) -> None:
    configure_logging(os.environ.get("DREAMQ_LOG_COMPONENT", "worker"))


@signals.worker_init.connect
def _metrics_exporter(**_kwargs) -> None:
    """On a host without an API process: DREAMQ_METRICS_PORT serves this host's event metrics."""
    port = os.environ.get("DREAMQ_METRICS_PORT")
    if port:
        try:
            serve_host_metrics(int(port))
        except OSError:  # another worker of this host serves it already: it reads the same directory
            log.warning("metrics port in use; not serving it from this worker", extra={"port": port})


@signals.worker_process_shutdown.connect
def _child_exit(pid=None, **_kwargs) -> None:
    job_tail.flush()  # a finished job's hand-off must commit before the process goes
    mark_process_dead(pid or os.getpid())


@signals.worker_process_init.connect
def _child_init(**_kwargs) -> None:
    dispose_after_fork()
    reset_storage_clients()
    job_tail.reset_after_fork()
    if gpu_worker_pool() is not None and os.environ.get("DREAMQ_PRELOAD", "1") == "1":
        _preload()


def _preload() -> None:
    """Load the pool's prod version before the first job arrives (warm-up is the slow part)."""
    # Imported here, not at the top: every process that publishes loads this module through the
    # Celery app, and only a GPU worker needs the model runtime.
    from workers.runtime import get_runtime

    cluster, model = gpu_worker_pool()  # type: ignore[misc]  # called only in a GPU worker
    try:
        with transaction() as session:
            row = session.execute(
                text(
                    "SELECT m.name, v.number, v.digest FROM model_aliases a JOIN models m ON m.id = a.model_id "
                    "JOIN model_versions v ON v.id = a.version_id WHERE m.name = :m AND a.alias = 'prod'"
                ),
                {"m": model},
            ).first()
        if row is not None:
            get_runtime().get(row.name, row.number, row.digest)
            report_loaded()
    except Exception:  # a broken version must not keep the worker from serving other versions
        log.exception("model preload failed", extra={"model": model})


def report_loaded() -> None:
    """Publish which versions this worker holds in memory (the dispatcher's affinity reads it)."""
    from workers.runtime import get_runtime  # GPU workers only (see _preload)

    worker_id = os.environ.get("DREAMQ_WORKER_NODENAME") or f"?@{socket.gethostname()}"
    with transaction() as session:
        record_loaded(session, worker_id, get_runtime().loaded_digests(), get_runtime().loads)


class Heartbeat:
    def __init__(self, worker_id: str, cluster: str, model: str):
        self.worker_id, self.cluster, self.model = worker_id, cluster, model
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dreamq-heartbeat", daemon=True)
        self.state = "idle"
        # Until the first beat lands, every beat is the fresh one (Postgres may be restarting).
        self._fresh = True

    def beat(self, state: str | None = None, *, fresh: bool = False) -> None:
        fresh = fresh or self._fresh
        with transaction() as session:
            heartbeat(session, self.worker_id, self.cluster, self.model, state or self.state, fresh=fresh)
        self._fresh = False

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL_S):
            try:
                self.beat()
            except Exception:
                log.warning("heartbeat failed", exc_info=True)

    def start(self) -> None:
        try:
            self.beat("idle", fresh=True)
        except Exception:
            # Postgres unreachable at start: the thread keeps trying; the worker is not
            # counted as capacity until a beat lands, which is what should happen.
            log.warning("first heartbeat failed; retrying in the background", exc_info=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.beat("stopped")
        except Exception:
            log.warning("could not mark worker stopped", exc_info=True)


_heartbeat: Heartbeat | None = None


@signals.worker_ready.connect
def _worker_ready(sender=None, **_kwargs) -> None:
    global _heartbeat
    pool = gpu_worker_pool()
    if pool is None:
        return
    _heartbeat = Heartbeat(sender.hostname, *pool)
    _heartbeat.start()
    # Jobs may have queued while no worker served this pool.
    get_publisher().request_dispatch()


@signals.worker_shutting_down.connect
def _worker_shutting_down(**_kwargs) -> None:
    """Warm shutdown: mark the worker draining. The job it runs sees that at its next progress
    step and goes back to the queue at once (app/jobs/execution.py), so a shutdown never waits out a
    long job, and the dispatcher stops counting this worker's capacity."""
    if _heartbeat is not None:
        _heartbeat.state = "draining"
        try:
            _heartbeat.beat("draining")
        except Exception:
            log.warning("could not mark worker draining", exc_info=True)


@signals.worker_shutdown.connect
def _worker_shutdown(**_kwargs) -> None:
    job_tail.flush()  # the solo pool runs tasks in this process
    if _heartbeat is not None:
        _heartbeat.stop()
