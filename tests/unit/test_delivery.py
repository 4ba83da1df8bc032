"""chatnode.delivery driven without Redis: what it asks Redis for, and what it does with
each reply (a failed UNLIVE, the unacked caps)."""

from __future__ import annotations

import asyncio
from typing import Any

from chatnode import inbox
from chatnode.config import Settings
from chatnode.delivery import Delivery
from chatnode.errors import Unavailable
from chatnode.metrics import Metrics
from chatnode.redisio import Script
from chatnode.session import Outbox, Session


class Recorder:
    """Stands in for the Batcher: keeps every command with its callback, answers none."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def submit(self, callback: Any, *args: Any) -> None:
        self.calls.append((str(args[0]), callback))

    def submit_script(self, callback: Any, script: Script, keys_: Any, args: Any) -> None:
        name = next(n for n in ("UNLIVE", "GO_LIVE") if getattr(inbox, n) is script)
        self.calls.append((name, callback))

    def fire(self, *args: Any) -> None:
        self.calls.append((str(args[0]), None))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


class Conn:
    paused = False

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def buffered(self) -> int:
        return 0

    def send_texts(self, frames: list[bytes]) -> None:
        self.sent.extend(frames)


class Router:
    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.connected.set()


def make(**settings: Any) -> tuple[Delivery, Recorder, Session]:
    recorder = Recorder()
    closed: list[int] = []
    outbox = Outbox(lambda s, code, reason: closed.append(code), lambda s: None)
    delivery = Delivery(
        Settings.from_env({}, node_id="n1", **settings),
        recorder,  # type: ignore[arg-type]
        Router(),  # type: ignore[arg-type]
        outbox,
        Metrics(),
        lambda s, code, reason: closed.append(code),
    )
    s = Session(Conn(), "+15550001111", "jti", "n1")  # type: ignore[arg-type]
    s.ready = True
    return delivery, recorder, s


def entry(n: int, size: int = 10) -> inbox.Entry:
    return inbox.Entry(f"{n}-0", "m", "+15550002222", f"c{n}", b"x" * size)


def live(delivery: Delivery, s: Session) -> None:
    """Bring the session live: no pending entries, GO_LIVE answered 'live'."""
    recorder: Recorder = delivery.batcher  # type: ignore[assignment]
    delivery.step(s)
    name, callback = recorder.calls.pop()
    assert name == "XREADGROUP"
    callback([])
    name, callback = recorder.calls.pop()
    assert name == "GO_LIVE"
    callback(["live"])
    assert not s.catching and s.token is not None


async def test_a_failed_unlive_starts_the_catch_up_over() -> None:
    """Point 20: UNLIVE's reply was once ignored, and a failure left the route live with
    a token the session dropped. Now the session stalls and catches up from the start,
    with UNLIVE first, once the sweep retries it."""
    delivery, recorder, s = make()
    live(delivery, s)
    recorder.calls.clear()
    delivery.restart(s)  # e.g. the node's channel came back
    # (restart stops pushes at once; the catch-up's first read is behind its own UNLIVE)
    assert recorder.names() == ["UNLIVE", "UNLIVE", "XREADGROUP"]
    (_, unlive), _, (_, read) = recorder.calls
    gen = s.gen
    unlive(Unavailable("Redis is unavailable"))
    assert s.stalled and s.cursor == "0" and s.gen == gen + 1 and s.token is None
    recorder.calls.clear()
    read([entry(1)])  # the read behind it answers: stale now, so it starts over
    assert recorder.names() == ["UNLIVE", "XREADGROUP"] and not s.unacked
    recorder.calls[0][1](1)
    assert not s.stalled or s.reading


async def test_a_successful_unlive_changes_nothing() -> None:
    delivery, recorder, s = make()
    live(delivery, s)
    recorder.calls.clear()
    delivery.restart(s)
    unlive = recorder.calls[0][1]
    gen = s.gen
    unlive(1)
    assert s.gen == gen and not s.stalled


async def test_live_delivery_stops_at_the_unacked_entry_cap() -> None:
    """Point 2: past CHATNODE_UNACKED_MAX_ENTRIES the rest wait in Redis (the session
    stops taking pushes and catches up later); an ack makes room and it goes on."""
    delivery, recorder, s = make(unacked_max_entries=3)
    live(delivery, s)
    recorder.calls.clear()
    taken = delivery.deliver(s, [entry(i) for i in range(1, 6)])
    assert taken == 3 and list(s.unacked) == ["1-0", "2-0", "3-0"]
    assert recorder.names()[0] == "UNLIVE" and s.catching
    recorder.calls[0][1](1)
    recorder.calls.clear()
    delivery.step(s)
    assert s.stalled and recorder.calls == []  # full: nothing read
    s.release("1-0")
    delivery.acked(s)
    assert recorder.names() == ["UNLIVE", "XREADGROUP"]  # the catch-up from the start


async def test_the_unacked_byte_cap_holds_too() -> None:
    delivery, _recorder, s = make(unacked_max_bytes=25)
    live(delivery, s)
    taken = delivery.deliver(s, [entry(i, size=10) for i in range(1, 6)])
    assert taken == 3 and s.unacked_bytes == 30
    s.release("2-0")
    assert s.unacked_bytes == 20
    s.hold(entry(1, size=10), 0.0)  # sent again: counted once
    assert s.unacked_bytes == 20 and list(s.unacked) == ["3-0", "1-0"]


def test_reads_may_name_what_is_out_or_being_acked_only() -> None:
    s = Session(Conn(), "+15550001111", "jti", "n1")  # type: ignore[arg-type]
    s.hold(entry(1), 0.0)
    s.hold(inbox.Entry("2-0", "r", "+15550002222", "c9", b"r"), 0.0)  # a receipt
    s.acking = {"3-0": entry(3)}
    assert s.holds("+15550002222") == {"c1", "c3"}
    assert s.holds("+15550003333") == set()
