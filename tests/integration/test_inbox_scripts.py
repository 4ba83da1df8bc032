"""The inbox and route scripts on a real Redis: push when live, catch-up, ack, refresh."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from chatnode import channel, frames, inbox, keys, lua, presence, slowpath
from chatnode.errors import Blocked, InboxFull, Unavailable
from chatnode.redisio import Batcher
from tests.integration.harness import Stack, new_mobile


@pytest.fixture
async def batcher(stack: Stack) -> AsyncIterator[Batcher]:
    b = Batcher(stack.redis_url)
    yield b
    await b.close()


def live_route(route: str, token: str) -> str:
    """A live route as GO_LIVE writes it: `node|session|token`."""
    return f"{route}|{token}"


async def go_live(batcher: Batcher, mobile: str, route: str, token: str, ttl: int) -> Any:
    reply = await batcher.script(lua.GO_LIVE, *inbox.go_live_call(mobile, "", route, token, ttl))
    return inbox.go_live_result(reply)


async def unlive(batcher: Batcher, mobile: str, route: str) -> Any:
    return await batcher.script(lua.UNLIVE, *inbox.unlive_call(mobile, "", route))


async def read_pending(batcher: Batcher, mobile: str, cursor: str) -> Any:
    return inbox.pending_entries(await batcher.run(*inbox.pending_call(mobile, "", cursor)))


async def user(redis: aioredis.Redis) -> str:
    """A user Redis knows (its account key and inbox group), with no route."""
    mobile = new_mobile()
    await redis.set(keys.account(mobile), "t")
    await redis.xgroup_create(keys.inbox(mobile), keys.GROUP, "0", mkstream=True)
    return mobile


WINDOW_S = 42  # the dedupe window these calls pass


async def send(batcher: Batcher, sender: str, to: str, cid: str, body: str = "hi") -> Any:
    frame = frames.Send(cid, to, body)
    call = inbox.message_call(sender, frame, 1, 100, WINDOW_S)
    return inbox.stored(await batcher.script(lua.SEND, *call))


async def subscribe(redis: aioredis.Redis, node: str, owner: str) -> Any:
    """Listen on `node`'s channel in `owner`'s partition, as that node does."""
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.ssubscribe(keys.user_channel(node, owner))
    return pubsub


async def next_message(pubsub: Any, timeout: float = 2.0) -> str | None:
    """The next published message, or None when none comes within `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (left := deadline - loop.time()) > 0:
        msg = await pubsub.get_message(timeout=left)  # None for the subscribe reply too
        if msg is not None:
            return str(msg["data"])
    return None


async def test_send_to_a_live_route_pushes_the_entry_and_records_it_as_pending(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    alice, bob = await user(redis), await user(redis)
    await redis.set(keys.route(bob), live_route("node-x|s1", "tok"))
    pubsub = await subscribe(redis, "node-x", bob)
    try:
        stored = await send(batcher, alice, bob, "c1", "hello | world")
        payload = await next_message(pubsub)
    finally:
        await pubsub.aclose()
    assert payload is not None
    push = channel.decode(payload)
    assert isinstance(push, channel.Push) and (push.owner, push.token) == (bob, "tok")
    entries = inbox.pushed_entries(push.entries) or []
    assert [e.msg_id for e in entries] == [stored.msg_id]
    assert orjson.loads(entries[0].frame)["body"] == "hello | world"
    assert (await redis.xpending(keys.inbox(bob), keys.GROUP))["pending"] == 1


async def test_send_to_a_route_that_is_catching_up_pushes_nothing(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    alice, bob = await user(redis), await user(redis)
    await redis.set(keys.route(bob), "node-y|s1")
    pubsub = await subscribe(redis, "node-y", bob)
    try:
        await send(batcher, alice, bob, "c1")
        assert await next_message(pubsub, timeout=0.3) is None
    finally:
        await pubsub.aclose()
    assert (await redis.xpending(keys.inbox(bob), keys.GROUP))["pending"] == 0
    assert await redis.xlen(keys.inbox(bob)) == 1


async def test_go_live_reads_what_is_new_then_turns_the_route_live(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    alice, bob = await user(redis), await user(redis)
    route = "node-z|s1"
    await redis.set(keys.route(bob), route, ex=60)
    first = await send(batcher, alice, bob, "c1")
    second = await send(batcher, alice, bob, "c2")
    got = await go_live(batcher, bob, route, "t1", 60)
    assert [e.msg_id for e in got] == [first.msg_id, second.msg_id]
    assert await redis.get(keys.route(bob)) == route  # not live while there was more
    assert await go_live(batcher, bob, route, "t1", 60) == "live"
    assert await redis.get(keys.route(bob)) == live_route(route, "t1")
    assert 0 < await redis.ttl(keys.route(bob)) <= 60  # KEEPTTL
    assert await unlive(batcher, bob, route) == 1
    assert await read_pending(batcher, bob, "0") != []
    assert await redis.get(keys.route(bob)) == route


async def test_go_live_is_refused_to_a_replaced_session_and_remakes_a_lost_route(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    bob = await user(redis)
    await redis.set(keys.route(bob), "node-b|newer")
    assert await go_live(batcher, bob, "node-a|older", "t", 60) == "gone"
    assert await unlive(batcher, bob, "node-a|older") == 1  # not ours: untouched
    assert await read_pending(batcher, bob, "0") == []
    assert await redis.get(keys.route(bob)) == "node-b|newer"
    await redis.delete(keys.route(bob))  # Redis lost it
    assert await go_live(batcher, bob, "node-a|older", "t", 60) == "live"
    assert await redis.get(keys.route(bob)) == "node-a|older|t"


async def test_pending_entries_come_back_until_acked_and_ack_removes_them(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    alice, bob = await user(redis), await user(redis)
    route = "node-p|s1"
    await redis.set(keys.route(bob), route, ex=60)
    stored = [await send(batcher, alice, bob, f"c{i}") for i in range(3)]
    await go_live(batcher, bob, route, "t", 60)  # reads all three
    pending = await read_pending(batcher, bob, "0")
    assert [e.msg_id for e in pending] == [s.msg_id for s in stored]
    after_first = await read_pending(batcher, bob, stored[0].msg_id)
    assert [e.msg_id for e in after_first] == [s.msg_id for s in stored[1:]]
    dedupe = [keys.dedupe(bob, alice, f"c{i}") for i in range(3)]
    acked = [(alice, "c0"), (alice, "c1")]
    await slowpath.ack(batcher, bob, [stored[0].msg_id, stored[1].msg_id], acked, WINDOW_S)
    assert await redis.xlen(keys.inbox(bob)) == 1
    assert [e.msg_id for e in await read_pending(batcher, bob, "0")] == [stored[2].msg_id]
    # the acked ones are remembered for the window only; the unacked one for long
    assert [0 < await redis.ttl(k) <= WINDOW_S for k in dedupe] == [True, True, False]
    assert await redis.ttl(dedupe[2]) > keys.DEDUPE_SAFETY_TTL_S - 60


async def test_a_repeated_send_id_is_stored_once_with_the_same_msgid(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    alice, bob = await user(redis), await user(redis)
    first = await send(batcher, alice, bob, "same")
    again = await send(batcher, alice, bob, "same")
    assert again == first
    assert await redis.xlen(keys.inbox(bob)) == 1


async def test_a_send_a_block_dropped_is_remembered_for_the_window_only(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    """It is never stored, so never acked: nothing else would shorten its key."""
    alice, bob = await user(redis), await user(redis)
    await redis.sadd(keys.blocks(bob), alice)  # bob blocked alice
    first = await send(batcher, alice, bob, "b-1")
    assert await send(batcher, alice, bob, "b-1") == first
    assert await redis.xlen(keys.inbox(bob)) == 0
    key = keys.dedupe(bob, alice, "b-1")
    assert str(await redis.get(key)).endswith("|b")
    assert 0 < await redis.ttl(key) <= WINDOW_S


async def test_an_ack_shortens_a_dedupe_key_never_lengthens_it(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    alice, bob = await user(redis), await user(redis)
    stored = await send(batcher, alice, bob, "c1")
    key = keys.dedupe(bob, alice, "c1")
    await slowpath.ack(batcher, bob, [stored.msg_id], [(alice, "c1")], 5)
    assert 0 < await redis.ttl(key) <= 5  # in the pipeline of the XDEL and XACK
    await slowpath.ack(batcher, bob, [stored.msg_id], [(alice, "c1")], WINDOW_S)  # again
    assert 0 < await redis.ttl(key) <= 5
    never = keys.dedupe(bob, alice, "never-sent")
    await slowpath.ack(batcher, bob, [stored.msg_id], [(alice, "never-sent")], 5)
    assert await redis.exists(never) == 0  # an ack makes no key
    assert await redis.xlen(keys.inbox(bob)) == 0


async def test_an_ack_whose_xdel_is_refused_fails(batcher: Batcher, redis: aioredis.Redis) -> None:
    """XDEL refused (here the inbox is no stream): the ack fails, so the caller keeps
    the entry to deliver again."""
    alice, bob = await user(redis), await user(redis)
    stored = await send(batcher, alice, bob, "c1")
    await redis.delete(keys.inbox(bob))
    await redis.set(keys.inbox(bob), "not a stream")
    with pytest.raises(Unavailable):
        await slowpath.ack(batcher, bob, [stored.msg_id], [(alice, "c1")], WINDOW_S)
    # the EXPIRE in the same pipeline went through: the documented cost (a resend after
    # the window would be stored again), in a case only a broken stream makes
    assert 0 < await redis.ttl(keys.dedupe(bob, alice, "c1")) <= WINDOW_S


# -- read receipts: the dedupe keys within the window, the unread counts past it


async def delivered(
    batcher: Batcher, redis: aioredis.Redis, sender: str, to: str, n: int
) -> list[str]:
    """`n` messages from `sender` (client ids r0, r1, ...) stored for `to` and read for
    delivery (pending in the group); their msgIds."""
    route = f"node-d|{new_mobile()}"
    await redis.set(keys.route(to), route, ex=60)
    stored = [await send(batcher, sender, to, f"r{i}") for i in range(n)]
    assert await go_live(batcher, to, route, "t", 60) != "live"  # it read them
    return [s.msg_id for s in stored]


async def ack(
    batcher: Batcher, reader: str, sender: str, msg_ids: list[str], cids: list[str]
) -> None:
    await slowpath.ack(batcher, reader, msg_ids, [(sender, c) for c in cids], WINDOW_S)


async def read(
    batcher: Batcher, reader: str, sender: str, ids: list[str], held: set[str] | None = None
) -> tuple[int, int, list[str], int]:
    call = inbox.read_call(reader, "", sender, ids, held or set())
    reply = await batcher.script(lua.READ, *call)
    return inbox.read_result(ids, reply)


async def unread(batcher: Batcher, reader: str, sender: str, ids: list[str], took: int) -> Any:
    call = inbox.unread_call(reader, sender, ids, took)
    return await batcher.script(lua.UNREAD, *call)


async def count(redis: aioredis.Redis, reader: str, sender: str) -> int:
    return int(await redis.hget(keys.unread(reader), sender) or 0)


async def test_a_send_counts_each_message_once(batcher: Batcher, redis: aioredis.Redis) -> None:
    """One count per message stored, per sender: not a resend, not a blocked send, not
    an ack; the counts live 30 days from the last."""
    alice, carol, bob = await user(redis), await user(redis), await user(redis)
    from_alice = await delivered(batcher, redis, alice, bob, 3)
    await delivered(batcher, redis, carol, bob, 1)
    assert await redis.hgetall(keys.unread(bob)) == {alice: "3", carol: "1"}
    assert await redis.ttl(keys.unread(bob)) > keys.DEDUPE_SAFETY_TTL_S - 60
    await send(batcher, alice, bob, "r0")  # a resend
    await ack(batcher, bob, alice, from_alice, ["r0", "r1", "r2"])
    await ack(batcher, bob, alice, from_alice, ["r0", "r1", "r2"])  # from another socket
    assert await count(redis, bob, alice) == 3
    await redis.sadd(keys.blocks(bob), alice)  # bob blocked alice
    await send(batcher, alice, bob, "b0")
    assert await count(redis, bob, alice) == 3
    await redis.srem(keys.blocks(bob), alice)
    await redis.sadd(keys.blocks(bob), keys.blocked_marker(alice))  # alice blocked bob
    with pytest.raises(Blocked):
        await send(batcher, alice, bob, "b1")
    assert await count(redis, bob, alice) == 3
    await redis.srem(keys.blocks(bob), keys.blocked_marker(alice))
    assert await redis.xlen(keys.inbox(bob)) == 1  # carol's, not acked
    assert (await redis.xpending(keys.inbox(bob), keys.GROUP))["pending"] == 1
    for cid in ("r0", "r1", "r2"):
        key = keys.dedupe(bob, alice, cid)
        assert not str(await redis.get(key)).endswith("|r")
        assert 0 < await redis.ttl(key) <= WINDOW_S


async def test_past_the_window_a_read_rests_on_the_count_and_unread_gives_it_back(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    alice, bob = await user(redis), await user(redis)
    msg_ids = await delivered(batcher, redis, alice, bob, 3)
    await ack(batcher, bob, alice, msg_ids, ["r0", "r1", "r2"])
    await redis.delete(*[keys.dedupe(bob, alice, f"r{i}") for i in range(3)])  # the window
    assert await read(batcher, bob, alice, ["r0"]) == (0, 0, ["r0"], 1)
    assert await count(redis, bob, alice) == 2
    # the receipt could not be stored: the count is given back, and the next read counts
    assert await unread(batcher, bob, alice, ["r0"], 1) == 1
    assert await count(redis, bob, alice) == 3
    assert await redis.ttl(keys.unread(bob)) > keys.DEDUPE_SAFETY_TTL_S - 60
    assert await read(batcher, bob, alice, ["r0", "r1", "r2", "zz"]) == (
        1,
        0,
        ["r0", "r1", "r2"],
        3,
    )
    assert await redis.hexists(keys.unread(bob), alice) == 0  # spent: the field goes
    assert await read(batcher, bob, alice, ["r1"]) == (1, 0, [], 0)
    # from a sender it has nothing unread from, a reader gets nothing on trust
    assert await read(batcher, bob, await user(redis), ["r0"]) == (1, 0, [], 0)


async def test_a_read_takes_its_message_from_the_count_acked_or_not(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    """Read while out on the socket (before its ack) or after its ack within the
    window: the count goes down with the read, so it leaves none behind, and once the
    keys are gone a second read of the ids is dropped."""
    alice, bob = await user(redis), await user(redis)
    msg_ids = await delivered(batcher, redis, alice, bob, 2)
    assert await read(batcher, bob, alice, ["r0"], {"r0"}) == (0, 0, ["r0"], 1)  # while out
    await ack(batcher, bob, alice, msg_ids, ["r0", "r1"])
    assert await count(redis, bob, alice) == 1  # r1's
    assert await read(batcher, bob, alice, ["r0"]) == (0, 0, [], 0)  # read already
    await unread(batcher, bob, alice, ["r0"], 1)  # its receipt failed: r0 is unread again
    assert await count(redis, bob, alice) == 2
    assert not str(await redis.get(keys.dedupe(bob, alice, "r0"))).endswith("|r")
    assert 0 < await redis.ttl(keys.dedupe(bob, alice, "r0")) <= WINDOW_S
    assert await read(batcher, bob, alice, ["r0", "r1"]) == (0, 0, ["r0", "r1"], 2)
    assert await redis.exists(keys.unread(bob)) == 0
    await redis.delete(keys.dedupe(bob, alice, "r0"), keys.dedupe(bob, alice, "r1"))
    assert await read(batcher, bob, alice, ["r0"]) == (1, 0, [], 0)


async def test_a_full_inbox_counts_nothing(batcher: Batcher, redis: aioredis.Redis) -> None:
    alice, bob = await user(redis), await user(redis)
    for i in range(100):  # the limit `send` passes
        await redis.xadd(keys.inbox(bob), {"k": "r", "i": str(i)})
    with pytest.raises(InboxFull):
        await send(batcher, alice, bob, "f0")
    assert await count(redis, bob, alice) == 0


async def test_a_read_names_an_undelivered_id_after_a_delivered_one(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    """Each id's flag (out on the socket or not) goes with that id: an undelivered id
    before one that is out is still refused."""
    alice, bob = await user(redis), await user(redis)
    await delivered(batcher, redis, alice, bob, 1)  # r0, out
    await send(batcher, alice, bob, "u0")  # not delivered
    assert await read(batcher, bob, alice, ["u0", "r0"], {"r0"}) == (0, 1, ["r0"], 1)


async def test_nothing_is_taken_on_trust_for_a_message_not_delivered_yet(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    """The count holds messages stored and not delivered too; an id with no record must
    not stand for one of them: a reader cannot get a read receipt before delivery by
    naming a made-up id. Once delivered, the count vouches for one (the known limit)."""
    alice, carol, bob = await user(redis), await user(redis), await user(redis)
    await delivered(batcher, redis, carol, bob, 1)  # the group exists
    await send(batcher, alice, bob, "u0")
    assert await count(redis, bob, alice) == 1
    assert await read(batcher, bob, alice, ["made-up"]) == (1, 0, [], 0)
    assert await count(redis, bob, alice) == 1
    route = await redis.get(keys.route(bob))
    assert await go_live(batcher, bob, route, "t2", 60) != "live"  # u0 read: delivered
    assert await read(batcher, bob, alice, ["made-up"]) == (0, 0, ["made-up"], 1)


async def test_with_many_entries_waiting_nothing_is_taken_on_trust(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    """More than lua.TRUST_SCAN entries after the group's last delivered id: READ does
    not look through them all, and takes nothing on trust."""
    alice, bob = await user(redis), await user(redis)
    msg_ids = await delivered(batcher, redis, alice, bob, 1)
    await ack(batcher, bob, alice, msg_ids, ["r0"])
    await redis.delete(keys.dedupe(bob, alice, "r0"))  # past the window
    for i in range(lua.TRUST_SCAN + 1):
        await redis.xadd(keys.inbox(bob), {"k": "r", "i": str(i)})
    assert await read(batcher, bob, alice, ["r0"]) == (1, 0, [], 0)
    await redis.xtrim(keys.inbox(bob), maxlen=lua.TRUST_SCAN, approximate=False)
    assert await read(batcher, bob, alice, ["r0"]) == (0, 0, ["r0"], 1)


async def test_the_count_stops_at_its_cap(batcher: Batcher, redis: aioredis.Redis) -> None:
    alice, bob = await user(redis), await user(redis)
    await redis.hset(keys.unread(bob), alice, inbox.UNREAD_MAX - 1)
    await delivered(batcher, redis, alice, bob, 2)
    assert await count(redis, bob, alice) == inbox.UNREAD_MAX
    await redis.delete(keys.dedupe(bob, alice, "r0"))
    await read(batcher, bob, alice, ["r0"])
    await unread(batcher, bob, alice, ["r0"], 5)
    assert await count(redis, bob, alice) == inbox.UNREAD_MAX


async def test_refresh_keeps_a_live_token_and_tells_replaced_from_lost(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    bob = await user(redis)
    mine = "node-r|s1"
    await redis.set(keys.route(bob), live_route(mine, "tok"), ex=5)
    assert (await presence.refresh(batcher, bob, "", mine, 60, 1))[0] == 1
    assert await redis.get(keys.route(bob)) == live_route(mine, "tok")
    assert await redis.ttl(keys.route(bob)) > 5
    await redis.delete(keys.route(bob))
    assert (await presence.refresh(batcher, bob, "", mine, 60, 2))[0] == 2
    assert await redis.get(keys.route(bob)) == mine  # back, catching up
    await redis.set(keys.route(bob), "node-r|s2")
    assert (await presence.refresh(batcher, bob, "", mine, 60, 3))[0] == 0
    assert await redis.get(keys.route(bob)) == "node-r|s2"


# -- devices (lua.ACK_DEVICE, ADD_DEVICE, CLAIM's check)


async def two_devices_and_a_message(batcher: Batcher, redis: aioredis.Redis) -> Any:
    """Bob with the default device and device 7, and a message from Alice stored for him:
    (bob, stored)."""
    alice, bob = await user(redis), await user(redis)
    await redis.set(keys.account(bob), keys.account_value(["", "7"]))
    await redis.xgroup_create(keys.inbox(bob), keys.group("7"), "0")
    return bob, await send(batcher, alice, bob, "c0")


async def ack_as(batcher: Batcher, owner: str, device: str, msg_id: str) -> Any:
    """`device`'s ack of one entry (lua.ACK_DEVICE): how many entries it deleted."""
    return await batcher.script(lua.ACK_DEVICE, *inbox.ack_device_call(owner, device, [msg_id]))


async def test_an_entry_leaves_once_every_listed_device_is_done_with_it(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    bob, stored = await two_devices_and_a_message(batcher, redis)
    for device in ("", "7"):  # each device reads it through its own group
        await batcher.run(*inbox.pending_call(bob, device, ">"))
    assert await ack_as(batcher, bob, "", stored.msg_id) == 0  # device 7 still holds it
    first = inbox.first_acks_call(bob, "7", [stored.msg_id])
    assert await batcher.script(lua.FIRST_ACKS, *first) == []  # the default acked it first
    assert await ack_as(batcher, bob, "7", stored.msg_id) == 1
    assert await redis.xlen(keys.inbox(bob)) == 0


async def test_an_entry_not_yet_read_by_a_device_waits_for_it(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    bob, stored = await two_devices_and_a_message(batcher, redis)
    await batcher.run(*inbox.pending_call(bob, "", ">"))  # only the default device read it
    assert await ack_as(batcher, bob, "", stored.msg_id) == 0
    assert await redis.xlen(keys.inbox(bob)) == 1


async def test_an_ack_after_a_device_was_linked_keeps_what_the_new_device_needs(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    """The only device's ack deletes at once; once a second device is linked (in Redis,
    whatever the acking session has heard), the same ack leaves the entries it has not
    read: the list is read by the script that deletes."""
    alice, bob = await user(redis), await user(redis)
    await redis.set(keys.account(bob), keys.account_value([""]))
    first, second = await send(batcher, alice, bob, "c1"), await send(batcher, alice, bob, "c2")
    await batcher.run(*inbox.pending_call(bob, "", ">"))  # the default device read both
    assert await ack_as(batcher, bob, "", first.msg_id) == 1  # alone: deleted at once
    args = [keys.account(bob), keys.inbox(bob), keys.loading(bob)]
    assert await batcher.script(lua.ADD_DEVICE, args, ["7", keys.group("7"), bob]) == 2
    assert await ack_as(batcher, bob, "", second.msg_id) == 0  # device 7 has not read it
    entries = await batcher.run(*inbox.pending_call(bob, "7", ">"))
    assert [e[0] for e in entries[0][1]] == [second.msg_id]  # the new device gets it


@pytest.mark.parametrize(
    ("listed", "acker", "deleted"),
    [
        (None, "", 1),  # a value from before devices: the default device alone
        (None, "7", 0),  # ... so device 7 is not alone: the default has not read it
        (["7"], "7", 1),  # a named device alone
        (["7"], "", 0),  # a device the list lacks is not alone
        (["", "7"], "7", 0),
        ([""], "0", 0),  # '0' names the default device in the value, never a device key
    ],
)
async def test_an_ack_deletes_at_once_only_when_the_acking_device_is_the_only_one_listed(
    batcher: Batcher, redis: aioredis.Redis, listed: list[str] | None, acker: str, deleted: int
) -> None:
    """ACK_DEVICE's first test (the only device: XDEL with no look at the groups) against
    each form of the account value."""
    alice, bob = await user(redis), await user(redis)  # bob's value: a name (no list)
    if listed is not None:
        await redis.set(keys.account(bob), keys.account_value(listed))
    for device in {"7", acker} - {""}:
        await redis.xgroup_create(keys.inbox(bob), keys.group(device), "0", mkstream=True)
    stored = await send(batcher, alice, bob, "c9")
    await batcher.run(*inbox.pending_call(bob, acker, ">"))
    assert await ack_as(batcher, bob, acker, stored.msg_id) == deleted
    assert await redis.xlen(keys.inbox(bob)) == 1 - deleted


async def test_adding_a_device_to_a_value_from_before_devices_drops_it_for_a_reload(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    bob = await user(redis)  # its account value is a name, as before devices
    args = [keys.account(bob), keys.inbox(bob), keys.loading(bob)]
    assert await batcher.script(lua.ADD_DEVICE, args, ["7", keys.group("7"), bob]) == -1
    assert await redis.exists(keys.account(bob)) == 0  # the next send reloads it
    await redis.set(keys.account(bob), keys.account_value([""]))
    assert await batcher.script(lua.ADD_DEVICE, args, ["7", keys.group("7"), bob]) == 2
    assert keys.device_keys(await redis.get(keys.account(bob))) == ["", "7"]


async def test_a_claim_of_a_device_the_list_lacks_is_refused(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    bob = await user(redis)
    await redis.set(keys.account(bob), keys.account_value([""]))
    claim = lua.claim_call(bob, "9", "n1|s1", 60, 1)  # device 9 was removed
    assert await batcher.script(lua.CLAIM, *claim) == ["removed"]
    assert await redis.exists(keys.route(bob, "9")) == 0
    old, value = await batcher.script(lua.CLAIM, *lua.claim_call(bob, "", "n1|s2", 60, 1))
    assert old is None and keys.device_keys(value) == [""]
    assert await presence.refresh(batcher, bob, "", "n1|s2", 60, 2) == [1, 1]
    await redis.set(keys.account(bob), keys.account_value(["7"]))  # the default device went
    assert await presence.refresh(batcher, bob, "", "n1|s2", 60, 3) == [3, 1]


# -- plain acks and TRIM: what a one-device session acks leaves at the next trim


async def trim(batcher: Batcher, owner: str, *acked: str) -> Any:
    """lua.TRIM of the ids `acked` (and the head): how many entries went."""
    return await batcher.script(lua.TRIM, [keys.inbox(owner), keys.account(owner)], list(acked))


async def plain_ack(batcher: Batcher, owner: str, device: str, *msg_ids: str) -> Any:
    """A one-device session's ack (core.acks): XACK alone."""
    return await batcher.run("XACK", keys.inbox(owner), keys.group(device), *msg_ids)


async def test_trim_deletes_the_prefix_every_group_is_done_with(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    """Before the first entry a group still needs: its first pending one, or the one
    after its last-delivered id. An acked entry behind a pending one waits for it."""
    alice, bob = await user(redis), await user(redis)
    ids = [(await send(batcher, alice, bob, f"t{i}")).msg_id for i in range(5)]
    assert await trim(batcher, bob) == 0  # delivered to no one yet
    await batcher.run(*inbox.pending_call(bob, "", ">"))
    await plain_ack(batcher, bob, "", ids[0], ids[1], ids[3])
    assert await trim(batcher, bob) == 2
    assert [e[0] for e in await redis.xrange(keys.inbox(bob))] == ids[2:]
    await plain_ack(batcher, bob, "", ids[2])
    assert await trim(batcher, bob) == 2  # ids[3] too, acked earlier
    assert [e[0] for e in await redis.xrange(keys.inbox(bob))] == ids[4:]
    await redis.xgroup_create(keys.inbox(bob), keys.group("7"), "0")  # a device linked now
    await redis.set(keys.account(bob), keys.account_value(["", "7"]))
    await plain_ack(batcher, bob, "", ids[4])
    assert await trim(batcher, bob) == 0  # group 7 has not read it
    await batcher.run(*inbox.pending_call(bob, "7", ">"))
    assert await trim(batcher, bob) == 0  # pending in group 7
    await plain_ack(batcher, bob, "7", ids[4])
    assert await trim(batcher, bob) == 1
    assert await redis.xlen(keys.inbox(bob)) == 0
    await redis.delete(keys.inbox(bob))
    await redis.xadd(keys.inbox(bob), {"k": "r"})
    assert await trim(batcher, bob, "1-1") == 0  # no group: nothing is known to be done
    await redis.delete(keys.account(bob))
    assert await trim(batcher, bob, "1-1") == 0  # nor without the account
    await redis.delete(keys.inbox(bob))
    assert await trim(batcher, bob) == 0  # no stream


async def test_a_plain_ack_after_a_device_was_linked_keeps_what_the_new_device_needs(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    """A session that still believes it is the only device acks with XACK alone; the
    trim reads the groups in the same script that deletes, so what the new device has
    not read stays, whatever the acking session has heard."""
    alice, bob = await user(redis), await user(redis)
    await redis.set(keys.account(bob), keys.account_value([""]))
    first, second = await send(batcher, alice, bob, "c1"), await send(batcher, alice, bob, "c2")
    await batcher.run(*inbox.pending_call(bob, "", ">"))  # the default device read both
    await plain_ack(batcher, bob, "", first.msg_id)
    assert await trim(batcher, bob) == 1
    args = [keys.account(bob), keys.inbox(bob), keys.loading(bob)]
    assert await batcher.script(lua.ADD_DEVICE, args, ["7", keys.group("7"), bob]) == 2
    await plain_ack(batcher, bob, "", second.msg_id)  # it has not heard of device 7
    assert await trim(batcher, bob) == 0
    entries = await batcher.run(*inbox.pending_call(bob, "7", ">"))
    assert [e[0] for e in entries[0][1]] == [second.msg_id]  # the new device gets it
    assert await ack_as(batcher, bob, "7", second.msg_id) == 1  # done by both: it goes


async def test_a_full_inbox_first_trims_what_is_acked(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    """Entries acked and not yet trimmed do not count against the inbox limit: a send
    or a receipt that finds the inbox full trims first."""
    alice, bob = await user(redis), await user(redis)
    for i in range(100):  # the limit `send` passes
        await redis.xadd(keys.inbox(bob), {"k": "r", "i": str(i)})
    entries = await batcher.run(*inbox.pending_call(bob, "", ">"))
    ids = [e[0] for e in entries[0][1]]
    with pytest.raises(InboxFull):
        await send(batcher, alice, bob, "f0")
    await plain_ack(batcher, bob, "", ids[1])  # behind ids[0], still pending: not the head
    with pytest.raises(InboxFull):
        await send(batcher, alice, bob, "f1")
    await plain_ack(batcher, bob, "", ids[0])
    stored = await send(batcher, alice, bob, "f1")  # room: the acked head (2) went
    assert stored is not None and await redis.xlen(keys.inbox(bob)) == 99
    read_receipt = inbox.Receipt(bob, alice, "read", ["x"], 1)
    assert await batcher.script(lua.RECEIPT, *read_receipt.call(100)) == ["ok"]
    reply = await batcher.script(lua.RECEIPT, *read_receipt.call(100))
    assert reply == ["full"]  # nothing acked to trim
    await plain_ack(batcher, bob, "", ids[2])
    assert await batcher.script(lua.RECEIPT, *read_receipt.call(100)) == ["ok"]
    assert await redis.xlen(keys.inbox(bob)) == 100
    assert await redis.xrange(keys.inbox(bob), count=1) == await redis.xrange(
        keys.inbox(bob), ids[3], ids[3]
    )  # what is left starts at the first entry still pending


async def test_a_read_of_an_acked_message_not_yet_trimmed_gets_its_receipt(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    alice, bob = await user(redis), await user(redis)
    msg_ids = await delivered(batcher, redis, alice, bob, 2)
    await plain_ack(batcher, bob, "", msg_ids[0])  # still in the stream: acked by the group
    assert await read(batcher, bob, alice, ["r0"]) == (0, 0, ["r0"], 1)
    assert await trim(batcher, bob, msg_ids[0]) == 1
    assert await redis.xlen(keys.inbox(bob)) == 1
    assert await read(batcher, bob, alice, ["r1"]) == (0, 0, ["r1"], 1)  # pending


async def test_an_ack_of_an_id_acked_already_finds_nothing_to_ack_again(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    """slowpath.fetch (the ids a socket did not deliver itself) gives only entries
    pending in the device's group: not one acked and not yet trimmed (its ack again
    would store a second `delivered`), nor one never delivered to the device."""
    alice, bob = await user(redis), await user(redis)
    msg_ids = await delivered(batcher, redis, alice, bob, 2)
    await plain_ack(batcher, bob, "", msg_ids[0])
    assert [e.msg_id for e in await slowpath.fetch(batcher, bob, msg_ids)] == [msg_ids[1]]
    later = await send(batcher, alice, bob, "r9")  # stored, not read for delivery
    assert await slowpath.fetch(batcher, bob, [later.msg_id]) == []
    assert await slowpath.fetch(batcher, bob, msg_ids, "7") == []  # no such group
    assert await slowpath.fetch(batcher, new_mobile(), ["1-0"]) == []  # no such stream


async def test_trim_deletes_the_acked_ids_it_is_given_behind_a_pending_entry(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    """The ids a session acked go even behind an entry still pending (acked out of
    order), once every group is done with them; an id a group has not read, or holds
    pending, stays."""
    alice, bob = await user(redis), await user(redis)
    ids = [(await send(batcher, alice, bob, f"o{i}")).msg_id for i in range(4)]
    await batcher.run(*inbox.pending_call(bob, "", ">"))
    await plain_ack(batcher, bob, "", ids[1], ids[2])
    await redis.set(keys.account(bob), keys.account_value(["", "7"]))  # a device linked
    assert await trim(batcher, bob, ids[1], ids[2]) == 0  # 7 has no group yet: it needs all
    await redis.xgroup_create(keys.inbox(bob), keys.group("7"), "0")
    assert await trim(batcher, bob, ids[1], ids[2]) == 0
    await batcher.run(*inbox.pending_call(bob, "7", ">"))  # device 7 read them all
    await plain_ack(batcher, bob, "7", ids[0], ids[2], ids[3])
    assert await trim(batcher, bob, ids[2], ids[1]) == 1  # 7 holds ids[1] (any order)
    assert [e[0] for e in await redis.xrange(keys.inbox(bob))] == [ids[0], ids[1], ids[3]]
    await redis.set(keys.account(bob), keys.account_value([""]))  # 7 removed
    await plain_ack(batcher, bob, "", ids[0])
    assert await trim(batcher, bob, ids[0]) == 2  # and ids[1], at the head now
    assert [e[0] for e in await redis.xrange(keys.inbox(bob))] == [ids[3]]  # still pending


async def test_a_group_no_listed_device_owns_holds_nothing_back(
    batcher: Batcher, redis: aioredis.Redis
) -> None:
    """A group left by a device the account no longer lists (its removal raced) does not
    keep acked entries in the inbox, nor fill it: as lua.ACK_DEVICE, only the listed
    devices count."""
    alice, bob = await user(redis), await user(redis)
    await redis.xgroup_create(keys.inbox(bob), keys.group("9"), "0")  # listed nowhere
    ids = [(await send(batcher, alice, bob, f"n{i}")).msg_id for i in range(3)]
    await batcher.run(*inbox.pending_call(bob, "", ">"))
    await plain_ack(batcher, bob, "", ids[1])
    assert await trim(batcher, bob, ids[1]) == 1
    await plain_ack(batcher, bob, "", ids[0])
    assert await trim(batcher, bob) == 1  # the head
    await redis.delete(keys.account(bob))  # unknown to Redis: every group counts
    await plain_ack(batcher, bob, "", ids[2])
    assert await trim(batcher, bob, ids[2]) == 0
