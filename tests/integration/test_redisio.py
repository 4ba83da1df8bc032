"""chatnode.redisio on a real Redis: one pipeline a turn, order, pipelines in flight,
reconnects."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from chatnode.redisio import Batcher
from tests.integration.harness import Stack, new_mobile

# Keeps Redis busy for about 200 ms, so that replies are late on purpose.
BUSY_200MS = """
local t0 = redis.call('TIME')
repeat
  local t = redis.call('TIME')
until (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > 200000
return 1
"""


async def test_one_turn_is_one_pipeline_and_replies_keep_the_order(stack: Stack) -> None:
    pipelines: list[int] = []
    b = Batcher(stack.redis_url, on_pipeline=pipelines.append)
    key = "test:order:" + new_mobile()
    try:
        results = await asyncio.gather(*(b.call("INCR", key) for _ in range(50)))
        assert results == list(range(1, 51))
        assert pipelines == [50]
        await b.run("DEL", key)
    finally:
        await b.close()


async def test_commands_wait_behind_two_pipelines_in_flight_then_go_together(
    stack: Stack,
) -> None:
    pipelines: list[int] = []
    b = Batcher(stack.redis_url, on_pipeline=pipelines.append)
    key = "test:inflight:" + new_mobile()
    try:
        await b.run("PING")
        pipelines.clear()
        slow = b.call("EVAL", BUSY_200MS, 0)
        await asyncio.sleep(0)
        second = b.call("INCR", key)
        await asyncio.sleep(0)
        third = b.call("INCR", key)  # two are in flight: these two wait
        await asyncio.sleep(0)
        fourth = b.call("INCR", key)
        assert await asyncio.gather(slow, second, third, fourth) == [1, 1, 2, 3]
        assert pipelines == [1, 1, 2]
        await b.run("DEL", key)
    finally:
        await b.close()


async def test_a_killed_connection_is_replaced_on_the_next_command(
    stack: Stack, redis: aioredis.Redis
) -> None:
    b = Batcher(stack.redis_url)
    try:
        first_id = await b.run("CLIENT", "ID")
        await redis.execute_command("CLIENT", "KILL", "ID", first_id)
        await asyncio.sleep(0.1)  # the wire hears of it
        assert await b.run("PING") == "PONG"
        assert await b.run("CLIENT", "ID") != first_id
    finally:
        await b.close()


async def test_a_backlog_past_the_high_mark_is_congested_until_below_the_low_mark(
    stack: Stack,
) -> None:
    """Point 21 of the hardening issue: the node stops reading sockets while Redis is
    behind (congested), and hears when it may read again (relieved)."""
    b = Batcher(stack.redis_url)
    b.high, b.low = 100, 20
    relieved = asyncio.Event()
    try:
        await b.run("PING")
        busy = b.call("EVAL", BUSY_200MS, 0)
        pings = [b.call("PING") for _ in range(150)]
        assert b.backlog >= 150 and b.congested()
        b.when_relieved(relieved.set)
        await asyncio.sleep(0.05)
        assert b.congested() and not relieved.is_set()  # Redis is busy: replies are late
        async with asyncio.timeout(5):
            await relieved.wait()
        assert b.backlog < 20 and not b.congested()
        await asyncio.gather(busy, *pings)
    finally:
        await b.close()


async def test_a_deferred_command_rides_with_the_next_pipeline_or_goes_alone(
    stack: Stack,
) -> None:
    pipelines: list[int] = []
    b = Batcher(stack.redis_url, on_pipeline=pipelines.append)
    key = "test:defer:" + new_mobile()
    try:
        await b.run("PING")
        pipelines.clear()
        got: list[object] = []
        b.defer(got.append, "INCR", key)
        assert await b.call("INCR", key) == 2  # in order, one pipeline of two
        assert got == [1] and pipelines == [2]
        b.defer(got.append, "INCR", key)
        async with asyncio.timeout(1):  # nothing else goes: it goes alone, soon
            while len(got) < 2:
                await asyncio.sleep(0.001)
        assert got == [1, 3] and pipelines == [2, 1]
        await b.run("DEL", key)
    finally:
        await b.close()
