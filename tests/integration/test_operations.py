"""Operating a node: start-up failures, migrate, SIGTERM drain, Redis going away."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from chatnode import devstack
from tests.integration.harness import JWT_SECRET, Api, Client, NodeProc, Stack, new_user


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatnode", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_serve_without_secret_refuses_to_start(stack: Stack) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CHATNODE_JWT_SECRET"}
    done = subprocess.run(
        [sys.executable, "-m", "chatnode", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
    assert "CHATNODE_JWT_SECRET" in done.stderr and "Traceback" not in done.stderr


def test_unreachable_redis_is_one_clear_line(stack: Stack) -> None:
    port = devstack.free_port()
    done = run_cli(
        "serve",
        "--http-port",
        str(devstack.free_port()),
        "--ws-port",
        str(devstack.free_port()),
        CHATNODE_JWT_SECRET=JWT_SECRET,
        CHATNODE_REDIS_URL=f"redis://127.0.0.1:{port}/0",
        CHATNODE_DATABASE_URL=stack.database_url,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Redis" in lines[0] and str(port) in lines[0], done.stderr


def test_unreachable_postgres_is_one_clear_line(stack: Stack) -> None:
    port = devstack.free_port()
    done = run_cli(
        "serve",
        "--http-port",
        str(devstack.free_port()),
        "--ws-port",
        str(devstack.free_port()),
        CHATNODE_JWT_SECRET=JWT_SECRET,
        CHATNODE_REDIS_URL=stack.redis_url,
        CHATNODE_DATABASE_URL=f"postgresql://u:hunter2@127.0.0.1:{port}/x",
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "PostgreSQL" in lines[0] and str(port) in lines[0], done.stderr
    assert "hunter2" not in done.stderr


def test_migrate_is_idempotent(stack: Stack) -> None:
    for _ in range(2):
        done = run_cli("migrate", CHATNODE_DATABASE_URL=stack.database_url)
        assert done.returncode == 0, done.stderr


async def test_sigterm_closes_sockets_with_1012_and_exits_0(
    api_a: Api, stack: Stack, workdir: Path
) -> None:
    node = NodeProc(stack, "draining", workdir).start()
    user = await new_user(api_a)
    c = await Client.connect(node.ws, user.token)
    node.signal(signal.SIGTERM)
    assert await c.closed() == 1012
    assert await asyncio.to_thread(node.wait) == 0


@pytest.mark.timeout(60)
async def test_redis_away_readyz_503_sends_unavailable_then_recovers(
    stack: Stack, workdir: Path, http: aiohttp.ClientSession
) -> None:
    """Redis stops: the node stays up, /readyz says 503, sends get `unavailable` (never a
    false `accepted`); Redis returns with its append-only file: everything recovers."""
    redis = devstack.RedisServer(workdir / f"redis-{time.time_ns()}").start()
    own = Stack(redis.url, stack.database_url)
    node = NodeProc(own, "redis-away", workdir).start()
    api = Api(http, node.http)
    try:
        alice, bob = await new_user(api), await new_user(api)
        c = await Client.connect(node.ws, alice.token)
        assert (await c.send_message(bob.mobile, "before"))["type"] == "accepted"
        redis.stop(kill=True)
        status, body, _ = await api.call("GET", "/readyz")
        assert status == 503 and body["error"]["code"] == "unavailable"
        status, _, _ = await api.call("GET", "/healthz")
        assert status == 200
        reply = await c.send_message(bob.mobile, "during", cid="during-1")
        assert reply["type"] == "error" and reply["code"] == "unavailable"
        redis.start()
        deadline = time.monotonic() + 20
        while (await api.call("GET", "/readyz"))[0] != 200:
            assert time.monotonic() < deadline, "node did not reconnect to Redis"
            await asyncio.sleep(0.2)
        reply = await c.send_message(bob.mobile, "during", cid="during-1")
        assert reply["type"] == "accepted"
        await c.close()
        b = await Client.connect(node.ws, bob.token)
        bodies = [(await b.recv_type("message"))["body"] for _ in range(2)]
        assert bodies == ["before", "during"]
        await b.close()
    finally:
        node.stop()
        redis.stop()
