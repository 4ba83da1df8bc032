"""Which node holds a user, and the per-node Pub/Sub channels between nodes.

Each node subscribes to its own channel only; a message goes only to the node named in
the recipient's route key. Inbox entries are published by the scripts that store them
(inbox.py); nodes publish kicks and logouts. A publish to a dead node is harmless: the
entry waits in the inbox.
"""

from __future__ import annotations

from typing import Protocol

from chatnode import inbox, keys, logs
from chatnode.redisio import Batcher, Subscriber

log = logs.get(__name__)


class Listener(Protocol):
    """What a node does with what its channel brings."""

    def on_push(self, owner: str, token: str, entries: list[inbox.Entry] | None) -> None: ...
    def on_kick(self, mobile: str, session: str) -> None: ...
    def on_logout(self, mobile: str, jti: str) -> None: ...
    def on_typing(self, to: str, sender: str, state: str) -> None: ...
    def on_resync(self) -> None: ...


def dispatch(listener: Listener, payload: str) -> None:
    """Decode one channel message and hand it to the listener."""
    kind, _, rest = payload.partition("|")
    if kind == "e":
        owner, token, entries = inbox.parse_push(rest)
        if entries is None:
            log.error("channel_push_malformed", user=owner)
        listener.on_push(owner, token, entries)
        return
    parts = rest.split("|")
    if kind == "k" and len(parts) == 2:
        listener.on_kick(parts[0], parts[1])
    elif kind == "l" and len(parts) == 2:
        listener.on_logout(parts[0], parts[1])
    elif kind == "t" and len(parts) == 3:
        listener.on_typing(parts[0], parts[1], parts[2])
    else:
        log.warning("channel_message_unknown", kind=kind)


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
