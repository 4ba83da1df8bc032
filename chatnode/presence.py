"""Presence: the route key (who holds a user, with a TTL), last seen, who may see whom."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from chatnode import accounts, blocks, channel, keys
from chatnode.errors import NotFound, Unavailable
from chatnode.redisio import Batcher, Script

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# KEYS: route, seen, inbox. ARGV: our route, ttl, now ms, seen ttl.
# Point the user's route at this session (catching up, not live); the previous holder's
# route is the reply. The inbox's group is made here if Redis lacks it.
CLAIM = Script(
    """
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
redis.pcall('XGROUP', 'CREATE', KEYS[3], '"""
    + keys.GROUP
    + """', '0', 'MKSTREAM')
return old
"""
)

# KEYS: route, seen. ARGV: our route, ttl, now ms, seen ttl.
# 1: still ours (TTL pushed back); 0: another session holds the user now;
# 2: the route was gone (Redis lost it) and is back, not live: the session catches up.
REFRESH = Script(
    keys.LUA_ROUTES
    + """
local cur = redis.call('GET', KEYS[1])
if cur and not ours(cur, ARGV[1]) then return 0 end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
if cur then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return 1
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 2
"""
)

# KEYS: route, seen. ARGV: our route, now ms, seen ttl.
RELEASE = Script(
    keys.LUA_ROUTES
    + """
if ours(redis.call('GET', KEYS[1]), ARGV[1]) then redis.call('DEL', KEYS[1]) end
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


def claim_call(mobile: str, route: str, ttl_s: int, ms: int) -> tuple[list[str], list[Any]]:
    """CLAIM: point the user's route at this session; the reply is the previous route or
    None. Last seen is stamped too, so a node that dies before its first refresh still
    leaves a plausible time behind."""
    return [keys.route(mobile), keys.seen(mobile), keys.inbox(mobile)], [
        route,
        ttl_s,
        ms,
        keys.SEEN_TTL_S,
    ]


def refresh(batcher: Batcher, mobile: str, route: str, ttl_s: int, ms: int) -> Any:
    """Queue one refresh; the batcher sends all refreshes of a sweep as one pipeline."""
    return batcher.script(
        REFRESH, [keys.route(mobile), keys.seen(mobile)], [route, ttl_s, ms, keys.SEEN_TTL_S]
    )


def release_call(mobile: str, route: str, ms: int) -> tuple[list[str], list[Any]]:
    """RELEASE: the route goes if it is still this session's; last seen is stamped."""
    return [keys.route(mobile), keys.seen(mobile)], [route, ms, keys.SEEN_TTL_S]


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


# KEYS: account, blocks, route of the recipient. ARGV: sender, payload for its node.
# 1 if the typing frame went to the recipient's node, 0 if no block-free route exists.
TYPING = Script(
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local hit = redis.call('SMISMEMBER', KEYS[2], ARGV[1], '<' .. ARGV[1])
if hit[1] == 1 or hit[2] == 1 then return 0 end
local route = redis.call('GET', KEYS[3])
if not route then return 0 end
redis.call('PUBLISH', '"""
    + keys.NODE_CHANNEL_PREFIX
    + """' .. string.match(route, '^[^|]+'), ARGV[2])
return 1
"""
)


def typing_call(sender: str, to: str, state: str) -> tuple[list[str], list[Any]]:
    """TYPING: forward a typing frame to the recipient's node unless a block stands
    between them."""
    return [keys.account(to), keys.blocks(to), keys.route(to)], [
        sender,
        channel.typing(to, sender, state),
    ]
