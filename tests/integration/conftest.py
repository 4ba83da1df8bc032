"""Session fixtures: one stack (Redis, PostgreSQL) and one two-node cluster for all tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.integration.harness import Api, NodeProc, Stack, clustered, start_stack


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chatnode")
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
async def stack(workdir: Path) -> AsyncIterator[Stack]:
    s = await start_stack(workdir)
    await forget_rate_limits(s.redis_url)
    yield s
    s.stop()


async def forget_rate_limits(url: str) -> None:
    """Every test client is 127.0.0.1: start each session with its counters at zero."""
    client: Any = (
        aioredis.RedisCluster.from_url(url)
        if await clustered(url)
        else aioredis.Redis.from_url(url)
    )
    try:
        async for key in client.scan_iter("chatnode:rl:*", count=1000):
            await client.delete(key)
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def cluster(stack: Stack, workdir: Path) -> Iterator[tuple[NodeProc, NodeProc]]:
    """Two nodes sharing Redis and PostgreSQL, started once for the session."""
    a = NodeProc(stack, "test-a", workdir).start()
    b = NodeProc(stack, "test-b", workdir).start()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="session")
def isolated(stack: Stack, workdir: Path) -> Iterator[NodeProc]:
    """A node on its own Redis database with wide limits, for the fuzzers: their thousands
    of failed logins and reconnects from 127.0.0.1 must not rate-limit other tests."""
    base, _, _ = stack.redis_url.rpartition("/")
    own = Stack(f"{base}/1", stack.database_url)
    node = NodeProc(
        own,
        "isolated",
        workdir,
        CHATNODE_LOGIN_FAILS_PER_ADDRESS="1000000",
        CHATNODE_LOGIN_FAILS_PER_NUMBER="1000000",
        CHATNODE_CONNECTS_PER_USER="1000000",
    ).start()
    yield node
    node.stop()


@pytest.fixture(scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # the client drops idle connections before a node does (10 s), so a request never
    # goes out on a connection the node is closing at that moment
    connector = aiohttp.TCPConnector(keepalive_timeout=4)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


@pytest.fixture(scope="session")
def api_a(http: aiohttp.ClientSession, cluster: tuple[NodeProc, NodeProc]) -> Api:
    return Api(http, cluster[0].http)


@pytest.fixture(scope="session")
def api_b(http: aiohttp.ClientSession, cluster: tuple[NodeProc, NodeProc]) -> Api:
    return Api(http, cluster[1].http)


@pytest.fixture(scope="session")
async def redis(stack: Stack) -> AsyncIterator[aioredis.Redis]:
    """A client of the stack's Redis: redis-py's cluster client when it is a cluster
    (the tests' own look-ups follow its slots; the nodes use chatnode.cluster)."""
    if await clustered(stack.redis_url):
        many = aioredis.RedisCluster.from_url(stack.redis_url, decode_responses=True)
        yield many  # type: ignore[misc]  # the commands the tests use are the same
        await many.aclose()
        return
    client = aioredis.Redis.from_url(stack.redis_url, decode_responses=True)
    yield client
    await client.aclose()
