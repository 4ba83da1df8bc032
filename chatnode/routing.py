"""Which node holds a user, and the per-node Pub/Sub channels between nodes.

A publish goes only to the node named in the recipient's route key. Wake-ups for one
node in one event-loop turn coalesce into one PUBLISH. A publish to a dead node is
harmless: the entry waits in the inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from chatnode import keys, logs
from chatnode.redisio import Batcher

log = logs.get(__name__)
BACKOFF_MAX_S = 5.0


class Listener(Protocol):
    """What a node does with what other nodes tell it."""

    def on_wake(self, mobiles: list[str]) -> None: ...
    def on_kick(self, mobile: str, session: str) -> None: ...
    def on_logout(self, mobile: str, jti: str) -> None: ...
    def on_typing(self, to: str, sender: str, state: str) -> None: ...
    def on_resync(self) -> None: ...


def dispatch(listener: Listener, payload: str) -> None:
    """Decode one channel message and hand it to the listener."""
    kind, _, rest = payload.partition("|")
    parts = rest.split("|")
    if kind == "w":
        listener.on_wake([m for m in rest.split(",") if m])
    elif kind == "k" and len(parts) == 2:
        listener.on_kick(parts[0], parts[1])
    elif kind == "l" and len(parts) == 2:
        listener.on_logout(parts[0], parts[1])
    elif kind == "t" and len(parts) == 3:
        listener.on_typing(parts[0], parts[1], parts[2])
    else:
        log.warning("channel_message_unknown", kind=kind)


class Router:
    """Publishes to the node holding a user and listens on this node's channel."""

    def __init__(self, client: aioredis.Redis, batcher: Batcher, node_id: str) -> None:
        self._client = client
        self._batcher = batcher
        self.node_id = node_id
        self.listener: Listener | None = None
        self._wakes: dict[str, set[str]] = {}
        self._flush_scheduled = False
        self.connected = asyncio.Event()

    def send(self, node: str, payload: str) -> None:
        """Deliver a control message to `node` (locally without Redis when it is us)."""
        if node == self.node_id:
            if self.listener is not None:
                dispatch(self.listener, payload)
            return
        self._batcher.fire("PUBLISH", keys.node_channel(node), payload)

    def wake(self, route: str, mobile: str) -> None:
        """Tell the node in `route` that `mobile`'s inbox has something new."""
        parsed = keys.parse_route(route)
        if parsed is None:
            return
        self._wakes.setdefault(parsed[0], set()).add(mobile)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_wakes)

    def _flush_wakes(self) -> None:
        self._flush_scheduled = False
        wakes, self._wakes = self._wakes, {}
        for node, mobiles in wakes.items():
            self.send(node, "w|" + ",".join(mobiles))

    def to_route(self, route: str | None, payload: str) -> None:
        parsed = keys.parse_route(route)
        if parsed is not None:
            self.send(parsed[0], payload)

    async def listen(self) -> None:
        """Subscribe to this node's channel forever, reconnecting with backoff."""
        backoff = 0.1
        first = True
        while True:
            pubsub: Any = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.node_channel(self.node_id))
                self.connected.set()
                if not first and self.listener is not None:
                    self.listener.on_resync()  # wake-ups may have been missed
                first = False
                backoff = 0.1
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is None or msg.get("type") != "message":
                        continue
                    if self.listener is not None:
                        dispatch(self.listener, msg["data"])
            except (RedisError, OSError, TimeoutError) as exc:
                self.connected.clear()
                log.warning("pubsub_lost", error=type(exc).__name__, retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
