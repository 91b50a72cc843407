"""Flower that knows every queue: `control`, `cpu` and `<cluster>.<model>.<tier>` of every pool.

Flower lists on /broker and /api/queues/length only the queues its workers report consuming
(`active_queues`), or, when none report, `task_default_queue` and `conf.task_queues`. dreamq's
pool queues are created on demand (tasks/celery_app.py), so a pool whose workers are gone,
draining or not started yet (a burst pool before the controller scales it up) would vanish from
Flower exactly when its backlog matters. `install()` widens Flower's queue list with every pool
and tier from Postgres (re-read every POOL_QUEUES_TTL_S, so pools added later appear without a
restart) on top of what the workers report; it runs from the Flower config file
(app/observability/flowerconfig.py, given with `--conf`), before Flower starts serving.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import text

from app.core.queues import CONTROL_QUEUE, CPU_QUEUE, pool_queue
from app.db.session import transaction

log = logging.getLogger(__name__)

# The query is small, but Flower calls this on its IO loop for every page and API call.
POOL_QUEUES_TTL_S = 10.0

_cache: tuple[float, list[str]] = (0.0, [])


def pool_queue_names(session) -> list[str]:
    """control, cpu and every `<cluster>.<model>.<tier>` of every pool, tiers in rank order."""
    rows = session.execute(
        text(
            "SELECT c.name AS cluster, m.name AS model FROM pools p JOIN clusters c ON c.id = p.cluster_id "
            "JOIN models m ON m.id = p.model_id ORDER BY c.name, m.name"
        )
    ).all()
    tiers = list(session.execute(text("SELECT name FROM tiers ORDER BY rank")).scalars())
    return [CONTROL_QUEUE, CPU_QUEUE] + [pool_queue(r.cluster, r.model, t) for r in rows for t in tiers]


def known_queues() -> list[str]:
    """pool_queue_names(), cached; the last good list (or just control/cpu) when Postgres is down."""
    global _cache
    at, names = _cache
    if time.monotonic() - at < POOL_QUEUES_TTL_S and names:
        return names
    try:
        with transaction() as session:
            names = pool_queue_names(session)
    except Exception:  # Flower must keep serving what the workers report
        log.warning("could not read pool queues from the database", exc_info=True)
        names = names or [CONTROL_QUEUE, CPU_QUEUE]
    _cache = (time.monotonic(), names)
    return names


def install() -> None:
    from flower.views import BaseHandler

    if getattr(BaseHandler, "_dreamq_queues", False):
        return
    reported = BaseHandler.get_active_queue_names

    def get_active_queue_names(self) -> list[str]:
        return sorted(set(reported(self)) | set(known_queues()))

    BaseHandler.get_active_queue_names = get_active_queue_names
    BaseHandler._dreamq_queues = True
