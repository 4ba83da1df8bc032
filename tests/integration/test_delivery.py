"""PROTOCOL.md guarantees 1-4 and 6, with sender and recipient on different nodes."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from chatnode import keys
from tests.integration.harness import Api, Client, NodeProc, connected, eventually, new_user

Cluster = tuple[NodeProc, NodeProc]


async def test_g1_accepted_means_stored_and_kept_until_acked(
    api_a: Api, cluster: Cluster, redis: aioredis.Redis
) -> None:
    """Guarantee 1: `accepted` only once the entry is in the recipient's inbox in Redis."""
    alice, bob = await new_user(api_a), await new_user(api_a)
    async with connected(cluster[0].ws, alice.token) as a:
        acc = await a.send_message(bob.mobile, "stored?", cid="g1")
        assert acc["type"] == "accepted" and acc["id"] == "g1"
        assert isinstance(acc["ts"], int) and isinstance(acc["msgId"], str)
        entries = await redis.xrange(keys.inbox(bob.mobile), acc["msgId"], acc["msgId"])
        assert len(entries) == 1 and entries[0][1]["b"] == "stored?"
    # Bob connects on the other node and does not ack: the entry stays.
    async with connected(cluster[1].ws, bob.token) as b:
        msg = await b.recv_type("message")
        assert msg == {
            "type": "message",
            "msgId": acc["msgId"],
            "id": "g1",
            "from": alice.mobile,
            "body": "stored?",
            "ts": acc["ts"],
        }
    assert await redis.xlen(keys.inbox(bob.mobile)) == 1
    async with connected(cluster[0].ws, bob.token) as b:
        again = await b.recv_type("message")
        assert again["msgId"] == acc["msgId"]  # again after every reconnect
        await b.send({"type": "ack", "msgIds": [acc["msgId"]]})
        await asyncio.sleep(0.3)
    assert (
        await eventually(lambda: redis.xlen(keys.inbox(bob.mobile)), 0) == 0
    )  # acked: XACK, then gone at the trim


async def test_g1_live_delivery_across_nodes(api_a: Api, cluster: Cluster) -> None:
    alice, bob = await new_user(api_a), await new_user(api_a)
    async with connected(cluster[0].ws, alice.token) as a, connected(cluster[1].ws, bob.token) as b:
        acc = await a.send_message(bob.mobile, "live")
        msg = await b.recv_type("message")
        assert (
            msg["msgId"] == acc["msgId"] and msg["from"] == alice.mobile and msg["body"] == "live"
        )


async def test_g2_redelivered_while_connected_if_not_acked(api_a: Api, cluster: Cluster) -> None:
    """Guarantee 2: an unacked entry comes again after CHATNODE_REDELIVERY_S (2 s here)."""
    alice, bob = await new_user(api_a), await new_user(api_a)
    async with connected(cluster[1].ws, bob.token) as b, connected(cluster[0].ws, alice.token) as a:
        acc = await a.send_message(bob.mobile, "are you there")
        first = await b.recv_type("message")
        second = await b.recv_type("message", timeout=8)
        assert first["msgId"] == second["msgId"] == acc["msgId"]
        await b.send({"type": "ack", "msgIds": [acc["msgId"]]})
        assert await b.quiet(4.5, "message") == []  # acked: no more redelivery


async def test_g2_same_id_is_accepted_again_and_stored_once(
    api_a: Api, cluster: Cluster, redis: aioredis.Redis
) -> None:
    alice, bob = await new_user(api_a), await new_user(api_a)
    async with connected(cluster[0].ws, alice.token) as a:
        first = await a.send_message(bob.mobile, "once", cid="dup-1")
    async with connected(cluster[1].ws, alice.token) as a:  # even from another node
        second = await a.send_message(bob.mobile, "once", cid="dup-1")
    assert first["type"] == second["type"] == "accepted"
    assert (first["msgId"], first["ts"]) == (second["msgId"], second["ts"])
    assert await redis.xlen(keys.inbox(bob.mobile)) == 1


async def test_g3_backlog_in_order_before_anything_newer(api_a: Api, cluster: Cluster) -> None:
    """Guarantee 3: on connect the whole backlog comes, in order, before newer entries."""
    alice, bob = await new_user(api_a), await new_user(api_a)
    async with connected(cluster[0].ws, alice.token) as a:
        backlog = [await a.send_message(bob.mobile, f"old {i}") for i in range(20)]
        b = await Client.connect(cluster[1].ws, bob.token)
        newer = [await a.send_message(bob.mobile, f"new {i}") for i in range(5)]
        got = [await b.recv_type("message") for _ in range(25)]
        await b.close()
    assert [m["msgId"] for m in got] == [m["msgId"] for m in backlog + newer]
    assert [m["body"] for m in got[:20]] == [f"old {i}" for i in range(20)]


async def test_g3_order_kept_live_across_nodes(api_a: Api, cluster: Cluster) -> None:
    alice, bob = await new_user(api_a), await new_user(api_a)
    async with connected(cluster[0].ws, alice.token) as a, connected(cluster[1].ws, bob.token) as b:
        sent = []
        for i in range(24):
            await a.send({"type": "send", "id": f"o{i}", "to": bob.mobile, "body": str(i)})
        for i in range(24):
            sent.append(await a.recv_type("accepted", id=f"o{i}"))
        got = [await b.recv_type("message") for _ in range(24)]
        await b.send({"type": "ack", "msgIds": [m["msgId"] for m in got]})
    assert [m["body"] for m in got] == [str(i) for i in range(24)]
    assert [m["msgId"] for m in got] == [m["msgId"] for m in sent]


async def test_g4_delivered_receipt_waits_for_offline_sender(api_a: Api, cluster: Cluster) -> None:
    """Guarantee 4: the ack puts a `delivered` receipt in the sender's inbox."""
    alice, bob = await new_user(api_a), await new_user(api_a)
    async with connected(cluster[0].ws, alice.token) as a:
        acc1 = await a.send_message(bob.mobile, "one", cid="r1")
        acc2 = await a.send_message(bob.mobile, "two", cid="r2")
    async with connected(cluster[1].ws, bob.token) as b:  # alice is offline now
        m1, m2 = await b.recv_type("message"), await b.recv_type("message")
        await b.send({"type": "ack", "msgIds": [m1["msgId"], m2["msgId"]]})
        await asyncio.sleep(0.3)
    assert {m1["msgId"], m2["msgId"]} == {acc1["msgId"], acc2["msgId"]}
    async with connected(cluster[1].ws, alice.token) as a:
        receipt = await a.recv_type("receipt")
        assert receipt["status"] == "delivered" and receipt["by"] == bob.mobile
        assert sorted(receipt["ids"]) == ["r1", "r2"]
        assert isinstance(receipt["ts"], int) and receipt["msgId"]
        await a.send({"type": "ack", "msgIds": [receipt["msgId"]]})


async def test_g4_read_receipt_live_across_nodes(api_a: Api, cluster: Cluster) -> None:
    alice, bob = await new_user(api_a), await new_user(api_a)
    async with connected(cluster[0].ws, alice.token) as a, connected(cluster[1].ws, bob.token) as b:
        await a.send_message(bob.mobile, "read me", cid="rd1")
        msg = await b.recv_type("message")
        await b.send({"type": "ack", "msgIds": [msg["msgId"]]})
        delivered = await a.recv_type("receipt", status="delivered")
        await b.send({"type": "read", "to": alice.mobile, "ids": ["rd1"]})
        read = await a.recv_type("receipt", status="read")
    assert delivered["ids"] == ["rd1"] and read["ids"] == ["rd1"] and read["by"] == bob.mobile


async def test_acking_unknown_or_foreign_ids_does_nothing(
    api_a: Api, cluster: Cluster, redis: aioredis.Redis
) -> None:
    alice, bob, eve = await new_user(api_a), await new_user(api_a), await new_user(api_a)
    async with connected(cluster[0].ws, alice.token) as a:
        acc = await a.send_message(bob.mobile, "for bob only")
    async with connected(cluster[1].ws, eve.token) as e:
        await e.send({"type": "ack", "msgIds": [acc["msgId"], "1-0"]})
        await asyncio.sleep(0.3)
    assert await redis.xlen(keys.inbox(bob.mobile)) == 1


async def test_typing_forwarded_not_stored(
    api_a: Api, cluster: Cluster, redis: aioredis.Redis
) -> None:
    alice, bob = await new_user(api_a), await new_user(api_a)
    async with connected(cluster[0].ws, alice.token) as a, connected(cluster[1].ws, bob.token) as b:
        # typing goes only where a route is: Bob's hello comes once his route is
        # claimed, so the first typing frame after it reaches him
        await a.send({"type": "typing", "to": bob.mobile, "state": "start"})
        assert await b.recv_type("typing") == {
            "type": "typing",
            "from": alice.mobile,
            "state": "start",
        }
        await a.send({"type": "typing", "to": bob.mobile, "state": "stop"})
        assert (await b.recv_type("typing"))["state"] == "stop"
    assert (
        await eventually(lambda: redis.xlen(keys.inbox(bob.mobile)), 0) == 0
    )  # acked: gone at the trim


async def test_g6_inbox_full_refuses_and_trims_nothing(
    api_a: Api, cluster: Cluster, redis: aioredis.Redis
) -> None:
    """Guarantee 6: past CHATNODE_INBOX_LIMIT (25 here) sends get `inbox_full`."""
    alice, bob = await new_user(api_a), await new_user(api_a)
    async with connected(cluster[0].ws, alice.token) as a:
        for i in range(25):
            assert (await a.send_message(bob.mobile, f"m{i}"))["type"] == "accepted"
        over = await a.send_message(bob.mobile, "one too many", cid="full1")
        assert over["type"] == "error" and over["code"] == "inbox_full" and over["ref"] == "full1"
        assert await redis.xlen(keys.inbox(bob.mobile)) == 25
        async with connected(cluster[1].ws, bob.token) as b:
            got = [await b.recv_type("message") for _ in range(25)]
            assert [m["body"] for m in got] == [f"m{i}" for i in range(25)]
            await b.send({"type": "ack", "msgIds": [m["msgId"] for m in got[:5]]})
            await asyncio.sleep(0.3)
        retry = await a.send_message(bob.mobile, "one too many", cid="full1")
        assert retry["type"] == "accepted"


async def test_ack_of_an_entry_delivered_on_an_earlier_connection_counts(
    api_a: Api, cluster: Cluster, redis: aioredis.Redis
) -> None:
    """A device that got M, lost its socket, and acks M first thing on its new socket:
    M leaves the inbox and the sender still gets its `delivered` receipt."""
    alice, bob = await new_user(api_a), await new_user(api_a)
    async with connected(cluster[0].ws, alice.token) as a:
        acc = await a.send_message(bob.mobile, "ack me later", cid="late1")
    async with connected(cluster[1].ws, bob.token) as b:
        assert (await b.recv_type("message"))["msgId"] == acc["msgId"]
    async with connected(cluster[0].ws, bob.token) as b:
        await b.send({"type": "ack", "msgIds": [acc["msgId"]]})  # before reading anything
        await asyncio.sleep(0.5)
    assert (
        await eventually(lambda: redis.xlen(keys.inbox(bob.mobile)), 0) == 0
    )  # acked: gone at the trim
    async with connected(cluster[1].ws, alice.token) as a:
        receipt = await a.recv_type("receipt")
    assert receipt["status"] == "delivered" and receipt["ids"] == ["late1"]


async def test_acks_sent_before_a_reconnects_catch_up_each_ack_once(
    api_a: Api, cluster: Cluster, redis: aioredis.Redis
) -> None:
    """Acks of entries an earlier socket got, sent first thing on the new socket (held
    until the claim, then racing the catch-up that sends the entries again): each entry
    is acked once, each message gets one delivered receipt, no ack is answered with an
    error, and the inbox empties. (tests/unit/test_core.py drives the slow lane's
    ordering of such acks step by step.)"""
    alice, bob = await new_user(api_a), await new_user(api_a)
    api_b = Api(api_a.session, cluster[1].http)
    acked_before = await acked_count(api_b)
    async with connected(cluster[0].ws, alice.token) as a:
        accepted = [await a.send_message(bob.mobile, f"m{i}", cid=f"c{i}") for i in range(4)]
    ids = [acc["msgId"] for acc in accepted]
    async with connected(cluster[1].ws, bob.token) as b:
        for msg_id in ids:
            assert (await b.recv_type("message"))["msgId"] == msg_id
    async with connected(cluster[1].ws, bob.token) as b:
        for msg_id in ids:  # before the hello is even read: held until the claim
            await b.send({"type": "ack", "msgIds": [msg_id]})
        errors = await b.quiet(1.5, "error")
        assert errors == []
    assert (
        await eventually(lambda: redis.xlen(keys.inbox(bob.mobile)), 0) == 0
    )  # acked: gone at the trim
    assert (await redis.xpending(keys.inbox(bob.mobile), keys.GROUP))["pending"] == 0
    assert await acked_count(api_b) - acked_before == 4  # each once, on bob's node
    async with connected(cluster[0].ws, alice.token) as a:
        receipts = []
        for _ in ids:
            receipt = await a.recv_type("receipt")
            receipts += receipt["ids"]
            await a.send({"type": "ack", "msgIds": [receipt["msgId"]]})
        assert sorted(receipts) == ["c0", "c1", "c2", "c3"]
        assert await a.quiet(1.0, "receipt") == []


async def acked_count(api: Api) -> float:
    """The node's chatnode_messages_acked counter (from /metrics)."""
    async with api.session.get(api.base + "/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("chatnode_messages_acked_total ")
    )
