"""The registry API's OpenAPI 3.1 document, built from the request models that validate the
calls (so the two cannot drift apart). A copy is kept in the repository
(`controller/registry/registry-openapi.json`, checked by the tests) and served at
`GET /openapi.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic.json_schema import models_json_schema

from controller.domain import wire as api
from controller.registry.app import MAX_BODY_BYTES

PATH = Path(__file__).with_name("registry-openapi.json")

#: serving.ConnectionGuard answers a request head that is too slow, on any path; the app a
#: body that is too slow (serving.Limits); both close the connection.
TIMEOUT = "The request head or body did not arrive in time; the connection is closed."
_ERRORS = {
    "400": "Malformed JSON, or a body that is not a JSON object.",
    "401": "Missing, unknown or revoked token.",
    "403": "A token of another workspace.",
    "408": TIMEOUT,
    "413": f"Body larger than {MAX_BODY_BYTES} bytes.",
    "422": "Wrong types, missing or unknown fields, bad ids, sources or URLs; a refused "
           "runtime address (register).",
    "503": "The store is unavailable; retry.",
}


def _status(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _call(summary: str, request: str, ok: str, extra: dict[str, str]) -> dict[str, Any]:
    return {
        "summary": summary,
        "security": [{"workspaceToken": []}],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{request}"}}}},
        "responses": {"200": _status(ok, "Status"),
                      **{code: _status(text, "Error")
                         for code, text in sorted({**_ERRORS, **extra}.items())}},
    }


#: What the models check beside their fields' own shapes and JSON Schema can say: `error` is
#: part of a report, so a non-null `error` comes with a non-null `plugins`
#: (wire._with_report; 422 otherwise).
_ERROR_WITH_REPORT = {
    "if": {"required": ["error"], "properties": {"error": {"type": "string"}}},
    "then": {"required": ["plugins"], "properties": {"plugins": {"type": "array"}}},
}


def document() -> dict[str, Any]:
    _, schemas = models_json_schema(
        [(api.RegisterRequest, "validation"), (api.HeartbeatRequest, "validation")],
        ref_template="#/components/schemas/{model}")
    components = dict(schemas["$defs"])
    for request in ("RegisterRequest", "HeartbeatRequest"):
        components[request] = {**components[request], **_ERROR_WITH_REPORT}
    components["Status"] = {"type": "object", "required": ["status"],
                            "properties": {"status": {"type": "string"}}}
    serving = {"type": "string", "description": "The serving build's package version "
                                                 "(`pluginctl --version`)."}
    components["Health"] = {"type": "object", "required": ["status", "version"],
                            "properties": {"status": {"type": "string"}, "version": serving}}
    components["Error"] = {"type": "object", "required": ["error"],
                           "properties": {"error": {"type": "string",
                                                    "description": "What is wrong, by field."}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "pluginctl registry API", "version": "v1"},
        "paths": {
            "/registry/register": {"post": _call(
                "A runtime (re)started: where it is and, optionally, what it has.",
                "RegisterRequest", "Recorded (durable).", {})},
            "/registry/heartbeat": {"post": _call(
                "Still alive and, optionally, what it has now.", "HeartbeatRequest",
                "Recorded.", {"409": "The workspace never registered."})},
            "/healthz": {"get": {"summary": "Liveness.", "responses": {
                "200": _status("Serving.", "Health"), "408": _status(TIMEOUT, "Error")}}},
            "/openapi.json": {"get": {"summary": "This document.", "responses": {
                "200": {"description": "The OpenAPI document."},
                "408": _status(TIMEOUT, "Error")}}},
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"workspaceToken": {
                "type": "http", "scheme": "bearer",
                "description": "The workspace's registry token (`pluginctl token create`)."}},
        },
    }


def text() -> str:
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"
