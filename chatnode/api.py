"""The HTTP API (aiohttp): auth, block-action, profile, health, readiness, metrics."""

from __future__ import annotations

import asyncio
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from chatnode import accounts, auth, blocks, keys, logs, netaddr, openapi, presence, ratelimit
from chatnode.config import Settings
from chatnode.errors import (
    ChatError,
    Code,
    Conflict,
    InvalidCredentials,
    InvalidRequest,
    RateLimited,
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


# -- auth ------------------------------------------------------------------------

# Invisible characters that change how the text around them is shown (bidi overrides and
# isolates, zero-width characters): a name must not pass for another or reorder what
# follows it. Most are category Cf anyway; they are listed to say what is meant.
INVISIBLE = frozenset(
    [
        *map(chr, range(0x202A, 0x202F)),  # LRE, RLE, PDF, LRO, RLO
        *map(chr, range(0x2066, 0x206A)),  # LRI, RLI, FSI, PDI
        *map(chr, range(0x200B, 0x2010)),  # ZWSP, ZWNJ, ZWJ, LRM, RLM
        "\u2060",  # word joiner
        "\ufeff",  # zero-width no-break space
    ]
)
# control, format, surrogate, line and paragraph separator
UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def name_field(body: dict[str, Any]) -> str:
    name = string_field(body, "name")
    if not 1 <= len(name) <= 64 or not name.strip():
        raise InvalidRequest("name must be 1-64 characters")
    if any(ch in INVISIBLE or unicodedata.category(ch) in UNPRINTABLE_CATEGORIES for ch in name):
        raise InvalidRequest("name must not contain control, format or invisible characters")
    return name


def password_field(body: dict[str, Any]) -> str:
    password = string_field(body, "password")
    if "\x00" in password:  # bcrypt would silently cut the password there
        raise InvalidRequest("password must not contain NUL characters")
    if not 8 <= len(password.encode("utf-8", "surrogatepass")) <= auth.MAX_PASSWORD_BYTES:
        raise InvalidRequest("password must be 8-72 UTF-8 bytes")
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest("password must be valid UTF-8") from None
    return password


async def signup(request: web.Request) -> web.Response:
    """Create an account. Limited per client address; a taken number is refused before
    the bcrypt hash (cheap conflicts; the insert still settles a race), and the hash runs
    in bcrypt's signup lane, so signups cannot take all of the logins' threads."""
    svc = request.app[SERVICES]
    body = await json_body(request)
    name = name_field(body)
    mobile = mobile_field(body.get("mobileNo"), "mobileNo")
    password = password_field(body)
    cfg = svc.settings
    address = client_address(request)
    verdict = await ratelimit.hit(
        svc.batcher, "signup-address", address, cfg.signups_per_address, cfg.signup_window_s
    )
    if not verdict.allowed:
        log.info("signup_limited", address=address)
        raise RateLimited("too many signups, try again later", retry_after=verdict.retry_after)
    if await accounts.is_registered(svc.pool, mobile):
        raise Conflict("this mobile number is already registered")
    hashed = await svc.passwords.hash(password, address)
    user_id = await accounts.create_user(svc.pool, mobile, name, hashed, cfg.node_id)
    try:  # Redis learns of the user now; if it can't, the first send reloads from PostgreSQL
        await blocks.load_into_redis(svc.pool, svc.batcher, mobile)
    except Exception as exc:
        log.warning("signup_redis_copy_failed", user=mobile, error=type(exc).__name__)
    log.info("signup", user=mobile)
    return ok(201, message="signed up", id=str(user_id))


async def login(request: web.Request) -> web.Response:
    """Log in. Each attempt reserves its place in the failed-login counters before bcrypt
    runs (so parallel guesses cannot all pass a limit), and a right password gives its
    place back. The per-number counter is kept per client address too: a guesser locks
    the number only from where they guess, and its owner logs in from elsewhere."""
    svc = request.app[SERVICES]
    body = await json_body(request)
    mobile = body.get("mobileNo")
    password = string_field(body, "password")
    if not isinstance(mobile, str):
        raise InvalidRequest("mobileNo must be a string")
    cfg = svc.settings
    address = client_address(request)
    limits = login_limits(cfg, mobile if is_mobile(mobile) else "malformed", address)
    verdict = await ratelimit.reserve(svc.batcher, limits, cfg.login_fail_window_s)
    if not verdict.allowed:
        raise RateLimited(
            "too many failed logins, try again later", retry_after=verdict.retry_after
        )
    try:
        user = await accounts.find_user(svc.pool, mobile) if is_mobile(mobile) else None
        good = await svc.passwords.verify(password, user.password_hash if user else None, address)
    except Exception:  # not a guess: the database or bcrypt could not judge it (503)
        await ratelimit.release(svc.batcher, limits)
        raise
    if user is None or not good:
        if user is not None:
            await record_failed_login(svc, user)
        raise InvalidCredentials()
    await ratelimit.release(svc.batcher, limits)
    token, claims = svc.tokens.issue(user.mobile, user.id)
    svc.tokens.known.remember(user.id, user.mobile)
    await accounts.record_event(svc.pool, user.id, "login", cfg.node_id)
    log.info("login", user=user.mobile)
    return ok(message="logged in", token=token, expiresIn=claims.expires_at - _now())


async def record_failed_login(svc: Services, user: accounts.User) -> None:
    """The audit trail of a wrong password (numbers without an account have no row to
    point at). A database that cannot take it does not change the answer."""
    try:
        await accounts.record_event(svc.pool, user.id, "login_failed", svc.settings.node_id)
    except Exception as exc:
        log.warning("login_failed_not_recorded", user=user.mobile, error=type(exc).__name__)


async def logout(request: web.Request) -> web.Response:
    """Revoke the token; done once PostgreSQL and Redis hold the revocation. Closing the
    socket it opened is best effort: if the route look-up or the message fails, each
    node's periodic token check closes it anyway."""
    svc = request.app[SERVICES]
    claims = await current_user(request)
    expires = datetime.fromtimestamp(claims.expires_at, UTC)
    await accounts.revoke_token(svc.pool, claims.uid, claims.jti, expires, svc.settings.node_id)
    ttl = max(1, claims.expires_at - _now())
    try:
        await svc.batcher.run("SET", keys.revoked(claims.jti), "1", "EX", ttl)
    except ChatError:
        # PostgreSQL holds the revocation and Redis does not: no node may trust Redis
        # alone until it holds them all again (they are then copied back)
        _distrust_redis_revocations(svc.batcher)
        raise
    try:
        route = await svc.batcher.run("GET", keys.route(claims.mobile))
        svc.router.to_route(route, f"l|{claims.mobile}|{claims.jti}")
    except Exception as exc:
        log.warning("logout_close_failed", user=claims.mobile, error=type(exc).__name__)
    log.info("logout", user=claims.mobile)
    return ok(message="logged out")


_distrusting: set[asyncio.Task[None]] = set()


def _distrust_redis_revocations(batcher: Batcher) -> None:
    """Delete the marker saying Redis holds every revocation, retried for a while in the
    background (Redis may be away right now)."""

    async def delete() -> None:
        for pause in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0):
            await asyncio.sleep(pause)
            try:
                await batcher.run("DEL", keys.REVOCATIONS_LOADED)
                return
            except ChatError:
                continue
        log.error("revocations_marker_not_deleted")

    task = asyncio.get_running_loop().create_task(delete())
    _distrusting.add(task)
    task.add_done_callback(_distrusting.discard)


def login_limits(settings: Settings, mobile: str, address: str) -> list[tuple[str, str, int]]:
    """Failed-login counters a login is judged by: per number at this client address,
    and per client address."""
    return [
        ("login-number", f"{mobile}|{address}", settings.login_fails_per_number),
        ("login-address", address, settings.login_fails_per_address),
    ]


def _now() -> int:
    return int(datetime.now(UTC).timestamp())


# -- blocks and profile ------------------------------------------------------------


async def block(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    claims = await looking_up(request)
    body = await json_body(request)
    target = mobile_field(body.get("blockedUserMobileNo"), "blockedUserMobileNo")
    await blocks.block(svc.pool, svc.batcher, claims.mobile, target)
    return ok(message="blocked")


async def unblock(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    claims = await looking_up(request)
    target = mobile_field(query_mobile(request), "mobileNo")
    await blocks.unblock(svc.pool, svc.batcher, claims.mobile, target)
    return ok(message="unblocked")


async def block_list(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    claims = await looking_up(request)
    return ok(data=await blocks.list_blocked(svc.pool, claims.mobile))


async def last_seen(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    claims = await looking_up(request)
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
