"""What a message leaves in Redis after its ack: its dedupe key, for the dedupe window
only (docs/PROTOCOL.md, guarantee 2, v1.2), and a count per conversation that lets a
read past the window still get its receipt. Real Redis, real nodes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
import websockets
from websockets.asyncio.client import ClientConnection

from chatnode import devstack, keys
from tests.integration.harness import (
    FLOOD_ENV,
    Api,
    NodeProc,
    Stack,
    User,
    connected,
    eventually,
    new_user,
)

PAIRS = 20
MESSAGES = 20_000  # in all: 1,000 per pair
WINDOW_S = 2
# What Redis may hold after the window beyond what it held before, per pair. Nothing per
# message is left (each recipient's unread count of its sender is one hash field, made by
# the warm-up); allocator rounding in the inbox streams and the keyspace's hash tables is
# what this allows for (the figures are printed).
SLACK_PER_PAIR = 4096
# Rate-limit counters are made by signups, logins and handshakes before the start is
# measured; with windows this long none expires during the test, so the key count must
# come back exactly.
LONG_WINDOWS = {"CHATNODE_CONNECT_WINDOW_S": "3600", "CHATNODE_SIGNUP_WINDOW_S": "3600"}


class Peer:
    """A protocol client at speed: counts its answers and acks every message and receipt
    it gets, in one ack frame every 20 ms."""

    def __init__(self, user: User, ws: ClientConnection) -> None:
        self.user = user
        self.ws = ws
        self.accepted: set[str] = set()  # client ids
        self.messages: set[str] = set()  # msgIds of messages got
        self.delivered: set[str] = set()  # client ids named by delivered receipts
        self.errors: list[dict[str, Any]] = []
        self.to_ack: list[str] = []
        self.tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._ack())]

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self.ws:
                frame = orjson.loads(raw)
                kind = frame["type"]
                if kind == "accepted":
                    self.accepted.add(frame["id"])
                elif kind == "message":
                    self.messages.add(frame["msgId"])
                    self.to_ack.append(frame["msgId"])
                elif kind == "receipt":
                    self.delivered.update(frame["ids"])
                    self.to_ack.append(frame["msgId"])
                elif kind == "error":
                    self.errors.append(frame)

    async def _ack(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                await asyncio.sleep(0.02)
                while self.to_ack:
                    ids, self.to_ack = self.to_ack[:1000], self.to_ack[1000:]
                    await self.ws.send(orjson.dumps({"type": "ack", "msgIds": ids}).decode())

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.ws.close()


async def open_peer(url: str, user: User) -> Peer:
    ws = await websockets.connect(f"{url}?token={user.token}", open_timeout=10)
    hello = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
    assert hello["type"] == "hello"
    return Peer(user, ws)


async def key_count(redis: aioredis.Redis) -> int:
    """DBSIZE, less the revocations the nodes copied from PostgreSQL (earlier tests'
    logouts, expiring whenever their tokens do). Neither expires a dedupe key: Redis must
    do that alone."""
    revoked = [k async for k in redis.scan_iter(match="chatnode:revoked:*", count=1000)]
    return int(await redis.dbsize()) - len(revoked)


async def figures(redis: aioredis.Redis, users: list[User]) -> dict[str, int]:
    """Keys, used_memory and the inboxes' MEMORY USAGE."""
    info = await redis.info("memory")
    inboxes = 0
    for u in users:
        inboxes += await redis.memory_usage(keys.inbox(u.mobile), samples=0) or 0
    return {
        "keys": await key_count(redis),
        "used_memory": int(info["used_memory"]),
        "inboxes": inboxes,
    }


async def wait_until(check: Any, limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


async def exchange(
    redis: aioredis.Redis, pairs: list[tuple[Peer, Peer]], count: int, prefix: str
) -> float:
    """Each sender sends `count` messages to its recipient; wait until every message and
    every receipt is acked (nothing pending in any inbox; the entries leave the streams
    at the sessions' trims, a few seconds later: inboxes_empty). How long that took."""
    began = time.monotonic()

    async def send_all(sender: Peer, to: str) -> None:
        for i in range(count):
            frame = {"type": "send", "id": f"{prefix}{i}", "to": to, "body": f"message {i}"}
            await sender.ws.send(orjson.dumps(frame).decode())
            if i % 100 == 99:
                await asyncio.sleep(0)  # let the readers and ackers run

    await asyncio.gather(*(send_all(s, r.user.mobile) for s, r in pairs))
    sent = {f"{prefix}{i}" for i in range(count)}
    users = [p.user for pair in pairs for p in pair]

    async def all_acked() -> bool:
        if any(not sent <= s.delivered or p.to_ack for s, r in pairs for p in (s, r)):
            return False
        pending = [await redis.xpending(keys.inbox(u.mobile), keys.GROUP) for u in users]
        return all(p["pending"] == 0 for p in pending)

    await wait_until(all_acked, 30, "not every message and receipt was acked")
    took = time.monotonic() - began
    assert all(sent <= s.accepted for s, _ in pairs)
    assert not [p.errors for pair in pairs for p in pair if p.errors]
    return took


async def inboxes_empty(redis: aioredis.Redis, pairs: list[tuple[Peer, Peer]]) -> None:
    """Wait until the acked entries have left every inbox (lua.TRIM)."""

    async def empty() -> bool:
        lengths = [await redis.xlen(keys.inbox(p.user.mobile)) for pair in pairs for p in pair]
        return not any(lengths)

    await wait_until(empty, 15, "the acked entries did not leave the inboxes")


async def test_acked_messages_leave_redis_memory_where_it_started(
    stack: Stack, workdir: Path, http: aiohttp.ClientSession
) -> None:
    """20 senders on one node, 20 recipients on another, 1,000 messages from each sender,
    every message and receipt acked: once the dedupe window has passed, Redis holds the
    same keys as before the first of them, and its memory is back within SLACK_PER_PAIR
    bytes a pair. What stays is one unread count per pair, in a hash per recipient that
    the warm-up made.

    The start is measured after a warm-up of 20 messages a pair, acked and past the
    window too: the first traffic grows some of Redis's own buffers once (about 210 KB
    here, the same after 4,000, 20,000 or 40,000 messages), and that is not what this
    measures. The figures before the warm-up are printed as well."""
    server = devstack.RedisServer(workdir / f"dedupe-{time.time_ns()}", appendonly=False).start()
    own = Stack(server.url, stack.database_url)
    env = {**FLOOD_ENV, **LONG_WINDOWS, "CHATNODE_DEDUPE_WINDOW_S": str(WINDOW_S)}
    nodes: list[NodeProc] = []
    peers: list[Peer] = []
    redis = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        nodes += [NodeProc(own, f"mem-{n}-{time.time_ns()}", workdir, **env) for n in "ab"]
        for node in nodes:
            node.start()
        api = Api(http, nodes[0].http)
        users = [await new_user(api) for _ in range(2 * PAIRS)]
        senders = [await open_peer(nodes[0].ws, u) for u in users[:PAIRS]]
        recipients = [await open_peer(nodes[1].ws, u) for u in users[PAIRS:]]
        peers = senders + recipients
        pairs = list(zip(senders, recipients, strict=True))

        async def settled() -> bool:  # every socket claimed its route and went live
            routes = await redis.mget([keys.route(u.mobile) for u in users])
            return all(r is not None and str(r).count("|") == 2 for r in routes)

        await wait_until(settled, 10, "the sockets did not go live")
        cold = await figures(redis, users)

        back_to = cold["keys"] + PAIRS  # and each recipient's unread counts, to stay

        async def keys_back() -> bool:
            return await key_count(redis) <= back_to

        await exchange(redis, pairs, 20, "w")
        await inboxes_empty(redis, pairs)
        await wait_until(keys_back, WINDOW_S + 10, "the warm-up's dedupe keys did not expire")
        start = await figures(redis, users)
        assert start["keys"] == back_to
        unread = [await redis.hgetall(keys.unread(r.user.mobile)) for r in recipients]
        assert unread == [{s.user.mobile: "20"} for s in senders]

        took = await exchange(redis, pairs, MESSAGES // PAIRS, "m")
        acked_at = time.monotonic()
        acked = await figures(redis, users)  # the dedupe keys wait out their window
        await wait_until(keys_back, WINDOW_S + 10, "the dedupe keys did not expire")
        gone = time.monotonic() - acked_at
        await inboxes_empty(redis, pairs)
        slack = PAIRS * SLACK_PER_PAIR

        async def memory_back() -> bool:  # the keyspace's tables shrink in serverCron
            info = await redis.info("memory")
            return bool(abs(int(info["used_memory"]) - start["used_memory"]) <= slack)

        with contextlib.suppress(AssertionError):
            await wait_until(memory_back, 5, "")
        end = await figures(redis, users)
        census: dict[str, int] = {}
        async for key in redis.scan_iter(count=1000):
            kind = key.rsplit(":", 1)[-1]
            if key.startswith(("chatnode:rl:", "chatnode:revoked:", "chatnode:revloaded:")):
                kind = key.split(":")[1]
            census[kind] = census.get(kind, 0) + 1
        print(
            f"\n{MESSAGES} messages from {PAIRS} senders to {PAIRS} recipients, all acked"
            f" {took:.1f} s after the first send; dedupe window {WINDOW_S} s: their keys were"
            f" gone {gone:.1f} s after the last ack was seen"
        )
        for name, fig in (("cold", cold), ("start", start), ("acked", acked), ("end", end)):
            print(
                f"  {name:5}  keys={fig['keys']:6}  used_memory={fig['used_memory']:9,}"
                f"  inboxes' MEMORY USAGE={fig['inboxes']:7,}"
            )
        print(
            f"  end - start: keys {end['keys'] - start['keys']:+},"
            f" used_memory {end['used_memory'] - start['used_memory']:+,} B"
            f" (allowed ±{slack:,}: {SLACK_PER_PAIR:,} B a pair),"
            f" inboxes {end['inboxes'] - start['inboxes']:+,} B"
        )
        print(f"  keys at the end: {dict(sorted(census.items()))}")
        assert acked["keys"] > start["keys"]  # the acked messages' keys, for the window
        assert end["keys"] == start["keys"]
        unread = [await redis.hgetall(keys.unread(r.user.mobile)) for r in recipients]
        assert unread == [{s.user.mobile: str(20 + MESSAGES // PAIRS)} for s in senders]
        assert abs(end["used_memory"] - start["used_memory"]) <= slack
        assert abs(end["inboxes"] - start["inboxes"]) <= slack
    finally:
        for peer in peers:
            await peer.close()
        await redis.aclose()
        for node in nodes:
            node.stop()
        server.stop()


async def test_a_resend_within_the_window_after_the_ack_is_stored_once_after_it_anew(
    stack: Stack, workdir: Path, http: aiohttp.ClientSession, redis: aioredis.Redis
) -> None:
    """Before the ack the id is kept (the safety TTL); the ack shortens it to the
    window, within which a resend is answered with the first msgId and a read still gets
    its receipt; after it, a second read is dropped in silence (the message was read)
    and a resend is a new message."""
    window = 3
    node = NodeProc(
        stack, f"window-{time.time_ns()}", workdir, CHATNODE_DEDUPE_WINDOW_S=str(window)
    ).start()
    try:
        api = Api(http, node.http)
        alice, bob = await new_user(api), await new_user(api)
        key = keys.dedupe(bob.mobile, alice.mobile, "w-1")
        async with connected(node.ws, alice.token) as a, connected(node.ws, bob.token) as b:
            first = await a.send_message(bob.mobile, "hi", "w-1")
            assert first["type"] == "accepted"
            assert await redis.ttl(key) > keys.DEDUPE_SAFETY_TTL_S - 60
            assert (await a.send_message(bob.mobile, "hi", "w-1"))["msgId"] == first["msgId"]
            message = await b.recv_type("message", id="w-1")
            await b.send({"type": "ack", "msgIds": [message["msgId"]]})
            receipt = await a.recv_type("receipt", status="delivered")
            await a.send({"type": "ack", "msgIds": [receipt["msgId"]]})

            async def shortened() -> bool:
                return 0 < await redis.ttl(key) <= window

            await wait_until(shortened, 5, "the ack did not shorten the dedupe key")
            within = await a.send_message(bob.mobile, "hi again", "w-1")
            assert within["msgId"] == first["msgId"]  # stored once
            await b.send({"type": "read", "to": alice.mobile, "ids": ["w-1"]})
            read = await a.recv_type("receipt", status="read")
            assert read["ids"] == ["w-1"]
            await a.send({"type": "ack", "msgIds": [read["msgId"]]})
            assert 0 < await redis.ttl(key) <= window  # the read mark keeps the TTL
            assert await b.quiet(0.3, "message") == []

            async def expired() -> bool:
                return not await redis.exists(key)

            await wait_until(expired, window + 5, "the dedupe key did not expire")
            await b.send({"type": "read", "to": alice.mobile, "ids": ["w-1"]})
            late = await a.send_message(bob.mobile, "hi, late", "w-1")
            assert late["type"] == "accepted" and late["msgId"] != first["msgId"]
            again = await b.recv_type("message", id="w-1")
            assert again["msgId"] == late["msgId"] and again["body"] == "hi, late"
            assert await a.quiet(0.5, "receipt") == []  # the late read found no record
            assert await b.quiet(0.1, "error") == []
    finally:
        node.stop()


async def test_a_read_long_after_the_ack_still_gets_its_receipt_once(
    stack: Stack, workdir: Path, http: aiohttp.ClientSession, redis: aioredis.Redis
) -> None:
    """Phones ack on arrival and people read later. Bob acks Alice's message, and reads
    it after its dedupe key is gone: Alice gets the read receipt, once (the count of his
    unread messages from her vouches for one id). A second read of it is dropped, and
    so is a read naming an id of Carol, from whom Bob never got anything."""
    window = 1
    node = NodeProc(
        stack, f"late-read-{time.time_ns()}", workdir, CHATNODE_DEDUPE_WINDOW_S=str(window)
    ).start()
    try:
        api = Api(http, node.http)
        alice, bob, carol = await new_user(api), await new_user(api), await new_user(api)
        key = keys.dedupe(bob.mobile, alice.mobile, "late-1")
        async with (
            connected(node.ws, alice.token) as a,
            connected(node.ws, bob.token) as b,
            connected(node.ws, carol.token) as c,
        ):
            assert (await a.send_message(bob.mobile, "hi", "late-1"))["type"] == "accepted"
            message = await b.recv_type("message", id="late-1")
            await b.send({"type": "ack", "msgIds": [message["msgId"]]})
            delivered = await a.recv_type("receipt", status="delivered")
            await a.send({"type": "ack", "msgIds": [delivered["msgId"]]})

            async def expired() -> bool:
                return not await redis.exists(key)

            await wait_until(expired, window + 10, "the dedupe key did not expire")
            assert await redis.hget(keys.unread(bob.mobile), alice.mobile) == "1"
            await b.send({"type": "read", "to": alice.mobile, "ids": ["late-1"]})
            read = await a.recv_type("receipt", status="read")
            assert read["ids"] == ["late-1"] and read["by"] == bob.mobile
            await a.send({"type": "ack", "msgIds": [read["msgId"]]})
            assert not await redis.hexists(keys.unread(bob.mobile), alice.mobile)
            await b.send({"type": "read", "to": alice.mobile, "ids": ["late-1"]})
            await b.send({"type": "read", "to": carol.mobile, "ids": ["never-1"]})
            assert await a.quiet(0.5, "receipt") == []  # the count is spent
            assert await c.quiet(0.1, "receipt") == []  # nothing to count against
            assert await b.quiet(0.1, "error") == []  # dropped in silence
        assert (
            await eventually(lambda: redis.xlen(keys.inbox(alice.mobile)), 0) == 0
        )  # acked: gone at the trim
        assert (
            await eventually(lambda: redis.xlen(keys.inbox(carol.mobile)), 0) == 0
        )  # acked: gone at the trim
    finally:
        node.stop()
