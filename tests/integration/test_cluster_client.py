"""chatnode.cluster.Cluster on a real Redis Cluster (chatnode.devcluster): every shard
through one object, scripts on every primary, MOVED and ASK during a slot migration
followed in order, the replica count, a dead seed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis

from chatnode import keys, ratelimit
from chatnode.cluster import Cluster
from chatnode.devcluster import RedisCluster
from chatnode.devstack import StackError
from chatnode.errors import Unavailable
from chatnode.lua import SCRIPTS
from tests.clusterkit import own_cluster
from tests.integration.harness import new_mobile

# Two keys of one slot, in order: what a send does to an inbox and its dedupe key.
PUSH_BOTH = "redis.call('RPUSH', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1]); return 1"


@pytest.fixture
async def cluster_of(redis_cluster: RedisCluster) -> AsyncIterator[Cluster]:
    redis_cluster.wait_ok(timeout=30)
    c = Cluster(redis_cluster.url)
    await c.start()
    try:
        yield c
    finally:
        await c.close()


def tag_in(slots: set[int]) -> str:
    """A hash tag whose slot is one of `slots`."""
    for i in range(1_000_000):
        tag = f"t{i}"
        if keys.slot(tag) in slots:
            return "{" + tag + "}"
    raise AssertionError("no tag found")


def direct(port: int) -> redis.Redis:
    return redis.Redis(port=port, decode_responses=True, socket_timeout=2)


async def test_keys_on_every_shard_go_to_their_primary(
    redis_cluster: RedisCluster, cluster_of: Cluster
) -> None:
    owners = redis_cluster.slot_owners()
    run = new_mobile()
    for port in redis_cluster.primaries():
        key = tag_in({s for s, p in enumerate(owners) if p == port}) + ":" + run
        assert await cluster_of.run("SET", key, str(port)) == "OK"
        assert await cluster_of.run("GET", key) == str(port)
        with direct(port) as r:
            assert r.get(key) == str(port)  # on that primary itself, no redirect
            r.delete(key)
    assert len(cluster_of.primaries) == len(redis_cluster.primaries())


async def test_scripts_are_loaded_and_run_on_every_primary(
    redis_cluster: RedisCluster, cluster_of: Cluster
) -> None:
    assert await cluster_of.each("PING") == ["PONG"] * len(redis_cluster.primaries())
    shas = [s.sha for s in SCRIPTS]
    for loaded in await cluster_of.each("SCRIPT", "EXISTS", *shas):
        assert loaded == [1] * len(shas)
    owners = redis_cluster.slot_owners()
    for port in redis_cluster.primaries():
        subject = tag_in({s for s, p in enumerate(owners) if p == port}) + new_mobile()
        verdict = await ratelimit.hit(cluster_of, "test", subject, limit=5, window_s=30)
        assert verdict.allowed
        assert await cluster_of.run("DEL", keys.rate_limit("test", subject)) == 1


@pytest.mark.timeout(60)
async def test_a_slot_migration_is_followed_without_losing_or_reordering_writes(
    redis_cluster: RedisCluster, cluster_of: Cluster
) -> None:
    """Three slots move from one primary to another (and back) while one writer sends
    two-key scripts to them in order, a few per loop turn: ASK, TRYAGAIN and MOVED are
    followed; every write lands once, in the order it was sent; the map learns the new
    owner; the same Cluster object goes on working."""
    redis_cluster.wait_ok(timeout=30)
    owners = redis_cluster.slot_owners()
    src = owners[0]
    assert src is not None
    dst = next(p for p in redis_cluster.primaries() if p != src)
    moving = {s for s, p in enumerate(owners) if p == src}
    moving = set(sorted(moving)[:3])
    tag = tag_in(moving) + new_mobile()
    listed, marker = tag + ":list", tag + ":marker"
    (sha,) = set(await cluster_of.each("SCRIPT", "LOAD", PUSH_BOTH))
    c = cluster_of
    redirects: Counter[str] = Counter()
    redirected = c._redirected

    def counting(p: Any, error: Exception, retry: bool) -> None:
        redirects[str(error).split()[0]] += 1
        redirected(p, error, retry)  # type: ignore[arg-type]

    c._redirected = counting  # type: ignore[method-assign]

    sent: list[tuple[int, asyncio.Future[Any]]] = []
    done = asyncio.Event()

    async def writer() -> None:
        n = 0
        while not done.is_set():
            for _ in range(5):
                sent.append((n, c.call("EVALSHA", sha, 2, listed, marker, n)))
                n += 1
            await asyncio.sleep(0.001)

    async def migrate(frm: int, to: int) -> None:
        await asyncio.sleep(0.05)
        # each slot stays 50 ms with its keys moved and src still its owner: the writer
        # (a few writes a millisecond) meets ASK there, whatever the machine's speed
        moved = await asyncio.to_thread(redis_cluster.migrate_slots, 3, frm, to, ask_window_s=0.05)
        assert set(moved) == moving
        await asyncio.sleep(0.1)

    writing = asyncio.ensure_future(writer())
    try:
        await migrate(src, dst)
        await c.run("GET", marker)  # answered by dst, after a MOVED at most
        assert c._slots[keys.slot(tag)] == f"127.0.0.1:{dst}"
        await migrate(dst, src)
    finally:
        done.set()
        await writing
    results = await asyncio.gather(*(f for _, f in sent), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, failed[:3]
    stored = [int(v) for v in await c.run("LRANGE", listed, 0, -1)]
    assert stored == [n for n, _ in sent]  # once each, in order
    assert await c.run("GET", marker) == str(sent[-1][0])
    assert c._slots[keys.slot(tag)] == f"127.0.0.1:{src}"
    assert redis_cluster.slot_owners()[keys.slot(tag)] == src
    await c.run("DEL", listed, marker)
    assert not c._held and not c._out
    assert redirects["MOVED"] >= 1 and redirects["ASK"] + redirects["TRYAGAIN"] >= 1, redirects


@pytest.mark.timeout(60)
async def test_replica_count_and_a_paused_seed(tmp_path: Path) -> None:
    """A cluster of this test's own: a replica SIGKILLed under writes, then the seed
    primary paused (SIGSTOP); the same Cluster object throughout."""
    with own_cluster(tmp_path / "rc") as rc:
        c = Cluster(rc.url)
        await c.start()
        seed = int(rc.url.rsplit(":", 1)[1].split("/")[0])
        try:
            c.set_replicas(1, 3000)
            await _a_dead_replica_is_no_longer_waited_for(rc, c, seed)
            await _a_paused_seed_is_replaced_in_the_map(rc, c, seed)
        finally:
            await c.close()
            with contextlib.suppress(StackError):
                rc.resume(seed)  # a stopped node would only stop at SIGKILL


async def _a_dead_replica_is_no_longer_waited_for(rc: RedisCluster, c: Cluster, seed: int) -> None:
    """A primary whose only replica is SIGKILLed under writes (WAIT 3 s, so its pipelines
    stay blocked) waits for no replica within about a second, counted on a connection of
    its own, not behind those WAITs; its writes succeed again once the WAITs already sent
    time out; the other primaries still wait for theirs."""
    victim = next(p for p in rc.primaries() if p != seed)
    owners = rc.slot_owners()
    key = tag_in({s for s, p in enumerate(owners) if p == victim}) + new_mobile()
    assert await c.run("SET", key, "1") == "OK"  # waited for its replica
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            try:
                await c.run("SET", key, "x")
            except Unavailable:
                await asyncio.sleep(0.01)

    writers = [asyncio.ensure_future(load()) for _ in range(100)]
    try:
        await asyncio.sleep(0.3)
        await asyncio.to_thread(rc.kill, rc.replica_of(victim))
        killed = time.monotonic()
        while _waits(c, victim) != 0:
            assert time.monotonic() - killed < 2.5, "the dead replica is still counted"
            await asyncio.sleep(0.05)
        while True:
            with contextlib.suppress(Unavailable):
                if await c.run("SET", key, "2") == "OK":
                    break
            assert time.monotonic() - killed < 10, "writes still wait for a dead replica"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*writers)
    assert all(_waits(c, p) == 1 for p in rc.primaries() if p != victim)


async def _a_paused_seed_is_replaced_in_the_map(rc: RedisCluster, c: Cluster, seed: int) -> None:
    """The seed primary is paused (SIGSTOP: connected, answering nothing): its replica
    takes over, and the Cluster learns it from the other nodes without waiting out the
    seed for a whole command timeout on each map read; the seed's slots are served."""
    owners = rc.slot_owners()
    seed_key = tag_in({s for s, p in enumerate(owners) if p == seed}) + new_mobile()
    assert await c.run("SET", seed_key, "a") == "OK"
    await asyncio.to_thread(rc.pause, seed)
    paused = time.monotonic()

    async def poke() -> None:  # what tells the Cluster: commands that time out
        while True:
            with contextlib.suppress(Unavailable):
                await c.run("GET", seed_key)
            await asyncio.sleep(0.1)

    poking = asyncio.ensure_future(poke())
    try:
        heir = await asyncio.to_thread(rc.wait_failover, seed, 20)
        while c._slots[keys.slot(seed_key)] != f"127.0.0.1:{heir}":
            await asyncio.sleep(0.05)
            assert time.monotonic() - paused < 15, "the map never learned the heir"
        # the watchdog (5 s), then one MAP_ASK_S on the paused seed, not 5 s more
        assert time.monotonic() - paused < 8.5
    finally:
        poking.cancel()
    started = time.monotonic()
    while True:
        with contextlib.suppress(Unavailable):
            if await c.run("GET", seed_key) == "a":
                break
        assert time.monotonic() - started < 15, "the seed's slots are not served again"
        await asyncio.sleep(0.1)
    assert f"127.0.0.1:{seed}" not in c.primaries


def _waits(c: Cluster, port: int) -> int:
    """How many replicas `port`'s Batcher waits for now."""
    return c._shards[f"127.0.0.1:{port}"]._replicas
