"""The OpenAPI 3.0 description of the HTTP API, served at /openapi.json."""

from __future__ import annotations

from typing import Any

MOBILE = {"type": "string", "pattern": r"^\+?[0-9]{7,15}$", "example": "+15551234567"}
ERROR = {
    "type": "object",
    "required": ["success", "error"],
    "properties": {
        "success": {"type": "boolean", "enum": [False]},
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}
OK = {"type": "object", "required": ["success"], "properties": {"success": {"type": "boolean"}}}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _responses(success: str, *errors: str) -> dict[str, Any]:
    out: dict[str, Any] = {success: {"description": "success", **_json(OK)}}
    for code in (*errors, "413", "429", "503"):
        out[code] = {"description": "error", **_json(ERROR)}
    return out


def _body(required: list[str], props: dict[str, Any]) -> dict[str, Any]:
    schema = {"type": "object", "required": required, "properties": props}
    return {"required": True, **_json(schema)}


def _query_mobile() -> list[dict[str, Any]]:
    return [{"name": "mobileNo", "in": "query", "required": True, "schema": MOBILE}]


def document() -> dict[str, Any]:
    """The whole OpenAPI document; a fresh dict each call."""
    auth: list[dict[str, list[str]]] = [{"bearer": []}]
    signup = {
        "summary": "Create an account",
        "requestBody": _body(
            ["name", "mobileNo", "password"],
            {
                "name": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 64,
                    "description": "no control, format, bidi or zero-width characters",
                },
                "mobileNo": MOBILE,
                "password": {"type": "string", "minLength": 8, "maxLength": 72},
            },
        ),
        "responses": _responses("201", "400", "409"),
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "chatnode", "version": "1", "description": "See PROTOCOL.md"},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            }
        },
        "paths": {
            "/auth/signup": {"post": signup},
            "/auth/signin": {"post": {**signup, "summary": "Alias of /auth/signup"}},
            "/auth/login": {
                "post": {
                    "summary": "Log in: a token for the WebSocket and the auth endpoints",
                    "requestBody": _body(
                        ["mobileNo", "password"],
                        {
                            "mobileNo": MOBILE,
                            "password": {"type": "string"},
                            "device": {
                                "type": "string",
                                "minLength": 1,
                                "maxLength": 64,
                                "description": "the device's name (v2); `default` if absent",
                            },
                        },
                    ),
                    "responses": _responses("200", "400", "401", "409"),
                }
            },
            "/auth/logout": {
                "post": {
                    "summary": "Revoke this token on every node",
                    "security": auth,
                    "responses": _responses("200", "401"),
                }
            },
            "/devices": {
                "get": {
                    "summary": "The caller's devices (v2)",
                    "security": auth,
                    "responses": _responses("200", "401"),
                }
            },
            "/devices/{deviceId}": {
                "delete": {
                    "summary": "Remove one of the caller's devices: its tokens stop working (v2)",
                    "security": auth,
                    "parameters": [
                        {
                            "name": "deviceId",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"},
                        }
                    ],
                    "responses": _responses("200", "401", "404"),
                }
            },
            "/block-action/block": {
                "post": {
                    "security": auth,
                    "requestBody": _body(["blockedUserMobileNo"], {"blockedUserMobileNo": MOBILE}),
                    "responses": _responses("200", "400", "401", "404"),
                }
            },
            "/block-action/unblock": {
                "delete": {
                    "security": auth,
                    "parameters": _query_mobile(),
                    "responses": _responses("200", "400", "401", "404"),
                }
            },
            "/block-action/list": {
                "get": {"security": auth, "responses": _responses("200", "401")}
            },
            "/profile/lastseen": {
                "get": {
                    "security": auth,
                    "parameters": _query_mobile(),
                    "responses": _responses("200", "400", "401", "404"),
                }
            },
            "/healthz": {"get": {"responses": {"200": {"description": "alive", **_json(OK)}}}},
            "/readyz": {"get": {"responses": _responses("200")}},
            "/metrics": {"get": {"responses": {"200": {"description": "Prometheus text format"}}}},
        },
    }
