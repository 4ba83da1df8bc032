"""chatnode.resp.Wire and chatnode.redisio: RESP in order over one connection, fed bytes
without a network."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest
from redis.exceptions import NoScriptError, ResponseError

from chatnode.errors import Unavailable
from chatnode.redisio import Batcher, Script
from chatnode.resp import Wire, meaning
from tests.unit.transport import Transport


def wire(timeout: float = 5.0) -> tuple[Wire, Transport]:
    w = Wire(timeout)
    t = Transport()
    w.connection_made(t)  # type: ignore[arg-type]
    return w, t


async def test_a_batch_is_one_write_and_replies_reach_callbacks_in_order() -> None:
    w, t = wire()
    got: list[Any] = []
    w.send([(("SET", "k", "v"), got.append), (("GET", "k"), got.append), (("PING",), got.append)])
    assert t.writes == [
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n"
    ]
    assert w.in_flight == 1
    w.data_received(b"+OK\r\n$1\r\nv")  # a reply cut in two
    assert got == ["OK"]
    w.data_received(b"\r\n+PONG\r\n")
    assert got == ["OK", "v", "PONG"]
    assert w.in_flight == 0


async def test_two_batches_in_flight_are_answered_in_order() -> None:
    w, _ = wire()
    got: list[Any] = []
    w.send([(("INCR", "a"), got.append)])
    w.send([(("INCR", "a"), got.append), (("INCR", "a"), got.append)])
    assert w.in_flight == 2
    w.data_received(b":1\r\n:2\r\n")
    assert w.in_flight == 1
    w.data_received(b":3\r\n")
    assert got == [1, 2, 3] and w.in_flight == 0


async def test_error_replies_keep_the_expected_ones_and_the_rest_mean_unavailable() -> None:
    w, _ = wire()
    got: list[Any] = []
    w.send([(("X",), got.append) for _ in range(2)])
    w.data_received(
        b"-BUSYGROUP Consumer Group name already exists\r\n"
        b"-LOADING Redis is loading the dataset in memory\r\n"
    )
    assert isinstance(got[0], ResponseError) and str(got[0]).startswith("BUSYGROUP")
    assert isinstance(got[1], Unavailable)


async def test_a_script_redis_lost_fails_as_unavailable_and_the_scripts_load_again() -> None:
    loads: list[int] = []
    w = Wire(5.0, None, lambda: loads.append(1))
    w.connection_made(Transport())  # type: ignore[arg-type]
    got: list[Any] = []
    w.send([(("EVALSHA", "abc", 0), got.append), (("GET", "k"), got.append)])
    w.data_received(b"-NOSCRIPT No matching script\r\n$1\r\nv\r\n")
    assert isinstance(got[0], Unavailable) and got[1] == "v"
    assert loads == [1]
    assert isinstance(meaning(ResponseError("NOSCRIPT No matching script")), NoScriptError)


def test_meaning_of_other_errors() -> None:
    assert isinstance(meaning(ResponseError("OOM command not allowed")), Unavailable)
    assert isinstance(meaning(ResponseError("NOGROUP No such key")), ResponseError)


async def test_a_lost_connection_fails_every_waiter_once() -> None:
    w, _ = wire()
    got: list[Any] = []
    w.send([(("GET", "a"), got.append), (("GET", "b"), got.append)])
    w.connection_lost(ConnectionResetError())
    w.connection_lost(None)  # twice is harmless
    assert len(got) == 2 and all(isinstance(g, Unavailable) for g in got)
    assert not w.usable


async def test_a_late_reply_trips_the_watchdog() -> None:
    w, t = wire(timeout=0.2)
    got: list[Any] = []
    w.send([(("BLPOP", "nothing", "0"), got.append)])
    await asyncio.sleep(1.2)  # the watchdog looks every 0.5 s
    assert t.aborted and isinstance(got[0], Unavailable)


async def test_a_callback_that_raises_does_not_stop_the_others() -> None:
    w, _ = wire()
    got: list[Any] = []

    def bad(reply: Any) -> None:
        raise RuntimeError("bug in a callback")

    w.send([(("PING",), bad), (("PING",), got.append)])
    w.data_received(b"+PONG\r\n+PONG\r\n")
    assert got == ["PONG"]


async def test_batcher_refuses_at_once_while_backing_off() -> None:
    from chatnode import devstack

    batcher = Batcher(f"redis://127.0.0.1:{devstack.free_port()}/0")  # nothing listens
    with pytest.raises(Unavailable):
        await batcher.run("PING")
    started = asyncio.get_running_loop().time()
    with pytest.raises(Unavailable):
        await batcher.run("PING")  # within the back-off: no connect attempt
    assert asyncio.get_running_loop().time() - started < 0.04
    assert batcher._backoff == 0.05
    await batcher.close()


def test_batcher_refuses_tls_urls_it_cannot_speak() -> None:
    with pytest.raises(ValueError, match="plain TCP"):
        Batcher("rediss://127.0.0.1:6380/0")


def test_script_sha_is_the_sha1_of_its_source() -> None:
    source = "return 1"
    assert Script(source).sha == hashlib.sha1(source.encode()).hexdigest()


async def test_a_callback_that_aborts_the_wire_ends_the_read() -> None:
    """The replies after it are not handed to anyone twice: their waiters heard of the loss."""
    w, t = wire()
    got: list[Any] = []

    def aborting(reply: Any) -> None:
        got.append(reply)
        w.abort()

    w.send([(("PING",), aborting), (("PING",), got.append)])
    w.data_received(b"+PONG\r\n+PONG\r\n")
    assert got[0] == "PONG" and isinstance(got[1], Unavailable) and len(got) == 2
    assert t.aborted and not w.usable


async def test_a_protocol_error_aborts_the_wire_and_fails_its_waiters() -> None:
    w, t = wire()
    got: list[Any] = []
    w.send([(("PING",), got.append)])
    w.data_received(b"?garbage\r\n")
    assert t.aborted and isinstance(got[0], Unavailable)


async def test_many_noscript_replies_load_the_scripts_once() -> None:
    """A pipeline of script calls after Redis lost its scripts comes back NOSCRIPT for
    each: the scripts are loaded again once, not once per call, until that is answered."""
    from chatnode.lua import SCRIPTS
    from chatnode.redisio import Batcher

    b = Batcher("redis://127.0.0.1:1/0")
    for _ in range(50):
        b._load_scripts()
    queued = b._queue
    assert len(queued) == len(SCRIPTS)
    assert all(args[:2] == ("SCRIPT", "LOAD") for args, _ in queued)
    queued[-1][1]("sha")  # the last load answered: a later loss loads them again
    b._queue = []
    b._load_scripts()
    assert len(b._queue) == len(SCRIPTS)
    b._queue = []
