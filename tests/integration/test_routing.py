"""chatnode.routing on a real Redis: this node's channel, through a lost connection."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from chatnode.routing import Subscriber
from tests.integration.harness import Stack, new_mobile


async def test_subscriber_hears_its_channel_and_tells_of_a_loss_and_a_return(
    stack: Stack, redis: aioredis.Redis
) -> None:
    channel = "test:channel:" + new_mobile()
    got: asyncio.Queue[str] = asyncio.Queue()
    changes: list[bool] = []
    sub = Subscriber(
        stack.redis_url, [channel], got.put_nowait, lambda: changes.append(sub.connected.is_set())
    )
    task = asyncio.create_task(sub.run())
    try:
        async with asyncio.timeout(5):
            await sub.connected.wait()
        await redis.execute_command("SPUBLISH", channel, "one | with bars")
        assert await asyncio.wait_for(got.get(), 5) == "one | with bars"
        await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        async with asyncio.timeout(10):
            while changes != [False, True]:  # lost, then back
                await asyncio.sleep(0.02)
        await redis.execute_command("SPUBLISH", channel, "two")
        assert await asyncio.wait_for(got.get(), 5) == "two"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
