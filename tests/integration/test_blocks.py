"""Guarantee 5: blocks, with PostgreSQL as truth and Redis refilled when it lost its copy."""

from __future__ import annotations

import redis.asyncio as aioredis

from chatnode import keys
from tests.integration.harness import Api, NodeProc, User, connected, new_user

Cluster = tuple[NodeProc, NodeProc]


async def block(api: Api, who: User, target: User) -> None:
    status, body, _ = await api.call(
        "POST", "/block-action/block", {"blockedUserMobileNo": target.mobile}, who.token
    )
    assert status == 200, body


async def test_blocked_sender_is_accepted_but_never_delivered(
    api_a: Api, api_b: Api, cluster: Cluster, redis: aioredis.Redis
) -> None:
    """N blocked you: your send is accepted and never delivered; no receipt, no typing."""
    you, n = await new_user(api_a), await new_user(api_a)
    await block(api_b, n, you)
    async with connected(cluster[0].ws, you.token) as y, connected(cluster[1].ws, n.token) as nc:
        acc = await y.send_message(n.mobile, "can you hear me", cid="blk1")
        assert acc["type"] == "accepted" and acc["msgId"]
        again = await y.send_message(n.mobile, "can you hear me", cid="blk1")
        assert again["msgId"] == acc["msgId"]  # still idempotent
        await y.send({"type": "typing", "to": n.mobile, "state": "start"})
        await nc.send({"type": "typing", "to": you.mobile, "state": "start"})
        await nc.send({"type": "read", "to": you.mobile, "ids": ["blk1"]})
        assert await nc.quiet(1.0) == []
        assert await y.quiet(0.5, "typing") == [] and await y.quiet(0.2, "receipt") == []
    assert await redis.xlen(keys.inbox(n.mobile)) == 0


async def test_blocker_send_is_refused_until_unblock(api_a: Api, cluster: Cluster) -> None:
    """N's own send to you is refused with `blocked` until N unblocks you."""
    you, n = await new_user(api_a), await new_user(api_a)
    await block(api_a, n, you)
    async with connected(cluster[1].ws, n.token) as nc:
        refused = await nc.send_message(you.mobile, "hi", cid="b2")
        assert (
            refused["type"] == "error" and refused["code"] == "blocked" and refused["ref"] == "b2"
        )
        status, _, _ = await api_a.call(
            "DELETE", "/block-action/unblock", token=n.token, params={"mobileNo": you.mobile}
        )
        assert status == 200
        assert (await nc.send_message(you.mobile, "hi", cid="b3"))["type"] == "accepted"
    async with connected(cluster[0].ws, you.token) as y:
        assert (await y.recv_type("message"))["id"] == "b3"


async def test_lastseen_hidden_from_blocked_user(api_a: Api, cluster: Cluster) -> None:
    you, n, third = await new_user(api_a), await new_user(api_a), await new_user(api_a)
    async with connected(cluster[0].ws, n.token):
        await block(api_a, n, you)
        status, body, _ = await api_a.call(
            "GET", "/profile/lastseen", token=you.token, params={"mobileNo": n.mobile}
        )
        assert status == 200 and "lastSeen" not in body["data"]
        status, body, _ = await api_a.call(
            "GET", "/profile/lastseen", token=third.token, params={"mobileNo": n.mobile}
        )
        assert body["data"]["lastSeen"] == "online"


async def test_redis_that_lost_its_copy_is_refilled_before_judging(
    api_a: Api, cluster: Cluster, redis: aioredis.Redis
) -> None:
    """Redis without the user's keys: blocks and the account come back from PostgreSQL."""
    you, n = await new_user(api_a), await new_user(api_a)
    await block(api_a, n, you)
    for user in (you, n):
        await redis.delete(keys.account(user.mobile), keys.blocks(user.mobile))
    async with connected(cluster[0].ws, you.token) as y:
        acc = await y.send_message(n.mobile, "still blocked?")
        assert acc["type"] == "accepted"
    assert await redis.xlen(keys.inbox(n.mobile)) == 0  # block held
    assert await redis.exists(keys.account(n.mobile)) == 1
    async with connected(cluster[1].ws, n.token) as nc:
        refused = await nc.send_message(you.mobile, "hi")
        assert refused["type"] == "error" and refused["code"] == "blocked"


async def test_unblock_retry_lifts_a_redis_copy_left_behind(
    api_a: Api, cluster: Cluster, redis: aioredis.Redis
) -> None:
    """An unblock whose Redis step failed (the copy is still there) is retried by the
    client: 404, since PostgreSQL has no block left, but the Redis copy is lifted."""
    you, n = await new_user(api_a), await new_user(api_a)
    await block(api_a, n, you)
    params = {"mobileNo": you.mobile}
    assert (await api_a.call("DELETE", "/block-action/unblock", token=n.token, params=params))[
        0
    ] == 200
    await redis.sadd(keys.blocks(n.mobile), you.mobile)  # as if the SREM had failed
    await redis.sadd(keys.blocks(you.mobile), keys.blocked_marker(n.mobile))
    assert (await api_a.call("DELETE", "/block-action/unblock", token=n.token, params=params))[
        0
    ] == 404
    async with connected(cluster[1].ws, n.token) as nc:
        assert (await nc.send_message(you.mobile, "free again"))["type"] == "accepted"
