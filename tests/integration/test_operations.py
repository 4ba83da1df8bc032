"""Operating a node: start-up failures, migrate, SIGTERM drain, Redis going away."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
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


@pytest.mark.parametrize("dead", ["Redis", "PostgreSQL"])
def test_unreachable_service_is_one_clear_line(stack: Stack, dead: str) -> None:
    """A node that cannot reach Redis or PostgreSQL at start-up says which and where in
    one line (no traceback, no password) and exits non-zero."""
    port = devstack.free_port()
    urls = {
        "CHATNODE_REDIS_URL": stack.redis_url,
        "CHATNODE_DATABASE_URL": stack.database_url,
    }
    if dead == "Redis":
        urls["CHATNODE_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    else:
        urls["CHATNODE_DATABASE_URL"] = f"postgresql://u:hunter2@127.0.0.1:{port}/x"
    done = run_cli(
        "serve",
        "--http-port",
        str(devstack.free_port()),
        "--ws-port",
        str(devstack.free_port()),
        CHATNODE_JWT_SECRET=JWT_SECRET,
        **urls,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and dead in lines[0] and str(port) in lines[0], done.stderr
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


def _consecutive_free_ports(count: int) -> int:
    """`count` free ports in a row, below the kernel's ephemeral range: a port from that
    range can be taken meanwhile by any outgoing connection (dev's own, to its Redis)."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        base = random.randrange(10_000, low - count)
        if all(devstack.bindable(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free port range")


@pytest.mark.timeout(120)
async def test_dev_starts_embedded_services_and_two_nodes_and_stops_on_ctrl_c(
    http: aiohttp.ClientSession,
) -> None:
    """`chatnode dev` with nothing configured: embedded Redis and PostgreSQL, the schema,
    two nodes whose URLs it prints; SIGINT (Ctrl-C) stops everything and exits 0."""
    data = Path(tempfile.mkdtemp(prefix="chatnode-dev-"))
    os.chmod(data, 0o755)
    http_base, ws_base = _consecutive_free_ports(2), _consecutive_free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATNODE_")}
    errors_path = data / "dev-stderr.txt"
    errors = errors_path.open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chatnode",
        "dev",
        "--nodes",
        "2",
        "--http-port",
        str(http_base),
        "--ws-port",
        str(ws_base),
        "--data-dir",
        str(data / "state"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=errors,
    )
    assert proc.stdout is not None
    try:
        lines: list[str] = []
        async with asyncio.timeout(90):
            while not lines or "is up" not in lines[-1]:
                line = (await proc.stdout.readline()).decode()
                assert line, f"dev exited early: {lines} {errors_path.read_text()[-2000:]}"
                lines.append(line)
        for i in range(2):
            assert f"http://127.0.0.1:{http_base + i}" in "".join(lines)
            assert f"ws://127.0.0.1:{ws_base + i}/ws" in "".join(lines)
            api = Api(http, f"http://127.0.0.1:{http_base + i}")
            assert (await api.call("GET", "/readyz"))[0] == 200
        user = await new_user(Api(http, f"http://127.0.0.1:{http_base}"))
        c = await Client.connect(f"ws://127.0.0.1:{ws_base + 1}/ws", user.token)
        assert c.hello["node"] == "dev-2"
        await c.close()
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(60):
            assert await proc.wait() == 0
        for port in (http_base, http_base + 1, ws_base, ws_base + 1):
            assert not devstack.port_open(port)
        assert (data / "state" / "redis" / "appendonlydir").exists()  # AOF on
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        errors.close()
        shutil.rmtree(data, ignore_errors=True)
