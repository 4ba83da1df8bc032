"""Which node holds a user, and the per-node Pub/Sub channels between nodes.

Each node subscribes to its own channels only, one per partition of users (keys.py), with
sharded Pub/Sub: on a cluster a message then travels to the shard of its channel and its
replicas, never over the whole cluster bus. A message goes only to the node named in the
recipient's route key, on that node's channel in the recipient's partition. Inbox
entries are published by the scripts that store them (inbox.py); nodes publish kicks and
logouts (channel.py writes and reads them all). A publish to a dead node is harmless:
the entry waits in the inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from redis.exceptions import ResponseError

from chatnode import channel, inbox, keys, logs, redisio, resp
from chatnode.errors import Unavailable
from chatnode.redisio import Redis

log = logs.get(__name__)
SUBSCRIBER_PING_S = 5.0


class Listener(Protocol):
    """What a node does with what its channel brings."""

    def on_push(self, owner: str, token: str, entries: list[inbox.Entry] | None) -> None: ...
    def on_kick(self, mobile: str, session: str) -> None: ...
    def on_logout(self, mobile: str, jti: str) -> None: ...
    def on_typing(self, to: str, sender: str, state: str) -> None: ...
    def on_devices(self, owner: str, count: int) -> None: ...
    def on_resync(self) -> None: ...


def dispatch(listener: Listener, payload: str) -> None:
    """Decode one channel message and hand it to the listener."""
    match channel.decode(payload):
        case channel.Push(owner, token, data):
            entries = inbox.pushed_entries(data)
            if entries is None:
                log.error("channel_push_malformed", user=owner)
            listener.on_push(owner, token, entries)
        case channel.Kick(mobile, session):
            listener.on_kick(mobile, session)
        case channel.Logout(mobile, jti):
            listener.on_logout(mobile, jti)
        case channel.Typing(to, sender, state):
            listener.on_typing(to, sender, state)
        case channel.Devices(owner, count):
            listener.on_devices(owner, count)
        case None:
            pass


class Router:
    """Publishes control messages to the node holding a user; listens on this node's
    channels (one per partition, keys.node_channels)."""

    def __init__(
        self,
        redis_url: str,
        batcher: Redis,
        node_id: str,
        owner: Callable[[str], dict[str, Any]] | None = None,
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._batcher = batcher
        self.node_id = node_id
        self.listener: Listener | None = None
        self._subscriber = Subscriber(
            redis_url,
            keys.node_channels(node_id),
            self._on_message,
            self._on_change,
            owner=owner,
            refresh=refresh,
        )
        self.connected = self._subscriber.connected

    def send(self, node: str, mobile: str, payload: str) -> None:
        """Deliver a control message about `mobile` to `node` (locally without Redis when
        it is us), on that node's channel in the user's partition."""
        if node == self.node_id:
            self._on_message(payload)
            return
        self._batcher.fire("SPUBLISH", keys.user_channel(node, mobile), payload)

    def to_route(self, route: str | None, mobile: str, payload: str) -> None:
        parsed = keys.parse_route(route)
        if parsed is not None:
            self.send(parsed[0], mobile, payload)

    def _on_message(self, payload: str) -> None:
        if self.listener is not None:
            dispatch(self.listener, payload)

    def _on_change(self) -> None:
        if self.listener is not None:
            self.listener.on_resync()  # pushes may be lost while the channel is away

    async def listen(self) -> None:
        """Subscribe to this node's channels forever, reconnecting with backoff."""
        await self._subscriber.run()


class Subscriber:
    """SSUBSCRIBE to channels on connections of their own, one per Redis that serves
    some of them (on a cluster, the primary owning each channel's slot); reconnects with
    backoff. Any trouble on one connection (lost, a missed ping, a slot that moved away:
    Redis then unsubscribes its channels) closes them all and subscribes again, after
    the cluster's map is read again.

    A PING every few seconds proves each connection alive: Redis answers it in
    subscribed mode too, and a missing answer means a dead peer that TCP has not noticed
    yet."""

    def __init__(
        self,
        url: str,
        channels: list[str],
        on_message: Callable[[str], None],
        on_change: Callable[[], None],
        *,
        owner: Callable[[str], dict[str, Any]] | None = None,
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._opts = resp.options(url)
        self._channels = channels
        self._on_message = on_message
        self._on_change = on_change  # the subscription was lost, or is back after a loss
        self._owner = owner or (lambda channel: self._opts)
        self._refresh = refresh
        self.connected = asyncio.Event()

    def _places(self) -> list[tuple[dict[str, Any], list[str]]]:
        """Each Redis to subscribe on, with its channels."""
        places: dict[tuple[Any, Any, Any], tuple[dict[str, Any], list[str]]] = {}
        for name in self._channels:
            opts = self._owner(name)
            where = (opts.get("host"), opts.get("port"), opts.get("path"))
            places.setdefault(where, (opts, []))[1].append(name)
        return list(places.values())

    async def run(self) -> None:
        """Subscribe forever, reconnecting with backoff."""
        backoff = redisio.BACKOFF_MIN_S
        first = True
        while True:
            wires: list[_SubWire] = []
            try:
                if not first and self._refresh is not None:
                    await self._refresh()
                for opts, channels in self._places():
                    wire = await resp.open_connection(opts, lambda: _SubWire(self._on_message))
                    wires.append(wire)
                    await wire.subscribe(resp.handshake(opts), channels)
                self.connected.set()
                if not first:
                    self._on_change()  # messages may have been missed meanwhile
                first = False
                backoff = redisio.BACKOFF_MIN_S
                await _watch(wires)
            except (OSError, TimeoutError, ResponseError, Unavailable) as exc:
                log.warning("pubsub_lost", error=str(exc)[:120], retry_in=backoff)
            except Exception:  # never give up the channel: it carries every push
                log.exception("pubsub_failed", retry_in=backoff)
            finally:
                for wire in wires:
                    wire.abort()
                if self.connected.is_set():
                    self.connected.clear()
                    with contextlib.suppress(Exception):
                        self._on_change()
                first = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, redisio.BACKOFF_MAX_S)


async def _watch(wires: list[_SubWire]) -> None:
    """Return (raise) when a connection is lost, moved or stops answering pings."""
    while True:
        pongs = [w.pongs for w in wires]
        for wire in wires:
            wire.write_commands([("PING",)])
        await asyncio.wait(
            [w.lost for w in wires], timeout=SUBSCRIBER_PING_S, return_when="FIRST_COMPLETED"
        )
        for wire, before in zip(wires, pongs, strict=True):
            if wire.lost.done():
                raise Unavailable(wire.why or "the subscription connection closed")
            if wire.pongs == before:
                raise TimeoutError("Redis did not answer a ping on the subscription")


class _SubWire(resp.Link):
    """A subscriber connection: channel messages, pongs, and the replies to its commands."""

    def __init__(self, on_message: Callable[[str], None]) -> None:
        super().__init__()
        self._on_message = on_message
        self._replies: deque[asyncio.Future[Any]] = deque()
        self.pongs = 0
        self.why = ""

    async def subscribe(self, hello: list[tuple[Any, ...]], channels: list[str]) -> None:
        loop = asyncio.get_running_loop()
        commands = [*hello, *(("SSUBSCRIBE", c) for c in channels)]
        futures = [loop.create_future() for _ in commands]
        self._replies.extend(futures)
        self.write_commands(commands)
        async with asyncio.timeout(redisio.COMMAND_TIMEOUT_S):
            for fut in futures:
                reply = await fut
                if isinstance(reply, Exception):
                    raise Unavailable(f"Redis refused the subscription: {reply}")

    def on_reply(self, reply: Any) -> None:
        kind = reply[0] if isinstance(reply, list) and reply else None
        if kind in ("smessage", "message") and len(reply) == 3:
            try:
                self._on_message(reply[2])
            except Exception:
                log.exception("channel_message_failed")
        elif kind == "pong":
            self.pongs += 1
        elif kind == "sunsubscribe":
            # its slot moved to another shard; never a reply (we send no SUNSUBSCRIBE),
            # even while our SSUBSCRIBEs wait for theirs
            self.why = "a channel's slot moved"
            self.abort()
        elif self._replies:
            fut = self._replies.popleft()
            if not fut.done():
                fut.set_result(reply)

    def on_lost(self) -> None:
        for fut in self._replies:
            if not fut.done():
                fut.set_result(Unavailable("Redis is unavailable"))
        self._replies.clear()
