"""Guarantees 7 and 8: presence without ghosts, one session per user."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.integration.harness import Api, Client, NodeProc, Stack, connected, new_user

Cluster = tuple[NodeProc, NodeProc]


async def lastseen(api: Api, viewer_token: str, mobile: str) -> str | None:
    status, body, _ = await api.call(
        "GET", "/profile/lastseen", token=viewer_token, params={"mobileNo": mobile}
    )
    assert status == 200, body
    value: str | None = body["data"].get("lastSeen")
    return value


async def test_online_while_connected_then_last_seen_time(
    api_a: Api, api_b: Api, cluster: Cluster
) -> None:
    viewer, user = await new_user(api_a), await new_user(api_a)
    async with connected(cluster[0].ws, user.token):
        assert await lastseen(api_b, viewer.token, user.mobile) == "online"
    before = datetime.now(UTC)
    await asyncio.sleep(0.3)
    seen = await lastseen(api_b, viewer.token, user.mobile)
    assert seen is not None and seen.endswith("Z")
    when = datetime.fromisoformat(seen.replace("Z", "+00:00"))
    assert abs((when - before).total_seconds()) < 5


async def test_connection_that_stops_answering_pings_is_closed(
    api_a: Api, cluster: Cluster
) -> None:
    """A connection that never answers pings is closed within two heartbeats (2 s here)."""
    viewer, user = await new_user(api_a), await new_user(api_a)
    sock = socket.create_connection(("127.0.0.1", cluster[0].ws_port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws?token={user.token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    assert b" 101 " in sock.recv(4096).split(b"\r\n")[0]
    try:
        assert await lastseen(api_a, viewer.token, user.mobile) == "online"
        started = time.monotonic()
        while await lastseen(api_a, viewer.token, user.mobile) == "online":
            assert time.monotonic() - started < 2 * 2 + 2, "silent connection stayed online"
            await asyncio.sleep(0.2)
    finally:
        sock.close()


async def test_g8_new_connection_on_other_node_replaces_old_with_4001(
    api_a: Api, cluster: Cluster
) -> None:
    user, other = await new_user(api_a), await new_user(api_a)
    first = await Client.connect(cluster[0].ws, user.token)
    async with connected(cluster[1].ws, user.token) as second:
        assert await first.closed() == 4001
        async with connected(cluster[0].ws, other.token) as o:
            await o.send_message(user.mobile, "to the new one")
        assert (await second.recv_type("message"))["body"] == "to the new one"


async def test_g8_same_node_replacement_with_4001(api_a: Api, cluster: Cluster) -> None:
    user = await new_user(api_a)
    first = await Client.connect(cluster[1].ws, user.token)
    async with connected(cluster[1].ws, user.token):
        assert await first.closed() == 4001


async def test_logout_closes_sockets_of_that_token_with_4003(
    api_a: Api, api_b: Api, cluster: Cluster
) -> None:
    user = await new_user(api_a)
    c = await Client.connect(cluster[0].ws, user.token)
    status, _, _ = await api_b.call("POST", "/auth/logout", token=user.token)
    assert status == 200
    assert await c.closed() == 4003


@pytest.mark.timeout(90)
async def test_g7_users_of_a_killed_node_go_offline_and_inboxes_keep_filling(
    api_a: Api, cluster: Cluster, stack: Stack, workdir: Path
) -> None:
    """SIGKILL a node: its users show offline within the route TTL (6 s here, 60 s by
    default); messages to them wait in the inbox and arrive on reconnect to any node."""
    doomed = NodeProc(stack, "doomed", workdir).start()
    viewer, user = await new_user(api_a), await new_user(api_a)
    try:
        c = await Client.connect(doomed.ws, user.token)
        assert await lastseen(api_a, viewer.token, user.mobile) == "online"
        doomed.signal(signal.SIGKILL)
        doomed.wait()
        killed = time.monotonic()
        async with connected(cluster[0].ws, viewer.token) as v:
            acc = await v.send_message(user.mobile, "while you were dead")
            assert acc["type"] == "accepted"
            while (seen := await lastseen(api_a, viewer.token, user.mobile)) == "online":
                assert time.monotonic() - killed < 20, "ghost: still online"
                await asyncio.sleep(0.5)
            assert seen is not None  # refreshed last seen survives the node
        async with connected(cluster[1].ws, user.token) as back:
            assert (await back.recv_type("message"))["msgId"] == acc["msgId"]
        del c
    finally:
        doomed.stop()
