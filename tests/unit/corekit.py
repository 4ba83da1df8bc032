"""Drive a SocketCore with no Redis, no socket and no event loop.

`Inbox` is a model of one user's Redis state as the core's calls see it: the stream,
the consumer group's pending list and last-delivered id, the route (live or not), and
the pushes that SEND and RECEIPT publish to the user's node. It answers only the calls
a socket core makes; it is a model for unit tests, not a stand-in for Redis in
integration tests (those run real Redis).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import orjson

from chatnode import channel, frames, inbox, keys, lua, presence
from chatnode.config import Settings
from chatnode.core.actions import Action, Call, Node
from chatnode.core.socket import SocketCore
from chatnode.metrics import Metrics

ME = "+15550001111"
PEER = "+15550002222"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.wall_ms = 1_700_000_000_000

    def monotonic(self) -> float:
        return self.t

    def perf(self) -> float:
        return self.t

    def ms(self) -> int:
        return self.wall_ms + int(self.t * 1000)

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Wire:
    """The socket's write side as the core sees it."""

    def __init__(self) -> None:
        self.paused = False
        self.bytes = 0

    def buffered(self) -> int:
        return self.bytes


def script_name(script: Any) -> str:
    for module in (lua, presence):
        for name in dir(module):
            if getattr(module, name) is script:
                return name
    raise AssertionError(f"unknown script {script!r}")


def name_of(call: Call) -> str:
    return script_name(call.script) if call.script is not None else str(call.args[0])


def make(clock: Clock | None = None, wire: Wire | None = None, **settings: Any) -> SocketCore:
    node = Node(
        Settings.from_env({}, node_id="n1", **settings), Metrics(), clock or Clock(), lambda: True
    )
    return SocketCore(node, wire or Wire(), ME, "jti", 0)


def take(core: SocketCore) -> tuple[list[Call], list[Action]]:
    """The core's actions: its Redis calls, and the rest."""
    calls: list[Call] = []
    other: list[Action] = []
    for action in take_actions(core):
        (calls if isinstance(action, Call) else other).append(action)  # type: ignore[arg-type]
    return calls, other


def take_actions(core: SocketCore) -> list[Action]:
    """What the core asked for since the last look, in order (the driver walks the
    same list in place, gateway.Gateway._carry_out)."""
    actions = list(core.actions)
    core.actions.clear()
    return actions


def feed(core: SocketCore, call: Call, value: Any) -> None:
    """The event of a Redis reply: the call's continuation takes it (the driver's
    callback does the same, gateway.Gateway._replied)."""
    if call.then is not None:
        call.then(value)


def written(core: SocketCore) -> list[dict[str, Any]]:
    """What the driver would write now, decoded."""
    return [orjson.loads(f) for f in core.answers.take()]


def entry(n: int, size: int = 10, sender: str = PEER) -> inbox.Entry:
    """A message entry whose frame is `size` bytes of body and some JSON around it."""
    frame = frames.message(f"{n}-0", f"c{n}", sender, "x" * size, 1)
    return inbox.Entry(f"{n}-0", "m", sender, f"c{n}", frame)


class Inbox:
    """One user's inbox, group and route, answering a core's calls in order."""

    def __init__(self, owner: str = ME) -> None:
        self.owner = owner
        self.stream: dict[int, dict[str, str]] = {}  # seq -> fields (id is f"{seq}-0")
        self.seq = 0
        self.pending: set[int] = set()
        self.delivered_upto = 0  # the group's last-delivered id
        self.route: str | None = None
        self.pushes: deque[str] = deque()  # payloads published to the owner's node
        self.sent: dict[str, str] = {}  # dedupe of the owner's sends: client id -> msgId
        self.peer_seq = 0
        self.unknown_once = False

    # -- what other users do ------------------------------------------------------------

    def add(self, fields: dict[str, str]) -> str:
        self.seq += 1
        self.stream[self.seq] = fields
        self._push()
        return f"{self.seq}-0"

    def message_from_peer(self, n: int, body: str = "hi") -> str:
        return self.add({"k": "m", "f": PEER, "i": f"p{n}", "b": body, "t": "1"})

    def receipt_from_peer(self, client_ids: list[str]) -> str:
        return self.add(
            {"k": "r", "s": "delivered", "f": PEER, "i": ",".join(client_ids), "t": "1"}
        )

    def _push(self) -> None:
        if not self.route or self.route.count("|") < 2:
            return
        token = self.route.split("|", 2)[2]
        items = self._read_new(100)
        if items:
            data = orjson.dumps([[i, [x for kv in f.items() for x in kv]] for i, f in items])
            self.pushes.append(channel.push(self.owner, token, data.decode()))

    def _read_new(self, count: int) -> list[tuple[str, dict[str, str]]]:
        out = []
        for seq in sorted(self.stream):
            if seq > self.delivered_upto and len(out) < count:
                out.append((f"{seq}-0", self.stream[seq]))
                self.pending.add(seq)
                self.delivered_upto = seq
        return out

    def entries(self) -> list[str]:
        return [f"{s}-0" for s in sorted(self.stream)]

    # -- answering the core's calls -------------------------------------------------------

    def answer(self, call: Call) -> Any:
        name = name_of(call)
        handler = getattr(self, "_" + name.lower(), None)
        if handler is None:
            raise AssertionError(f"the model does not answer {name}")
        return handler(call)

    def _get(self, call: Call) -> Any:
        return None  # no send tokens saved

    def _set(self, call: Call) -> Any:
        return "OK"

    def _claim(self, call: Call) -> Any:
        old, self.route = self.route, call.argv[0]
        return [old, keys.account_value([keys.DEFAULT_DEVICE])]  # one device: plain acks

    def _release(self, call: Call) -> Any:
        mine = call.argv[0]
        if self.route and (self.route == mine or self.route.startswith(mine + "|")):
            self.route = None
        return 1

    def _xreadgroup(self, call: Call) -> Any:
        cursor = call.args[-1]
        after = int(cursor.partition("-")[0]) if cursor != "0" else 0
        count = int(call.args[5])
        ids = sorted(s for s in self.pending if s > after)[:count]
        if not ids:
            return [[keys.inbox(self.owner), []]]
        return [[keys.inbox(self.owner), [[f"{s}-0", self._fields(s)] for s in ids]]]

    def _fields(self, seq: int) -> list[str] | None:
        fields = self.stream.get(seq)
        return None if fields is None else [x for kv in fields.items() for x in kv]

    def _go_live(self, call: Call) -> Any:
        route, token, count = call.argv[0], call.argv[1], int(call.argv[2])
        if self.route and not (self.route == route or self.route.startswith(route + "|")):
            return ["gone"]
        items = self._read_new(count)
        if items:
            return ["more", [[i, [x for kv in f.items() for x in kv]] for i, f in items]]
        self.route = f"{route}|{token}"
        return ["live"]

    def _unlive(self, call: Call) -> Any:
        mine = call.argv[0]
        if self.route and self.route.startswith(mine + "|"):
            self.route = mine
        return 1

    def _xack(self, call: Call) -> Any:
        for msg_id in call.args[3:]:
            self.pending.discard(int(msg_id.partition("-")[0]))
        return len(call.args) - 3

    def _xdel(self, call: Call) -> Any:
        gone = [s for s in (int(m.partition("-")[0]) for m in call.args[2:]) if s in self.stream]
        for seq in gone:
            del self.stream[seq]
        return len(gone)

    def _ack_device(self, call: Call) -> Any:  # the owner's only device: XDEL and XACK
        ids = [int(m.partition("-")[0]) for m in call.argv[1:]]
        self.pending.difference_update(ids)
        gone = [s for s in ids if s in self.stream]
        for seq in gone:
            del self.stream[seq]
        return len(gone)

    def _trim(self, call: Call) -> Any:  # the ids and the head the group is done with
        low = min(self.pending) if self.pending else self.delivered_upto + 1
        listed = {int(m.partition("-")[0]) for m in call.argv}
        done = {s for s in listed if s <= self.delivered_upto and s not in self.pending}
        gone = [s for s in self.stream if s < low or s in done]
        for seq in gone:
            del self.stream[seq]
        return len(gone)

    def _expire(self, call: Call) -> Any:
        assert call.args[3] == "LT"  # an ack shortens a dedupe key, never lengthens it
        return 1

    def _send(self, call: Call) -> Any:
        if self.unknown_once:  # Redis lost the recipient's account: the slow way
            self.unknown_once = False
            return ["unknown"]
        return ["ok", self.sent_id(call.argv[1]), str(call.argv[3])]

    def sent_id(self, client_id: str) -> str:
        """The msgId of the owner's send with this client id (stored once)."""
        if client_id not in self.sent:
            self.peer_seq += 1
            self.sent[client_id] = f"{self.peer_seq}-0"
        return self.sent[client_id]

    def _receipt(self, call: Call) -> Any:
        return ["ok"]

    def _read(self, call: Call) -> Any:
        # the model keeps no dedupe records and no unread counts: nothing known
        return [len(call.argv) - 2, 0, [], 0]  # (argv: sender, group, a flag per id)

    def _unread(self, call: Call) -> Any:
        return 1

    def _typing(self, call: Call) -> Any:
        return 1


def parse_push(payload: str) -> tuple[str, list[inbox.Entry] | None]:
    """The token and entries of a pushed payload, as the node's channel hands them on."""
    push = channel.decode(payload)
    assert isinstance(push, channel.Push)
    return push.token, inbox.pushed_entries(push.entries)
