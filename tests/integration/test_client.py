"""chatnode.client against real nodes: REST with typed errors, sends and receipts,
reconnects through a proxy whose sockets the test cuts (resend with the same id, dedupe
by msgId, acks only after the handler), and the close codes that end a connection."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chatnode import client as cn
from tests.integration.harness import NodeProc, new_mobile


@pytest.fixture
async def api(cluster: tuple[NodeProc, NodeProc]) -> AsyncIterator[cn.Api]:
    async with cn.Api(cluster[0].http, cluster[0].ws) as a:
        yield a


async def user(api: cn.Api, device: str | None = None) -> tuple[str, cn.Login]:
    mobile = new_mobile()
    await api.signup("Client", mobile, "password123")
    return mobile, await api.login(mobile, "password123", device)


class Proxy:
    """TCP from a local port to a node's socket port; `cut()` drops every connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.StreamWriter] = set()
        self.refusing = False

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/ws"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.pipes |= {writer, up_w}

        async def copy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(copy(reader, up_w), copy(up_r, writer))
        self.pipes -= {writer, up_w}

    def cut(self) -> None:
        for w in list(self.pipes):
            w.transport.abort()
        self.pipes.clear()

    async def stop(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def proxy(cluster: tuple[NodeProc, NodeProc]) -> AsyncIterator[tuple[Proxy, str]]:
    p = Proxy(cluster[1].ws_port)
    url = await p.start()
    yield p, url
    await p.stop()


async def test_rest_calls_and_their_typed_errors(api: cn.Api) -> None:
    mobile, login = await user(api, device="laptop")
    assert login.device_id is not None and login.expires_in > 0
    with pytest.raises(cn.Conflict) as taken:
        await api.signup("Again", mobile, "password123")
    assert taken.value.status == 409
    with pytest.raises(cn.InvalidCredentials):
        await api.login(mobile, "wrong-password")
    devices = await api.devices(login.token)
    assert [d.name for d in devices] == ["laptop"]
    other, _ = await user(api)
    await api.block(login.token, other)
    assert await api.blocked(login.token) == [other]
    await api.unblock(login.token, other)
    assert await api.blocked(login.token) == []
    with pytest.raises(cn.NotFound):
        await api.unblock(login.token, other)
    seen = await api.last_seen(login.token, other)
    assert seen.mobile == other and seen.last_seen is None  # never connected
    await api.logout(login.token)
    with pytest.raises(cn.Unauthorized):
        await api.devices(login.token)


async def test_send_delivered_and_read_through_callbacks_and_events(
    api: cn.Api, cluster: tuple[NodeProc, NodeProc]
) -> None:
    alice, a_login = await user(api)
    bob, b_login = await user(api)
    got: list[cn.Message] = []

    async def on_message(m: cn.Message) -> None:
        got.append(m)

    async with (
        cn.Connection(cluster[0].ws, a_login.token) as a,
        cn.Connection(cluster[1].ws, b_login.token, on_message=on_message) as b,
    ):
        assert a.state is cn.State.LIVE and b.hello["mobileNo"] == bob
        delivered = asyncio.ensure_future(a.receipt_for("m-1", "delivered"))
        accepted = await a.send(bob, "hi bob", id="m-1")
        assert accepted.id == "m-1" and accepted.msg_id
        receipt = await delivered  # bob's handler returned, then the client acked
        assert receipt.by == bob and receipt.ids == ("m-1",)
        assert [(m.sender, m.body, m.id) for m in got] == [(alice, "hi bob", "m-1")]
        read = asyncio.ensure_future(a.receipt_for("m-1", "read"))
        await b.read(alice, ["m-1"])
        assert (await read).status == "read"
        with pytest.raises(cn.UnknownRecipient):
            await a.send(new_mobile(), "nobody there")
        await b.send(alice, "hi alice")
        bodies = []  # events(): alice has no callbacks: her receipts and messages, in order
        async with asyncio.timeout(10):
            async for event in a.events():
                if isinstance(event, cn.Message):
                    bodies.append(event.body)
                    break
        assert bodies == ["hi alice"]
        await api.block(b_login.token, alice)
        with pytest.raises(cn.Blocked) as blocked:
            await b.send(alice, "no")  # bob blocked alice: his sends to her are refused
        assert blocked.value.ref is not None


async def test_a_cut_socket_resends_unaccepted_sends_and_drops_redeliveries(
    api: cn.Api, cluster: tuple[NodeProc, NodeProc], proxy: tuple[Proxy, str]
) -> None:
    """Bob's socket goes through the proxy. Entries his handler did not finish come
    again and are handled once; sends queued while the socket was down go out after the
    reconnect with their ids, and each is stored once."""
    p, url = proxy
    alice, a_login = await user(api)
    bob, b_login = await user(api)
    seen: list[str] = []
    release = asyncio.Event()

    async def slow_handler(m: cn.Message) -> None:
        if m.body == "hold" and not release.is_set():
            raise RuntimeError("the app crashed mid-handler")  # not acked: comes again
        seen.append(m.body)

    states: list[cn.State] = []
    async with (
        cn.Connection(cluster[0].ws, a_login.token) as a,
        cn.Connection(
            url,
            b_login.token,
            on_message=slow_handler,
            on_state=lambda s: states.append(s.state),
            backoff_base_s=0.05,
            backoff_cap_s=0.5,
        ) as b,
    ):
        for body in ("one", "hold", "three"):
            await a.send(bob, body)
        async with asyncio.timeout(10):
            while seen != ["one", "three"]:
                await asyncio.sleep(0.05)
        p.refusing = True
        p.cut()  # bob is away; his sends wait in the outbox
        ids = [b.queue(alice, f"while away {i}") for i in range(5)]
        await asyncio.sleep(0.3)
        assert b.outbox == ids and b.state is cn.State.CONNECTING
        release.set()
        p.refusing = False
        results = [await b.accepted(i, timeout_s=15) for i in ids]
        assert len({r.msg_id for r in results}) == 5
        async with asyncio.timeout(15):
            while "hold" not in seen:
                await asyncio.sleep(0.05)
        await asyncio.sleep(2.5)  # past CHATNODE_REDELIVERY_S (2 s on the test nodes)
        assert seen == ["one", "three", "hold"]  # each once: dedupe by msgId
        assert b.connects >= 2 and cn.State.CONNECTING in states
        bodies, ids = [], []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):  # past a redelivery: nothing comes twice
                async for event in a.events():
                    if isinstance(event, cn.Message):
                        bodies.append(event.body)
                        ids.append(event.msg_id)
        assert bodies == [f"while away {i}" for i in range(5)]  # in order, once
        assert len(set(ids)) == 5


async def test_a_resend_after_the_socket_was_cut_before_accepted_is_stored_once(
    api: cn.Api, cluster: tuple[NodeProc, NodeProc], proxy: tuple[Proxy, str]
) -> None:
    p, url = proxy
    alice, a_login = await user(api)
    bob, b_login = await user(api)
    async with (
        cn.Connection(url, a_login.token, backoff_base_s=0.05, backoff_cap_s=0.5) as a,
        cn.Connection(cluster[0].ws, b_login.token) as b,
    ):
        cid = a.queue(bob, "maybe stored")
        await asyncio.sleep(0.02)  # written; the node may or may not have stored it
        p.cut()  # either way it goes again, with its id
        accepted = await a.accepted(cid, timeout_s=15)
        got: list[Any] = []
        async with asyncio.timeout(10):
            async for event in b.events():
                if isinstance(event, cn.Message):
                    got.append(event)
                    break
        assert got[0].msg_id == accepted.msg_id and got[0].sender == alice
        quiet: list[Any] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                async for event in b.events():
                    if isinstance(event, cn.Message):
                        quiet.append(event)
        assert quiet == []  # stored once


async def test_close_codes_that_end_a_connection(
    api: cn.Api, cluster: tuple[NodeProc, NodeProc]
) -> None:
    _, login = await user(api, device="phone")
    first = cn.Connection(cluster[0].ws, login.token)
    await first.start()
    async with cn.Connection(cluster[1].ws, login.token):
        async with asyncio.timeout(10):
            while first.state is not cn.State.CLOSED:
                await asyncio.sleep(0.05)
        assert isinstance(first.closed_by, cn.Replaced) and first.closed_by.close_code == 4001
        with pytest.raises(cn.Closed):
            first.queue("+15550000001", "closed for good")
    await first.close()
    second = cn.Connection(cluster[0].ws, login.token)
    await second.start()
    await api.logout(login.token)
    async with asyncio.timeout(10):
        while second.state is not cn.State.CLOSED:
            await asyncio.sleep(0.05)
    assert isinstance(second.closed_by, cn.LoggedOut) and second.closed_by.close_code == 4003
    refused = cn.Connection(cluster[0].ws, login.token)
    with pytest.raises(cn.LoggedOut) as why:
        await refused.start()  # the handshake answers 401: no reconnect loop
    assert why.value.status == 401
    await second.close()
    await refused.close()


def test_full_jitter_stays_within_its_cap() -> None:
    waits = [cn.backoff_s(a, 0.25, 15.0) for a in range(40) for _ in range(20)]
    assert all(0 <= w <= 15.0 for w in waits)
    assert max(cn.backoff_s(0, 0.25, 15.0) for _ in range(200)) <= 0.25
    assert max(waits) > 7.5  # it does grow toward the cap


async def test_close_waits_for_async_callbacks_then_cancels_the_late_ones(
    api: cn.Api, cluster: tuple[NodeProc, NodeProc], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An async callback nobody waits for (here on_state) is kept while it runs: close()
    lets the `closed` state's callback finish, and cancels one that outlives
    CALLBACK_DRAIN_S instead of leaving it behind."""
    monkeypatch.setattr(cn, "CALLBACK_DRAIN_S", 0.5)
    _, login = await user(api)
    seen: list[str] = []
    finished: list[str] = []
    cancelled: list[str] = []

    async def on_state(event: Any) -> None:
        state = event.state.value
        seen.append(state)
        try:
            await asyncio.sleep(0.2 if state == "closed" else 0)
            if state == "closed":
                finished.append(state)
        except asyncio.CancelledError:
            cancelled.append(state)
            raise

    conn = cn.Connection(cluster[0].ws, login.token, on_state=on_state)
    await conn.start()
    await conn.close()
    assert finished == ["closed"] and not conn._callbacks

    async def never_ends(event: Any) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(event.state.value)
            raise

    conn = cn.Connection(cluster[0].ws, login.token, on_state=never_ends)
    await conn.start()
    async with asyncio.timeout(5):  # 0.5 s to drain, then cancelled
        await conn.close()
    assert "closed" in cancelled and not conn._callbacks
