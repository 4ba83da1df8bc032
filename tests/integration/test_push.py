"""Live pushes and catching up: answers in frame order, a client that lags and comes back,
a node whose subscription to its channel is cut."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import aiohttp
import orjson
import redis.asyncio as aioredis
import websockets

from chatnode import keys
from tests.integration.harness import (
    FLOOD_ENV,
    Api,
    NodeProc,
    Stack,
    connected,
    new_user,
    on_every_node,
    stream_id,
)

Cluster = tuple[NodeProc, NodeProc]


async def test_answers_come_in_the_order_of_the_frames(api_a: Api, cluster: Cluster) -> None:
    """A send's `accepted` needs Redis and an invalid frame's error does not; still each
    answer comes in the order its frame came."""
    alice, bob = await new_user(api_a), await new_user(api_a)
    async with connected(cluster[0].ws, alice.token) as a:
        await a.send({"type": "send", "id": "o1", "to": bob.mobile, "body": "one"})
        await a.send({"type": "typing", "to": "not a number", "state": "start"})
        await a.send({"type": "send", "id": "o2", "to": bob.mobile, "body": "two"})
        await a.send({"type": "ack", "msgIds": "not a list"})
        got = [await a.recv() for _ in range(4)]
    assert [(f["type"], f.get("id", f.get("ref"))) for f in got] == [
        ("accepted", "o1"),
        ("error", None),
        ("accepted", "o2"),
        ("error", None),
    ]


async def test_a_client_that_lags_then_reads_gets_everything_in_order(
    stack: Stack, workdir: Path, http: aiohttp.ClientSession, redis: aioredis.Redis
) -> None:
    """A recipient whose socket stops draining while 4.5 MB wait for it: the node stops
    pushing to it (its route is no longer live) instead of buffering without end; once it
    reads again every message comes, once, in the order stored, and pushes resume."""
    node = NodeProc(
        stack,
        f"lag-{time.monotonic_ns()}",
        workdir,
        **FLOOD_ENV,
        CHATNODE_HEARTBEAT_S="30",  # it must not be closed for missing pongs meanwhile
        CHATNODE_REDELIVERY_S="60",
    ).start()
    api = Api(http, node.http)
    count, body = 3000, "x" * 1500
    try:
        alice, bob = await new_user(api), await new_user(api)
        sock = socket.create_connection(("127.0.0.1", node.ws_port), timeout=5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        ws = await websockets.connect(
            f"{node.ws}?token={bob.token}", sock=sock, max_queue=1, max_size=2**20
        )
        assert orjson.loads(await ws.recv())["type"] == "hello"
        async with connected(node.ws, alice.token) as a:
            for i in range(count):
                await a.send({"type": "send", "id": f"lag{i}", "to": bob.mobile, "body": body})
            accepted = [await a.recv_type("accepted", timeout=30) for _ in range(count)]
            deadline = time.monotonic() + 10  # (with replica acks, pushes follow accepted)
            while (route := await redis.get(keys.route(bob.mobile)) or "").count("|") != 1:
                assert time.monotonic() < deadline, route  # not live: it lags
                await asyncio.sleep(0.05)
            got: list[dict[str, object]] = []
            async with asyncio.timeout(60):
                while len(got) < count:
                    frame = orjson.loads(await ws.recv())
                    if frame["type"] == "message":
                        got.append(frame)
                        await ws.send(
                            orjson.dumps({"type": "ack", "msgIds": [frame["msgId"]]}).decode()
                        )
            ids = [str(f["msgId"]) for f in got]
            assert len(set(ids)) == len(ids), "an entry came twice"
            assert ids == [x["msgId"] for x in accepted]  # all, once, in stored order
            assert [stream_id(i) for i in ids] == sorted(stream_id(i) for i in ids)
            deadline = time.monotonic() + 10
            while (await redis.get(keys.route(bob.mobile)) or "").count("|") != 2:
                assert time.monotonic() < deadline, "the route never went live again"
                await asyncio.sleep(0.1)
            live = await a.send_message(bob.mobile, "after")
            after = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            assert after["msgId"] == live["msgId"]
        await ws.close()
    finally:
        node.stop()


async def test_messages_sent_while_a_node_lost_its_subscription_still_arrive(
    api_a: Api, cluster: Cluster, redis: aioredis.Redis
) -> None:
    """Cut every Pub/Sub connection: pushes published meanwhile are lost on the wire, but
    the node catches its sessions up once it has subscribed again: nothing is lost."""
    alice, bob = await new_user(api_a), await new_user(api_a)
    async with connected(cluster[0].ws, alice.token) as a, connected(cluster[1].ws, bob.token) as b:
        await a.send_message(bob.mobile, "before")
        assert (await b.recv_type("message"))["body"] == "before"
        await on_every_node(redis, "CLIENT", "KILL", "TYPE", "pubsub")
        sent = [await a.send_message(bob.mobile, f"cut {i}") for i in range(20)]
        assert all(s["type"] == "accepted" for s in sent)
        got = [await b.recv_type("message", timeout=15) for _ in range(20)]
        assert [g["msgId"] for g in got] == [s["msgId"] for s in sent]


async def test_a_backlog_of_big_frames_comes_whole_without_overrunning_the_socket(
    stack: Stack, workdir: Path, http: aiohttp.ClientSession
) -> None:
    """210 waiting messages whose frames are ~60 KB each (control characters are escaped
    six-fold in JSON), 12 MB in all: the catch-up takes a page only as far as the socket's
    buffer allows, so the recipient gets every one instead of a close for not reading."""
    node = NodeProc(stack, f"big-{time.monotonic_ns()}", workdir, **FLOOD_ENV).start()
    api = Api(http, node.http)
    count, body = 210, "\x01" * 10000
    try:
        alice, bob = await new_user(api), await new_user(api)
        async with connected(node.ws, alice.token) as a:
            for i in range(count):
                assert (await a.send_message(bob.mobile, body, cid=f"big{i}"))["type"] == "accepted"
        async with connected(node.ws, bob.token) as b:
            got = []
            async with asyncio.timeout(60):
                while len(got) < count:
                    frame = await b.recv_type("message", timeout=30)
                    got.append(frame["id"])
                    await b.send({"type": "ack", "msgIds": [frame["msgId"]]})
        assert got == [f"big{i}" for i in range(count)]
    finally:
        node.stop()
