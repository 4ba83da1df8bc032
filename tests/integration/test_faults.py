"""Faults with real processes: each test names the fault and the invariant it checks."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets

from chatnode import devstack
from tests.integration.harness import (
    FLOOD_ENV,
    Api,
    NodeProc,
    Resilient,
    Stack,
    User,
    new_user,
    report,
    settle,
    stream_id,
)

PAIRS = 8
ROOMY = {"CHATNODE_INBOX_LIMIT": "10000"}  # unacked entries pile up while acks fail
PER_SENDER = 30  # 2 * PAIRS * PER_SENDER = 480 messages, most of them in flight at the kill


def check_every_accepted_arrived_once_in_order(
    clients: list[Resilient], scenario: str, fault_at: float, **figures: Any
) -> int:
    """Every accepted (sender, id) reached its recipient exactly once after dedupe by
    msgId, one msgId per client id, and each inbox came in the order it was stored.
    The figures go to the chaos report (scripts/chaos) before they are asserted."""
    by_mobile = {c.user.mobile: c for c in clients}
    accepted = delivered = duplicated = 0
    for c in clients:
        for cid, msg_id in c.accepted.items():
            to = by_mobile[c.sent[cid][0]]
            got = {
                m["msgId"] for m in to.messages() if m["from"] == c.user.mobile and m["id"] == cid
            }
            accepted += 1
            delivered += msg_id in got
            duplicated += len(got) > 1
    redelivered = sum(c.deliveries for c in clients) - sum(len(c.seen) for c in clients)
    report(
        scenario,
        accepted=accepted,
        delivered=delivered,
        lost=accepted - delivered,
        duplicated=duplicated,
        redelivered=redelivered,
        recover_s=round(time.monotonic() - fault_at, 2),
        **figures,
    )
    assert (accepted - delivered, duplicated) == (0, 0)
    for c in clients:
        order = [stream_id(m["msgId"]) for m in c.seen]
        assert order == sorted(order), f"{c.user.mobile} got its inbox out of order"
    return accepted


async def connected_pairs(
    api: Api, urls: list[str], count: int
) -> tuple[list[tuple[Resilient, Resilient]], list[Resilient]]:
    """`count` pairs of fresh users, the first of each on urls[0], the second on urls[1]."""
    return await connect_pairs(
        urls, [(await new_user(api), await new_user(api)) for _ in range(count)]
    )


async def connect_pairs(
    urls: list[str], users: list[tuple[User, User]]
) -> tuple[list[tuple[Resilient, Resilient]], list[Resilient]]:
    """Clients for pairs of users, the first of each on urls[0], the second on urls[1];
    all connected."""
    pairs = []
    for first, second in users:
        a, b = Resilient(first, urls), Resilient(second, urls)
        b.on_node(urls[1])
        pairs.append((a, b))
    clients = [c for pair in pairs for c in pair]
    for c in clients:
        await c.connect()
    return pairs, clients


async def run_traffic(
    clients: list[Resilient],
    pairs: list[tuple[Resilient, Resilient]],
    fault: asyncio.Future[None] | None,
    at: int,
) -> None:
    """Both ends of every pair send PER_SENDER messages; the fault fires after `at` rounds."""
    for i in range(PER_SENDER):
        if i == at and fault is not None:
            await fault
        for a, b in pairs:
            await a.send(b.user.mobile, f"{a.user.mobile} {i}", f"m{i}")
            await b.send(a.user.mobile, f"{b.user.mobile} {i}", f"m{i}")
        await asyncio.sleep(0.02)


@pytest.fixture
def two_nodes(stack: Stack, workdir: Path) -> Iterator[tuple[NodeProc, NodeProc]]:
    tag = str(time.monotonic_ns())[-6:]
    a = NodeProc(stack, f"fault-a-{tag}", workdir, **ROOMY).start()
    b = NodeProc(stack, f"fault-b-{tag}", workdir, **ROOMY).start()
    yield a, b
    a.stop()
    b.stop()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
async def test_node_killed_mid_traffic_loses_nothing(
    two_nodes: tuple[NodeProc, NodeProc], http: aiohttp.ClientSession, sig: int
) -> None:
    """SIGKILL (or SIGTERM) one node while 480 messages flow between users on both nodes:
    clients reconnect to the other node; every accepted message arrives once, in order."""
    doomed, survivor = two_nodes
    api = Api(http, survivor.http)
    pairs, clients = await connected_pairs(api, [doomed.ws, survivor.ws], PAIRS)

    fault_at = [0.0]

    async def kill() -> None:
        fault_at[0] = time.monotonic()
        doomed.signal(sig)

    fault = asyncio.ensure_future(kill())
    await run_traffic(clients, pairs, fault, at=PER_SENDER // 3)
    sent = sum(len(c.sent) for c in clients)

    def settled() -> bool:
        if any(len(c.accepted) < len(c.sent) for c in clients):
            return False
        return sum(len(c.messages()) for c in clients) >= sent

    try:
        await settle(clients, settled)
        name = f"{signal.Signals(sig).name} a node mid-traffic"
        assert check_every_accepted_arrived_once_in_order(clients, name, fault_at[0]) == sent
        assert sent == 2 * PAIRS * PER_SENDER
        if sig == signal.SIGTERM:
            assert await asyncio.to_thread(doomed.wait) == 0  # drained and exited cleanly
        assert sum(c.reconnects for c in clients) >= PAIRS  # the doomed node's users moved
    finally:
        for c in clients:
            await c.close()


async def two_devices(api: Api, user: User) -> tuple[User, User]:
    """`user` logged in as two named devices: one User (token) each."""
    out = []
    for name in ("phone", "laptop"):
        body = {"mobileNo": user.mobile, "password": user.password, "device": name}
        status, answer, _ = await api.call("POST", "/auth/login", body)
        assert status == 200, answer
        out.append(User(user.mobile, user.name, user.password, answer["token"]))
    return out[0], out[1]


@pytest.mark.timeout(120)
async def test_node_killed_with_devices_on_both_nodes_loses_nothing_on_any_device(
    two_nodes: tuple[NodeProc, NodeProc], http: aiohttp.ClientSession
) -> None:
    """Every user has two devices, one on each node; the phones send, both devices of
    the recipient get everything. SIGKILL one node mid-traffic: every accepted message
    reaches every device of its recipient once (after dedupe by msgId), in order."""
    doomed, survivor = two_nodes
    api = Api(http, survivor.http)
    urls = [doomed.ws, survivor.ws]
    users = [(await new_user(api), await new_user(api)) for _ in range(PAIRS // 2)]
    phones: list[tuple[User, User]] = []
    laptops: list[tuple[User, User]] = []
    for first, second in users:
        (p1, l1), (p2, l2) = await two_devices(api, first), await two_devices(api, second)
        phones.append((p1, p2))
        laptops.append((l2, l1))  # the other node from each one's phone: see connect_pairs
    pairs, senders = await connect_pairs(urls, phones)
    _, watchers = await connect_pairs(urls, laptops)
    fault_at = [0.0]

    async def kill() -> None:
        fault_at[0] = time.monotonic()
        doomed.signal(signal.SIGKILL)

    fault = asyncio.ensure_future(kill())
    everyone = senders + watchers
    try:
        await run_traffic(senders, pairs, fault, at=PER_SENDER // 3)
        sent = sum(len(c.sent) for c in senders)
        devices = {
            m: [c for c in everyone if c.user.mobile == m] for m in {c.user.mobile for c in senders}
        }

        def got(device: Resilient, sender: str, cid: str) -> set[str]:
            return {
                m["msgId"]
                for m in device.messages()
                if m["from"] == sender and m["id"] == cid and "to" not in m
            }

        def settled() -> bool:
            if any(len(c.accepted) < len(c.sent) for c in senders):
                return False
            return all(
                got(d, c.user.mobile, cid)
                for c in senders
                for cid, (to, _) in c.sent.items()
                for d in devices[to]
            )

        await settle(everyone, settled)
        accepted = delivered = duplicated = 0
        for c in senders:
            for cid, msg_id in c.accepted.items():
                for d in devices[c.sent[cid][0]]:
                    ids = got(d, c.user.mobile, cid)
                    accepted += 1
                    delivered += msg_id in ids
                    duplicated += len(ids) > 1
        report(
            "SIGKILL a node, 2 devices per user on both nodes (per device)",
            accepted=accepted,
            delivered=delivered,
            lost=accepted - delivered,
            duplicated=duplicated,
            recover_s=round(time.monotonic() - fault_at[0], 2),
        )
        assert (accepted - delivered, duplicated) == (0, 0)
        assert accepted == 2 * sent and sent == PAIRS * PER_SENDER
        for d in everyone:
            order = [stream_id(m["msgId"]) for m in d.seen]
            assert order == sorted(order), f"a device of {d.user.mobile} got its inbox out of order"
    finally:
        for c in everyone:
            await c.close()


@pytest.mark.timeout(120)
async def test_redis_restarted_mid_traffic_loses_no_accepted_message(
    stack: Stack, workdir: Path, http: aiohttp.ClientSession
) -> None:
    """Redis (append-only, appendfsync always) stops mid-traffic and comes back: nodes stay
    up and reconnect on their own, /readyz says 503 meanwhile, and every accepted message
    arrives once, in order."""
    redis = devstack.RedisServer(workdir / f"aof-{time.monotonic_ns()}", fsync="always").start()
    own = Stack(redis.url, stack.database_url)
    nodes = [
        NodeProc(own, f"aof-{i}-{time.monotonic_ns()}", workdir, **ROOMY).start() for i in range(2)
    ]
    api = Api(http, nodes[0].http)
    urls = [n.ws for n in nodes]
    try:
        pairs, clients = await connected_pairs(api, urls, 4)

        fault_at = [0.0]

        async def outage() -> None:
            fault_at[0] = time.monotonic()
            redis.stop(kill=True)
            await asyncio.sleep(0.5)
            for node in nodes:
                status, body, _ = await Api(http, node.http).call("GET", "/readyz")
                assert status == 503 and body["error"]["code"] == "unavailable"
            await asyncio.sleep(1.0)
            redis.start()

        await run_traffic(clients, pairs, asyncio.ensure_future(outage()), at=PER_SENDER // 3)
        refused = [e for c in clients for e in c.errors]
        assert refused and {e["code"] for e in refused} == {"unavailable"}, refused
        sent = sum(len(c.sent) for c in clients)

        def settled() -> bool:
            if any(len(c.accepted) < len(c.sent) for c in clients):
                return False
            return sum(len(c.messages()) for c in clients) >= sent

        await settle(clients, settled)
        name = "Redis restarted (appendfsync always) mid-traffic"
        assert check_every_accepted_arrived_once_in_order(clients, name, fault_at[0]) == sent
        for node in nodes:
            assert (await Api(http, node.http).call("GET", "/readyz"))[0] == 200
        for c in clients:
            await c.close()
    finally:
        for node in nodes:
            node.stop()
        redis.stop()


@pytest.mark.timeout(90)
async def test_redis_restarted_empty_lifts_no_block_and_loses_no_account(
    stack: Stack, workdir: Path, http: aiohttp.ClientSession
) -> None:
    """Redis comes back with no data (persistence off): blocks and users are reloaded from
    PostgreSQL before any send is judged; a connected user still gets new messages; a
    token logged out before the wipe stays refused."""
    redis = devstack.RedisServer(workdir / f"empty-{time.monotonic_ns()}", appendonly=False).start()
    own = Stack(redis.url, stack.database_url)
    node = NodeProc(own, f"empty-{time.monotonic_ns()}", workdir).start()
    api = Api(http, node.http)
    try:
        you, n, friend = await new_user(api), await new_user(api), await new_user(api)
        status, _, _ = await api.call(
            "POST", "/block-action/block", {"blockedUserMobileNo": you.mobile}, n.token
        )
        assert status == 200
        _, second, _ = await api.call(
            "POST", "/auth/login", {"mobileNo": friend.mobile, "password": friend.password}
        )
        logged_out = second["token"]
        assert (await api.call("POST", "/auth/logout", token=logged_out))[0] == 200
        f = Resilient(friend, [node.ws])
        nc = Resilient(n, [node.ws])
        await f.connect()
        await nc.connect()
        fault_at = time.monotonic()
        redis.stop(kill=True)
        redis.start()
        while (await api.call("GET", "/readyz"))[0] != 200:
            await asyncio.sleep(0.2)
        assert (await api.call("GET", "/block-action/list", token=logged_out))[0] == 401
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(f"{node.ws}?token={logged_out}", open_timeout=5)
        assert refused.value.response.status_code == 401
        y = Resilient(you, [node.ws])
        await y.connect()
        await y.send(n.mobile, "after the wipe", "w1")
        await y.send(friend.mobile, "hello friend", "w2")
        await nc.send(you.mobile, "never", "w3")

        def settled() -> bool:
            return (
                len(y.accepted) == 2
                and any(e.get("ref") == "w3" for e in nc.errors)
                and len(f.messages()) == 1
            )

        await settle([y], settled, timeout=30)
        assert next(e["code"] for e in nc.errors if e.get("ref") == "w3") == "blocked"
        assert f.messages()[0]["body"] == "hello friend"
        await asyncio.sleep(1)
        assert nc.messages() == []  # the block held
        report(
            "Redis restarted empty (blocks, accounts from PostgreSQL)",
            accepted=1,
            delivered=len(f.messages()),
            lost=1 - len(f.messages()),
            duplicated=0,
            redelivered=0,
            recover_s=round(time.monotonic() - fault_at, 2),
        )
        status, _, _ = await api.call(
            "POST", "/auth/login", {"mobileNo": friend.mobile, "password": friend.password}
        )
        assert status == 200
        for c in (f, nc, y):
            await c.close()
    finally:
        node.stop()
        redis.stop()


@pytest.mark.timeout(120)
async def test_postgres_down_refuses_logins_but_chat_goes_on(
    stack: Stack, workdir: Path, http: aiohttp.ClientSession
) -> None:
    """PostgreSQL stops: signup and login answer 503 `unavailable`, connected users keep
    chatting, and everything works again when it returns."""
    import os
    import tempfile

    pg_dir = Path(tempfile.mkdtemp(prefix="chatnode-pgdown-"))
    os.chmod(pg_dir, 0o755)
    pg = await asyncio.to_thread(devstack.PostgresServer(pg_dir, database="down").start)
    own = Stack(stack.redis_url, pg.url)
    try:
        from tests.integration.harness import _migrate

        assert (await asyncio.to_thread(_migrate, pg.url)).returncode == 0
        node = NodeProc(own, f"pgdown-{time.monotonic_ns()}", workdir).start()
        api = Api(http, node.http)
        alice, bob = await new_user(api), await new_user(api)
        a, b = Resilient(alice, [node.ws]), Resilient(bob, [node.ws])
        await a.connect()
        await b.connect()
        fault_at = time.monotonic()
        await asyncio.to_thread(pg.stop)
        status, body, _ = await api.call(
            "POST", "/auth/login", {"mobileNo": alice.mobile, "password": alice.password}
        )
        assert status == 503 and body["error"]["code"] == "unavailable"
        status, body, _ = await api.call(
            "POST", "/auth/signup", {"name": "x", "mobileNo": "+15550009999", "password": "p" * 8}
        )
        assert status == 503 and body["error"]["code"] == "unavailable"
        assert (await api.call("GET", "/readyz"))[0] == 503
        for i in range(5):
            await a.send(bob.mobile, f"still here {i}", f"pg{i}")
        await settle([a], lambda: len(b.messages()) == 5, timeout=20)
        await asyncio.to_thread(pg.start)
        deadline = time.monotonic() + 30
        while (await api.call("GET", "/readyz"))[0] != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.3)
        status, _, _ = await api.call(
            "POST", "/auth/login", {"mobileNo": alice.mobile, "password": alice.password}
        )
        assert status == 200
        report(
            "PostgreSQL down: chat goes on, logins 503",
            accepted=len(a.accepted),
            delivered=len(b.messages()),
            lost=len(a.accepted) - len(b.messages()),
            duplicated=0,
            redelivered=0,
            recover_s=round(time.monotonic() - fault_at, 2),
        )
        await a.close()
        await b.close()
        node.stop()
    finally:
        await asyncio.to_thread(pg.stop)
        import shutil

        shutil.rmtree(pg_dir, ignore_errors=True)


def rss(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096


@pytest.mark.timeout(90)
async def test_client_that_stops_reading_costs_only_its_own_connection(
    stack: Stack, workdir: Path, http: aiohttp.ClientSession
) -> None:
    """A client that never reads (its TCP buffer fills and it answers no pings) while 6 MB
    of messages wait for it: the node's buffer for it stays bounded, it is closed within
    two heartbeats of going silent, and another pair on the same node chats on."""
    import base64
    import os
    import socket

    node = NodeProc(
        stack,
        f"slow-{time.monotonic_ns()}",
        workdir,
        **FLOOD_ENV,
    ).start()
    api = Api(http, node.http)
    try:
        stuck, flooder, alice, bob = [await new_user(api) for _ in range(4)]
        sock = socket.create_connection(("127.0.0.1", node.ws_port), timeout=5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            (
                f"GET /ws?token={stuck.token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        assert b" 101 " in sock.recv(200)  # and then it never reads again
        base = rss(node.proc.pid)  # type: ignore[union-attr]
        f = Resilient(flooder, [node.ws])
        await f.connect()
        body = "x" * 1500
        for i in range(4000):
            await f.send(stuck.mobile, body, f"fl{i}")
        a, b = Resilient(alice, [node.ws]), Resilient(bob, [node.ws])
        await a.connect()
        await b.connect()
        for i in range(50):
            await a.send(bob.mobile, f"hi {i}", f"ok{i}")
        await settle([a, f], lambda: len(b.messages()) == 50 and len(f.accepted) == 4000)
        report(
            "client stops reading: others unaffected",
            accepted=len(a.accepted),
            delivered=len(b.messages()),
            lost=len(a.accepted) - len(b.messages()),
            duplicated=0,
            redelivered=0,
            recover_s=0,
        )
        grown = rss(node.proc.pid) - base  # type: ignore[union-attr]
        assert grown < 48 * 2**20, f"node grew {grown / 2**20:.1f} MiB for one stuck client"
        viewer = alice.token
        deadline = time.monotonic() + 2 * 2 + 4
        while True:
            _, seen, _ = await api.call(
                "GET", "/profile/lastseen", token=viewer, params={"mobileNo": stuck.mobile}
            )
            if seen["data"].get("lastSeen") != "online":
                break
            assert time.monotonic() < deadline, "the stuck client was never closed"
            await asyncio.sleep(0.25)
        sock.close()
        for c in (f, a, b):
            await c.close()
    finally:
        node.stop()
