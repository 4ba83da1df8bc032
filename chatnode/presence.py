"""Presence: the route key (who holds a user, with a TTL), last seen, who may see whom."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from chatnode import accounts, blocks, keys
from chatnode.errors import NotFound, Unavailable
from chatnode.redisio import Batcher, Script

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# KEYS: route, seen. ARGV: our route value, ttl, now ms, seen ttl.
# 1: still ours (TTL pushed back); 0: another session holds the user now;
# 2: the route was gone (Redis lost it) and is back: entries may have waited unannounced.
REFRESH = Script(
    """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
if cur then return 1 end
return 2
"""
)

# KEYS: route, seen. ARGV: our route value, now ms, seen ttl.
RELEASE = Script(
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return 1
"""
)


def now_ms() -> int:
    return int(time.time() * 1000)


def iso(ms: int) -> str:
    """Milliseconds since the epoch as ISO-8601 UTC with a Z."""
    when = EPOCH + timedelta(milliseconds=ms)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def claim(batcher: Batcher, mobile: str, route: str, ttl_s: int) -> str | None:
    """Point the user's route at this session; the previous holder's route, if any.

    Last seen is stamped too, so a node that dies before its first refresh still
    leaves a plausible time behind."""
    batcher.fire("SET", keys.seen(mobile), now_ms(), "EX", keys.SEEN_TTL_S)
    old = await batcher.run("SET", keys.route(mobile), route, "EX", ttl_s, "GET")
    return str(old) if old else None


def refresh(batcher: Batcher, mobile: str, route: str, ttl_s: int, ms: int) -> Any:
    """Queue one refresh; the batcher sends all refreshes of a sweep as one pipeline."""
    return batcher.script(
        REFRESH, [keys.route(mobile), keys.seen(mobile)], [route, ttl_s, ms, keys.SEEN_TTL_S]
    )


async def release(batcher: Batcher, mobile: str, route: str, ms: int) -> None:
    await batcher.script(
        RELEASE, [keys.route(mobile), keys.seen(mobile)], [route, ms, keys.SEEN_TTL_S]
    )


async def last_seen(pool: Any, batcher: Batcher, viewer: str, target: str) -> dict[str, Any]:
    """The profile answer for `target` as `viewer` may see it."""
    user = await accounts.find_user(pool, target)
    if user is None:
        raise NotFound("no user has this mobile number")
    data: dict[str, Any] = {"username": user.name, "mobileNo": user.mobile}
    if await blocks.has_blocked(pool, target, viewer):
        return data
    try:
        route, seen = await batcher.run("MGET", keys.route(target), keys.seen(target))
    except Unavailable:
        route, seen = None, None
    if route:
        data["lastSeen"] = "online"
    elif seen:
        data["lastSeen"] = iso(int(seen))
    elif user.last_seen is not None:
        data["lastSeen"] = iso(int(user.last_seen.timestamp() * 1000))
    return data


# KEYS: account, blocks, route of the recipient. ARGV: sender.
TYPING = Script(
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local hit = redis.call('SMISMEMBER', KEYS[2], ARGV[1], '<' .. ARGV[1])
if hit[1] == 1 or hit[2] == 1 then return false end
return redis.call('GET', KEYS[3])
"""
)


async def typing_route(batcher: Batcher, sender: str, to: str) -> str | None:
    """Where to forward a typing frame, or None when no block-free route exists."""
    route = await batcher.script(
        TYPING, [keys.account(to), keys.blocks(to), keys.route(to)], [sender]
    )
    return str(route) if route else None
