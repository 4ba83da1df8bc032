"""A user's devices: listing, removal (its tokens revoked, its socket closed with 4003),
and the sweep that removes devices unseen for CHATNODE_DEVICE_IDLE_DAYS.

PostgreSQL holds the devices and each device's unexpired tokens (accounts.py). Removing
a device revokes those tokens like a logout does: in PostgreSQL in the same transaction
as the removal, then in Redis, then a logout message to the node holding the user for
each, which closes a socket opened with one of them (4003). The route sweep of every
node closes such a socket anyway if that message is lost (routesweep.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from chatnode import accounts, channel, keys, logs, presence
from chatnode.errors import ChatError, NotFound
from chatnode.redisio import Redis
from chatnode.routing import Router

log = logs.get(__name__)

DEFAULT_NAME = "default"  # the device of a login that names none (PROTOCOL v1 clients)
IDLE_SWEEP_S = 3600.0  # how often each node looks for idle devices, at most
IDLE_BATCH = 100  # devices removed per look, at most


def sweep_period(idle_days: float) -> float:
    """Seconds between a node's looks for idle devices: an hour, or a tenth of the idle
    time when that is shorter (each look also marks the node's connected devices seen)."""
    return max(0.5, min(IDLE_SWEEP_S, idle_days * 86400 / 10))


async def remove(
    pool: Any,
    batcher: Redis,
    router: Router,
    user_id: int,
    mobile: str,
    device_id: int,
    node: str,
    distrust: Callable[[Redis, int], None],
) -> None:
    """Remove one of the user's devices (NotFound if they have no such device): its tokens
    stop working on every node and its socket closes with 4003. `distrust`: what a
    revocation PostgreSQL holds and Redis could not take calls for (apiauth)."""
    revoked = await accounts.remove_device(pool, user_id, device_id, node)
    if revoked is None:
        raise NotFound("no such device")
    now = int(time.time())
    results = await asyncio.gather(
        *(
            batcher.call("SET", keys.revoked(jti), "1", "EX", max(1, exp - now))
            for jti, exp in revoked
        ),
        return_exceptions=True,
    )
    for (jti, _), result in zip(revoked, results, strict=True):
        if isinstance(result, BaseException):
            distrust(batcher, keys.partition(jti))
    if any(isinstance(r, ChatError) for r in results):
        log.warning("device_revocations_not_in_redis", user=mobile, device=device_id)
    try:
        route = await batcher.run("GET", keys.route(mobile))
        for jti, _ in revoked:
            router.to_route(route, mobile, channel.logout(mobile, jti))
    except Exception as exc:
        log.warning("device_close_failed", user=mobile, error=type(exc).__name__)
    log.info("device_removed", user=mobile, device=device_id, tokens=len(revoked))


def listing(devices: list[accounts.Device]) -> list[dict[str, str]]:
    """GET /devices' data."""
    return [
        {
            "deviceId": str(d.id),
            "name": d.name,
            "createdAt": _iso(d.created_at),
            "lastSeen": _iso(d.last_seen),
        }
        for d in devices
    ]


def _iso(at: datetime) -> str:
    return presence.iso(int(at.timestamp() * 1000))


async def remove_idle(
    pool: Any,
    batcher: Redis,
    router: Router,
    idle_days: float,
    node: str,
    distrust: Callable[[Redis, int], None],
) -> int:
    """Remove up to IDLE_BATCH devices unseen for `idle_days`, like DELETE /devices does.
    Nodes may race on one: the loser finds it gone."""
    removed = 0
    for user_id, mobile, device_id in await accounts.idle_devices(pool, idle_days, IDLE_BATCH):
        try:
            await remove(pool, batcher, router, user_id, mobile, device_id, node, distrust)
            removed += 1
        except NotFound:
            continue
    if removed:
        log.info("idle_devices_removed", count=removed, idle_days=idle_days)
    return removed
