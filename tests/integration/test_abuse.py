"""Abuse: rate limits across nodes, tokens that cannot act for others, no enumeration."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import websockets

from tests.integration.harness import Api, Client, NodeProc, Stack, connected, new_mobile, new_user

LIMITS = {
    "CHATNODE_LOGIN_FAILS_PER_NUMBER": "3",
    "CHATNODE_LOGIN_FAILS_PER_ADDRESS": "8",
    "CHATNODE_CONNECTS_PER_USER": "10",
    "CHATNODE_CONNECT_FAILS_PER_ADDRESS": "10",
    "CHATNODE_CONNECT_WINDOW_S": "4",
    "CHATNODE_SEND_RATE": "5",
    "CHATNODE_SEND_BURST": "10",
    "CHATNODE_REFUSALS_BEFORE_CLOSE": "30",
}


@pytest.fixture(scope="module")
def strict(stack: Stack, workdir: Path) -> Iterator[tuple[NodeProc, NodeProc]]:
    """Two nodes with small limits, so tests reach them quickly."""
    a = NodeProc(stack, "strict-a", workdir, **LIMITS).start()
    b = NodeProc(stack, "strict-b", workdir, **LIMITS).start()
    yield a, b
    a.stop()
    b.stop()


async def test_failed_logins_per_number_are_limited_across_nodes(
    strict: tuple[NodeProc, NodeProc], http: aiohttp.ClientSession
) -> None:
    apis = [Api(http, n.http) for n in strict]
    user = await new_user(apis[0])
    statuses = []
    for i in range(5):
        status, body, headers = await apis[i % 2].call(
            "POST", "/auth/login", {"mobileNo": user.mobile, "password": "wrong-guess"}
        )
        statuses.append(status)
    assert statuses[:3] == [401, 401, 401]
    assert statuses[3:] == [429, 429]
    assert body["error"]["code"] == "rate_limited" and int(headers["Retry-After"]) >= 1
    # even the right password waits out the window: a guesser learns nothing
    status, body, _ = await apis[1].call(
        "POST", "/auth/login", {"mobileNo": user.mobile, "password": user.password}
    )
    assert status == 429
    # another number from another address would still be fine; per-address is wider


async def test_unknown_numbers_are_limited_like_known_ones(
    strict: tuple[NodeProc, NodeProc], http: aiohttp.ClientSession
) -> None:
    api = Api(http, strict[0].http)
    mobile = new_mobile()
    statuses = [
        (await api.call("POST", "/auth/login", {"mobileNo": mobile, "password": "x" * 8}))[0]
        for _ in range(4)
    ]
    assert statuses == [401, 401, 401, 429]


async def test_sends_per_user_are_limited_then_flooders_are_closed(
    strict: tuple[NodeProc, NodeProc], http: aiohttp.ClientSession
) -> None:
    api = Api(http, strict[0].http)
    alice, bob = await new_user(api), await new_user(api)
    c = await Client.connect(strict[0].ws, alice.token)
    for i in range(15):
        await c.send({"type": "send", "id": f"f{i}", "to": bob.mobile, "body": "spam"})
    replies = [await c.recv_where(lambda f: f["type"] in ("accepted", "error")) for _ in range(15)]
    limited = [r for r in replies if r["type"] == "error"]
    assert limited and all(r["code"] == "rate_limited" for r in limited)
    assert {r["ref"] for r in limited} <= {f"f{i}" for i in range(15)}
    assert sum(r["type"] == "accepted" for r in replies) >= 10  # the burst went through
    for i in range(60):
        try:
            await c.send({"type": "send", "id": f"g{i}", "to": bob.mobile, "body": "spam"})
        except websockets.ConnectionClosed:
            break
    assert await c.closed() == 1008


async def handshake(url: str) -> int:
    try:
        async with websockets.connect(url) as ws:
            await ws.recv()
            return 101
    except websockets.InvalidStatus as exc:
        if exc.response.status_code == 429:
            assert int(exc.response.headers["Retry-After"]) >= 1
        return exc.response.status_code


async def test_one_user_reconnecting_in_a_loop_is_limited_across_nodes(
    strict: tuple[NodeProc, NodeProc], http: aiohttp.ClientSession
) -> None:
    user = await new_user(Api(http, strict[1].http))
    codes = [await handshake(f"{strict[i % 2].ws}?token={user.token}") for i in range(15)]
    assert codes[:10] == [101] * 10 and codes[10:] == [429] * 5
    other = await new_user(Api(http, strict[1].http))  # others from the same address: fine
    assert await handshake(f"{strict[0].ws}?token={other.token}") == 101


async def test_bad_tokens_from_one_address_are_limited(strict: tuple[NodeProc, NodeProc]) -> None:
    await asyncio.sleep(4.1)  # a fresh window
    codes = [await handshake(f"{strict[i % 2].ws}?token=bad{i}") for i in range(15)]
    assert set(codes) == {401, 429} and codes[0] == 401 and codes[-1] == 429


async def test_frame_sender_comes_from_the_token(
    api_a: Api, cluster: tuple[NodeProc, NodeProc]
) -> None:
    """A `from` or `by` field in a frame is ignored: the sender is the token's user."""
    alice, bob, mallory = await new_user(api_a), await new_user(api_a), await new_user(api_a)
    async with connected(cluster[1].ws, bob.token) as b:
        await b.send_message(mallory.mobile, "hello mallory", cid="b1")
    async with connected(cluster[0].ws, mallory.token) as m:
        got = await m.recv_type("message")
        await m.send({"type": "ack", "msgIds": [got["msgId"]]})
        await m.send(
            {
                "type": "send",
                "id": "spoof",
                "to": bob.mobile,
                "body": "hi",
                "from": alice.mobile,
                "mobileNo": alice.mobile,
            }
        )
        assert (await m.recv_type("accepted"))["id"] == "spoof"
        await m.send({"type": "read", "to": bob.mobile, "ids": ["b1"], "by": alice.mobile})
        assert await m.quiet(0.5, "error") == []
    async with connected(cluster[1].ws, bob.token) as b:
        got = [await b.recv_where(lambda f: f["type"] in ("message", "receipt")) for _ in range(3)]
    assert sorted(g.get("status", g["type"]) for g in got) == ["delivered", "message", "read"]
    assert all(g.get("from", g.get("by")) == mallory.mobile for g in got)


async def test_passwords_tokens_and_bodies_never_reach_a_log(
    api_a: Api, api_b: Api, cluster: tuple[NodeProc, NodeProc]
) -> None:
    password = "Sekr3t-" + new_mobile()[1:]
    user = await new_user(api_a, password=password)
    other = await new_user(api_b)
    body = "body-marker-" + new_mobile()[1:]
    async with connected(cluster[1].ws, user.token) as c:
        await c.send_message(other.mobile, body)
        await c.ws.send("not json " + password)
        await c.recv_type("error")
    await api_a.call("POST", "/auth/login", {"mobileNo": user.mobile, "password": password + "x"})
    with pytest.raises(websockets.InvalidStatus):
        async with websockets.connect(cluster[0].ws + "?token=" + user.token + "x"):
            pass
    await api_b.call("POST", "/auth/logout", token=user.token)
    await asyncio.sleep(0.5)
    logs = "".join(node.log_path.read_text() for node in cluster)
    assert user.mobile in logs  # the logs are there and carry the user
    for secret in (password, user.token, body):
        assert secret not in logs
