"""Presence: the route key (who holds a user, with a TTL), last seen, who may see whom."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from chatnode import accounts, blocks, keys, lua
from chatnode.errors import NotFound, Unavailable
from chatnode.redisio import Redis

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def now_ms() -> int:
    return int(time.time() * 1000)


def iso(ms: int) -> str:
    """Milliseconds since the epoch as ISO-8601 UTC with a Z."""
    when = EPOCH + timedelta(milliseconds=ms)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def refresh(batcher: Redis, mobile: str, device: str, route: str, ttl_s: int, ms: int) -> Any:
    """Queue one refresh of a device's route: [status, device count] (lua.REFRESH); the
    batcher sends all refreshes of a sweep as one pipeline."""
    args = [keys.route(mobile, device), keys.seen(mobile), keys.account(mobile)]
    return batcher.script(
        lua.REFRESH, args, [route, ttl_s, ms, keys.SEEN_TTL_S, keys.group(device)]
    )


async def last_seen(pool: Any, batcher: Redis, viewer: str, target: str) -> dict[str, Any]:
    """The profile answer for `target` as `viewer` may see it."""
    user = await accounts.find_user(pool, target)
    if user is None:
        raise NotFound("no user has this mobile number")
    data: dict[str, Any] = {"username": user.name, "mobileNo": user.mobile}
    if await blocks.has_blocked(pool, target, viewer):
        return data
    try:  # online while any device is connected; last seen is when the last one was
        account, seen = await batcher.run("MGET", keys.account(target), keys.seen(target))
        devices = keys.device_keys(account) or [keys.DEFAULT_DEVICE]
        routes = await batcher.run("MGET", *(keys.route(target, d) for d in devices))
        route = any(routes)
    except Unavailable:
        route, seen = False, None
    if route:
        data["lastSeen"] = "online"
    elif seen:
        data["lastSeen"] = iso(int(seen))
    elif user.last_seen is not None:
        data["lastSeen"] = iso(int(user.last_seen.timestamp() * 1000))
    return data
