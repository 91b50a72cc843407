"""The Flask app: `create_app()` is what gunicorn serves (`app.api:create_app()`)."""

from __future__ import annotations

import logging
import time
import uuid

from flask import Flask, g, request

from app.config import get_settings

log = logging.getLogger("app.api.access")


def create_app() -> Flask:
    from app.api import admin, generations, health, openapi, uploads
    from app.api.errors import register_error_handlers

    settings = get_settings()
    settings.require("database_url")
    app = Flask("dreamq")
    # Werkzeug refuses bodies above this before reading them (413); uploads are the largest.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes + 1024 * 1024
    app.json.sort_keys = False
    for module in (health, generations, uploads, admin, openapi):
        app.register_blueprint(module.bp)
    register_error_handlers(app)

    @app.before_request
    def _start() -> None:
        g.request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        g.started = time.perf_counter()

    @app.after_request
    def _finish(response):
        response.headers["X-Request-Id"] = g.get("request_id", "")
        if request.path not in ("/healthz", "/readyz"):
            log.info(
                "request",
                extra={"method": request.method, "path": request.path, "status": response.status_code,
                       "ms": round((time.perf_counter() - g.get("started", time.perf_counter())) * 1000, 1),
                       "request_id": g.get("request_id")},
            )
        return response

    return app
