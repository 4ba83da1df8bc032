"""Which node holds a user, and the per-node Pub/Sub channels between nodes.

Each node subscribes to its own channel only; a message goes only to the node named in
the recipient's route key. Inbox entries are published by the scripts that store them
(inbox.py); nodes publish kicks and logouts (channel.py writes and reads them all). A
publish to a dead node is harmless: the entry waits in the inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from redis.exceptions import ResponseError

from chatnode import channel, inbox, keys, logs, redisio, resp
from chatnode.errors import Unavailable
from chatnode.redisio import Batcher

log = logs.get(__name__)
SUBSCRIBER_PING_S = 5.0


class Listener(Protocol):
    """What a node does with what its channel brings."""

    def on_push(self, owner: str, token: str, entries: list[inbox.Entry] | None) -> None: ...
    def on_kick(self, mobile: str, session: str) -> None: ...
    def on_logout(self, mobile: str, jti: str) -> None: ...
    def on_typing(self, to: str, sender: str, state: str) -> None: ...
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
        case None:
            pass


class Router:
    """Publishes control messages to the node holding a user; listens on this node's channel."""

    def __init__(self, redis_url: str, batcher: Batcher, node_id: str) -> None:
        self._batcher = batcher
        self.node_id = node_id
        self.listener: Listener | None = None
        self._subscriber = Subscriber(
            redis_url, keys.node_channel(node_id), self._on_message, self._on_change
        )
        self.connected = self._subscriber.connected

    def send(self, node: str, payload: str) -> None:
        """Deliver a control message to `node` (locally without Redis when it is us)."""
        if node == self.node_id:
            self._on_message(payload)
            return
        self._batcher.fire("PUBLISH", keys.node_channel(node), payload)

    def to_route(self, route: str | None, payload: str) -> None:
        parsed = keys.parse_route(route)
        if parsed is not None:
            self.send(parsed[0], payload)

    def _on_message(self, payload: str) -> None:
        if self.listener is not None:
            dispatch(self.listener, payload)

    def _on_change(self) -> None:
        if self.listener is not None:
            self.listener.on_resync()  # pushes may be lost while the channel is away

    async def listen(self) -> None:
        """Subscribe to this node's channel forever, reconnecting with backoff."""
        await self._subscriber.run()


class Subscriber:
    """SUBSCRIBE to one channel on a connection of its own; reconnects with backoff.

    A PING every few seconds proves the connection alive: Redis answers it in subscribed
    mode too, and a missing answer means a dead peer that TCP has not noticed yet."""

    def __init__(
        self,
        url: str,
        channel: str,
        on_message: Callable[[str], None],
        on_change: Callable[[], None],
    ) -> None:
        self._opts = resp.options(url)
        self._channel = channel
        self._on_message = on_message
        self._on_change = on_change  # the subscription was lost, or is back after a loss
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Subscribe forever, reconnecting with backoff."""
        backoff = redisio.BACKOFF_MIN_S
        first = True
        while True:
            wire: _SubWire | None = None
            try:
                wire = await resp.open_connection(self._opts, lambda: _SubWire(self._on_message))
                await wire.subscribe(resp.handshake(self._opts), self._channel)
                self.connected.set()
                if not first:
                    self._on_change()  # messages may have been missed meanwhile
                first = False
                backoff = redisio.BACKOFF_MIN_S
                await wire.watch()
            except (OSError, TimeoutError, ResponseError, Unavailable) as exc:
                log.warning("pubsub_lost", error=type(exc).__name__, retry_in=backoff)
            except Exception:  # never give up the channel: it carries every push
                log.exception("pubsub_failed", retry_in=backoff)
            finally:
                if wire is not None:
                    wire.abort()
                if self.connected.is_set():
                    self.connected.clear()
                    with contextlib.suppress(Exception):
                        self._on_change()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, redisio.BACKOFF_MAX_S)


class _SubWire(resp.Link):
    """The subscriber connection: channel messages, pongs, and the replies to its commands."""

    def __init__(self, on_message: Callable[[str], None]) -> None:
        super().__init__()
        self._on_message = on_message
        self._replies: deque[asyncio.Future[Any]] = deque()
        self._pongs = 0

    async def subscribe(self, hello: list[tuple[Any, ...]], channel: str) -> None:
        loop = asyncio.get_running_loop()
        commands = [*hello, ("SUBSCRIBE", channel)]
        futures = [loop.create_future() for _ in commands]
        self._replies.extend(futures)
        self.write_commands(commands)
        async with asyncio.timeout(redisio.COMMAND_TIMEOUT_S):
            for fut in futures:
                reply = await fut
                if isinstance(reply, Exception):
                    raise Unavailable(f"Redis refused the subscription: {reply}")

    async def watch(self) -> None:
        """Return when the connection is lost or stops answering pings."""
        while True:
            pongs = self._pongs
            self.write_commands([("PING",)])
            await asyncio.wait([self.lost], timeout=SUBSCRIBER_PING_S)
            if self.lost.done():
                raise Unavailable("the subscription connection closed")
            if self._pongs == pongs:
                raise TimeoutError("Redis did not answer a ping on the subscription")

    def on_reply(self, reply: Any) -> None:
        if isinstance(reply, list) and reply and reply[0] == "message" and len(reply) == 3:
            try:
                self._on_message(reply[2])
            except Exception:
                log.exception("channel_message_failed")
        elif isinstance(reply, list) and reply and reply[0] == "pong":
            self._pongs += 1
        elif self._replies:
            fut = self._replies.popleft()
            if not fut.done():
                fut.set_result(reply)

    def on_lost(self) -> None:
        for fut in self._replies:
            if not fut.done():
                fut.set_result(Unavailable("Redis is unavailable"))
        self._replies.clear()
