"""The HTTP API (aiohttp): auth, block-action, profile, health, readiness, metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from chatnode import accounts, auth, blocks, keys, logs, openapi, presence, ratelimit
from chatnode.config import Settings
from chatnode.errors import (
    ChatError,
    Code,
    InvalidCredentials,
    InvalidRequest,
    RateLimited,
    Unavailable,
)
from chatnode.frames import is_mobile
from chatnode.health import Health
from chatnode.metrics import CONTENT_TYPE, Metrics
from chatnode.redisio import Batcher
from chatnode.routing import Router

log = logs.get(__name__)

MAX_BODY_BYTES = 64 * 1024
READY_TIMEOUT_S = 2.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class Services:
    """What the HTTP handlers need, built by app.py."""

    settings: Settings
    batcher: Batcher
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


HTTP_ERRORS: dict[int, Code] = {
    400: Code.INVALID_REQUEST,
    401: Code.UNAUTHORIZED,
    404: Code.NOT_FOUND,
    405: Code.NOT_FOUND,
    409: Code.CONFLICT,
    413: Code.PAYLOAD_TOO_LARGE,
    429: Code.RATE_LIMITED,
    503: Code.UNAVAILABLE,
}


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure, aiohttp's own included, as the JSON error envelope."""
    try:
        return await handler(request)
    except RateLimited as exc:
        return fail(exc.code, exc.message, 429, {"Retry-After": str(exc.retry_after)})
    except ChatError as exc:
        return fail(exc.code, exc.message, exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_ERRORS.get(exc.status, Code.INVALID_REQUEST)
        status = 404 if exc.status == 405 else exc.status
        message = "no such endpoint" if status == 404 else exc.reason
        return fail(code, message, status)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("http_failed", path=request.path)
        return fail(Code.INTERNAL, "internal error", 500)


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


async def current_user(request: web.Request) -> auth.Claims:
    svc = request.app[SERVICES]
    token = auth.bearer(request.headers.get("Authorization"))
    return await auth.authenticate(svc.tokens, svc.batcher, svc.pool, token)


# -- auth ------------------------------------------------------------------------


async def signup(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    body = await json_body(request)
    name = string_field(body, "name")
    mobile = mobile_field(body.get("mobileNo"), "mobileNo")
    password = string_field(body, "password")
    if not 1 <= len(name) <= 64 or not name.strip():
        raise InvalidRequest("name must be 1-64 characters")
    if any(ch < " " or ch == "\x7f" for ch in name):
        raise InvalidRequest("name must not contain control characters")
    if "\x00" in password:  # bcrypt would silently cut the password there
        raise InvalidRequest("password must not contain NUL characters")
    if not 8 <= len(password.encode("utf-8", "surrogatepass")) <= auth.MAX_PASSWORD_BYTES:
        raise InvalidRequest("password must be 8-72 UTF-8 bytes")
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest("password must be valid UTF-8") from None
    hashed = await svc.passwords.hash(password)
    user_id = await accounts.create_user(svc.pool, mobile, name, hashed, svc.settings.node_id)
    try:  # Redis learns of the user now; if it can't, the first send reloads from PostgreSQL
        await svc.batcher.script(
            blocks.LOAD, [keys.account(mobile), keys.blocks(mobile), keys.inbox(mobile)], [name]
        )
    except Exception as exc:
        log.warning("signup_redis_copy_failed", user=mobile, error=type(exc).__name__)
    log.info("signup", user=mobile)
    return ok(201, message="signed up", id=str(user_id))


async def login(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    body = await json_body(request)
    mobile = body.get("mobileNo")
    password = string_field(body, "password")
    if not isinstance(mobile, str):
        raise InvalidRequest("mobileNo must be a string")
    number = mobile if is_mobile(mobile) else "malformed"
    limits = login_limits(svc.settings, number, request.remote or "unknown")
    for kind, subject, limit in limits:
        verdict = await ratelimit.peek(svc.batcher, kind, subject, limit)
        if not verdict.allowed:
            raise RateLimited(
                "too many failed logins, try again later", retry_after=verdict.retry_after
            )
    user = await accounts.find_user(svc.pool, mobile) if is_mobile(mobile) else None
    good = await svc.passwords.verify(password, user.password_hash if user else None)
    if user is None or not good:
        window = svc.settings.login_fail_window_s
        for kind, subject, limit in limits:
            await ratelimit.hit(svc.batcher, kind, subject, limit, window)
        raise InvalidCredentials()
    token, claims = svc.tokens.issue(user.mobile)
    await accounts.record_event(svc.pool, user.id, "login", svc.settings.node_id)
    log.info("login", user=user.mobile)
    return ok(message="logged in", token=token, expiresIn=claims.expires_at - _now())


async def logout(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    claims = await current_user(request)
    user = await accounts.find_user(svc.pool, claims.mobile)
    if user is None:
        raise Unavailable("account not found, try again")
    expires = datetime.fromtimestamp(claims.expires_at, UTC)
    await accounts.revoke_token(svc.pool, user.id, claims.jti, expires, svc.settings.node_id)
    ttl = max(1, claims.expires_at - _now())
    await svc.batcher.run("SET", keys.revoked(claims.jti), "1", "EX", ttl)
    route = await svc.batcher.run("GET", keys.route(claims.mobile))
    svc.router.to_route(route, f"l|{claims.mobile}|{claims.jti}")
    log.info("logout", user=claims.mobile)
    return ok(message="logged out")


def login_limits(settings: Settings, mobile: str, address: str) -> list[tuple[str, str, int]]:
    """Failed-login counters a login is judged by: per number and per client address."""
    return [
        ("login-number", mobile, settings.login_fails_per_number),
        ("login-address", address, settings.login_fails_per_address),
    ]


def _now() -> int:
    return int(datetime.now(UTC).timestamp())


# -- blocks and profile ------------------------------------------------------------


async def block(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    claims = await current_user(request)
    body = await json_body(request)
    target = mobile_field(body.get("blockedUserMobileNo"), "blockedUserMobileNo")
    await blocks.block(svc.pool, svc.batcher, claims.mobile, target)
    return ok(message="blocked")


async def unblock(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    claims = await current_user(request)
    target = mobile_field(query_mobile(request), "mobileNo")
    await blocks.unblock(svc.pool, svc.batcher, claims.mobile, target)
    return ok(message="unblocked")


async def block_list(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    claims = await current_user(request)
    return ok(data=await blocks.list_blocked(svc.pool, claims.mobile))


async def last_seen(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    claims = await current_user(request)
    target = mobile_field(query_mobile(request), "mobileNo")
    return ok(data=await presence.last_seen(svc.pool, svc.batcher, claims.mobile, target))


# -- operations --------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return ok(message="alive")


async def readyz(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    checks = {"redis": _ping_redis(svc), "postgres": accounts.ping(svc.pool)}
    results = {}
    for name, check in checks.items():
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await check
            results[name] = "ok"
        except Exception:
            results[name] = "unavailable"
    problem = svc.health.problem()
    if problem is None and all(v == "ok" for v in results.values()):
        return ok(checks=results)
    return fail(Code.UNAVAILABLE, f"not ready: {problem or results}", 503)


async def _ping_redis(svc: Services) -> None:
    await svc.batcher.run("PING")


async def metrics(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    response = web.Response(body=svc.metrics.render())
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(openapi.document()), content_type="application/json")


def build(services: Services, *, with_metrics: bool = True) -> web.Application:
    """The API; `with_metrics` False leaves /metrics to another port (metrics_app)."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[errors_middleware])
    app[SERVICES] = services
    app.router.add_post("/auth/signup", signup)
    app.router.add_post("/auth/signin", signup)
    app.router.add_post("/auth/login", login)
    app.router.add_post("/auth/logout", logout)
    app.router.add_post("/block-action/block", block)
    app.router.add_delete("/block-action/unblock", unblock)
    app.router.add_get("/block-action/list", block_list)
    app.router.add_get("/profile/lastseen", last_seen)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if with_metrics:
        app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_json)
    return app


def metrics_app(services: Services) -> web.Application:
    """/metrics alone, for CHATNODE_METRICS_PORT (an internal port, not behind the proxy)."""
    app = web.Application(middlewares=[errors_middleware])
    app[SERVICES] = services
    app.router.add_get("/metrics", metrics)
    return app
