"""What every HTTP handler shares: the services, the JSON envelope, request fields, the
caller and their look-up budget."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from chatnode import auth, netaddr, ratelimit
from chatnode.config import Settings
from chatnode.errors import Code, InvalidRequest, RateLimited
from chatnode.frames import is_mobile
from chatnode.health import Health
from chatnode.metrics import Metrics
from chatnode.redisio import Redis
from chatnode.routing import Router

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class Services:
    """What the HTTP handlers need, built by app.py."""

    settings: Settings
    batcher: Redis
    pool: Any
    router: Router
    tokens: auth.Tokens
    passwords: auth.Passwords
    metrics: Metrics
    health: Health = field(default_factory=Health)


SERVICES = web.AppKey("services", Services)


def ok(status: int = 200, **fields: Any) -> web.Response:
    return web.Response(
        body=orjson.dumps({"success": True, **fields}),
        status=status,
        content_type="application/json",
    )


def fail(
    code: Code, message: str, status: int, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"success": False, "error": {"code": str(code), "message": message}}
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


async def json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body


def mobile_field(value: Any, name: str) -> str:
    if not is_mobile(value):
        raise InvalidRequest(f"{name} must be a mobile number (7-15 digits, optional +)")
    assert isinstance(value, str)
    return value


def string_field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string")
    return value


def query_mobile(request: web.Request) -> str | None:
    """?mobileNo=; a raw '+' arrives as a space when the client did not encode it."""
    value = request.query.get("mobileNo")
    if value is not None and value.startswith(" "):
        value = "+" + value[1:]
    return value


def client_address(request: web.Request) -> str:
    """The address per-address limits count: the TCP peer, or behind a proxy listed in
    CHATNODE_TRUSTED_PROXIES the client it forwarded for (netaddr.client_address), as
    `limit_subject` groups it."""
    svc = request.app[SERVICES]
    return netaddr.limit_subject(
        netaddr.client_address(
            request.remote,
            request.headers.getall("X-Forwarded-For", []),
            svc.settings.trusted_proxies,
        )
    )


async def current_user(request: web.Request) -> auth.Claims:
    svc = request.app[SERVICES]
    token = auth.bearer(request.headers.get("Authorization"))
    return await auth.authenticate(svc.tokens, svc.batcher, svc.pool, token)


async def looking_up(request: web.Request) -> auth.Claims:
    """The token's user, counted against their look-up budget: last seen and block
    actions answer name and existence of any number, so no account may walk through the
    directory (CHATNODE_LOOKUPS_PER_USER per CHATNODE_LOOKUP_WINDOW_S)."""
    svc = request.app[SERVICES]
    claims = await current_user(request)
    cfg = svc.settings
    # per address too: accounts are cheap, so one host must not harvest with many of them
    for kind, subject, limit in (
        ("lookup-user", claims.mobile, cfg.lookups_per_user),
        ("lookup-address", client_address(request), cfg.lookups_per_address),
    ):
        verdict = await ratelimit.hit(svc.batcher, kind, subject, limit, cfg.lookup_window_s)
        if not verdict.allowed:
            raise RateLimited("too many look-ups, try again later", retry_after=verdict.retry_after)
    return claims
