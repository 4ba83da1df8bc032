"""chatnode.devcluster.RedisCluster, real redis-server processes: it forms, fails over,
migrates slots under writes, restarts a shard empty, pauses a node; `chatnode dev
--redis-cluster`. Tests that break the cluster take their own; the rest share one."""

from __future__ import annotations

import ast
import asyncio
import itertools
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis

from chatnode import devstack
from chatnode.devcluster import SLOTS, RedisCluster
from tests.clusterkit import cluster_client, own_cluster, slot_of, write_keys
from tests.integration.harness import Api, Client, Stack, new_user


def test_the_cluster_serves_every_slot_and_each_primary_has_a_replica(
    clean_redis_cluster: RedisCluster,
) -> None:
    cluster = clean_redis_cluster
    primaries, replicas = cluster.primaries(), cluster.replicas()
    assert len(primaries) == 3 and len(replicas) == 3
    assert sorted(cluster.replica_of(p) for p in primaries) == sorted(replicas)
    for port in cluster.ports:
        info = cluster.cluster_info(port)
        assert info["cluster_state"] == "ok", (port, info)
        assert (info["cluster_slots_ok"], info["cluster_known_nodes"]) == (str(SLOTS), "6")
    assert set(cluster.slot_owners()) == set(primaries)  # each serves slots; none unserved
    with cluster_client(cluster) as client:
        written = write_keys(client, 600)
        assert client.mget_nonatomic(list(written)) == list(written.values())
        before = int(
            cluster.cluster_info(primaries[0]).get("cluster_stats_messages_publish_sent", 0)
        )
        redis.Redis(port=primaries[0]).execute_command("PUBLISH", "devcluster", "hello")
    for port in primaries:
        assert redis.Redis(port=port).dbsize() > 0  # every shard took keys
    after = int(cluster.cluster_info(primaries[0])["cluster_stats_messages_publish_sent"])
    assert after > before  # a PUBLISH goes to every node over the cluster bus


@pytest.mark.timeout(60)
def test_sigkill_a_primary_its_replica_takes_over_within_15s_and_it_rejoins_as_replica(
    tmp_path: Path,
) -> None:
    with own_cluster(tmp_path / "rc") as cluster, cluster_client(cluster) as client:
        written = write_keys(client, 500)
        victim = cluster.primary_for_slot(0)
        heir = cluster.replica_of(victim)
        assert redis.Redis(port=victim).execute_command("WAIT", 1, 5000) == 1  # replicated
        cluster.kill(victim)
        started = time.monotonic()
        assert cluster.wait_failover(victim, timeout=15) == heir
        took = time.monotonic() - started
        cluster.wait_ok(timeout=15)
        assert client_reads(cluster, written)  # a new client: this one still asks the dead
        assert heir in cluster.primaries()
        cluster.start_node(victim)  # back empty; it learns it was replaced
        deadline = time.monotonic() + 15
        while cluster.replicas_of(heir) != [victim]:
            assert time.monotonic() < deadline, "the old primary did not rejoin as a replica"
            time.sleep(0.1)
        cluster.wait_ok(timeout=15)
    assert took < 15


@pytest.mark.timeout(60)
async def test_migrate_slots_moves_1000_slots_with_keys_intact_while_clients_write(
    clean_redis_cluster: RedisCluster,
) -> None:
    """2,000 keys written, then 1,000 slots moved (and moved back, leaving the shared
    cluster as it was) while a client keeps writing keys of exactly those slots: every key
    written before or during reads back."""
    cluster = clean_redis_cluster
    src, dst = cluster.primary_for_slot(0), cluster.primary_for_slot(SLOTS - 1)
    moving = [s for s, owner in enumerate(cluster.slot_owners()) if owner == src][:1000]
    targets = keys_in_slots(set(moving), 3000)
    with cluster_client(cluster) as client:
        written = write_keys(client, 2000)
    writer = aioredis.RedisCluster(host="127.0.0.1", port=dst, decode_responses=True)
    stop = asyncio.Event()
    during: dict[str, str] = {}

    async def write_meanwhile() -> None:
        for round_ in itertools.count():
            for key in targets:
                if stop.is_set():
                    return
                await writer.set(key, str(round_))
                during[key] = str(round_)

    try:
        task = asyncio.create_task(write_meanwhile())
        moved = await asyncio.to_thread(cluster.migrate_slots, 1000, src, dst)
        owners = cluster.slot_owners()
        assert moved == moving and {owners[s] for s in moved} == {dst}
        assert client_reads(cluster, written)
        back = await asyncio.to_thread(cluster.migrate_slots, 1000, dst, src)
        stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        stop.set()
        await writer.aclose()
    assert back == moving  # dst's lowest slots were the moved ones
    assert len(during) > 100, "the writer hardly wrote while slots moved"
    assert client_reads(cluster, written | during)
    cluster.wait_ok(timeout=15)


def keys_in_slots(slots: set[int], count: int) -> list[str]:
    """`count` keys that hash into `slots`."""
    keys: list[str] = []
    for i in itertools.count():
        if slot_of(f"m:{i}") in slots:
            keys.append(f"m:{i}")
            if len(keys) == count:
                return keys
    raise AssertionError("unreachable")


def client_reads(cluster: RedisCluster, expected: dict[str, str]) -> bool:
    with cluster_client(cluster) as client:
        got = client.mget_nonatomic(list(expected))
    missing = [k for k, v in zip(expected, got, strict=True) if expected[k] != v]
    assert not missing, f"{len(missing)} keys lost or wrong, e.g. {missing[:5]}"
    return True


@pytest.mark.timeout(60)
def test_restart_shard_empty_loses_only_that_shards_keys_and_the_cluster_is_ok(
    tmp_path: Path,
) -> None:
    with own_cluster(tmp_path / "rc") as cluster, cluster_client(cluster) as client:
        written = write_keys(client, 1000)
        shard = cluster.primary_for_slot(0)
        replica = cluster.replica_of(shard)
        started = time.monotonic()
        cluster.restart_shard_empty(shard)
        took = time.monotonic() - started
        cluster.wait_ok(timeout=5)
        assert shard in cluster.primaries() and cluster.replicas_of(shard) == [replica]
        owners = cluster.slot_owners()
        gone = {k for k in written if owners[slot_of(k)] == shard}
        assert 0 < len(gone) < len(written)
        got = dict(zip(written, client.mget_nonatomic(list(written)), strict=True))
        assert all(got[k] is None for k in gone)
        assert all(got[k] == v for k, v in written.items() if k not in gone)
        client.set("after-restart", "1")  # {slot 0..}'s shard takes writes again
        assert client.get("after-restart") == "1"
    assert took < 30


@pytest.mark.timeout(30)
def test_pause_a_primary_it_answers_nothing_then_resume_and_it_serves_again(
    clean_redis_cluster: RedisCluster,
) -> None:
    """SIGSTOP for less than the node timeout: no failover, no data lost."""
    cluster = clean_redis_cluster
    with cluster_client(cluster) as client:
        written = write_keys(client, 100)
    port = cluster.primary_for_slot(slot_of("k:0"))
    direct = redis.Redis(port=port, socket_timeout=0.3, retry=None)
    try:
        cluster.pause(port)
        try:
            assert port not in cluster.primaries()  # asked of live nodes only
            with pytest.raises(redis.TimeoutError):
                direct.ping()
        finally:
            cluster.resume(port)
        assert direct.ping()
    finally:
        direct.close()
    cluster.wait_ok(timeout=15)
    assert port in cluster.primaries()
    assert client_reads(cluster, written)


# -- chatnode dev --redis-cluster -----------------------------------------------------------


@asynccontextmanager
async def dev_running(data: Path, *args: str, **env: str) -> AsyncIterator[list[str]]:
    """`chatnode dev --redis-cluster ...` until it says it is up; its stdout lines."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHATNODE_")}
    errors = (data / "dev-stderr.txt").open("wb")
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "chatnode", "dev", "--redis-cluster"),
        *(*args, "--data-dir", str(data / "state")),
        env=base | env,
        stdout=asyncio.subprocess.PIPE,
        stderr=errors,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(45):
            while not lines or "is up" not in lines[-1]:
                line = (await proc.stdout.readline()).decode()
                stderr = (data / "dev-stderr.txt").read_text()[-2000:]
                assert line, f"dev exited early: {lines} {stderr}"
                lines.append(line)
        yield lines
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)  # dev stops its cluster on the way out
            try:
                async with asyncio.timeout(30):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        errors.close()


def _cluster_ports(lines: list[str]) -> list[int]:
    match = re.search(r"primaries (\[[\d, ]+\])\s+replicas (\[[\d, ]+\])", "".join(lines))
    assert match, lines
    return [*ast.literal_eval(match[1]), *ast.literal_eval(match[2])]


@pytest.mark.timeout(90)
async def test_dev_redis_cluster_forms_six_nodes_and_ctrl_c_stops_them(
    tmp_path: Path, stack: Stack
) -> None:
    """`dev --redis-cluster --nodes 0`: a 3+3 cluster is up, named on stdout; SIGINT
    (Ctrl-C) stops every redis-server of it and dev exits 0."""
    async with dev_running(
        tmp_path, "--nodes", "0", CHATNODE_DATABASE_URL=stack.database_url
    ) as lines:
        ports = _cluster_ports(lines)
        assert len(ports) == 6
        assert f"redis://127.0.0.1:{ports[0]}/0" in "".join(lines)
        for port in ports:
            info = redis.Redis(port=port, decode_responses=True).execute_command("CLUSTER", "INFO")
            assert "cluster_state:ok" in info and "cluster_size:3" in info
    assert not any(devstack.port_open(port) for port in ports)


@pytest.mark.timeout(120)
async def test_dev_redis_cluster_runs_two_nodes_that_carry_a_session(
    tmp_path: Path, stack: Stack, http: aiohttp.ClientSession
) -> None:
    """The whole of `dev --redis-cluster`: both nodes ready on the cluster, a user signs up
    on one and opens a session on the other."""
    http_base, ws_base = _port_pair(), _port_pair()
    async with dev_running(
        tmp_path,
        *("--nodes", "2", "--http-port", str(http_base), "--ws-port", str(ws_base)),
        CHATNODE_DATABASE_URL=stack.database_url,
    ):
        for i in range(2):
            api = Api(http, f"http://127.0.0.1:{http_base + i}")
            assert (await api.call("GET", "/readyz"))[0] == 200
        user = await new_user(Api(http, f"http://127.0.0.1:{http_base}"))
        client = await Client.connect(f"ws://127.0.0.1:{ws_base + 1}/ws", user.token)
        assert client.hello["node"] == "dev-2"
        await client.close()


def _port_pair() -> int:
    """A free port whose next one is free too, below the ephemeral range."""
    for _ in range(100):
        port = devstack.free_steady_port()
        if not devstack.port_open(port + 1):
            return port
    raise RuntimeError("no two free ports in a row")
