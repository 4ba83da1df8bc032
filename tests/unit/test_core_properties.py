"""Property tests of the socket core: random interleavings of client frames, Redis
replies (in order, as one connection gives them), pushes from the node's channel,
socket lag, timers, Redis failures and reconnects, against a model of the user's inbox.

Whatever the interleaving:
- answers to sends come in the order of the sends;
- a receipt never reaches the client before the `accepted` of its message;
- entries reach the client in stored order (each first delivery after the one before);
- no entry is dropped: once things settle, every stored entry was delivered and acked;
- what the core holds per socket stays within its caps.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatnode import inbox
from chatnode.core.actions import (
    Call,
    CheckKnown,
    Close,
    FetchEntries,
    Job,
    StoreMessage,
    StoreRead,
    StoreReceipts,
)
from chatnode.core.socket import SocketCore
from chatnode.errors import Unavailable
from tests.unit.corekit import (
    PEER,
    Clock,
    Inbox,
    Wire,
    feed,
    make,
    name_of,
    parse_push,
    take_actions,
)

CAP_ENTRIES = 6
CAP_BYTES = 2000
# weights: what happens often (Redis answering, pushes, writes) and what is rare
# (failures, lag, reconnects)
WEIGHTS = {
    "exec": 8,
    "reply": 8,
    "push": 5,
    "flush": 5,
    "peer_msg": 2,
    "client_send": 3,
    "client_ack": 4,
    "peer_receipt": 2,
    "slow": 2,
    "slow_done": 2,
    "lose_account": 1,
    "drain": 2,
    "client_read": 1,
    "lag": 1,
    "tick": 1,
    "fail": 1,
    "reconnect": 1,
}
EVENTS = [event for event, weight in WEIGHTS.items() for _ in range(weight)]
READS = {"XREADGROUP", "GO_LIVE", "UNLIVE"}  # the catch-up's calls


def seq(msg_id: str) -> tuple[int, int]:
    ms, _, n = msg_id.partition("-")
    return int(ms), int(n)


class World:
    def __init__(self) -> None:
        self.clock = Clock()
        self.wire = Wire()
        self.model = Inbox()
        self.calls: deque[tuple[SocketCore, Call]] = deque()  # sent to Redis, in order
        self.replies: deque[tuple[SocketCore, Call, Any]] = deque()  # answered, on the way
        self.stored: list[str] = []  # every entry the model stored for the client
        self.received: set[str] = set()  # every entry msgId the client got
        self.unacked: list[str] = []  # the client got these and has not acked them
        self.sends = 0
        self.running: dict[SocketCore, Any] = {}  # slow jobs run, results not yet back
        self.trace: list[str] = []
        self.accepted_ids: set[str] = set()  # client ids the model stored
        self.core = self._connect()

    def _connect(self) -> SocketCore:
        core = make(
            clock=self.clock,
            wire=self.wire,
            unacked_max_entries=CAP_ENTRIES,
            unacked_max_bytes=CAP_BYTES,
            send_rate=10_000,
            send_burst=10_000,
            frame_rate=10_000,
            frame_burst=10_000,
            redelivery_s=30,
        )
        # this connection's view: answers in order, receipts after accepted
        self.sent_here: list[str] = []
        self.answered_here: list[str] = []
        self.last_first: tuple[int, int] = (0, 0)
        core.start()
        self.core = core
        self.collect(core)
        return core

    # -- the driver's part --------------------------------------------------------------

    def collect(self, core: SocketCore) -> None:
        for action in take_actions(core):
            if isinstance(action, Call):
                self.calls.append((core, action))
            elif isinstance(action, Close) and core is self.core:
                self.flush(action.last)
                self.reconnect()
        self.check_bounds(core)

    def check_bounds(self, core: SocketCore) -> None:
        ledger = core.ledger
        assert len(ledger.out) <= CAP_ENTRIES, (list(ledger.out), self.trace[-8:])
        biggest = max((len(e.frame) for e, _ in ledger.out.values()), default=0)
        assert ledger.out_bytes < CAP_BYTES + biggest

    # -- events ---------------------------------------------------------------------------

    def step(self, event: str, pick: int) -> None:
        self.trace.append(event)
        getattr(self, "on_" + event)(pick)
        self.collect(self.core)

    def on_peer_msg(self, pick: int) -> None:
        self.stored.append(self.model.message_from_peer(len(self.stored)))

    def on_peer_receipt(self, pick: int) -> None:
        if self.accepted_ids:
            ids = sorted(self.accepted_ids)
            self.stored.append(self.model.receipt_from_peer([ids[pick % len(ids)]]))

    def on_client_send(self, pick: int) -> None:
        self.sends += 1
        client_id = f"s{self.sends}"
        self.sent_here.append(client_id)
        frame = {"type": "send", "id": client_id, "to": PEER, "body": "b"}
        self.core.receive(orjson.dumps(frame).decode())

    def on_client_ack(self, pick: int) -> None:
        if self.unacked:
            n = 1 + pick % len(self.unacked)
            ids, self.unacked = self.unacked[:n], self.unacked[n:]
            self.core.receive(orjson.dumps({"type": "ack", "msgIds": ids}).decode())

    def on_client_read(self, pick: int) -> None:
        frame = {"type": "read", "to": PEER, "ids": [f"p{pick % 5}"]}
        self.core.receive(orjson.dumps(frame).decode())

    def on_exec(self, pick: int) -> None:
        """Redis runs the next calls (a pipeline)."""
        for _ in range(1 + pick % 4):
            if self.calls:
                owner, call = self.calls.popleft()
                self.replies.append((owner, call, self.execute(call)))

    def on_fail(self, pick: int) -> None:
        """A script Redis lost (NOSCRIPT) fails alone; else the connection is lost: every
        call sent and not yet run fails, and so do those Redis ran whose replies had
        not come back (their effects stay)."""
        if pick % 2 == 0 and self.calls and self.calls[0][1].script is not None:
            owner, call = self.calls.popleft()
            self.replies.append((owner, call, Unavailable()))
            return
        lost = [(owner, call, Unavailable()) for owner, call, _ in self.replies]
        lost += [(owner, call, Unavailable()) for owner, call in self.calls]
        self.replies, self.calls = deque(lost), deque()

    def on_reply(self, pick: int) -> None:
        """Replies reach the node, one or a few, in order."""
        for _ in range(1 + pick % 4):
            if self.replies:
                owner, call, reply = self.replies.popleft()
                before = len(self.calls)
                feed(owner, call, reply)
                self.collect(owner)
                if isinstance(reply, Exception) and name_of(call) in READS:
                    # a failed read waits for the sweep: no loop while Redis is away
                    made = [name_of(c) for _, c in list(self.calls)[before:]]
                    assert not set(made) & READS, (name_of(call), made)

    def on_push(self, pick: int) -> None:
        if self.model.pushes:
            token, entries = parse_push(self.model.pushes.popleft())
            self.core.pushed(token, entries)

    def on_flush(self, pick: int) -> None:
        self.flush(self.core.answers.take())
        self.core.written()

    def on_lag(self, pick: int) -> None:
        self.wire.paused = True

    def on_drain(self, pick: int) -> None:
        self.wire.paused = False
        self.core.drained()

    def on_tick(self, pick: int) -> None:
        self.clock.advance(31)
        self.core.tick(self.clock.t)

    def on_slow(self, pick: int) -> None:
        """The runner takes the next job and runs it; its result comes back later."""
        core = self.core
        if core not in self.running:
            job = core.lane.next()
            if job is not None:
                self.running[core] = self.run_slow(job, pick)

    def on_slow_done(self, pick: int) -> None:
        """A job's result reaches its socket (maybe one closed since)."""
        for core, result in list(self.running.items())[:1]:
            del self.running[core]
            core.lane.done(result)
            self.collect(core)

    def on_lose_account(self, pick: int) -> None:
        """Redis lost the recipient's account: the next send goes the slow way."""
        self.model.unknown_once = True

    def on_reconnect(self, pick: int) -> None:
        if pick % 2 == 0:
            self.reconnect()

    def execute(self, call: Call) -> Any:
        reply = self.model.answer(call)
        if isinstance(reply, list) and reply[:1] == ["ok"] and len(reply) == 3:
            self.accepted_ids.add(call.argv[1])  # a send stored
        return reply

    def run_slow(self, job: Job, pick: int) -> Any:
        if pick % 4 == 0:
            return Unavailable()
        match job:
            case StoreMessage(_, frame, ts):
                self.accepted_ids.add(frame.id)
                return inbox.Stored(self.model.sent_id(frame.id), ts)
            case FetchEntries(_, ids):
                out = []
                for msg_id in ids:
                    fields = self.model._fields(seq(msg_id)[0])
                    if fields is not None and seq(msg_id)[0] in self.model.pending:
                        out.append(inbox.decode(msg_id, fields))
                return out
            case StoreReceipts(_, _, ids):
                for msg_id in ids:
                    self.model.stream.pop(seq(msg_id)[0], None)
                    self.model.pending.discard(seq(msg_id)[0])
                return None
            case CheckKnown() | StoreRead():
                return None

    def flush(self, out: list[bytes]) -> None:
        for raw in out:
            frame = orjson.loads(raw)
            kind = frame["type"]
            if kind == "accepted" or (kind == "error" and frame.get("ref")):
                ref = frame.get("id") if kind == "accepted" else frame["ref"]
                self.answered_here.append(ref)
                # answers never reorder: they come in the order of the sends
                assert self.answered_here == self.sent_here[: len(self.answered_here)]
            elif kind in ("message", "receipt"):
                msg_id = frame["msgId"]
                if kind == "receipt":
                    for client_id in frame["ids"]:
                        if client_id in self.sent_here:  # sent on this connection
                            assert client_id in self.answered_here, "receipt before accepted"
                if msg_id not in self.received or seq(msg_id) > self.last_first:
                    # a first delivery on this connection comes after the one before
                    if msg_id not in self.unacked:
                        assert seq(msg_id) > self.last_first or msg_id in self.received, (
                            f"{msg_id} after {self.last_first}"
                        )
                    self.last_first = max(self.last_first, seq(msg_id))
                self.received.add(msg_id)
                if msg_id not in self.unacked:
                    self.unacked.append(msg_id)

    def reconnect(self) -> None:
        self.core.ended()
        old = self.core
        self._connect()
        self.collect(old)

    # -- settling -------------------------------------------------------------------------

    def settle(self) -> None:
        """Let everything through: no lag, no failures, the client acks all it got."""
        self.wire.paused = False
        for _ in range(5000):
            core = self.core
            if self.calls:
                self.step("exec", 1)
            elif self.replies:
                self.step("reply", 1)
            elif self.model.pushes:
                self.step("push", 1)
            elif self.running:
                self.step("slow_done", 1)
            elif core.lane.queue and core not in self.running:
                self.step("slow", 1)
            elif core.answers.outbox:
                self.step("flush", 1)
            elif self.unacked:
                self.step("client_ack", len(self.unacked) - 1)
            elif self.model.stream or core.delivery.catching or core.ledger.out:
                self.step("drain", 1)
                self.step("tick", 1)
            else:
                return
        core = self.core
        d = core.delivery
        raise AssertionError(
            f"did not settle: stream {sorted(self.model.stream)} pending {self.model.pending} "
            f"route {self.model.route} out {list(core.ledger.out)} acking {core.ledger.acking} "
            f"catching {d.catching} reading {d.reading} stalled {d.stalled} "
            f"cursor {d.cursor} slow {core.lane.queue} closed {core.closed} ready {core.ready} "
            f"unacked {self.unacked} trace {self.trace[-12:]}"
        )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.sampled_from(EVENTS), st.integers(0, 1000)), min_size=80, max_size=300)
)
def test_any_interleaving_keeps_order_and_loses_nothing(events: list[tuple[str, int]]) -> None:
    world = World()
    for event, pick in events:
        world.step(event, pick)
    world.settle()
    stored = set(world.stored)
    assert stored <= world.received, f"never delivered: {sorted(stored - world.received)}"
    assert world.model.stream == {} and world.model.pending == set()
    assert world.core.ledger.out == {} and world.core.ledger.acking is None
