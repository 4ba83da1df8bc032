"""The HTTP API (aiohttp): its routes, the error envelope, block-action, profile, health,
readiness, metrics. Account endpoints are in apiauth, what handlers share in apibase."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from pathlib import Path

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from chatnode import accounts, apiauth, blocks, logs, openapi, presence
from chatnode.apibase import (
    SERVICES,
    Handler,
    Services,
    fail,
    json_body,
    looking_up,
    mobile_field,
    ok,
    query_mobile,
)
from chatnode.errors import ChatError, Code, RateLimited
from chatnode.metrics import CONTENT_TYPE

log = logs.get(__name__)

MAX_BODY_BYTES = 64 * 1024
READY_TIMEOUT_S = 2.0


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


# Cross-origin requests (CORS) from the origins in CHATNODE_CORS_ORIGINS only: the web
# app served by another node (or another web server) calls this API with its bearer
# token, never with cookies, so nothing is sent on a browser's own authority.
CORS_METHODS = "GET, POST, DELETE"
CORS_HEADERS = "Authorization, Content-Type"
CORS_MAX_AGE_S = 600


def cors_middleware(origins: frozenset[str]) -> Middleware:
    """Answers a preflight from an allowed origin itself, and marks every answer to one
    (errors included) as readable by it; any other origin gets no CORS header, so its
    browser keeps the answer from its page. Every answer varies with Origin."""

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin", "")
        if (
            origin in origins
            and request.method == "OPTIONS"
            and ("Access-Control-Request-Method" in request.headers)
        ):
            preflight = {
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": CORS_METHODS,
                "Access-Control-Allow-Headers": CORS_HEADERS,
                "Access-Control-Max-Age": str(CORS_MAX_AGE_S),
                "Vary": "Origin",
            }
            return web.Response(status=204, headers=preflight)
        response = await handler(request)
        if origin in origins:
            response.headers["Access-Control-Allow-Origin"] = origin
        vary = response.headers.get("Vary")
        response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"
        return response

    return cors


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


def build(
    services: Services,
    *,
    with_metrics: bool = True,
    web_dir: str = "",
    ws_port: int = 0,
    web_sockets: Sequence[str] = (),
    web_apis: Sequence[str] = (),
    cors_origins: Sequence[str] = (),
) -> web.Application:
    """The API; `with_metrics` False leaves /metrics to another port (metrics_app);
    `web_dir` (CHATNODE_WEB_DIR): the web app at `/`, its socket on `ws_port` and then
    on `web_sockets` (CHATNODE_WEB_SOCKETS), its REST on this node and then on
    `web_apis` (CHATNODE_WEB_APIS); `cors_origins` (CHATNODE_CORS_ORIGINS): the pages
    that may call this API from another origin."""
    middlewares: list[Middleware] = [errors_middleware]
    if cors_origins:
        middlewares.insert(0, cors_middleware(frozenset(cors_origins)))  # errors too
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=middlewares)
    app[SERVICES] = services
    app.router.add_post("/auth/signup", apiauth.signup)
    app.router.add_post("/auth/signin", apiauth.signup)
    app.router.add_post("/auth/login", apiauth.login)
    app.router.add_post("/auth/logout", apiauth.logout)
    app.router.add_get("/devices", apiauth.list_devices)
    app.router.add_delete("/devices/{deviceId}", apiauth.delete_device)
    app.router.add_post("/block-action/block", block)
    app.router.add_delete("/block-action/unblock", unblock)
    app.router.add_get("/block-action/list", block_list)
    app.router.add_get("/profile/lastseen", last_seen)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if with_metrics:
        app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_json)
    if web_dir:
        add_web(app, Path(web_dir), ws_port, web_sockets, web_apis)
    return app


# What the web app's folder may hold, by suffix; other files are not served.
WEB_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
}
# The app's own files, and sockets to this node and CHATNODE_WEB_SOCKETS and the APIs of
# CHATNODE_WEB_APIS only (the {others} of the policy, filled in per request); no inline
# script.
WEB_CSP = (
    "default-src 'self'; connect-src 'self' {others}; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
HOST_NAME = re.compile(r"[A-Za-z0-9.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")
WEB_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_web(
    app: web.Application,
    folder: Path,
    ws_port: int,
    sockets: Sequence[str] = (),
    apis: Sequence[str] = (),
) -> None:
    """A static web app (CHATNODE_WEB_DIR) at `/`: index.html at `/`, each file at the
    top of the folder at its own name (read once, here: no path from a request ever
    reaches the file system), and `/config.js` telling the app this node's WebSocket
    port and the other sockets (`sockets`) and APIs (`apis`) to try when it is away.
    Any web server can serve the same folder, whose own config.js then points the app
    at `/ws` and the API on the page's host."""
    files: dict[str, tuple[bytes, str]] = {}
    for path in sorted(folder.iterdir()):
        kind = WEB_TYPES.get(path.suffix)
        if path.is_file() and kind is not None:
            files["/" + path.name] = (path.read_bytes(), kind)
    files["/"] = files["/index.html"]
    config = orjson.dumps({"wsPort": ws_port, "sockets": list(sockets), "apis": list(apis)})
    files["/config.js"] = (b"window.CHATNODE = " + config + b";\n", WEB_TYPES[".js"])

    others = " ".join([*sockets, *apis])

    async def serve(request: web.Request) -> web.Response:
        body, kind = files[request.path]
        host = request.url.host_subcomponent or ""  # as the browser wrote it ([::1])
        if not HOST_NAME.fullmatch(host):
            host = "127.0.0.1"
        own = f"ws://{host}:{ws_port} wss://{host}:{ws_port}"
        csp = WEB_CSP.format(others=f"{own} {others}".strip())
        headers = {**WEB_HEADERS, "Content-Security-Policy": csp}
        return web.Response(body=body, content_type=kind, headers=headers)

    for route in files:
        app.router.add_get(route, serve)


def metrics_app(services: Services) -> web.Application:
    """/metrics alone, for CHATNODE_METRICS_PORT (an internal port, not behind the proxy)."""
    app = web.Application(middlewares=[errors_middleware])
    app[SERVICES] = services
    app.router.add_get("/metrics", metrics)
    return app
