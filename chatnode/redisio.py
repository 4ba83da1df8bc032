"""Redis I/O: the client, Lua scripts called by SHA, and the per-turn pipeline batcher.

redis-py asyncio costs ~150 us of client CPU per command sent alone and ~25 us per
command inside a pipeline, so every command the node's handlers issue in one event-loop
turn goes out as one pipeline (DESIGN.md, "Batching").
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import UnixDomainSocketConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from chatnode import logs
from chatnode.errors import Unavailable

log = logs.get(__name__)

COMMAND_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0
MAX_BATCH = 1000
MAX_INFLIGHT = 4  # pipelines in flight at once, each on its own connection


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


class Link:
    """One Redis connection for the batcher: hiredis packs the pipeline and parses replies.

    redis-py spends ~50 us of Python per command packing arguments and wrapping each read
    in a timeout; here a pipeline is one write, one timeout and a C parser."""

    def __init__(self, url: str, timeout: float = COMMAND_TIMEOUT_S) -> None:
        opts = parse_url(url)
        if opts.get("connection_class") not in (None, UnixDomainSocketConnection):
            raise ValueError("the batcher speaks plain TCP or a unix socket to Redis")
        self._opts = opts
        self._timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser: Any = None
        self._backoff = 0.0  # seconds to wait after a failed connect; doubles to 2 s
        self._retry_at = 0.0

    async def _connect(self) -> None:
        """Connect, failing fast while backing off from an earlier failed attempt."""
        now = time.monotonic()
        if now < self._retry_at:
            raise RedisConnectionError("Redis is unreachable; backing off")
        try:
            await self._open()
        except BaseException:
            self.close()
            self._backoff = min(max(self._backoff * 2, BACKOFF_MIN_S), BACKOFF_MAX_S)
            self._retry_at = time.monotonic() + self._backoff
            raise
        self._backoff = 0.0

    async def _open(self) -> None:
        opts = self._opts
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            if opts.get("path"):
                self._reader, self._writer = await asyncio.open_unix_connection(opts["path"])
            else:
                self._reader, self._writer = await asyncio.open_connection(
                    opts.get("host", "127.0.0.1"), opts.get("port", 6379)
                )
        sock = self._writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._parser = hiredis.Reader(encoding="utf-8", replyError=ResponseError)
        hello: list[tuple[Any, ...]] = []
        if opts.get("password"):
            user = opts.get("username")
            hello.append(("AUTH", user, opts["password"]) if user else ("AUTH", opts["password"]))
        if opts.get("db"):
            hello.append(("SELECT", opts["db"]))
        if hello:
            for reply in await self._roundtrip(hello):
                if isinstance(reply, Exception):
                    raise RedisConnectionError(f"Redis refused the connection: {reply}")

    async def execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send commands as one pipeline; replies in order, errors as exception values."""
        try:
            async with asyncio.timeout(self._timeout):
                if self._stale():
                    self.close()
                if self._writer is None:
                    await self._connect()
                return await self._roundtrip(commands)
        except BaseException:
            self.close()  # a half-read pipeline leaves the stream unusable
            raise

    async def _roundtrip(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        assert self._writer is not None and self._reader is not None
        self._writer.write(b"".join([hiredis.pack_command(c) for c in commands]))
        parser = self._parser
        replies: list[Any] = []
        want = len(commands)
        while len(replies) < want:
            reply = parser.gets()
            if reply is False:
                data = await self._reader.read(1 << 16)
                if not data:
                    raise RedisConnectionError("Redis closed the connection")
                parser.feed(data)
                continue
            if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
                reply = NoScriptError(str(reply))
            replies.append(reply)
        return replies

    def _stale(self) -> bool:
        """Redis closed this idle connection (a restart): reconnect before writing to it."""
        reader, writer = self._reader, self._writer
        return writer is not None and (
            writer.is_closing() or (reader is not None and reader.at_eof())
        )

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


class Batcher:
    """Sends every command submitted during one event-loop turn as one pipeline."""

    def __init__(
        self,
        url: str,
        *,
        max_batch: int = MAX_BATCH,
        max_inflight: int = MAX_INFLIGHT,
        timeout: float = COMMAND_TIMEOUT_S,
        on_pipeline: Callable[[int], None] | None = None,
    ) -> None:
        self._links = [Link(url, timeout) for _ in range(max_inflight)]
        self._on_pipeline = on_pipeline
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._timeout = timeout
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._scheduled = False
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()

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

    def script(
        self, script: Script, keys: Sequence[str], args: Sequence[Any]
    ) -> asyncio.Future[Any]:
        """Run a Lua script by SHA; on NOSCRIPT, load it and retry in the same pipeline."""
        result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)

        def first(fut: asyncio.Future[Any]) -> None:
            if not fut.cancelled() and isinstance(fut.exception(), NoScriptError):
                self.fire("SCRIPT", "LOAD", script.source)
                self.call(*command).add_done_callback(lambda again: _settle(result, again))
            else:
                _settle(result, fut)

        self.call(*command).add_done_callback(first)
        return result

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
        link = self._links.pop()
        try:
            replies = await link.execute([args for args, _ in batch])
        except Exception as exc:  # every waiter hears of it; none hangs
            if not isinstance(exc, RedisError | OSError | TimeoutError):
                log.exception("pipeline_failed")
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(Unavailable("Redis is unavailable"))
                    fut.exception()  # waiters that gave up must not warn
            return
        finally:
            self._links.append(link)
            self._inflight -= 1
            if self._pending and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        if self._on_pipeline is not None:
            self._on_pipeline(len(batch))
        for (_, fut), reply in zip(batch, replies, strict=True):
            if fut.done():
                continue
            if isinstance(reply, Exception):
                fut.set_exception(_meaning(reply))
                fut.exception()
            else:
                fut.set_result(reply)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self._timeout)
        for link in self._links:
            link.close()


EXPECTED_REPLY_ERRORS = ("NOSCRIPT", "BUSYGROUP", "NOGROUP")


def _meaning(reply: Exception) -> Exception:
    """Error replies the code handles stay as they are; any other (LOADING while Redis
    reads its append-only file, OOM, ...) means Redis cannot serve us now."""
    if isinstance(reply, NoScriptError) or str(reply).startswith(EXPECTED_REPLY_ERRORS):
        return reply
    log.warning("redis_error_reply", error=str(reply)[:200])
    return Unavailable("Redis is unavailable")


def _settle(result: asyncio.Future[Any], source: asyncio.Future[Any]) -> None:
    if result.done():
        return
    if source.cancelled():
        result.cancel()
    elif (exc := source.exception()) is not None:
        result.set_exception(exc)
    else:
        result.set_result(source.result())


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
