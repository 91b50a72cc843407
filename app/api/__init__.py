"""The Flask app: `create_app()` is what gunicorn serves (`app.api:create_app()`)."""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask, g, request

from app.api import admin, dashboard, dream_machine, generations, health, metrics, openapi, uploads, webhooks
from app.api.errors import register_error_handlers
from app.core.config import get_settings
from app.core.logging_setup import close_context, open_context
from app.observability.metrics import observe_request
from app.wiring import connect_listeners

log = logging.getLogger("app.api.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def create_app() -> Flask:
    settings = get_settings()
    settings.require("database_url")
    connect_listeners()
    # No static folder: its route would be the one route that declares no permission.
    app = Flask("dreamq", static_folder=None)
    # Werkzeug refuses bodies above this before reading them (413); uploads are the largest.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes + 1024 * 1024
    app.json.sort_keys = False  # type: ignore[attr-defined]  # Flask's DefaultJSONProvider has it
    for module in (health, generations, uploads, admin, webhooks, metrics, openapi):
        app.register_blueprint(module.bp)
    app.register_blueprint(dream_machine.bp)  # Luma's Dream Machine API, /dream-machine/v1
    app.register_blueprint(dashboard.bp)
    dashboard.configure_sessions(app, settings)
    register_error_handlers(app)

    @app.before_request
    def _start() -> None:
        # A caller's id is kept only if it is a plain token: it is echoed and logged on every line.
        supplied = request.headers.get("X-Request-Id", "")
        g.request_id = supplied if _REQUEST_ID.fullmatch(supplied) else uuid.uuid4().hex
        g.started = time.perf_counter()
        # Every line of this request carries its id; the route adds user and tier, job routes the job.
        g.log_token = open_context(request_id=g.request_id)

    @app.teardown_request
    def _end(_exc) -> None:
        token = g.pop("log_token", None)
        if token is not None:
            close_context(token)

    @app.after_request
    def _finish(response):
        response.headers["X-Request-Id"] = g.get("request_id", "")
        seconds = time.perf_counter() - g.get("started", time.perf_counter())
        # The rule, not the path: bounded labels (no job ids).
        observe_request(
            request.url_rule.rule if request.url_rule else "unmatched", request.method, response.status_code, seconds
        )
        if request.path not in ("/healthz", "/readyz"):
            log.info(
                "request",
                extra={
                    "method": request.method,
                    "path": request.path,
                    "status": response.status_code,
                    "ms": round(seconds * 1000, 1),
                    "request_id": g.get("request_id"),
                },
            )
        return response

    return app
