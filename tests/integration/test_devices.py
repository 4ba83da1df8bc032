"""Devices (PROTOCOL v2): login names a device, GET /devices lists them, DELETE removes
one (its tokens stop working, its socket closes with 4003), the limit, idle expiry."""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from chatnode import keys
from tests.integration.harness import (
    Api,
    Client,
    NodeProc,
    Stack,
    User,
    _migrate,
    connected,
    new_mobile,
    new_user,
)
from tests.pgutil import ensure_database


async def login(api: Api, user: User, device: Any = None) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"mobileNo": user.mobile, "password": user.password}
    if device is not None:
        body["device"] = device
    status, answer, _ = await api.call("POST", "/auth/login", body)
    return status, answer


async def device_token(api: Api, user: User, device: str) -> tuple[str, str]:
    """(token, deviceId) of a login as `device`."""
    status, body = await login(api, user, device)
    assert status == 200, body
    return body["token"], body["deviceId"]


async def listed(api: Api, token: str) -> list[dict[str, Any]]:
    status, body, _ = await api.call("GET", "/devices", token=token)
    assert status == 200 and body["success"] is True, body
    devices: list[dict[str, Any]] = body["data"]
    return devices


async def handshake_status(url: str, token: str) -> int:
    try:
        async with websockets.connect(f"{url}?token={token}", open_timeout=5):
            return 101
    except websockets.InvalidStatus as exc:
        return exc.response.status_code


async def test_a_login_without_a_device_is_the_default_device_and_answers_as_v1(
    api_a: Api, api_b: Api, cluster: tuple[NodeProc, NodeProc]
) -> None:
    user = await new_user(api_a)
    status, first = await login(api_a, user)
    assert status == 200 and set(first) == {"success", "message", "token", "expiresIn"}, first
    _, again = await login(api_b, user)
    devices = await listed(api_b, again["token"])
    assert [d["name"] for d in devices] == ["default"]  # the same device, on any node
    assert devices[0]["deviceId"].isdigit()
    assert devices[0]["createdAt"].endswith("Z") and devices[0]["lastSeen"].endswith("Z")
    _, named = await device_token(api_a, user, "default")  # naming it: the same device
    assert named == devices[0]["deviceId"]
    async with connected(cluster[0].ws, again["token"]) as client:
        assert "deviceId" not in client.hello  # a v1 login's hello is v1's


async def test_names_make_devices_and_a_name_again_is_the_same_device(api_a: Api) -> None:
    user = await new_user(api_a)
    _, phone = await device_token(api_a, user, "phone")
    token, laptop = await device_token(api_a, user, "laptop")
    _, phone_again = await device_token(api_a, user, "phone")
    assert phone_again == phone and laptop != phone
    names = {d["name"]: d["deviceId"] for d in await listed(api_a, token)}
    assert names == {"default": names["default"], "phone": phone, "laptop": laptop}


async def test_a_name_trimmed_or_in_another_unicode_form_is_the_same_device(api_a: Api) -> None:
    user = await new_user(api_a)
    _, first = await device_token(api_a, user, "caf\u00e9")  # é as one code point
    _, again = await device_token(api_a, user, " cafe\u0301 ")  # e and a combining accent
    assert first == again
    status, answer, _ = await api_a.call("GET", "/devices", token=user.token)
    assert status == 200 and "caf\u00e9" in [d["name"] for d in answer["data"]]


async def test_hello_and_token_name_the_device(api_a: Api, cluster: tuple[NodeProc, ...]) -> None:
    user = await new_user(api_a)
    token, device = await device_token(api_a, user, "tablet")
    async with connected(cluster[1].ws, token) as client:
        assert client.hello["deviceId"] == device
        assert client.hello["mobileNo"] == user.mobile


@pytest.mark.parametrize("device", ["", " ", "x" * 65, 7, None, ["a"], "a\u202eb", "a\x00b"])
async def test_a_bad_device_name_is_400(api_a: Api, device: Any) -> None:
    user = await new_user(api_a)
    body = {"mobileNo": user.mobile, "password": user.password, "device": device}
    status, answer, _ = await api_a.call("POST", "/auth/login", body)
    assert status == 400 and answer["error"]["code"] == "invalid_request", answer


async def test_one_device_past_the_limit_is_409_and_known_ones_still_log_in(api_a: Api) -> None:
    user = await new_user(api_a)  # its login made `default`: 1 of 5
    for i in range(4):
        await device_token(api_a, user, f"d{i}")
    status, body = await login(api_a, user, "one-too-many")
    assert status == 409 and body["error"]["code"] == "too_many_devices", body
    token, _ = await device_token(api_a, user, "d2")  # a known device logs in still
    assert len(await listed(api_a, token)) == 5


async def test_parallel_logins_of_new_devices_do_not_pass_the_limit(api_a: Api, api_b: Api) -> None:
    user = await new_user(api_a)
    answers = await asyncio.gather(
        *(login(api_a if i % 2 else api_b, user, f"p{i}") for i in range(8))
    )
    assert sorted(status for status, _ in answers) == [200] * 4 + [409] * 4
    token = next(body["token"] for status, body in answers if status == 200)
    assert len(await listed(api_a, token)) == 5


async def test_removing_a_device_revokes_its_tokens_and_closes_its_socket_with_4003(
    api_a: Api, api_b: Api, cluster: tuple[NodeProc, NodeProc]
) -> None:
    user = await new_user(api_a)
    keep, _ = await device_token(api_a, user, "phone")
    gone, gone_id = await device_token(api_a, user, "laptop")
    gone_too, _ = await device_token(api_b, user, "laptop")  # a second token of it
    async with connected(cluster[1].ws, gone_too) as client:
        status, body, _ = await api_a.call("DELETE", f"/devices/{gone_id}", token=keep)
        assert status == 200 and body["success"] is True, body
        assert await client.closed() == 4003
    for token in (gone, gone_too):
        for api in (api_a, api_b):
            status, body, _ = await api.call("GET", "/devices", token=token)
            assert status == 401 and body["error"]["code"] == "unauthorized"
        assert await handshake_status(cluster[0].ws, token) == 401
    assert "laptop" not in {d["name"] for d in await listed(api_b, keep)}
    _, again = await device_token(api_a, user, "laptop")  # the name may be used again
    assert again != gone_id


async def test_only_your_own_devices_can_be_removed(api_a: Api) -> None:
    alice, bob = await new_user(api_a), await new_user(api_a)
    _, bobs = await device_token(api_a, bob, "phone")
    for device_id in (bobs, "999999999999", "abc", "-1", "1e3", "99999999999999999999"):
        status, body, _ = await api_a.call(
            "DELETE", f"/devices/{urllib.parse.quote(device_id)}", token=alice.token
        )
        assert status == 404 and body["error"]["code"] == "not_found", (device_id, body)
    assert bobs in {d["deviceId"] for d in await listed(api_a, bob.token)}


async def test_a_device_may_remove_itself(api_a: Api) -> None:
    user = await new_user(api_a)
    token, device = await device_token(api_a, user, "old-phone")
    status, _, _ = await api_a.call("DELETE", f"/devices/{device}", token=token)
    assert status == 200
    status, _, _ = await api_a.call("GET", "/devices", token=token)
    assert status == 401


# -- idle expiry: a node of its own, on a database of its own (it removes every idle device)


@pytest.fixture(scope="module")
def idle_node(stack: Stack, workdir: Path) -> Iterator[NodeProc]:
    url = urllib.parse.urlsplit(stack.database_url)
    admin = url._replace(path="/postgres").geturl()
    name = "chatnode_test_idle_devices"
    assert asyncio.run(ensure_database(admin, name))
    own = Stack(stack.redis_url, url._replace(path=f"/{name}").geturl())
    migrated = _migrate(own.database_url)
    assert migrated.returncode == 0, migrated.stderr
    node = NodeProc(own, "test-idle", workdir, CHATNODE_DEVICE_IDLE_DAYS="0.00004").start()
    yield node
    node.stop()


@pytest.mark.timeout(60)
async def test_a_device_unseen_for_the_idle_days_is_removed(http: Any, idle_node: NodeProc) -> None:
    """0.00004 days is 3.5 s: a device that logs in and never connects goes, with its
    token; a connected device stays however long it is connected."""
    api = Api(http, idle_node.http)
    user = await new_user(api)
    live, _ = await device_token(api, user, "live")
    idle, _ = await device_token(api, user, "idle")
    async with connected(idle_node.ws, live):
        deadline = time.monotonic() + 30
        names: set[str] = {"idle"}
        while "idle" in names and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            names = {d["name"] for d in await listed(api, live)}
        assert names == {"live"}  # `default` (new_user's login) went too
        status, _, _ = await api.call("GET", "/devices", token=idle)
        assert status == 401
        await asyncio.sleep(5)  # well past the idle time, still connected
        assert {d["name"] for d in await listed(api, live)} == {"live"}


# -- several devices at once (each its own session, delivery position and redelivery)


async def signed_up(api: Api) -> User:
    """A user with no device yet (new_user's login makes `default`)."""
    mobile = new_mobile()
    body = {"name": "Dev", "mobileNo": mobile, "password": "password123"}
    status, answer, _ = await api.call("POST", "/auth/signup", body)
    assert status == 201, answer
    return User(mobile, "Dev", "password123", "")


async def three_devices(api: Api, user: User) -> list[str]:
    """Tokens of three named devices of `user`."""
    return [(await device_token(api, user, name))[0] for name in ("phone", "laptop", "tab")]


async def _a_group_is_done(redis: Any, box: str) -> bool:
    """Some consumer group of the inbox has nothing pending (a device's ack is done)."""
    return any(g["pending"] == 0 for g in await redis.xinfo_groups(box))


async def test_devices_stay_connected_side_by_side_and_each_gets_every_message(
    api_a: Api, cluster: tuple[NodeProc, NodeProc], redis: Any
) -> None:
    alice, bob = await new_user(api_a), await signed_up(api_a)
    tokens = await three_devices(api_a, bob)
    urls = [cluster[0].ws, cluster[1].ws, cluster[0].ws]  # devices on both nodes
    bobs = [await Client.connect(url, t) for url, t in zip(urls, tokens, strict=True)]
    try:
        assert len({b.hello["deviceId"] for b in bobs}) == 3
        async with connected(cluster[1].ws, alice.token) as a:
            for i in range(3):
                assert (await a.send_message(bob.mobile, f"m{i}"))["type"] == "accepted"
            for b in bobs:
                got = [await b.recv_type("message") for _ in range(3)]
                assert [m["body"] for m in got] == ["m0", "m1", "m2"]
            box = keys.inbox(bob.mobile)
            ids = [m["msgId"] for m in got]
            assert not await _a_group_is_done(redis, box)
            await bobs[0].send({"type": "ack", "msgIds": ids})
            receipt = await a.recv_type("receipt", status="delivered")
            assert sorted(receipt["ids"]) == sorted(m["id"] for m in got)
            # the first device's XACK rides after its receipt is stored: an ack crossing
            # it may send a second `delivered` (PROTOCOL.md); this one comes after it
            deadline = time.monotonic() + 10
            while not await _a_group_is_done(redis, box) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await bobs[1].send({"type": "ack", "msgIds": ids})
            await asyncio.sleep(0.5)
            assert await redis.xlen(box) == 3  # the third device has not acked them yet
            assert await a.quiet(0.5, "receipt") == []  # `delivered` went once
            await bobs[2].send({"type": "ack", "msgIds": ids})
            deadline = time.monotonic() + 10
            while await redis.xlen(box) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert await redis.xlen(box) == 0  # every device acked: the entries left
    finally:
        for b in bobs:
            await b.close()


async def test_a_newer_connection_of_a_device_replaces_only_that_device(
    api_a: Api, cluster: tuple[NodeProc, NodeProc]
) -> None:
    user = await new_user(api_a)
    phone, laptop = [(await device_token(api_a, user, n))[0] for n in ("phone", "laptop")]
    async with connected(cluster[0].ws, phone) as first, connected(cluster[1].ws, laptop) as lt:
        async with connected(cluster[1].ws, phone):  # the phone again, on the other node
            assert await first.closed() == 4001
            assert await lt.quiet(1.0) == [] and lt.ws.close_code is None  # the laptop stays


async def test_a_device_offline_gets_its_backlog_in_order_and_a_removed_one_releases_it(
    api_a: Api, api_b: Api, cluster: tuple[NodeProc, NodeProc], redis: Any
) -> None:
    alice, bob = await new_user(api_a), await signed_up(api_a)
    phone, phone_id = await device_token(api_a, bob, "phone")
    tab, tab_id = await device_token(api_b, bob, "tab")
    _, old_id = await device_token(api_b, bob, "old")
    box = keys.inbox(bob.mobile)
    async with connected(cluster[0].ws, phone) as p, connected(cluster[1].ws, alice.token) as a:
        for i in range(5):
            await a.send_message(bob.mobile, f"b{i}")
        got = [await p.recv_type("message") for _ in range(5)]
        await p.send({"type": "ack", "msgIds": [m["msgId"] for m in got]})
        await a.recv_type("receipt", status="delivered")
    assert await redis.xlen(box) == 5  # tab and old have not had them
    async with connected(cluster[1].ws, tab) as t:  # back after a while: in order
        backlog = [await t.recv_type("message") for _ in range(5)]
        assert [m["body"] for m in backlog] == [f"b{i}" for i in range(5)]
        await t.send({"type": "ack", "msgIds": [m["msgId"] for m in backlog]})
        await asyncio.sleep(0.5)
    assert await redis.xlen(box) == 5  # `old` still holds them
    status, _, _ = await api_a.call("DELETE", f"/devices/{old_id}", token=phone)
    assert status == 200
    assert await redis.xlen(box) == 0  # removed: what only it held is released
    assert tab_id != phone_id


async def test_presence_is_online_while_any_device_is_and_typing_reaches_each(
    api_a: Api, cluster: tuple[NodeProc, NodeProc]
) -> None:
    alice, bob = await new_user(api_a), await new_user(api_a)
    phone, laptop = [(await device_token(api_a, bob, n))[0] for n in ("phone", "laptop")]

    async def last_seen() -> Any:
        _, body, _ = await api_a.call(
            "GET", f"/profile/lastseen?mobileNo={urllib.parse.quote(bob.mobile)}", token=alice.token
        )
        return body["data"].get("lastSeen")

    async with connected(cluster[0].ws, phone) as p:
        async with connected(cluster[1].ws, laptop) as lt:
            assert await last_seen() == "online"
            async with connected(cluster[0].ws, alice.token) as a:
                await a.send({"type": "typing", "to": bob.mobile, "state": "start"})
                for device in (p, lt):
                    frame = await device.recv_type("typing")
                    assert frame["from"] == alice.mobile and frame["state"] == "start"
        assert await last_seen() == "online"  # the phone is still connected
    deadline = time.monotonic() + 10
    while await last_seen() == "online" and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert (await last_seen() or "").endswith("Z")


async def test_a_read_on_one_device_reaches_the_sender(
    api_a: Api, cluster: tuple[NodeProc, NodeProc]
) -> None:
    alice, bob = await new_user(api_a), await new_user(api_a)
    phone, laptop = [(await device_token(api_a, bob, n))[0] for n in ("phone", "laptop")]
    async with (
        connected(cluster[0].ws, phone) as p,
        connected(cluster[1].ws, laptop) as lt,
        connected(cluster[1].ws, alice.token) as a,
    ):
        answer = await a.send_message(bob.mobile, "read me")
        for device in (p, lt):
            await device.recv_type("message")
        await lt.send({"type": "read", "to": alice.mobile, "ids": [answer["id"]]})
        receipt = await a.recv_type("receipt", status="read")
        assert receipt["ids"] == [answer["id"]] and receipt["by"] == bob.mobile


async def test_own_sends_and_reads_reach_the_users_other_devices_only(
    api_a: Api, cluster: tuple[NodeProc, NodeProc], redis: Any
) -> None:
    alice, bob = await new_user(api_a), await signed_up(api_a)  # alice also logged in as v1
    a_phone, a_laptop = [(await device_token(api_a, alice, n))[0] for n in ("phone", "laptop")]
    b_tab, b_desk = [(await device_token(api_a, bob, n))[0] for n in ("tab", "desk")]
    async with (
        connected(cluster[0].ws, a_phone) as phone,
        connected(cluster[1].ws, a_laptop) as laptop,
        connected(cluster[0].ws, alice.token) as v1,
        connected(cluster[1].ws, b_tab) as tab,
        connected(cluster[0].ws, b_desk) as desk,
    ):
        answer = await phone.send_message(bob.mobile, "hello from the phone", cid="own-1")
        assert answer["type"] == "accepted"
        copy = await laptop.recv_type("message")
        assert (copy["from"], copy["to"], copy["id"], copy["body"]) == (
            alice.mobile,
            bob.mobile,
            "own-1",
            "hello from the phone",
        )
        await laptop.send({"type": "ack", "msgIds": [copy["msgId"]]})
        for device in (tab, desk):
            got = await device.recv_type("message")
            assert "to" not in got and got["from"] == alice.mobile  # v1's shape for them
        await tab.send({"type": "read", "to": alice.mobile, "ids": ["own-1"]})
        synced = await desk.recv_type("receipt", status="read")
        assert (synced["by"], synced["from"], synced["ids"]) == (
            bob.mobile,
            alice.mobile,
            ["own-1"],
        )
        for device in (phone, laptop):
            receipt = await device.recv_type("receipt", status="read")
            assert receipt["by"] == bob.mobile and "from" not in receipt
        assert await phone.quiet(1.0, "message") == []  # no copy back to where it came from
        assert await v1.quiet(0.5, "message") == []  # nor to a v1 client (it skips it)
        assert await tab.quiet(0.5, "receipt") == []  # nor its own read
        await desk.send({"type": "ack", "msgIds": [synced["msgId"]]})
    deadline = time.monotonic() + 10
    box = keys.inbox(alice.mobile)
    # the copy: acked by the laptop, skipped (and acked) by the phone and the v1 client;
    # the receipts wait
    # for acks that never came (the sockets closed), so only they are left
    while time.monotonic() < deadline:
        kinds = [f.get("k") for _, f in await redis.xrange(box)]
        if "o" not in kinds:
            break
        await asyncio.sleep(0.1)
    assert "o" not in kinds
