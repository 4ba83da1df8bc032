"""Redis I/O: one ordered connection for commands, and Lua scripts called by SHA.

redis-py asyncio costs ~150 us of client CPU per command sent alone and ~25 us per
command inside a pipeline, so every command the node's handlers issue in one event-loop
turn goes out as one write (DESIGN.md, "Batching"). All commands travel over one
connection, so Redis runs them in the order they were issued: the sends of one socket
reach an inbox in the order the client sent them. hiredis (the C parser redis-py uses)
packs the commands and parses the replies; replies reach plain callbacks, with no task
or timeout object per pipeline. One watchdog gives every reply a deadline (resp.Wire).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from chatnode import logs
from chatnode.errors import Unavailable
from chatnode.lua import SCRIPTS, Script
from chatnode.resp import Callback as Callback  # re-exported: callers type their callbacks
from chatnode.resp import Reply, Wire, handshake, open_connection, options

log = logs.get(__name__)

COMMAND_TIMEOUT_S = 5.0
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0
# Pipelines written and not yet answered. Commands submitted meanwhile wait for a reply and
# go out together: under load a node makes fewer, larger writes (each costs a syscall on
# both ends), at the price of at most one Redis round trip of latency.
MAX_IN_FLIGHT = 2
# Commands queued or awaiting replies past which the node stops reading its sockets
# (Redis is slow: their frames wait in the kernel, not in this process), and below which
# it reads again.
BACKLOG_HIGH = 20_000
BACKLOG_LOW = 5_000
# A deferred command rides with the next pipeline that goes out, or goes on its own
# after this long: work nobody waits for costs no write of its own under load.
DEFER_S = 0.005
# With replica acks on, these commands' replies wait for a WAIT after them: their write
# is on a replica before the caller hears it is done (docs/ARCHITECTURE.md, "Writes that
# wait for a replica"). XACK, XDEL and EXPIRE do not: losing one redelivers a message
# with the same msgId, or keeps a dedupe key a little longer.
WAITED = frozenset({"EVALSHA", "SET", "DEL", "SADD", "SREM"})
UNWAITED_SCRIPTS = frozenset(s.sha for s in SCRIPTS if not s.waits)  # lua.Script.waits


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


class Redis(Protocol):
    """What the node asks of Redis: a Batcher (one Redis) or a cluster.Cluster."""

    @property
    def backlog(self) -> int: ...
    def congested(self) -> bool: ...
    def when_relieved(self, callback: Callable[[], None]) -> None: ...
    def submit(self, callback: Callback, *args: Any) -> None: ...
    def submit_script(
        self, callback: Callback, script: Script, keys: Sequence[str], args: Sequence[Any]
    ) -> None: ...
    def defer(self, callback: Callback, *args: Any) -> None: ...
    def call(self, *args: Any) -> asyncio.Future[Any]: ...
    def script(
        self, script: Script, keys: Sequence[str], args: Sequence[Any]
    ) -> asyncio.Future[Any]: ...
    def fire(self, *args: Any) -> None: ...
    async def run(self, *args: Any) -> Any: ...
    async def each(self, *args: Any) -> list[Any]: ...
    async def close(self) -> None: ...


class Commands:
    """`call`, `script`, `fire` and `run`, made of `submit` and `submit_script`: shared by
    Batcher and cluster.Cluster."""

    def submit(self, callback: Callback, *args: Any) -> None:
        raise NotImplementedError

    def submit_script(
        self, callback: Callback, script: Script, keys: Sequence[str], args: Sequence[Any]
    ) -> None:
        raise NotImplementedError

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


class Batcher(Commands):
    """Sends every command submitted during one event-loop turn as one pipeline."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = COMMAND_TIMEOUT_S,
        max_in_flight: int = MAX_IN_FLIGHT,
        on_pipeline: Callable[[int], None] | None = None,
        opts: dict[str, Any] | None = None,
        redirects: bool = False,
        replicas: int = 0,
        replica_wait_ms: int = 1000,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        """`opts` instead of `url`: connection options made already (cluster.py).
        `redirects`: this is a cluster node; its redirections reach the callbacks as
        resp.Redirect. `replicas` > 0: a pipeline with commands in WAITED ends with
        `WAIT replicas replica_wait_ms`, and those commands' replies are held until it
        answers; if fewer replicas than that have the writes by then, they fail as
        unavailable. `on_lost`: the connection was lost after it was made."""
        self._opts = opts if opts is not None else options(url)
        self._redirects = redirects
        self._replicas = replicas
        self._replica_wait_ms = replica_wait_ms
        self._on_lost = on_lost
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
        self._reloading = False  # SCRIPT LOADs after a NOSCRIPT are on their way
        self._deferred: asyncio.TimerHandle | None = None
        self._closed = False

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
        """Run a Lua script by SHA (every connection loads them all first). If Redis lost
        them meanwhile (NOSCRIPT), they are loaded again and this call fails as
        unavailable (resp.Wire.on_reply)."""
        self.submit(callback, "EVALSHA", script.sha, len(keys), *keys, *args)

    def _load_scripts(self) -> None:
        """Load every script again (Redis lost them); once, however many calls of the
        same pipeline come back NOSCRIPT, until the loads are answered."""
        if self._reloading:
            return
        self._reloading = True

        def loaded(reply: Reply) -> None:
            self._reloading = False

        for script in SCRIPTS[:-1]:
            self.submit(ignore, "SCRIPT", "LOAD", script.source)
        self.submit(loaded, "SCRIPT", "LOAD", SCRIPTS[-1].source)

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

    async def each(self, *args: Any) -> list[Any]:
        """Run a command on every server: here, the one."""
        return [await self.call(*args)]

    def set_replicas(self, replicas: int, wait_ms: int) -> None:
        """WAIT for `replicas` after each pipeline with writes (0: no WAIT)."""
        self._replicas = replicas
        self._replica_wait_ms = wait_ms

    def _flush(self) -> None:
        self._scheduled = False
        if not self._queue:
            return
        wire = self._wire
        if wire is not None and wire.usable:
            if wire.in_flight >= self._max_in_flight:
                return  # flushed when replies come back: fewer, larger pipelines under load
            batch, self._queue = self._queue, []
            if self._replicas:
                batch = self._waited(batch)
            wire.send(batch)
            if self._on_pipeline is not None:
                self._on_pipeline(len(batch))
            return
        if self._connecting is not None:
            return  # flushed once connected
        if self._closed or time.monotonic() < self._retry_at:
            # closed: a late command (a timer, a cluster's retired node) must not open a
            # connection nobody would close again
            self._fail_queued()
            return
        self._connecting = asyncio.get_running_loop().create_task(self._connect())

    def _waited(
        self, batch: list[tuple[tuple[Any, ...], Callback]]
    ) -> list[tuple[tuple[Any, ...], Callback]]:
        """The batch with a WAIT after it, holding the replies of the commands in WAITED
        until it answers (the batch as it is when it has none)."""
        held: list[list[Any]] = []  # [callback, reply] of each waited command
        out: list[tuple[tuple[Any, ...], Callback]] = []
        for args, callback in batch:
            if args[0] in WAITED and not (args[0] == "EVALSHA" and args[1] in UNWAITED_SCRIPTS):
                slot: list[Any] = [callback, None]
                held.append(slot)
                out.append((args, _keeper(slot)))
            else:
                out.append((args, callback))
        if not held:
            return batch
        need = self._replicas

        def waited(reply: Reply) -> None:
            ok = not isinstance(reply, BaseException) and reply >= need
            if not ok:
                log.warning("redis_replica_wait_failed", replicas=str(reply)[:60], held=len(held))
            for callback, kept in held:
                if not ok and not isinstance(kept, BaseException):
                    kept = Unavailable("the write did not reach a replica in time")
                try:
                    callback(kept)
                except Exception:
                    log.exception("redis_callback_failed")

        out.append((("WAIT", need, self._replica_wait_ms), waited))
        return out

    async def _connect(self) -> None:
        try:
            wire = await open_connection(
                self._opts,
                lambda: Wire(self._timeout, self._replied, self._load_scripts, self._redirects),
            )
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
        wire.lost.add_done_callback(self._wire_lost)
        self._flush()

    def _wire_lost(self, _: object) -> None:
        if self._on_lost is not None and not self._closed:  # a close is not a loss
            self._on_lost()

    async def _greet(self, wire: Wire) -> None:
        """AUTH and SELECT as the URL asks, and load every script, before any command."""
        commands = [*handshake(self._opts)] + [("SCRIPT", "LOAD", s.source) for s in SCRIPTS]
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
        self._closed = True
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


def _keeper(slot: list[Any]) -> Callback:
    def keep(reply: Reply) -> None:
        slot[1] = reply

    return keep


def ignore(reply: Reply) -> None:
    """The callback of a command whose reply nobody waits for."""
