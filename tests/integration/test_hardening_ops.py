"""Issue 8, the operating side: secrets, Redis's eviction policy, HTTP deadlines
(slowloris), /metrics on its own port, readiness while draining, a subscriber that
cannot subscribe. Real node processes on real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from chatnode import devstack
from tests.integration.harness import JWT_SECRET, Api, NodeProc, Stack, new_user

# -- helpers -------------------------------------------------------------------------


def serve(stack: Stack, **env: str) -> subprocess.CompletedProcess[str]:
    """`chatnode serve` on free ports, expected to refuse to start."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "chatnode",
            "serve",
            "--http-port",
            str(devstack.free_port()),
            "--ws-port",
            str(devstack.free_port()),
        ],
        env={
            **os.environ,
            "CHATNODE_REDIS_URL": stack.redis_url,
            "CHATNODE_DATABASE_URL": stack.database_url,
            "CHATNODE_JWT_SECRET": JWT_SECRET,
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_one_clear_line(done: subprocess.CompletedProcess[str], *words: str) -> str:
    """Non-zero exit; the last stderr line is chatnode's own and names `words`."""
    assert done.returncode != 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("chatnode: "), done.stderr
    for word in words:
        assert word in line, done.stderr
    return line


def private_redis(workdir: Path, policy: str = "noeviction") -> devstack.RedisServer:
    folder = workdir / f"redis-{time.time_ns()}"
    return devstack.RedisServer(folder, appendonly=False, maxmemory_policy=policy).start()


async def closed_within(reader: asyncio.StreamReader, limit: float) -> tuple[float, bytes]:
    """Read until the server closes the connection; (seconds it took, what it sent)."""
    start = time.monotonic()
    got = b""
    async with asyncio.timeout(limit):
        try:
            while chunk := await reader.read(65536):
                got += chunk
        except ConnectionResetError:
            pass
    return time.monotonic() - start, got


# -- point 5: the JWT secret ------------------------------------------------------------


@pytest.mark.parametrize(
    "secret",
    ["short", "x" * 31, "change-me", "CHANGE-ME", "secret", "é" * 15],
    ids=["short", "31-bytes", "change-me", "CHANGE-ME", "secret", "30-utf8-bytes"],
)
def test_serve_refuses_a_short_or_placeholder_secret(stack: Stack, secret: str) -> None:
    done = serve(stack, CHATNODE_JWT_SECRET=secret)
    assert_one_clear_line(done, "CHATNODE_JWT_SECRET")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    if len(secret) > 6:
        assert secret not in done.stderr


def test_a_32_byte_secret_passes_the_check(stack: Stack) -> None:
    """16 characters, 32 UTF-8 bytes: accepted (the node then fails on the dead Redis)."""
    port = devstack.free_port()
    done = serve(
        stack, CHATNODE_JWT_SECRET="é" * 16, CHATNODE_REDIS_URL=f"redis://127.0.0.1:{port}/0"
    )
    line = assert_one_clear_line(done, "Redis", str(port))
    assert "CHATNODE_JWT_SECRET" not in line


# -- point 16: Redis's eviction policy ----------------------------------------------------


def test_serve_refuses_a_redis_that_may_evict(stack: Stack, workdir: Path) -> None:
    redis = private_redis(workdir, policy="allkeys-lru")
    try:
        done = serve(stack, CHATNODE_REDIS_URL=redis.url)
    finally:
        redis.stop()
    assert_one_clear_line(done, "maxmemory-policy", "allkeys-lru", "noeviction")


@pytest.mark.timeout(90)
async def test_readyz_answers_503_while_redis_may_evict(
    stack: Stack, workdir: Path, http: aiohttp.ClientSession
) -> None:
    """The policy changes under a running node: /readyz says 503 within a few seconds,
    and 200 again once it is noeviction again."""
    redis = private_redis(workdir)
    node = NodeProc(Stack(redis.url, stack.database_url), "eviction", workdir).start()
    api = Api(http, node.http)
    client = aioredis.Redis.from_url(redis.url)
    try:
        assert (await api.call("GET", "/readyz"))[0] == 200
        await client.config_set("maxmemory-policy", "allkeys-lru")
        body = await _readyz_until(api, 503, within=10)
        assert "maxmemory-policy" in body["error"]["message"]
        await client.config_set("maxmemory-policy", "noeviction")
        await _readyz_until(api, 200, within=10)
    finally:
        await client.aclose()
        node.stop()
        redis.stop()


async def _readyz_until(api: Api, wanted: int, within: float) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        status, body, _ = await api.call("GET", "/readyz")
        if status == wanted:
            return body
        assert time.monotonic() < deadline, f"/readyz stayed {status}: {body}"
        await asyncio.sleep(0.2)


# -- point 22: a subscriber that cannot subscribe ----------------------------------------

NO_SUBSCRIBE = ["on", ">hunter2", "~*", "&*", "+@all", "-subscribe", "-ssubscribe"]


def test_a_subscription_that_never_comes_is_one_clear_line(stack: Stack, workdir: Path) -> None:
    """Redis answers everything but SUBSCRIBE (an ACL): start-up gives up after a few
    seconds with one line naming the channel, no traceback, no password."""
    redis = private_redis(workdir)
    try:
        admin = subprocess.run(
            ["redis-cli", "-p", str(redis.port), "ACL", "SETUSER", "chat", *NO_SUBSCRIBE],
            capture_output=True,
            text=True,
            check=False,
        )
        if admin.returncode != 0 or "OK" not in admin.stdout:
            pytest.skip(f"cannot set a Redis ACL here: {admin.stdout}{admin.stderr}")
        done = serve(stack, CHATNODE_REDIS_URL=f"redis://chat:hunter2@127.0.0.1:{redis.port}/0")
    finally:
        redis.stop()
    assert_one_clear_line(done, "subscribe", str(redis.port))
    assert "hunter2" not in done.stderr


# -- point 9: HTTP deadlines (slowloris) ---------------------------------------------------


@pytest.fixture(scope="module")
def web_node(stack: Stack, workdir: Path) -> Iterator[NodeProc]:
    node = NodeProc(stack, "slowloris", workdir).start()
    yield node
    node.stop()


async def slow_client(port: int, sent: bytes, trickle: bytes = b"", limit: float = 20) -> Any:
    """One connection that sends `sent`, then `trickle` a byte every 0.5 s, and reads
    until the node closes it: (seconds from the start to the close, what the node sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()

    async def feed() -> None:
        for byte in trickle:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.5)

    feeder = asyncio.create_task(feed())
    try:
        writer.write(sent)
        await writer.drain()
        _, got = await closed_within(reader, limit)
        return time.monotonic() - start, got
    finally:
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await feeder
        writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 5)


SLOW_CLIENTS: dict[str, tuple[bytes, bytes, float]] = {
    "half-request-line": (b"GET /healthz HTT", b"", 20),
    "half-headers": (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ab", b"", 20),
    # a byte every 0.5 s keeps an idle timer alive; the header deadline is not idle-based
    "trickled-headers": (
        b"",
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: a" * 100,
        20,
    ),
    "idle-keepalive": (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"", 20),
    "trickled-body": (
        b"POST /auth/login HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
        b"",
        25,
    ),
}


@pytest.fixture(scope="module")
async def slow_clients(web_node: NodeProc) -> AsyncIterator[dict[str, asyncio.Task[Any]]]:
    """Every slow client at once: each waits about 10 s for the node to close it, so
    the tests below, each asserting its own, take those 10 s once, not five times."""
    tasks = {
        name: asyncio.create_task(slow_client(web_node.http_port, *case))
        for name, case in SLOW_CLIENTS.items()
    }
    yield tasks
    for task in tasks.values():
        task.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)


@pytest.mark.parametrize("case", ["half-request-line", "half-headers"])
async def test_an_incomplete_request_is_closed(
    slow_clients: dict[str, asyncio.Task[Any]], case: str
) -> None:
    took, _ = await slow_clients[case]
    assert took <= 15


async def test_headers_trickled_byte_by_byte_are_closed(
    slow_clients: dict[str, asyncio.Task[Any]],
) -> None:
    took, got = await slow_clients["trickled-headers"]
    assert took <= 15 and not got.startswith(b"HTTP/1.1 200")


async def test_an_idle_keepalive_connection_is_closed(
    slow_clients: dict[str, asyncio.Task[Any]],
) -> None:
    took, got = await slow_clients["idle-keepalive"]
    assert got.startswith(b"HTTP/1.1 200")  # answered, then closed when idle
    assert took <= 12


async def test_a_trickled_body_gets_408_and_is_closed(
    slow_clients: dict[str, asyncio.Task[Any]],
) -> None:
    took, got = await slow_clients["trickled-body"]
    assert took <= 15
    assert got.startswith(b"HTTP/1.1 408"), got[:200]


async def test_honest_requests_on_one_connection_still_work(
    web_node: NodeProc, http: aiohttp.ClientSession
) -> None:
    api = Api(http, web_node.http)
    user = await new_user(api)
    for _ in range(3):
        status, _, _ = await api.call("GET", "/block-action/list", token=user.token)
        assert status == 200


# -- point 22: /metrics on its own port ------------------------------------------------


async def test_metrics_port_serves_metrics_and_the_http_port_does_not(
    stack: Stack, workdir: Path, http: aiohttp.ClientSession
) -> None:
    port = devstack.free_port()
    node = NodeProc(stack, "metrics-port", workdir, CHATNODE_METRICS_PORT=str(port)).start()
    try:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            assert resp.status == 200
            assert "chatnode" in await resp.text()
        async with http.get(f"{node.http}/metrics") as resp:
            assert resp.status == 404
        async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
            assert resp.status == 404  # the metrics port serves /metrics alone
        async with http.get(f"{node.http}/readyz") as resp:
            assert resp.status == 200
    finally:
        node.stop()


async def test_without_a_metrics_port_metrics_stay_on_the_http_port(
    web_node: NodeProc, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{web_node.http}/metrics") as resp:
        assert resp.status == 200


# -- point 22: readiness while draining ---------------------------------------------------


async def _silent_websocket(port: int, token: str) -> asyncio.StreamWriter:
    """A WebSocket that never answers the server's close frame: the drain waits for it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    return writer


@pytest.mark.timeout(60)
async def test_readyz_answers_503_while_draining(
    stack: Stack, workdir: Path, http: aiohttp.ClientSession, api_a: Api
) -> None:
    node = NodeProc(stack, "drain-ready", workdir).start()
    api = Api(http, node.http)
    writer: asyncio.StreamWriter | None = None
    try:
        user = await new_user(api_a)
        writer = await _silent_websocket(node.ws_port, user.token)
        assert (await api.call("GET", "/readyz"))[0] == 200
        node.signal(signal.SIGTERM)
        seen: list[int] = []
        while True:  # until the HTTP port closes
            try:
                status, _, _ = await api.call("GET", "/readyz")
            except aiohttp.ClientError:
                break
            seen.append(status)
            await asyncio.sleep(0.05)
        assert 503 in seen, seen
        assert 200 not in seen[seen.index(503) :], seen
        assert await asyncio.to_thread(node.wait) == 0
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 5)
        node.stop()
