"""Redis I/O: one ordered connection for commands, and Lua scripts called by SHA.

redis-py asyncio costs ~150 us of client CPU per command sent alone and ~25 us per
command inside a pipeline, so every command the node's handlers issue in one event-loop
turn goes out as one write (DESIGN.md, "Batching"). All commands travel over one
connection, so Redis runs them in the order they were issued: the sends of one socket
reach an inbox in the order the client sent them. hiredis (the C parser redis-py uses)
packs the commands and parses the replies; replies reach plain callbacks, with no task
or timeout object per pipeline. One watchdog gives every reply a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import hiredis
from redis.asyncio.connection import UnixDomainSocketConnection, parse_url
from redis.exceptions import NoScriptError, ResponseError

from chatnode import logs
from chatnode.errors import Unavailable

log = logs.get(__name__)

COMMAND_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0
WATCHDOG_S = 0.5
# Pipelines written and not yet answered. Commands submitted meanwhile wait for a reply and
# go out together: under load a node makes fewer, larger writes (each costs a syscall on
# both ends), at the price of at most one Redis round trip of latency.
MAX_IN_FLIGHT = 2
EXPECTED_REPLY_ERRORS = ("NOSCRIPT", "BUSYGROUP", "NOGROUP")
# Commands queued or awaiting replies past which the node stops reading its sockets
# (Redis is slow: their frames wait in the kernel, not in this process), and below which
# it reads again.
BACKLOG_HIGH = 20_000
BACKLOG_LOW = 5_000
# A deferred command rides with the next pipeline that goes out, or goes on its own
# after this long: work nobody waits for costs no write of its own under load.
DEFER_S = 0.005

Reply = Any  # a value, or an exception instance: Unavailable, or an expected ResponseError
Callback = Callable[[Reply], None]

_SCRIPTS: list[Script] = []


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script loaded once per connection and called by SHA."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())
        _SCRIPTS.append(self)


def options(url: str) -> dict[str, Any]:
    """Connection options from a Redis URL (plain TCP or a unix socket)."""
    opts: dict[str, Any] = dict(parse_url(url))
    if opts.get("connection_class") not in (None, UnixDomainSocketConnection):
        raise ValueError("chatnode speaks plain TCP or a unix socket to Redis")
    return opts


def handshake(opts: dict[str, Any]) -> list[tuple[Any, ...]]:
    """AUTH and SELECT, as the URL asks, to send first on a new connection."""
    hello: list[tuple[Any, ...]] = []
    if opts.get("password"):
        user = opts.get("username")
        hello.append(("AUTH", user, opts["password"]) if user else ("AUTH", opts["password"]))
    if opts.get("db"):
        hello.append(("SELECT", opts["db"]))
    return hello


async def open_connection(opts: dict[str, Any], factory: Callable[[], asyncio.Protocol]) -> Any:
    """Connect with a timeout and TCP_NODELAY; the protocol instance made by `factory`."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        if opts.get("path"):
            transport, proto = await loop.create_unix_connection(factory, opts["path"])
        else:
            host, port = opts.get("host", "127.0.0.1"), opts.get("port", 6379)
            transport, proto = await loop.create_connection(factory, host, port)
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return proto


async def check(url: str) -> None:
    """Connect, authenticate and PING once; raises what went wrong (for start-up)."""
    wire: Wire = await open_connection(options(url), lambda: Wire(COMMAND_TIMEOUT_S))
    try:
        loop = asyncio.get_running_loop()
        commands = [*handshake(options(url)), ("PING",)]
        futures = [loop.create_future() for _ in commands]
        wire.send([(c, resolver(f)) for c, f in zip(commands, futures, strict=True)])
        async with asyncio.timeout(COMMAND_TIMEOUT_S):
            for fut in futures:
                await fut
    finally:
        wire.abort()


def meaning(reply: Exception) -> Exception:
    """Error replies the code handles stay as they are; any other (LOADING while Redis
    reads its append-only file, OOM, ...) means Redis cannot serve us now."""
    text = str(reply)
    if text.startswith("NOSCRIPT"):
        return NoScriptError(text)
    if text.startswith(EXPECTED_REPLY_ERRORS):
        return reply
    log.warning("redis_error_reply", error=text[:200])
    return Unavailable("Redis is unavailable")


class Wire(asyncio.Protocol):
    """One RESP connection: commands written in order, replies handed to callbacks in order."""

    def __init__(self, timeout: float, on_settled: Callable[[], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(encoding="utf-8", replyError=ResponseError)
        self._callbacks: deque[Callback] = deque()
        self._marks: deque[tuple[float, int]] = deque()  # (written at, replies owed until)
        self._written = 0
        self._replied = 0
        self._timeout = timeout
        self._watchdog: asyncio.TimerHandle | None = None
        self._on_settled = on_settled
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.lost.done()

    @property
    def in_flight(self) -> int:
        """Pipelines written whose replies have not all come back."""
        return len(self._marks)

    @property
    def owed(self) -> int:
        """Commands written whose replies have not come back."""
        return len(self._callbacks)

    def send(self, batch: Sequence[tuple[tuple[Any, ...], Callback]]) -> None:
        """Write the commands as one pipeline; each callback gets its reply in turn."""
        assert self.transport is not None
        packed: list[bytes] = []
        for args, callback in batch:
            try:
                packed.append(hiredis.pack_command(args))
            except (TypeError, ValueError) as exc:  # a bug in a caller: that command only
                log.error("redis_command_unpackable", command=str(args[0])[:20], error=str(exc))
                callback(Unavailable("a command could not be sent"))
                continue
            self._callbacks.append(callback)
        if not packed:
            return
        self._written += len(packed)
        self._marks.append((time.monotonic(), self._written))
        self.transport.write(b"".join(packed))
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(WATCHDOG_S, self._check)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        callbacks = self._callbacks
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError:
                log.error("redis_protocol_error")
                self.abort()
                return
            if reply is False:
                break
            self._replied += 1
            if isinstance(reply, ResponseError):
                reply = meaning(reply)
            callback = callbacks.popleft()
            try:
                callback(reply)
            except Exception:
                log.exception("redis_callback_failed")
        marks = self._marks
        while marks and marks[0][1] <= self._replied:
            marks.popleft()
        if self._on_settled is not None:
            self._on_settled()

    def _check(self) -> None:
        """A reply later than the timeout means Redis is stuck or gone: drop the link."""
        self._watchdog = None
        if self.lost.done():
            return
        if self._marks and time.monotonic() - self._marks[0][0] > self._timeout:
            log.warning("redis_reply_timeout", waiting=len(self._callbacks))
            self.abort()
            return
        if self._callbacks:
            self._watchdog = asyncio.get_running_loop().call_later(WATCHDOG_S, self._check)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.connection_lost(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost.done():
            return
        self.lost.set_result(None)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        callbacks, self._callbacks = self._callbacks, deque()
        self._marks.clear()
        for callback in callbacks:  # every waiter hears of it; none hangs
            with contextlib.suppress(Exception):
                callback(Unavailable("Redis is unavailable"))
        if self._on_settled is not None:
            self._on_settled()  # commands queued behind this wire: reconnect or fail them


class Batcher:
    """Sends every command submitted during one event-loop turn as one pipeline."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = COMMAND_TIMEOUT_S,
        max_in_flight: int = MAX_IN_FLIGHT,
        on_pipeline: Callable[[int], None] | None = None,
    ) -> None:
        self._opts = options(url)
        self._timeout = timeout
        self._max_in_flight = max_in_flight
        self._on_pipeline = on_pipeline
        self._wire: Wire | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._queue: list[tuple[tuple[Any, ...], Callback]] = []
        self._scheduled = False
        self._backoff = 0.0  # seconds to wait after a failed connect; doubles to 2 s
        self._retry_at = 0.0
        self.high = BACKLOG_HIGH
        self.low = BACKLOG_LOW
        self._relief: list[Callable[[], None]] = []  # waiting for the backlog to shrink
        self._deferred: asyncio.TimerHandle | None = None

    @property
    def backlog(self) -> int:
        """Commands queued or written and not answered yet."""
        wire = self._wire
        return len(self._queue) + (wire.owed if wire is not None else 0)

    def congested(self) -> bool:
        """Past the high mark: callers stop taking new work (sockets pause reading)."""
        return self.backlog > self.high

    def when_relieved(self, callback: Callable[[], None]) -> None:
        """Call back once the backlog is below the low mark."""
        self._relief.append(callback)

    def _relieve(self) -> None:
        if self._relief and self.backlog < self.low:
            waiting, self._relief = self._relief, []
            for callback in waiting:
                with contextlib.suppress(Exception):
                    callback()

    def submit(self, callback: Callback, *args: Any) -> None:
        """Queue one command; `callback` gets its reply (or an exception instance)."""
        self._queue.append((args, callback))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def submit_script(
        self, callback: Callback, script: Script, keys: Sequence[str], args: Sequence[Any]
    ) -> None:
        """Run a Lua script by SHA (every connection loads them all first).

        If the cache was flushed meanwhile (NOSCRIPT), the script is loaded again but this
        call fails as unavailable: running it again now would run it after commands
        queued behind it, and callers count on Redis keeping their order."""

        def first(reply: Reply) -> None:
            if isinstance(reply, NoScriptError):
                self.submit(ignore, "SCRIPT", "LOAD", script.source)
                reply = Unavailable("Redis lost its scripts; try again")
            callback(reply)

        self.submit(first, "EVALSHA", script.sha, len(keys), *keys, *args)

    def defer(self, callback: Callback, *args: Any) -> None:
        """Queue one command in order like `submit`, but let it wait (at most DEFER_S) for
        a pipeline that goes out anyway."""
        self._queue.append((args, callback))
        if not self._scheduled and self._deferred is None:
            self._deferred = asyncio.get_running_loop().call_later(DEFER_S, self._due)

    def _due(self) -> None:
        self._deferred = None
        if self._queue and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def call(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command; the future resolves with its reply or its error."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.submit(resolver(fut), *args)
        return fut

    def script(
        self, script: Script, keys: Sequence[str], args: Sequence[Any]
    ) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.submit_script(resolver(fut), script, keys, args)
        return fut

    def fire(self, *args: Any) -> None:
        """Queue a command whose reply nobody waits for."""
        self.submit(ignore, *args)

    async def run(self, *args: Any) -> Any:
        """Queue one command and wait for its reply."""
        return await self.call(*args)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._queue:
            return
        wire = self._wire
        if wire is not None and wire.usable:
            if wire.in_flight >= self._max_in_flight:
                return  # flushed when replies come back: fewer, larger pipelines under load
            batch, self._queue = self._queue, []
            wire.send(batch)
            if self._on_pipeline is not None:
                self._on_pipeline(len(batch))
            return
        if self._connecting is not None:
            return  # flushed once connected
        if time.monotonic() < self._retry_at:
            self._fail_queued()
            return
        self._connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        try:
            wire = await open_connection(self._opts, lambda: Wire(self._timeout, self._replied))
            await self._greet(wire)
        except Exception as exc:
            self._backoff = min(max(self._backoff * 2, BACKOFF_MIN_S), BACKOFF_MAX_S)
            self._retry_at = time.monotonic() + self._backoff
            log.warning("redis_connect_failed", error=type(exc).__name__, retry_in=self._backoff)
            self._fail_queued()
            return
        finally:
            self._connecting = None
        self._backoff = 0.0
        self._wire = wire
        self._flush()

    async def _greet(self, wire: Wire) -> None:
        """AUTH and SELECT as the URL asks, and load every script, before any command."""
        commands = [*handshake(self._opts)] + [("SCRIPT", "LOAD", s.source) for s in _SCRIPTS]
        if not commands:
            return
        futures = [asyncio.get_running_loop().create_future() for _ in commands]
        wire.send([(c, resolver(f)) for c, f in zip(commands, futures, strict=True)])
        try:
            async with asyncio.timeout(self._timeout):
                for fut in futures:
                    await fut
        except BaseException:
            wire.abort()
            raise

    def _replied(self) -> None:
        if self._queue and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        self._relieve()

    def _fail_queued(self) -> None:
        queued, self._queue = self._queue, []
        for _, callback in queued:
            with contextlib.suppress(Exception):
                callback(Unavailable("Redis is unavailable"))
        self._relieve()

    async def close(self) -> None:
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._connecting
        if self._wire is not None:
            self._wire.abort()
            self._wire = None
        self._fail_queued()


def resolver(fut: asyncio.Future[Any]) -> Callback:
    """A callback that settles `fut` with a reply, or with the error it carries."""

    def resolve(reply: Reply) -> None:
        if fut.done():
            return
        if isinstance(reply, BaseException):
            fut.set_exception(reply)
            fut.exception()  # a waiter that gave up must not warn
        else:
            fut.set_result(reply)

    return resolve


def ignore(reply: Reply) -> None:
    """The callback of a command whose reply nobody waits for."""
