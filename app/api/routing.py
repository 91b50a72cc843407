"""`endpoint()`: the only way a route registers.

Each route declares who may call it (`auth="public" | "user" | "admin"`; there is no default, so
a route without a permission does not register), its request and response schemas (pydantic;
the same classes validate requests and generate /v1/openapi.json), and runs in one transaction
that commits before the response is sent: a 202 means the job is durable.

Credentials are a Bearer key, except on the few admin GET routes the /dashboard page reads,
which declare `session_auth` and also accept its login cookie (signed, HttpOnly, SameSite=Strict);
a cookie can never authorize a write, so it opens no CSRF hole. HTML pages (`html`) are left out
of the OpenAPI document, and one with a `login_redirect` sends a caller without credentials there
instead of answering 401.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from flask import Blueprint, Response, jsonify, redirect, request
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session

from app.api.auth import Principal, authenticate
from app.api.errors import pydantic_fields
from app.core.errors import BadRequest, Unauthorized, Unprocessable, UnsupportedMediaType
from app.core.logging_setup import bind
from app.db.session import transaction

AUTH_LEVELS = ("public", "user", "admin")


@dataclass
class RouteSpec:
    rule: str
    methods: list[str]
    auth: str
    summary: str
    body: type[BaseModel] | None
    query: type[BaseModel] | None
    response: type[BaseModel] | None
    status: int
    tags: list[str]
    content_types: list[str] = field(default_factory=list)
    errors: list[int] = field(default_factory=list)
    # Other success statuses with the same body (e.g. 200 for an idempotent replay of a 202).
    also: list[int] = field(default_factory=list)
    # Request headers the route reads: name -> (JSON schema, description), for the OpenAPI document.
    headers: dict[str, tuple[dict, str]] = field(default_factory=dict)
    # Also accepts the dashboard login cookie (admin GET routes only).
    session_auth: bool = False
    # An HTML page for browsers, not part of the JSON API.
    html: bool = False
    login_redirect: str | None = None
    # False: served, but left out of /v1/openapi.json (another API's surface, documented by its owner).
    in_openapi: bool = True


REGISTRY: list[RouteSpec] = []


@dataclass
class Context:
    session: Session
    principal: Principal | None
    body: Any = None
    query: Any = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def user(self) -> Principal:
        assert self.principal is not None
        return self.principal


class Deferred:
    """A response produced after the commit, e.g. `Prefer: wait`, which must not hold a transaction."""

    def __init__(self, produce: Callable[[], Any]):
        self.produce = produce


def _no_constant(name: str):
    # Python's json accepts NaN/Infinity, which are not JSON and which no response could echo.
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(model: type[BaseModel]) -> BaseModel:
    mimetype = request.mimetype
    if mimetype != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {mimetype or 'none'}",
            fields=[{"field": "Content-Type", "reason": "must be application/json"}],
        )
    raw = request.get_data(cache=True)
    try:
        data = json.loads(raw or b"", parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="malformed_json") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply", code="malformed_json") from None
    if not isinstance(data, dict):
        raise Unprocessable(
            "request body must be a JSON object", fields=[{"field": "body", "reason": "must be an object"}]
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        fields = pydantic_fields(exc)
        raise Unprocessable("; ".join(f"{f['field']}: {f['reason']}" for f in fields), fields=fields) from None


def _parse_query(model: type[BaseModel]) -> BaseModel:
    try:
        return model.model_validate(request.args.to_dict())
    except ValidationError as exc:
        fields = pydantic_fields(exc)
        raise Unprocessable("; ".join(f"{f['field']}: {f['reason']}" for f in fields), fields=fields) from None


def endpoint(
    bp: Blueprint,
    rule: str,
    *,
    methods: list[str],
    auth: str,
    summary: str,
    body: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    response: type[BaseModel] | None = None,
    status: int = 200,
    content_types: list[str] | None = None,
    errors: list[int] | None = None,
    also: list[int] | None = None,
    headers: dict[str, tuple[dict, str]] | None = None,
    transactional: bool = True,
    session_auth: bool = False,
    html: bool = False,
    login_redirect: str | None = None,
    in_openapi: bool = True,
    fast: Callable[[], Any] | None = None,
) -> Callable:
    """Register `handler` for `rule` (see the module docstring).

    `fast`: an optional specialised handler for the route's common case, tried first. It returns
    None, before any side effect, for a request it does not take (the general path then answers
    it exactly as if `fast` were absent), else the result, having applied the same permission,
    body and transaction rules itself. Only for a route whose intake cost is measured
    (POST /v1/generations, bench/intake.py).
    """
    if auth not in AUTH_LEVELS:
        raise ValueError(f"route {rule}: auth must be one of {AUTH_LEVELS}, got {auth!r}")
    if session_auth and (auth != "admin" or set(methods) != {"GET"}):
        # SameSite=Strict keeps the cookie off cross-site requests; reads-only is the second fence.
        raise ValueError(f"route {rule}: session_auth is for admin GET routes only")
    if login_redirect and auth == "public":
        raise ValueError(f"route {rule}: a public route has nothing to log in for")

    def decorator(handler: Callable) -> Callable:
        prefix = bp.url_prefix or ""
        REGISTRY.append(
            RouteSpec(
                prefix + rule,
                methods,
                auth,
                summary,
                body,
                query,
                response,
                status,
                [bp.name],
                content_types or (["application/json"] if body else []),
                errors or [],
                also or [],
                headers or {},
                session_auth,
                html or bool(login_redirect),
                login_redirect,
                in_openapi,
            )
        )

        @functools.wraps(handler)
        def view(**kwargs):
            if fast is not None:
                result = fast(**kwargs)
                if result is not None:
                    return _finish(result, status)
            if not transactional:
                return _finish(handler(None, **kwargs), status)
            with transaction() as session:
                try:
                    principal = authenticate(session, auth, allow_session=session_auth) if auth != "public" else None
                except Unauthorized:
                    if login_redirect is None:
                        raise
                    return redirect(login_redirect, code=303)
                ctx = Context(session=session, principal=principal)
                if principal is not None:  # on every later line of this request (access log included)
                    bind(user_id=str(principal.user_id), tier=principal.tier)
                if body is not None:
                    ctx.body = parse_json_body(body)
                if query is not None:
                    ctx.query = _parse_query(query)
                result = handler(ctx, **kwargs)
            # The transaction has committed here; only now is the response built and sent.
            if isinstance(result, Deferred):
                result = result.produce()
            return _finish(result, status)

        bp.add_url_rule(rule, endpoint=handler.__name__, view_func=view, methods=methods)
        return view

    return decorator


def _finish(result: Any, default_status: int) -> Response:
    if isinstance(result, Response):
        return result
    headers: dict[str, str] = {}
    status = default_status
    if isinstance(result, tuple):
        if len(result) == 3:
            result, status, headers = result
        else:
            result, status = result
    if isinstance(result, BaseModel):
        result = result.model_dump(mode="json")
    response = jsonify(result)
    response.status_code = status
    for key, value in headers.items():
        response.headers[key] = value
    return response
