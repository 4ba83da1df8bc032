"""The WebSocket gateway: handshake auth, hello, frame errors and close codes."""

from __future__ import annotations

import asyncio

import pytest
import websockets

from tests.integration.harness import Api, Client, NodeProc, connected, new_mobile, new_user


async def handshake_status(url: str, **kwargs: object) -> int:
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(url, open_timeout=5, **kwargs):  # type: ignore[arg-type]
            pass
    return info.value.response.status_code


@pytest.mark.parametrize("query", ["", "?token=", "?token=garbage", "?token=a.b.c"])
async def test_handshake_without_valid_token_is_401(
    cluster: tuple[NodeProc, NodeProc], query: str
) -> None:
    assert await handshake_status(cluster[0].ws + query) == 401


async def test_handshake_with_expired_token_is_401(cluster: tuple[NodeProc, NodeProc]) -> None:
    import time

    import jwt

    from tests.integration.harness import JWT_SECRET

    token = jwt.encode(
        {"sub": "+15551234567", "jti": "x", "exp": int(time.time()) - 10}, JWT_SECRET, "HS256"
    )
    assert await handshake_status(cluster[0].ws + "?token=" + token) == 401


async def test_handshake_with_revoked_token_is_401(
    api_a: Api, cluster: tuple[NodeProc, NodeProc]
) -> None:
    user = await new_user(api_a)
    await api_a.call("POST", "/auth/logout", token=user.token)
    assert await handshake_status(cluster[1].ws + "?token=" + user.token) == 401


async def test_bearer_header_and_hello(api_a: Api, cluster: tuple[NodeProc, NodeProc]) -> None:
    user = await new_user(api_a)
    async with websockets.connect(
        cluster[1].ws, additional_headers={"Authorization": f"Bearer {user.token}"}
    ) as ws:
        import orjson

        hello = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
    assert hello == {"type": "hello", "mobileNo": user.mobile, "node": "test-b", "heartbeat": 2}


@pytest.mark.parametrize(
    ("frame", "code", "ref"),
    [
        ('{"type":"send","id":"a1","to":"bad","body":"x"}', "invalid_frame", "a1"),
        (
            '{"type":"send","id":"bad id!","to":"+15551234567","body":"x"}',
            "invalid_frame",
            "bad id!",
        ),
        ('{"type":"send","id":"a2","to":"+15551234567","body":""}', "invalid_frame", "a2"),
        ('{"type":"send","id":7,"to":"+15551234567","body":"x"}', "invalid_frame", None),
        ('{"type":"nope","id":"a3"}', "invalid_frame", "a3"),
        ('{"id":"a4"}', "invalid_frame", "a4"),
        ("[1,2]", "invalid_frame", None),
        ("not json", "invalid_frame", None),
        ('{"type":"ack","msgIds":"1-0"}', "invalid_frame", None),
        ('{"type":"read","to":"+15551234567","ids":[]}', "invalid_frame", None),
        ('{"type":"typing","to":"+15551234567","state":"maybe"}', "invalid_frame", None),
    ],
)
async def test_invalid_frames_get_error_and_socket_stays_open(
    api_a: Api, cluster: tuple[NodeProc, NodeProc], frame: str, code: str, ref: str | None
) -> None:
    user = await new_user(api_a)
    async with connected(cluster[0].ws, user.token) as c:
        await c.ws.send(frame)
        error = await c.recv_type("error")
        assert error["code"] == code and error["ref"] == ref and error["message"]
        other = await new_user(api_a)
        assert (await c.send_message(other.mobile, "still open"))["type"] == "accepted"


async def test_send_to_yourself_is_invalid(api_a: Api, cluster: tuple[NodeProc, NodeProc]) -> None:
    user = await new_user(api_a)
    async with connected(cluster[0].ws, user.token) as c:
        reply = await c.send_message(user.mobile, "me", cid="self1")
    assert reply == {**reply, "type": "error", "code": "invalid_frame", "ref": "self1"}


async def test_binary_frame_is_invalid(api_a: Api, cluster: tuple[NodeProc, NodeProc]) -> None:
    user = await new_user(api_a)
    async with connected(cluster[0].ws, user.token) as c:
        await c.ws.send(b'{"type":"typing"}')
        assert (await c.recv_type("error"))["code"] == "invalid_frame"


async def test_unknown_recipient_and_too_large(
    api_a: Api, cluster: tuple[NodeProc, NodeProc]
) -> None:
    user = await new_user(api_a)
    other = await new_user(api_a)
    async with connected(cluster[0].ws, user.token) as c:
        reply = await c.send_message(new_mobile(), "hello?", cid="u1")
        assert (
            reply["type"] == "error"
            and reply["code"] == "unknown_recipient"
            and reply["ref"] == "u1"
        )
        reply = await c.send_message(other.mobile, "é" * 8193, cid="big1")  # 16386 bytes
        assert reply["type"] == "error" and reply["code"] == "too_large" and reply["ref"] == "big1"
        reply = await c.send_message(other.mobile, "é" * 8192, cid="big2")  # 16384 bytes
        assert reply["type"] == "accepted"


async def test_frame_over_64k_closes_with_1009(
    api_a: Api, cluster: tuple[NodeProc, NodeProc]
) -> None:
    user = await new_user(api_a)
    c = await Client.connect(cluster[0].ws, user.token)
    await c.ws.send('{"type":"send","id":"x","to":"+15551234567","body":"' + "a" * 70000 + '"}')
    assert await c.closed() == 1009


async def test_repeated_invalid_frames_close_with_1008(
    api_a: Api, cluster: tuple[NodeProc, NodeProc]
) -> None:
    user = await new_user(api_a)
    c = await Client.connect(cluster[1].ws, user.token)
    for _ in range(40):
        try:
            await c.ws.send("garbage")
        except websockets.ConnectionClosed:
            break
    assert await c.closed() == 1008


async def test_unknown_ws_path_is_404(cluster: tuple[NodeProc, NodeProc]) -> None:
    url = cluster[0].ws.replace("/ws", "/other")
    assert await handshake_status(url) == 404


async def test_read_receipt_to_unknown_number_is_unknown_recipient(
    api_a: Api, cluster: tuple[NodeProc, NodeProc]
) -> None:
    user = await new_user(api_a)
    async with connected(cluster[1].ws, user.token) as c:
        await c.send({"type": "read", "to": new_mobile(), "ids": ["x1"]})
        error = await c.recv_type("error")
    assert error["code"] == "unknown_recipient" and error["ref"] is None
