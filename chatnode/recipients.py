"""Copying users Redis lacks from PostgreSQL, with the misses remembered briefly.

A send, receipt or read to a well-formed number Redis does not know costs a PostgreSQL
look-up. Without a memory of misses, a few sockets naming random numbers would keep the
pool busy and time out logins; so a miss is remembered for MISS_TTL_S (bounded in
number), and at most LOOKUP_CONCURRENCY look-ups run at once on a node, which leaves the
rest of the pool to logins. A number that signs up meanwhile is in Redis at once (signup
copies it there), so a remembered miss never hides a new user from the send path.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Any

from chatnode import blocks, logs
from chatnode.errors import Unavailable
from chatnode.redisio import Redis

log = logs.get(__name__)

MISS_TTL_S = 30.0
MAX_MISSES = 50_000
LOOKUP_CONCURRENCY = 4
LOOKUP_WAIT_S = 5.0


class Recipients:
    """Loads a user into Redis from PostgreSQL; remembers who does not exist."""

    def __init__(
        self,
        pool: Any,
        batcher: Redis,
        *,
        miss_ttl_s: float = MISS_TTL_S,
        max_misses: int = MAX_MISSES,
        concurrency: int = LOOKUP_CONCURRENCY,
    ) -> None:
        self._pool = pool
        self._batcher = batcher
        self._miss_ttl_s = miss_ttl_s
        self._max_misses = max_misses
        self._misses: OrderedDict[str, float] = OrderedDict()  # mobile -> until (monotonic)
        self._slots = asyncio.Semaphore(concurrency)

    def known_missing(self, mobile: str) -> bool:
        """A look-up found no such user a moment ago."""
        until = self._misses.get(mobile)
        if until is None:
            return False
        if until > time.monotonic():
            return True
        del self._misses[mobile]
        return False

    def _remember_miss(self, mobile: str) -> None:
        self._misses[mobile] = time.monotonic() + self._miss_ttl_s
        self._misses.move_to_end(mobile)
        while len(self._misses) > self._max_misses:
            self._misses.popitem(last=False)

    async def load(self, mobile: str) -> bool:
        """Copy `mobile` into Redis; False if no such user (remembered for a while)."""
        if self.known_missing(mobile):
            return False
        try:
            async with asyncio.timeout(LOOKUP_WAIT_S):
                await self._slots.acquire()
        except TimeoutError:
            raise Unavailable("too many look-ups in progress, try again") from None
        try:
            found = await blocks.load_into_redis(self._pool, self._batcher, mobile)
        finally:
            self._slots.release()
        if not found:
            self._remember_miss(mobile)
        return found
