"""Redis Cluster helpers for tests: a cluster of one's own, clients on it, keys on every
shard."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import ClusterNode, key_slot

from chatnode import devstack
from chatnode.devcluster import RedisCluster


def require_redis_server() -> None:
    """Skip, saying why, where no redis-server binary exists at all."""
    try:
        devstack.redis_binary()
    except devstack.StackError as exc:
        pytest.skip(f"no Redis Cluster without a redis-server binary: {exc}")


@contextlib.contextmanager
def own_cluster(data_dir: Path, **options: Any) -> Iterator[RedisCluster]:
    """A cluster for one test that breaks it (3 primaries, 1 replica each by default)."""
    require_redis_server()
    cluster = RedisCluster(data_dir, **options)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@contextlib.contextmanager
def cluster_client(cluster: RedisCluster) -> Iterator[redis.RedisCluster]:
    """redis-py's synchronous cluster client, strings in and out; it starts from any node
    that answers (the first may be killed)."""
    nodes = [ClusterNode("127.0.0.1", port) for port in cluster.ports]
    client = redis.RedisCluster(startup_nodes=nodes, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


def write_keys(client: redis.RedisCluster, count: int, prefix: str = "k") -> dict[str, str]:
    """`count` keys spread over every slot range, in pipelines; what was written."""
    written = {f"{prefix}:{i}": str(i) for i in range(count)}
    pipe = client.pipeline()
    for key, value in written.items():
        pipe.set(key, value)
    pipe.execute()
    return written


def slot_of(key: str) -> int:
    return int(key_slot(key.encode()))
