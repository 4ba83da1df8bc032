"""Rate limits counted in Redis: fixed windows shared by all nodes.

Failed logins, signups, look-ups and new connections are counted in Redis, so every
node sees the same count. A socket's own limits are token buckets (core/meter.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from chatnode import keys
from chatnode.lua import Script
from chatnode.redisio import Redis

# KEYS: counter. ARGV: window seconds. Returns the count in this window and its TTL.
HIT = Script(
    """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('TTL', KEYS[1])}
"""
)


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    retry_after: int


async def hit(batcher: Redis, kind: str, subject: str, limit: int, window_s: int) -> Verdict:
    """Count one event for `subject`; allowed while the window's count stays within limit."""
    count, ttl = await batcher.script(HIT, [keys.rate_limit(kind, subject)], [window_s])
    return Verdict(int(count) <= limit, max(1, int(ttl)))


# KEYS: counter. Takes back one event counted by HIT; never below 0, never makes a key.
GIVE_BACK = Script(
    """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n > 0 then return redis.call('DECR', KEYS[1]) end
return 0
"""
)


async def give_back(batcher: Redis, kind: str, subject: str) -> None:
    """Undo one `hit`: a reservation that turned out not to be the event limited (a
    login that was right, or one refused by another counter). The window is unchanged."""
    await batcher.script(GIVE_BACK, [keys.rate_limit(kind, subject)], [])


async def reserve(batcher: Redis, limits: Sequence[tuple[str, str, int]], window_s: int) -> Verdict:
    """Count one event on every (kind, subject, limit) counter before the work it limits.

    Counting first is what makes a limit hold under concurrency: N parallel requests each
    see their own count, so at most `limit` get through (a peek before and a count after
    would let all N pass). If any counter is over, every count is taken back (a refused
    request costs nothing) and the verdict carries the longest wait."""
    verdicts = await asyncio.gather(
        *(hit(batcher, kind, subject, limit, window_s) for kind, subject, limit in limits)
    )
    refused = [v for v in verdicts if not v.allowed]
    if not refused:
        return Verdict(True, 0)
    await release(batcher, limits)
    return Verdict(False, max(v.retry_after for v in refused))


async def release(batcher: Redis, limits: Sequence[tuple[str, str, int]]) -> None:
    """Take back the events `reserve` counted on these counters."""
    await asyncio.gather(*(give_back(batcher, kind, subject) for kind, subject, _ in limits))
