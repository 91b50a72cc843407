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

_STATUS_TEXT = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    400: "Malformed request",
    401: "Missing or invalid API key",
    403: "Key lacks the scope",
    404: "Not found (or not yours)",
    409: "Conflict",
    413: "Too large",
    415: "Unsupported media type",
    422: "Invalid field",
    429: "Rate limited (see Retry-After)",
    503: "Unavailable",
}


def implied_errors(spec) -> set[int]:
    """Statuses a route answers without its handler asking: auth, body parsing, path lookups."""
    statuses = set(spec.errors)
    if spec.auth != "public":
        statuses |= {401, 403}  # no/bad key; a key without the scope or a disabled account
    if spec.body is not None or spec.content_types:
        statuses |= {400, 413, 415, 422}  # malformed body, over MAX_CONTENT_LENGTH, wrong type, invalid field
    if spec.query is not None:
        statuses.add(422)
    if _PATH_PARAM.search(spec.rule):
        statuses.add(404)  # a value the converter refuses matches no route
    return statuses


# Flask rule parameters: <name>, <int:name>, <int(max=...):name>
_PATH_PARAM = re.compile(r"<(?:([a-z]+)(?:\([^)]*\))?:)?([a-z_]+)>")
_CONVERTER_SCHEMA = {"int": {"type": "integer", "minimum": 0}}


def _path_param_schema(converter: str | None, args: str) -> dict[str, Any]:
    schema = dict(_CONVERTER_SCHEMA.get(converter or "", {"type": "string"}))
    bounds = dict(re.findall(r"(min|max)=(\d+)", args))
    if "min" in bounds:
        schema["minimum"] = int(bounds["min"])
    if "max" in bounds:
        schema["maximum"] = int(bounds["max"])
    return schema


def _query_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A query string cannot carry null: an Optional parameter is simply left out."""
    schema = {k: v for k, v in schema.items() if not (k == "default" and v is None)}
    branches = [b for b in schema.pop("anyOf", []) if b != {"type": "null"}]
    if len(branches) == 1:
        schema.update(branches[0])
    elif branches:
        schema["anyOf"] = branches
    return schema


def build_openapi() -> dict[str, Any]:
    documented = [spec for spec in REGISTRY if spec.in_openapi and not spec.html]
    requests = {spec.body for spec in documented if spec.body} | {spec.query for spec in documented if spec.query}
    # Responses are described as they are serialized, requests as they are validated.
    responses = {spec.response for spec in documented if spec.response} | {schemas.Error}
    inputs = [(m, "validation") for m in sorted(requests, key=lambda m: m.__name__)]
    outputs = [(m, "serialization") for m in sorted(responses, key=lambda m: m.__name__)]
    _, top = models_json_schema(inputs + outputs, ref_template="#/components/schemas/{model}")  # type: ignore[arg-type]  # modes inferred as str, not Literal
    components = dict(top.get("$defs", {}))
    error_content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    paths: dict[str, Any] = {}
    # Left out: pages for browsers (/dashboard), and /dream-machine/v1, which is Luma's API
    # (described by Luma's own OpenAPI document, from which its clients are generated).
    for spec in documented:
        path = _PATH_PARAM.sub(lambda m: "{" + m.group(2) + "}", spec.rule)
        params = [
            {"name": m.group(2), "in": "path", "required": True, "schema": _path_param_schema(m.group(1), m.group(0))}
            for m in _PATH_PARAM.finditer(spec.rule)
        ]
        if spec.query is not None:
            properties = spec.query.model_json_schema(ref_template="#/components/schemas/{model}")["properties"]
            for name, field in spec.query.model_fields.items():
                params.append(
                    {
                        "name": name,
                        "in": "query",
                        "required": field.is_required(),
                        "description": field.description or "",
                        "schema": _query_schema(properties[name]),
                    }
                )
        for name, (schema, description) in spec.headers.items():
            params.append(
                {"name": name, "in": "header", "required": False, "description": description, "schema": schema}
            )
        for method in spec.methods:
            op: dict[str, Any] = {
                "summary": spec.summary,
                "tags": spec.tags,
                "operationId": f"{method.lower()}_{spec.rule}",
                "parameters": params,
                "responses": {},
            }
            if spec.auth != "public":
                op["security"] = [{"bearer": []}]
                op["x-dreamq-scope"] = spec.auth
            if spec.body is not None:
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{spec.body.__name__}"}}},
                }
            elif spec.content_types:
                content: dict[str, dict] = {}
                for ct in spec.content_types:
                    binary = {"type": "string", "format": "binary"}
                    if ct == "multipart/form-data":
                        content[ct] = {
                            "schema": {"type": "object", "properties": {"file": binary}, "required": ["file"]}
                        }
                    else:
                        content[ct] = {"schema": binary}
                op["requestBody"] = {"required": True, "content": content}
            for status in [spec.status, *spec.also]:
                ok: dict[str, Any] = {"description": _STATUS_TEXT.get(status, "OK")}
                if spec.response is not None:
                    ok["content"] = {
                        "application/json": {"schema": {"$ref": f"#/components/schemas/{spec.response.__name__}"}}
                    }
                op["responses"][str(status)] = ok
            for status in sorted(implied_errors(spec)):
                op["responses"][str(status)] = {
                    "description": _STATUS_TEXT.get(status, "Error"),
                    "content": error_content,
                }
            paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dreamq",
            "version": __version__,
            "description": "Generative-video serving: submit jobs, poll or wait, fetch pre-signed assets.",
        },
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


@endpoint(bp, "/v1/openapi.json", methods=["GET"], auth="public", transactional=False, summary="This document")
def openapi(_ctx):
    return build_openapi()
