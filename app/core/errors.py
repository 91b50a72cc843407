"""Errors the domain raises, each carrying the HTTP status and code the API answers with.

No Flask here: the domain (app/jobs, app/webhooks, app/scheduling) raises these, and
app/api/errors.py turns them into the JSON error body:

    {"error": {"code": "validation_error", "message": "...", "request_id": "...",
               "fields": [{"field": "width", "reason": "must be even"}]}}
"""

from __future__ import annotations


class ApiError(Exception):
    status = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        fields: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
        status: int | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.fields = fields or []
        self.headers = headers or {}
        if code:
            self.code = code
        if status:
            self.status = status


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"

    def __init__(self, message: str = "a valid API key is required (Authorization: Bearer <key>)", **kw):
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="dreamq"'}, **kw)


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class Unprocessable(ApiError):
    status, code = 422, "validation_error"


class TooManyRequests(ApiError):
    status, code = 429, "rate_limited"


class ServiceUnavailable(ApiError):
    status, code = 503, "unavailable"


def field_error(field: str, reason: str, *, status_cls: type[ApiError] = Unprocessable) -> ApiError:
    return status_cls(f"{field}: {reason}", fields=[{"field": field, "reason": reason}])
