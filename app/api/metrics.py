"""/metrics: Prometheus text format, for an admin-scope key (Prometheus sends it as bearer_token).

Not public: the gauges name pools, clusters, workers and model versions, and the scrape runs a
Postgres snapshot, which an anonymous caller should not be able to trigger at will. The
snapshot is taken after the route's own transaction (the key check) has ended, so a scrape
holds one connection at a time.
"""

from __future__ import annotations

from flask import Blueprint, Response

from app.api.routing import Deferred, endpoint
from app.observability.metrics import CONTENT_TYPE_LATEST, render

bp = Blueprint("metrics", __name__)


@endpoint(
    bp,
    "/metrics",
    methods=["GET"],
    auth="admin",
    summary="Prometheus metrics (text format 0.0.4): queue depth and urgency per tier, model and pool, "
    "SLO attainment, pool limits, workers, job outcomes, waits, model loads, rejections",
)
def metrics(_ctx):
    return Deferred(lambda: Response(render(), status=200, content_type=CONTENT_TYPE_LATEST))
