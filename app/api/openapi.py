"""/v1/openapi.json, generated from the same pydantic schemas that validate requests."""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint
from pydantic.json_schema import models_json_schema

from app import __version__
from app.api import schemas
from app.api.routing import REGISTRY, endpoint

bp = Blueprint("openapi", __name__)

_STATUS_TEXT = {200: "OK", 201: "Created", 202: "Accepted", 400: "Malformed request", 401: "Missing or invalid API key",
                403: "Key lacks the scope", 404: "Not found (or not yours)", 409: "Conflict", 413: "Too large",
                415: "Unsupported media type", 422: "Invalid field", 429: "Rate limited (see Retry-After)",
                503: "Unavailable"}


def build_openapi() -> dict[str, Any]:
    models = {spec.body for spec in REGISTRY if spec.body} | {spec.response for spec in REGISTRY if spec.response}
    models |= {spec.query for spec in REGISTRY if spec.query} | {schemas.Error}
    models.discard(None)
    ordered = sorted(models, key=lambda m: m.__name__)
    _, top = models_json_schema([(m, "validation") for m in ordered], ref_template="#/components/schemas/{model}")
    components = dict(top.get("$defs", {}))
    paths: dict[str, Any] = {}
    for spec in REGISTRY:
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", spec.rule)
        params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in re.findall(r"{([a-z_]+)}", path)]
        if spec.query is not None:
            for name, field in spec.query.model_fields.items():
                params.append({"name": name, "in": "query", "required": field.is_required(),
                               "description": field.description or "", "schema": {"$ref": f"#/components/schemas/{spec.query.__name__}"}})
        for method in spec.methods:
            op: dict[str, Any] = {"summary": spec.summary, "tags": spec.tags, "operationId": f"{method.lower()}_{spec.rule}",
                                  "parameters": params, "responses": {}}
            if spec.auth != "public":
                op["security"] = [{"bearer": []}]
                op["x-dreamq-scope"] = spec.auth
            if spec.body is not None:
                op["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{spec.body.__name__}"}}}}
            elif spec.content_types:
                op["requestBody"] = {"required": True, "content": {ct: {"schema": {"type": "string", "format": "binary"}}
                                                                   for ct in spec.content_types}}
            ok: dict[str, Any] = {"description": _STATUS_TEXT.get(spec.status, "OK")}
            if spec.response is not None:
                ok["content"] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{spec.response.__name__}"}}}
            op["responses"][str(spec.status)] = ok
            for status in spec.errors:
                op["responses"][str(status)] = {"description": _STATUS_TEXT.get(status, "Error"), "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "dreamq", "version": __version__,
                 "description": "Generative-video serving: submit jobs, poll or wait, fetch pre-signed assets."},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


@endpoint(bp, "/v1/openapi.json", methods=["GET"], auth="public", transactional=False, summary="This document")
def openapi(_ctx):
    return build_openapi()
