"""chatnode on a real Redis Cluster (3 primaries, a replica each, cluster-node-timeout
1500 ms), with two real nodes on it: faults mid-traffic, the replica wait, the bus."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from chatnode import keys
from chatnode.devcluster import RedisCluster
from tests.clusterkit import own_cluster
from tests.integration.harness import (
    Api,
    NodeProc,
    Resilient,
    Stack,
    User,
    connected,
    new_mobile,
    new_user,
    report,
    settle,
)
from tests.integration.test_faults import (
    PER_SENDER,
    ROOMY,
    check_every_accepted_arrived_once_in_order,
    connect_pairs,
    run_traffic,
)

PAIRS = 6
Nodes = tuple[RedisCluster, NodeProc, NodeProc]


@pytest.fixture
def on_cluster(stack: Stack, workdir: Path, tmp_path: Path) -> Iterator[Nodes]:
    """A Redis Cluster of this test's own, and two nodes on it, both given its first
    primary's address (the seed)."""
    with own_cluster(tmp_path / "redis-cluster") as rc:
        own = Stack(rc.url, stack.database_url)
        tag = str(time.monotonic_ns())[-6:]
        a = NodeProc(own, f"rc-a-{tag}", workdir, **ROOMY).start()
        b = NodeProc(own, f"rc-b-{tag}", workdir, **ROOMY).start()
        try:
            yield rc, a, b
        finally:
            a.stop()
            b.stop()


def seed_port(rc: RedisCluster) -> int:
    return int(rc.url.rsplit(":", 1)[1].split("/")[0])


async def user_where(api: Api, where: Callable[[int], bool]) -> User:
    """A new user whose keys are in a slot `where` accepts."""
    for _ in range(100_000):
        mobile = new_mobile()
        if where(keys.slot(keys.inbox(mobile))):
            return await new_user(api, mobile=mobile)
    raise AssertionError("no number found for that slot")


async def pairs_over(
    api: Api, urls: list[str], wheres: list[Callable[[int], bool]]
) -> tuple[list[tuple[Resilient, Resilient]], list[Resilient]]:
    """One pair per `where`: both users in slots it accepts, the first on urls[0], the
    second on urls[1]; all connected."""
    users = [(await user_where(api, w), await user_where(api, w)) for w in wheres]
    return await connect_pairs(urls, users)


def on_shard(owners: list[int | None], port: int) -> Callable[[int], bool]:
    return lambda slot: owners[slot] == port


async def traffic_through(
    clients: list[Resilient],
    pairs: list[tuple[Resilient, Resilient]],
    fault: Callable[[], None],
    scenario: str,
) -> float:
    """Run the fault threaded mid-traffic; check every accepted message arrived once, in
    order; close the clients. The unavailable window (from the fault to the last error
    or dropped socket) is reported and returned."""
    try:
        fault_at = [0.0]

        async def inject() -> None:
            fault_at[0] = time.monotonic()
            await asyncio.to_thread(fault)

        await run_traffic(clients, pairs, asyncio.ensure_future(inject()), at=PER_SENDER // 3)
        sent = sum(len(c.sent) for c in clients)

        def settled() -> bool:
            if any(len(c.accepted) < len(c.sent) for c in clients):
                return False
            return sum(len(c.messages()) for c in clients) >= sent

        await settle(clients, settled, timeout=90)
        troubles = [t for c in clients for t in c.troubles if t >= fault_at[0]]
        window = round(max(troubles) - fault_at[0], 2) if troubles else 0.0
        assert (
            check_every_accepted_arrived_once_in_order(
                clients, scenario, fault_at[0], unavailable_s=window
            )
            == sent
        )
        assert sent == 2 * len(pairs) * PER_SENDER
        return window
    finally:
        for c in clients:
            await c.close()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("which", ["seed", "other"])
async def test_a_primary_sigkilled_mid_traffic_loses_nothing(
    on_cluster: Nodes, http: aiohttp.ClientSession, which: str
) -> None:
    """SIGKILL a primary (the nodes' seed, or another) while users on every shard talk
    across nodes: its replica is promoted; every accepted message arrives once, in order;
    the unavailable window stays under 15 s."""
    rc, a, b = on_cluster
    seed = seed_port(rc)
    victim = seed if which == "seed" else next(p for p in rc.primaries() if p != seed)
    owners = rc.slot_owners()
    shards = [on_shard(owners, p) for p in rc.primaries()]
    pairs, clients = await pairs_over(Api(http, b.http), [a.ws, b.ws], shards + shards)
    window = await traffic_through(
        clients,
        pairs,
        lambda: rc.kill(victim),
        f"SIGKILL a Redis Cluster primary ({which}) mid-traffic",
    )
    assert window < 15
    assert victim not in rc.primaries()


@pytest.mark.timeout(240)
async def test_a_thousand_slots_migrated_mid_traffic_lose_and_reorder_nothing(
    on_cluster: Nodes, http: aiohttp.ClientSession
) -> None:
    """Move 1,000 slots from one primary to another while users whose keys are in those
    slots talk: every accepted message arrives once, in the order it was stored."""
    rc, a, b = on_cluster
    src, dst = rc.primaries()[:2]
    owners = rc.slot_owners()
    moving = sorted(s for s, p in enumerate(owners) if p == src)[:1000]
    first, last = moving[0], moving[-1]
    tags = {keys.slot(keys.part_tag(p)) for p in range(keys.PARTITIONS)}
    assert any(first <= s <= last for s in tags), "no partition among the moved slots"

    def in_moved(slot: int) -> bool:
        return first <= slot <= last

    def elsewhere(slot: int) -> bool:
        return owners[slot] != src

    pairs, clients = await pairs_over(
        Api(http, b.http), [a.ws, b.ws], [in_moved] * (PAIRS - 1) + [elsewhere]
    )
    await traffic_through(
        clients,
        pairs,
        lambda: rc.migrate_slots(1000, src, dst),
        "1,000 Redis Cluster slots migrated mid-traffic",
    )
    assert all(o == dst for o in rc.slot_owners()[first : last + 1])


@pytest.mark.timeout(180)
async def test_a_shard_restarted_empty_is_reloaded_from_postgresql(
    on_cluster: Nodes, http: aiohttp.ClientSession
) -> None:
    """A shard (primary and replica) comes back with no data: the accounts, blocks and
    revocations of its partitions are reloaded from PostgreSQL for that shard; a blocked
    sender stays blocked, a logged-out token stays refused, messages still flow."""
    rc, a, b = on_cluster
    api = Api(http, a.http)
    victim = rc.primaries()[1]
    owners = rc.slot_owners()
    here = on_shard(owners, victim)
    you, blocker, friend = [await user_where(api, here) for _ in range(3)]
    status, _, _ = await api.call(
        "POST", "/block-action/block", {"blockedUserMobileNo": you.mobile}, blocker.token
    )
    assert status == 200
    # a token whose jti is in a partition of this shard, logged out before the wipe
    for _ in range(200):
        _, body, _ = await api.call(
            "POST", "/auth/login", {"mobileNo": friend.mobile, "password": friend.password}
        )
        token = body["token"]
        status, _, _ = await api.call("POST", "/auth/logout", token=token)
        assert status == 200
        jti = _jti(token)
        if here(keys.slot(keys.revoked(jti))):
            break
    else:
        raise AssertionError("no token of this shard's partitions in 200 logins")
    started = time.monotonic()
    await asyncio.to_thread(rc.restart_shard_empty, victim)
    async with aioredis.Redis(port=victim, decode_responses=True) as shard:
        assert await shard.dbsize() == 0  # empty indeed
    assert (await api.call("GET", "/block-action/list", token=token))[0] == 401
    async with connected(b.ws, you.token) as y, connected(a.ws, friend.token) as f:
        blocked = await y.send_message(blocker.mobile, "let me in")
        assert blocked["type"] == "accepted"  # blocked sends look accepted, never arrive
        sent = await y.send_message(friend.mobile, "still here")
        assert sent["type"] == "accepted"
        got = await f.recv_type("message", timeout=10)
        assert got["msgId"] == sent["msgId"]
    async with connected(a.ws, blocker.token) as bl:
        assert await bl.quiet(1.5, "message") == []
    report(
        "Redis Cluster shard restarted empty (reloaded)",
        accepted=1,
        delivered=1,
        lost=0,
        duplicated=0,
        recover_s=round(time.monotonic() - started, 2),
    )


def _jti(token: str) -> str:
    body = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))["jti"])


@pytest.mark.timeout(120)
async def test_a_send_is_not_accepted_before_a_replica_has_it(
    on_cluster: Nodes, http: aiohttp.ClientSession
) -> None:
    """Every replica paused: a send answers unavailable after CHATNODE_REPLICA_WAIT_MS,
    never accepted, and the recipient gets nothing; resumed, the resend with the same id
    is accepted, stored once, delivered once."""
    rc, a, b = on_cluster
    api = Api(http, a.http)
    alice, bob = await new_user(api), await new_user(api)
    replicas = rc.replicas()
    async with connected(a.ws, alice.token) as al, connected(b.ws, bob.token) as bo:
        for port in replicas:
            rc.pause(port)
        try:
            answer = await al.send_message(bob.mobile, "wait for it", cid="r-1")
            assert answer["type"] == "error" and answer["code"] == "unavailable", answer
            assert await bo.quiet(1.0, "message") == []
        finally:
            for port in replicas:
                rc.resume(port)
        again = await al.send_message(bob.mobile, "wait for it", cid="r-1")
        assert again["type"] == "accepted"
        got = await bo.recv_type("message", timeout=10)
        assert got["msgId"] == again["msgId"]
        await bo.send({"type": "ack", "msgIds": [got["msgId"]]})
        assert await bo.quiet(1.0, "message") == []


@pytest.mark.timeout(120)
async def test_messages_cross_the_cluster_bus_by_shard_only(
    on_cluster: Nodes, http: aiohttp.ClientSession
) -> None:
    """200 messages between users on every shard, across nodes: the cluster bus carries
    no classic PUBLISH for them (CLUSTER INFO's publish counter stays where it was);
    the sharded counter moves, to the shard's replicas only."""
    rc, a, b = on_cluster
    owners = rc.slot_owners()
    shards = [on_shard(owners, p) for p in rc.primaries()]
    api = Api(http, a.http)

    def bus(field: str) -> int:
        return sum(int(rc.cluster_info(p).get(field, "0")) for p in rc.ports)

    pairs = [(await user_where(api, w), await user_where(api, w)) for w in shards]
    before = bus("cluster_stats_messages_publish_sent")
    shard_before = bus("cluster_stats_messages_publishshard_sent")
    for s, r in pairs:
        async with connected(a.ws, s.token) as sc, connected(b.ws, r.token) as rc_:
            for i in range(200 // len(pairs)):
                assert (await sc.send_message(r.mobile, f"m{i}"))["type"] == "accepted"
            for _ in range(200 // len(pairs)):
                got = await rc_.recv_type("message", timeout=10)
                await rc_.send({"type": "ack", "msgIds": [got["msgId"]]})
    assert bus("cluster_stats_messages_publish_sent") == before
    assert bus("cluster_stats_messages_publishshard_sent") > shard_before
