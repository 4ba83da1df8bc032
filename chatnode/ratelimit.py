"""Rate limits: token buckets per socket, fixed windows in Redis shared by all nodes.

A user holds one socket in the whole cluster (a new one closes the old with 4001), so a
bucket on the socket limits the user on every node at once. Failed logins and new
connections are counted in Redis, so every node sees the same count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from chatnode.redisio import Batcher, Script

# KEYS: counter. ARGV: window seconds. Returns the count in this window and its TTL.
HIT = Script(
    """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('TTL', KEYS[1])}
"""
)

# KEYS: counter. Returns the count and its TTL without counting.
PEEK = Script(
    """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
return {n, redis.call('TTL', KEYS[1])}
"""
)


class Bucket:
    """A token bucket: `rate` tokens a second, at most `burst` saved up."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def retry_after(self) -> float:
        return max(0.0, (1 - self.tokens) / self.rate)


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    retry_after: int


def _key(kind: str, subject: str) -> str:
    return f"chatnode:rl:{kind}:{{{subject}}}"


async def hit(batcher: Batcher, kind: str, subject: str, limit: int, window_s: int) -> Verdict:
    """Count one event for `subject`; allowed while the window's count stays within limit."""
    count, ttl = await batcher.script(HIT, [_key(kind, subject)], [window_s])
    return Verdict(int(count) <= limit, max(1, int(ttl)))


async def peek(batcher: Batcher, kind: str, subject: str, limit: int) -> Verdict:
    """Whether `subject` is still under its limit, without counting."""
    count, ttl = await batcher.script(PEEK, [_key(kind, subject)], [])
    return Verdict(int(count) < limit, max(1, int(ttl)))
