"""API errors: every failure is JSON naming the code, the reason and (for bad input) the fields.

    {"error": {"code": "validation_error", "message": "...", "request_id": "...",
               "fields": [{"field": "width", "reason": "must be even"}]}}

Our own faults answer 500 with the request id and never a traceback; the traceback goes to the
log line carrying the same request id.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy.exc
from flask import Flask, g, jsonify
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from app.core.errors import ApiError

log = logging.getLogger(__name__)


def _body(code: str, message: str, fields: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message, "request_id": getattr(g, "request_id", None)}
    if fields:
        error["fields"] = fields
    return {"error": error}


def pydantic_fields(exc: ValidationError) -> list[dict[str, str]]:
    fields = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        reason = err["msg"]
        if err["type"] == "extra_forbidden":
            reason = "unknown field"
        elif err["type"] == "missing":
            reason = "field required"
        fields.append({"field": loc, "reason": reason})
    return fields


def error_response(exc: ApiError, **extra: Any):
    """The JSON error for `exc` with its status and headers; `extra` adds top-level keys (the
    /dream-machine/v1 surface adds Luma's `detail`)."""
    response = jsonify({**extra, **_body(exc.code, exc.message, exc.fields)})
    response.status_code = exc.status
    for key, value in exc.headers.items():
        response.headers[key] = value
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return error_response(exc)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        code = {
            404: "not_found",
            405: "method_not_allowed",
            413: "payload_too_large",
            415: "unsupported_media_type",
        }.get(exc.code or 500, (exc.name or "error").lower().replace(" ", "_"))
        message = exc.description or exc.name
        if exc.code == 413:
            message = "request body is too large"
        response = jsonify(_body(code, message))
        response.status_code = exc.code or 500
        return response

    @app.errorhandler(sqlalchemy.exc.OperationalError)
    @app.errorhandler(sqlalchemy.exc.InterfaceError)
    def _database_unavailable(exc: Exception):
        # Postgres restarting or unreachable: nothing was stored, and the client may retry (with
        # the same Idempotency-Key, a retry can never make a second job).
        log.warning(
            "database unavailable",
            extra={
                "request_id": getattr(g, "request_id", None),
                "error": type(exc.orig if hasattr(exc, "orig") else exc).__name__,
            },
        )
        response = jsonify(_body("unavailable", "the database is unavailable; retry shortly"))
        response.status_code = 503
        response.headers["Retry-After"] = "1"
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error", extra={"request_id": getattr(g, "request_id", None)})
        response = jsonify(_body("internal_error", "internal error; quote the request_id when reporting it"))
        response.status_code = 500
        return response
