"""The OpenAPI 3.1 document, generated from the endpoints' models (never written by hand)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.api.framework import Endpoint, Upload
from server.api.schemas import Health, Problem

_PATH_PARAM = re.compile(r"{(\w+)}")
_REF = "#/components/schemas/{model}"


def build_openapi(endpoints: list[Endpoint], version: str) -> dict[str, Any]:
    models: list[tuple[type[BaseModel], Any]] = [
        (Problem, "serialization"),
        (Health, "serialization"),
    ]
    for e in endpoints:
        if e.body is not None:
            models.append((e.body, "validation"))
        if e.upload is not None:
            # Its fields' types (enums) land in the components the form's schema refers to.
            models.append((e.upload.form, "validation"))
        if e.response is not None:
            models.append((e.response, "serialization"))
    keys, defs = models_json_schema(models, ref_template=_REF)
    schemas: dict[str, Any] = defs.get("$defs", {})

    def ref(model: type[BaseModel], mode: str) -> dict[str, Any]:
        return keys[(model, mode)]  # type: ignore[index]

    problem = {"application/problem+json": {"schema": ref(Problem, "serialization")}}
    paths: dict[str, Any] = {
        "/healthz": _health_path("Liveness", ref(Health, "serialization")),
        "/readyz": _health_path("Readiness: the database answers", ref(Health, "serialization")),
    }
    for e in endpoints:
        op: dict[str, Any] = {
            "summary": e.summary,
            "operationId": _operation_id(e),
            "tags": list(e.tags),
            "security": [] if e.public else [{"bearer": []}],
            "parameters": [
                {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                for n in _PATH_PARAM.findall(e.path)
            ]
            + _query_parameters(e.query),
            "responses": {},
        }
        if e.upload is not None:
            op["description"] = e.upload.description
            op["requestBody"] = _upload_body(e.upload)
        if e.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(e.body, "validation")}},
            }
        ok: dict[str, Any] = {"description": "OK" if e.status != 201 else "Created"}
        if e.response is not None:
            ok["content"] = {e.content_type: {"schema": ref(e.response, "serialization")}}
        elif e.binary:
            binary = {"type": "string", "format": "binary"}
            ok["content"] = {t: {"schema": binary} for t in e.binary}
            if e.ranges:
                # Range requests: a part of the file, or a range that does not fit it.
                op["responses"]["206"] = {
                    "description": "Partial content (the requested byte range)",
                    "content": {t: {"schema": binary} for t in e.binary},
                }
        else:
            ok["description"] = "No content"
        op["responses"][str(e.status)] = ok
        for status in (*e.errors, *((413, 415) if e.body is not None else ())):
            op["responses"][str(status)] = {"description": _ERROR_TEXT[status], "content": problem}
        paths.setdefault(e.path, {})[e.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "telemed", "version": version},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }


_ERROR_TEXT = {
    400: "The request is malformed or invalid; `errors` names the fields",
    401: "Missing, invalid, expired or revoked token",
    403: "The token's role, team or scope does not allow this",
    404: "No such consultation (or invite code)",
    409: "Conflicts with the current state (e.g. an illegal transition)",
    413: "Request body too large (an upload: the file is larger than the limit)",
    415: "A request body that is not `application/json` (UTF-8); an empty body needs none; "
    "an upload: a file of a kind not accepted (the detail names what was detected)",
    416: "The requested range is not within the file",
    410: "The invite code has expired or its invite was revoked",
    429: "Too many attempts (per client address or over all clients); see Retry-After",
}


def _upload_body(upload: Upload) -> dict[str, Any]:
    form = upload.form.model_json_schema(ref_template=_REF)
    properties = {
        "file": {
            "type": "string",
            "format": "binary",
            "description": f"The file, at most {upload.max_bytes} bytes",
        },
        **form["properties"],
    }
    schema: dict[str, Any] = {"type": "object", "required": ["file"], "properties": properties}
    return {
        "required": True,
        "content": {"multipart/form-data": {"schema": schema}},
        "x-max-file-bytes": upload.max_bytes,
    }


def _query_parameters(model: type[BaseModel] | None) -> list[dict[str, Any]]:
    if model is None:
        return []
    schema = model.model_json_schema(ref_template=_REF)
    return [
        {
            "name": name,
            "in": "query",
            "required": name in schema.get("required", []),
            "schema": prop,
        }
        for name, prop in schema["properties"].items()
    ]


def _operation_id(e: Endpoint) -> str:
    name = getattr(e.handler, "__name__", "handle")
    if name == "handle":  # the life-cycle actions share one handler factory
        name = e.path.rsplit("/", 1)[-1]
    return f"{e.method.lower()}_{name}"


def _health_path(summary: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "operationId": f"get_{summary.split(':')[0].lower()}",
            "tags": ["health"],
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": schema}}},
                "503": {
                    "description": "Unavailable",
                    "content": {"application/json": {"schema": schema}},
                },
            },
        }
    }
