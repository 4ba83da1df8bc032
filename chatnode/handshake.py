"""The WebSocket handshake: the token, then the connection limits, before any socket.

A bad token gets HTTP 401 and no socket. Many users behind one address is normal; many
bad tokens, or one user reconnecting in a loop, is not: both are counted in Redis, so
every node sees the same counts.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from chatnode import auth, netaddr, ratelimit
from chatnode.errors import ChatError, Unauthorized
from chatnode.wsserver import Conn

if TYPE_CHECKING:
    from chatnode.gateway import Gateway


async def authorize(gw: Gateway, conn: Conn, request: Request) -> tuple[Response | None, Any]:
    """(None, the token's claims) to open the socket, or (the refusal, None)."""
    url = urlsplit(request.path)
    if url.path.rstrip("/") != "/ws":
        return conn.reject(HTTPStatus.NOT_FOUND, "not found\n"), None
    if not gw.accepting:
        return conn.reject(HTTPStatus.SERVICE_UNAVAILABLE, "node restarting\n"), None
    cfg = gw.settings
    token = parse_qs(url.query).get("token", [None])[0] or auth.bearer(
        _header(request.headers, "Authorization")
    )
    try:
        address = netaddr.limit_subject(
            netaddr.client_address(
                conn.address, request.headers.get_all("X-Forwarded-For"), cfg.trusted_proxies
            )
        )
        limits = [("connect-address", address, cfg.connects_per_address)]
        try:
            claims = await auth.authenticate(gw.tokens, gw.batcher, gw.pool, token)
            limits.append(("connect-user", claims.mobile, cfg.connects_per_user))
        except Unauthorized:
            claims = None
            limits.append(("connect-fail-address", address, cfg.connect_fails_per_address))
        for kind, subject, limit in limits:
            verdict = await ratelimit.hit(gw.batcher, kind, subject, limit, cfg.connect_window_s)
            if not verdict.allowed:
                response = conn.reject(HTTPStatus.TOO_MANY_REQUESTS, "rate_limited\n")
                response.headers["Retry-After"] = str(verdict.retry_after)
                return response, None
    except ChatError:
        return conn.reject(HTTPStatus.SERVICE_UNAVAILABLE, "unavailable\n"), None
    if claims is None:
        return conn.reject(HTTPStatus.UNAUTHORIZED, "unauthorized\n"), None
    if not gw.accepting:
        return conn.reject(HTTPStatus.SERVICE_UNAVAILABLE, "node restarting\n"), None
    return None, claims


def _header(headers: Headers, name: str) -> str | None:
    value = headers.get(name)
    return str(value) if value is not None else None
