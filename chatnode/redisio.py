"""Redis I/O: the client, Lua scripts called by SHA, and the per-turn pipeline batcher.

redis-py asyncio costs ~150 us of client CPU per command sent alone and ~25 us per
command inside a pipeline, so every command the node's handlers issue in one event-loop
turn goes out as one pipeline (DESIGN.md, "Batching").
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from chatnode.errors import Unavailable

COMMAND_TIMEOUT_S = 5.0
MAX_BATCH = 1000
MAX_INFLIGHT = 4


def connect(url: str, *, max_connections: int = 32) -> aioredis.Redis:
    """A client whose every socket operation has a timeout."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=COMMAND_TIMEOUT_S,
        socket_connect_timeout=2.0,
        health_check_interval=15,
        max_connections=max_connections,
    )


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script loaded once and called by SHA."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


class Batcher:
    """Sends every command submitted during one event-loop turn as one pipeline."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        max_batch: int = MAX_BATCH,
        max_inflight: int = MAX_INFLIGHT,
        timeout: float = COMMAND_TIMEOUT_S,
    ) -> None:
        self.client = client
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._timeout = timeout
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._scheduled = False
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.pipelines = 0
        self.commands = 0

    def call(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command; the future resolves with its reply or its error."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((args, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    def fire(self, *args: Any) -> None:
        """Queue a command whose reply nobody waits for (a publish, a refresh)."""
        self.call(*args).add_done_callback(_consume)

    async def run(self, *args: Any) -> Any:
        """Queue one command and wait for its reply; RedisError becomes Unavailable."""
        try:
            return await self.call(*args)
        except ResponseError:
            raise
        except (RedisError, OSError, TimeoutError) as exc:
            raise Unavailable("Redis is unavailable") from exc

    async def script(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a Lua script by SHA, loading it once if Redis does not know it yet."""
        try:
            return await self.run("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.run("SCRIPT", "LOAD", script.source)
            return await self.run("EVALSHA", script.sha, len(keys), *keys, *args)

    def _flush(self) -> None:
        self._scheduled = False
        while self._pending and self._inflight < self._max_inflight:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            self._inflight += 1
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _execute(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            for args, _ in batch:
                pipe.execute_command(*args)
            try:
                async with asyncio.timeout(self._timeout):
                    replies = await pipe.execute(raise_on_error=False)
            except (RedisError, OSError, TimeoutError) as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(Unavailable("Redis is unavailable"))
                        fut.exception()  # waiters that timed out must not warn
                del exc
                return
            self.pipelines += 1
            self.commands += len(batch)
            for (_, fut), reply in zip(batch, replies, strict=True):
                if fut.done():
                    continue
                if isinstance(reply, Exception):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)
        finally:
            self._inflight -= 1
            if self._pending and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self._timeout)


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
