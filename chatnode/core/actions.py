"""What a socket core asks its driver to do, and what it reads from the node."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from chatnode import frames, inbox
from chatnode.config import Settings
from chatnode.lua import Script
from chatnode.metrics import Metrics

Then = Callable[[Any], None]


class Call:
    """A Redis command, or a script when `script` is set (`args` are then its keys and
    argv its arguments). Calls go to Redis in the order they were made; `then` takes
    the reply (a value, or an exception instance). `defer`: it may ride with the next
    pipeline. (A plain class: one is made per Redis command, on the hot path.)"""

    __slots__ = ("args", "argv", "defer", "script", "then")

    def __init__(
        self,
        args: Sequence[Any],
        then: Then | None = None,
        script: Script | None = None,
        argv: Sequence[Any] = (),
        defer: bool = False,
    ) -> None:
        self.args = args
        self.then = then
        self.script = script
        self.argv = argv
        self.defer = defer

    def __repr__(self) -> str:
        return f"Call({self.args!r}, script={self.script is not None}, defer={self.defer})"


@dataclass(frozen=True, slots=True)
class Close:
    """Close the socket after writing `last` (what was queued before the close)."""

    code: int
    reason: str
    last: list[bytes] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Publish:
    """A message about `mobile` on another node's channel (e.g. close the user's older
    session)."""

    node: str
    mobile: str
    payload: str


@dataclass(frozen=True, slots=True)
class Reading:
    """Pause (False) or resume (True) reading the socket."""

    on: bool


@dataclass(frozen=True, slots=True)
class RunSlow:
    """The slow lane has work: the driver runs `SocketCore.lane.next()` jobs one by one."""


Action = Call | Close | Publish | Reading | RunSlow


# -- slow jobs: work that may need PostgreSQL, run by slowpath.py one at a time per socket


@dataclass(frozen=True, slots=True)
class StoreMessage:
    """The send script again, loading the recipient from PostgreSQL first: a Stored."""

    sender: str
    frame: frames.Send
    ts: int


@dataclass(frozen=True, slots=True)
class FetchEntries:
    """The entries of the owner's inbox with these ids, those pending in the device's
    group (delivered to it, not acked yet)."""

    owner: str
    msg_ids: list[str]
    device: str = ""  # the acking device (keys.device_key)


@dataclass(frozen=True, slots=True)
class StoreReceipts:
    """Store receipts (loading owners; an unknown owner is skipped), then the acking
    device's ack of `ack_ids` (lua.ACK_DEVICE), and shorten the dedupe keys of
    `messages` ((sender, client id) of the acked messages) to the window."""

    acker: str
    receipts: list[inbox.Receipt]
    ack_ids: list[str]
    messages: list[tuple[str, str]]
    device: str = ""  # the acking device (keys.device_key)


@dataclass(frozen=True, slots=True)
class StoreRead:
    """Store one read receipt, loading its owner: UnknownRecipient or InboxFull raised."""

    receipt: inbox.Receipt


@dataclass(frozen=True, slots=True)
class CheckKnown:
    """UnknownRecipient unless the user has an account."""

    mobile: str


Job = StoreMessage | FetchEntries | StoreReceipts | StoreRead | CheckKnown

# What a slow job's result (or its exception) becomes: the answer frame (or None), or
# the next job for the same place in the lane. It raises ChatError to answer an error.
Finish = Callable[[Any], "bytes | Next | None"]


@dataclass(slots=True)
class Next:
    job: Job
    finish: Finish


# -- what a core reads


def _wall_ms() -> int:
    return int(time.time() * 1000)


class Clock:
    """Time as the core sees it; tests pass one they move by hand. The real one's
    readings are the time module's functions themselves (no call in between)."""

    __slots__ = ("monotonic", "ms", "perf")

    def __init__(self) -> None:
        self.monotonic: Callable[[], float] = time.monotonic
        self.perf: Callable[[], float] = time.perf_counter  # latency measurements
        self.ms: Callable[[], int] = _wall_ms  # wall time, ms since the epoch (stamps)


class WriteBuffer(Protocol):
    """The socket's write side as the core may look at it: how far behind it is."""

    paused: bool

    def buffered(self) -> int: ...


@dataclass(slots=True)
class Node:
    """What every core of a node shares: settings, counters, the clock, and whether the
    node hears its channel (a session goes live only while it does)."""

    settings: Settings
    metrics: Metrics
    clock: Clock = field(default_factory=Clock)
    channel_up: Callable[[], bool] = lambda: True
