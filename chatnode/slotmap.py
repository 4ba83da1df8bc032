"""What a Redis Cluster node tells: whether it is one, its slot map, which slot a
command goes to, how many replicas a primary has in sync. Plain questions on a
connection of their own, and pure readers of the answers; cluster.py acts on them."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

from chatnode import keys
from chatnode.redisio import COMMAND_TIMEOUT_S, resolver
from chatnode.resp import Wire, handshake, open_connection, options

NO_KEY = frozenset({"PING", "INFO", "SCRIPT", "WAIT", "CLUSTER", "CONFIG", "DBSIZE", "MEMORY"})
_ONLINE = re.compile(r"^slave\d+:.*\bstate=online\b", re.M)


async def detect(url: str) -> bool:
    """True if the Redis at `url` is a cluster node."""
    info = await ask(options(url), ("INFO", "cluster"))
    return "cluster_enabled:1" in str(info)


async def ask(opts: dict[str, Any], command: tuple[Any, ...]) -> Any:
    """One command on a connection of its own (for the rare questions: the map)."""
    wire: Wire = await open_connection(opts, lambda: Wire(COMMAND_TIMEOUT_S))
    try:
        loop = asyncio.get_running_loop()
        commands = [*handshake(opts), command]
        futures = [loop.create_future() for _ in commands]
        wire.send([(c, resolver(f)) for c, f in zip(commands, futures, strict=True)])
        async with asyncio.timeout(COMMAND_TIMEOUT_S):
            replies = [await f for f in futures]
        return replies[-1]
    finally:
        wire.abort()


def key_slot(args: Sequence[Any]) -> int | None:
    """The slot a command's keys live in; None when it has no key."""
    name = args[0]
    if name == "EVALSHA":
        return keys.slot(args[3]) if args[2] else None
    if name == "XREADGROUP":
        return keys.slot(args[list(args).index("STREAMS") + 1])
    if name == "XGROUP":
        return keys.slot(args[2])
    if name in NO_KEY or len(args) < 2:
        return None
    return keys.slot(args[1])


def parse_slots(reply: list[Any], host: str) -> tuple[list[str], list[str]]:
    """CLUSTER SLOTS as (the `host:port` of each slot's primary, "" where none serves
    it; every node named, primaries and replicas). A node without an address is at
    `host`, the one asked."""
    slots = [""] * keys.SLOTS
    nodes: list[str] = []
    for start, end, primary, *replicas in reply:
        addr = f"{primary[0] or host}:{primary[1]}"
        for slot in range(int(start), int(end) + 1):
            slots[slot] = addr
        nodes += [addr, *(f"{r[0] or primary[0] or host}:{r[1]}" for r in replicas)]
    return slots, nodes


def online_replicas(info: Any) -> int:
    """Replicas in sync with a primary, from its INFO replication: those a WAIT can
    count on (one still in its first full sync cannot acknowledge anything yet)."""
    text = info.decode() if isinstance(info, bytes) else str(info)
    return len(_ONLINE.findall(text))
