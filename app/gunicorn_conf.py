"""gunicorn settings for the API: `gunicorn -c python:app.gunicorn_conf ... 'app.api:create_app()'`.

Only what every deployment needs; workers, threads and the bind address stay on the command line.
"""

from __future__ import annotations


def child_exit(server, worker) -> None:
    """A worker process ended: with PROMETHEUS_MULTIPROC_DIR set, drop its live-gauge files (its
    counters and histograms stay in the directory and keep counting in every scrape's sums)."""
    # Imported here, not at the top: the master needs prometheus_client only when a child exits.
    from app.observability.metrics import mark_process_dead

    mark_process_dead(worker.pid)
