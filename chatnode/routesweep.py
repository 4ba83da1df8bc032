"""The route sweep: every third of the route TTL, over all of a node's sessions.

It pushes back every route's TTL in one pipeline (a route another session holds now
means this one was replaced: 4001), and closes with 4003 the sockets whose token
expired or was revoked (a logout's message to this node may have been lost).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from chatnode import keys, presence
from chatnode.errors import CloseCode

if TYPE_CHECKING:
    from chatnode.gateway import Gateway, Session


async def refresh_routes(gw: Gateway) -> None:
    now = time.time()
    for s in list(gw.sessions.values()):
        if s.core.expires_at and s.core.expires_at <= now:
            gw.close(s, CloseCode.LOGGED_OUT, "token expired")
    sessions = [s for s in gw.sessions.values() if not s.gone and s.core.ready]
    ms = presence.now_ms()
    ttl = gw.settings.route_ttl_s
    revoked = _revoked(gw, sessions)
    results = await asyncio.gather(
        *(
            presence.refresh(gw.batcher, s.core.mobile, s.core.device_key, s.core.route, ttl, ms)
            for s in sessions
        ),
        return_exceptions=True,
    )
    for s, result in zip(sessions, results, strict=True):
        if isinstance(result, BaseException):
            continue
        status, devices = result
        if status == 0:
            gw.close(s, CloseCode.REPLACED, "replaced by a newer connection")
            continue
        if status == 3:
            gw.close(s, CloseCode.LOGGED_OUT, "device removed")
            continue
        s.core.devices_now(devices)  # (a channel.DEVICES message may have been lost)
        if status == 2 and not s.gone:  # Redis lost the route: made again, not live
            s.core.delivery.restart()
            gw.act(s)
    for s in await revoked:
        gw.close(s, CloseCode.LOGGED_OUT, "logged out")


async def _revoked(gw: Gateway, sessions: list[Session]) -> list[Session]:
    """The sessions whose token Redis holds as revoked, asked in the sweep's pipeline. A
    partition whose revocations Redis lost (its marker is gone) is copied back from
    PostgreSQL for the next pass."""
    batcher = gw.batcher
    parts = {keys.partition(s.core.jti) for s in sessions}
    marks = {p: batcher.call("EXISTS", keys.revocations_loaded(p)) for p in parts}
    checks = [batcher.call("EXISTS", keys.revoked(s.core.jti)) for s in sessions]
    found = await asyncio.gather(*checks, return_exceptions=True)
    loaded = await asyncio.gather(*marks.values(), return_exceptions=True)
    if any(mark == 0 for mark in loaded):
        gw.tokens.reload_revocations(batcher, gw.pool)
    return [s for s, hit in zip(sessions, found, strict=True) if hit == 1]
