"""RESP on asyncio: connecting to Redis, and the protocol objects its connections run.

`Link` holds what every connection to Redis shares (the transport, hiredis' reader, the
`lost` future, abort); `Wire` is the command connection the Batcher (redisio.py) drives,
and routing's subscriber connection is the other kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import hiredis
from redis.asyncio.connection import UnixDomainSocketConnection, parse_url
from redis.exceptions import NoScriptError, ResponseError

from chatnode import logs
from chatnode.errors import Unavailable

log = logs.get(__name__)

CONNECT_TIMEOUT_S = 2.0
WATCHDOG_S = 0.5
EXPECTED_REPLY_ERRORS = ("NOSCRIPT", "BUSYGROUP", "NOGROUP")
# Replies of a Redis Cluster node for a command it did not run: the slot is elsewhere
# (MOVED, ASK), or cannot be served right now (TRYAGAIN, CLUSTERDOWN). cluster.py sends
# the command again; on a single Redis they mean it cannot serve us (unavailable).
REDIRECT_ERRORS = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")

Reply = Any  # a value, or an exception instance: Unavailable, or an expected ResponseError
Callback = Callable[[Reply], None]


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


class Redirect(ResponseError):
    """A cluster node did not run the command: MOVED, ASK, TRYAGAIN or CLUSTERDOWN."""


def meaning(reply: Exception, redirects: bool = False) -> Exception:
    """Error replies the code handles stay as they are; any other (LOADING while Redis
    reads its append-only file, OOM, ...) means Redis cannot serve us now. With
    `redirects` (a connection to a cluster node), the cluster's redirections come back
    as Redirect."""
    text = str(reply)
    if text.startswith("NOSCRIPT"):
        return NoScriptError(text)
    if text.startswith(EXPECTED_REPLY_ERRORS):
        return reply
    if redirects and text.startswith(REDIRECT_ERRORS):
        return Redirect(text)
    log.warning("redis_error_reply", error=text[:200])
    return Unavailable("Redis is unavailable")


class Link(asyncio.Protocol):
    """One connection to Redis: replies parsed in order and handed to `on_reply`.

    A subclass says what a reply means (`on_reply`), what follows each read (`on_read`)
    and who must hear of a loss (`on_lost`, called once)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(encoding="utf-8", replyError=ResponseError)
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.lost.done()

    def write_commands(self, commands: Iterable[tuple[Any, ...]]) -> None:
        """Pack commands and write them in one write."""
        assert self.transport is not None
        self.transport.write(b"".join(hiredis.pack_command(c) for c in commands))

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        on_reply = self.on_reply
        lost = self.lost
        while not lost.done():  # a reply's callback may have aborted the connection
            try:
                reply = reader.gets()
            except hiredis.ProtocolError:
                log.error("redis_protocol_error")
                self.abort()
                return
            if reply is False:
                break
            on_reply(reply)
        self.on_read()

    def on_reply(self, reply: Reply) -> None:
        raise NotImplementedError

    def on_read(self) -> None:
        """Every complete reply of one read has been handled."""

    def on_lost(self) -> None:
        """The connection is gone: fail whoever still waits on it."""

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.connection_lost(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost.done():
            return
        self.lost.set_result(None)
        self.on_lost()


class Wire(Link):
    """The command connection: commands written in order, replies handed to callbacks in
    order. One watchdog gives every reply a deadline."""

    def __init__(
        self,
        timeout: float,
        on_settled: Callable[[], None] | None = None,
        on_noscript: Callable[[], None] | None = None,
        redirects: bool = False,
    ) -> None:
        super().__init__()
        self._on_noscript = on_noscript  # Redis lost its scripts: load them again
        self._redirects = redirects
        self._callbacks: deque[Callback] = deque()
        self._marks: deque[tuple[float, int]] = deque()  # (written at, replies owed until)
        self._written = 0
        self._replied = 0
        self._timeout = timeout
        self._watchdog: asyncio.TimerHandle | None = None
        self._on_settled = on_settled

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

    def on_reply(self, reply: Reply) -> None:
        self._replied += 1
        if isinstance(reply, ResponseError):
            reply = meaning(reply, self._redirects)
            if isinstance(reply, NoScriptError):
                # the scripts are loaded again, but this call fails: running it again
                # now would run it after commands queued behind it, and callers count
                # on Redis keeping their order
                if self._on_noscript is not None:
                    self._on_noscript()
                reply = Unavailable("Redis lost its scripts; try again")
        callback = self._callbacks.popleft()
        try:
            callback(reply)
        except Exception:
            log.exception("redis_callback_failed")

    def on_read(self) -> None:
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

    def on_lost(self) -> None:
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
