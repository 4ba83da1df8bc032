"""chatnode.routing: node-channel payloads decoded into listener calls, and the subscriber
connection fed bytes without a network."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from chatnode import channel, keys
from chatnode.errors import Unavailable
from chatnode.inbox import Entry
from chatnode.routing import _SubWire, dispatch
from tests.unit.transport import Transport


class Recorder:
    """A Listener that writes down every call it gets."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def on_push(self, owner: str, token: str, entries: list[Entry]) -> None:
        self.calls.append(("push", (owner, token, entries)))

    def on_kick(self, mobile: str, session: str) -> None:
        self.calls.append(("kick", (mobile, session)))

    def on_logout(self, mobile: str, jti: str) -> None:
        self.calls.append(("logout", (mobile, jti)))

    def on_typing(self, to: str, sender: str, state: str) -> None:
        self.calls.append(("typing", (to, sender, state)))

    def on_resync(self) -> None:
        self.calls.append(("resync", ()))


def calls_for(payload: str) -> list[tuple[str, tuple[Any, ...]]]:
    rec = Recorder()
    dispatch(rec, payload)
    return rec.calls


def push_payload(owner: str, token: str, entries: list[tuple[str, list[str]]]) -> str:
    """What the send and receipt scripts publish (cjson's encoding of XREADGROUP's reply)."""
    return channel.push(owner, token, json.dumps([[i, f] for i, f in entries]))


def test_push_of_a_message_decodes_its_frame() -> None:
    fields = ["k", "m", "f", "+15550000002", "i", "c1", "b", "hi | there", "t", "1700000000000"]
    ((name, (owner, token, entries)),) = calls_for(
        push_payload("+15550000001", "a1b2", [("1700000000000-0", fields)])
    )
    assert (name, owner, token) == ("push", "+15550000001", "a1b2")
    (entry,) = entries
    assert (entry.msg_id, entry.kind, entry.sender, entry.client_id) == (
        "1700000000000-0",
        "m",
        "+15550000002",
        "c1",
    )
    assert json.loads(entry.frame) == {
        "type": "message",
        "msgId": "1700000000000-0",
        "id": "c1",
        "from": "+15550000002",
        "body": "hi | there",
        "ts": 1700000000000,
    }


def test_push_of_a_receipt_and_several_entries_keep_their_order() -> None:
    receipt = ["k", "r", "s", "delivered", "f", "+15550000003", "i", "a,b", "t", "5"]
    message = ["k", "m", "f", "+15550000003", "i", "z", "b", "x", "t", "6"]
    ((_, (_, _, entries)),) = calls_for(
        push_payload("+15550000001", "t", [("5-0", receipt), ("6-0", message)])
    )
    assert [e.msg_id for e in entries] == ["5-0", "6-0"]
    assert json.loads(entries[0].frame)["ids"] == ["a", "b"]
    assert entries[1].kind == "m"


@pytest.mark.parametrize(
    ("payload", "owner", "token"),
    [
        ("e|", "", ""),
        ("e|+1555|t|", "+1555", "t"),
        ("e|+1555|t|not json", "+1555", "t"),
        ("e|+1555|t|[1]", "+1555", "t"),
        ('e|+1555|t|[["1-0", 5]]', "+1555", "t"),
    ],
)
def test_unreadable_push_reaches_the_listener_without_entries(
    payload: str, owner: str, token: str
) -> None:
    """The entries are pending in the group all the same: the session catches up."""
    assert calls_for(payload) == [("push", (owner, token, None))]


def test_kick() -> None:
    assert calls_for("k|+15550000001|sess-42") == [("kick", ("+15550000001", "sess-42"))]


def test_logout() -> None:
    assert calls_for("l|+15550000001|jti-abc") == [("logout", ("+15550000001", "jti-abc"))]


@pytest.mark.parametrize("state", ["start", "stop"])
def test_typing(state: str) -> None:
    assert calls_for(f"t|1234567|7654321|{state}") == [("typing", ("1234567", "7654321", state))]


def test_typing_argument_order_is_to_then_sender() -> None:
    # presence publishes channel.typing(frame.to, sender, state)
    (
        (
            name,
            (to, sender, _),
        ),
    ) = calls_for("t|to-user|from-user|start")
    assert (name, to, sender) == ("typing", "to-user", "from-user")


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "x|1234567",
        "r|",
        "w|1234567",
        "W|1234567",
        "wake|1234567",
        "k|1234567",  # kick needs mobile and session
        "k|1234567|s|extra",
        "l|1234567",
        "l|1234567|j|extra",
        "t|1234567|7654321",  # typing needs to, sender and state
        "t|1234567|7654321|start|extra",
        "k",
        "t",
    ],
)
def test_unknown_or_malformed_payload_calls_nothing(payload: str) -> None:
    assert calls_for(payload) == []


def test_what_the_encoders_write_decodes_to_the_same_fields() -> None:
    assert channel.decode(channel.kick("+1555", "s1")) == channel.Kick("+1555", "s1")
    assert channel.decode(channel.logout("+1555", "j1")) == channel.Logout("+1555", "j1")
    assert channel.decode(channel.typing("a", "b", "stop")) == channel.Typing("a", "b", "stop")
    assert channel.decode(channel.push("a", "t", "[]")) == channel.Push("a", "t", "[]")
    assert calls_for(channel.kick("1234567", "s")) == [("kick", ("1234567", "s"))]


def test_the_lua_that_pushes_entries_takes_its_tag_from_the_codec() -> None:
    assert f"'{channel.PUSH}|' .. owner" in keys.LUA_ROUTES


def test_each_payload_makes_exactly_one_call() -> None:
    rec = Recorder()
    for payload in (
        push_payload("1234567", "t", []),
        "k|1234567|s",
        "l|1234567|j",
        "t|1234567|7654321|stop",
    ):
        dispatch(rec, payload)
    assert [name for name, _ in rec.calls] == ["push", "kick", "logout", "typing"]


async def test_subscriber_wire_hands_on_messages_counts_pongs_and_answers_commands() -> None:
    got: list[str] = []
    w = _SubWire(got.append)
    t = Transport()
    w.connection_made(t)  # type: ignore[arg-type]
    subscribed = asyncio.ensure_future(w.subscribe([("SELECT", 1)], ["ch"]))
    await asyncio.sleep(0)
    assert t.writes == [b"*2\r\n$6\r\nSELECT\r\n$1\r\n1\r\n*2\r\n$10\r\nSSUBSCRIBE\r\n$2\r\nch\r\n"]
    w.data_received(b"+OK\r\n*3\r\n$10\r\nssubscribe\r\n$2\r\nch\r\n:1\r\n")
    await subscribed
    w.data_received(
        b"*3\r\n$8\r\nsmessage\r\n$2\r\nch\r\n$5\r\nk|a|b\r\n*2\r\n$4\r\npong\r\n$0\r\n\r\n"
    )
    assert got == ["k|a|b"] and w.pongs == 1
    # the slot of a channel moved to another shard: Redis unsubscribes it; start over
    w.data_received(b"*3\r\n$12\r\nsunsubscribe\r\n$2\r\nch\r\n:0\r\n")
    assert w.lost.done() and w.why


async def test_subscriber_wire_loss_fails_a_pending_subscription() -> None:
    w = _SubWire(lambda _: None)
    w.connection_made(Transport())  # type: ignore[arg-type]
    subscribed = asyncio.ensure_future(w.subscribe([], ["ch"]))
    await asyncio.sleep(0)
    w.connection_lost(ConnectionResetError())
    with pytest.raises(Unavailable):
        await subscribed
    assert w.lost.done()


async def test_a_channel_unsubscribed_while_subscribing_is_not_taken_for_a_reply() -> None:
    """A slot moves while our SSUBSCRIBEs wait for their replies: Redis's sunsubscribe
    push must drop the connection (subscribe again), not answer one of them and leave a
    channel unsubscribed for good."""
    w = _SubWire(lambda _: None)
    w.connection_made(Transport())  # type: ignore[arg-type]
    subscribed = asyncio.ensure_future(w.subscribe([], ["a", "b"]))
    await asyncio.sleep(0)
    w.data_received(b"*3\r\n$10\r\nssubscribe\r\n$1\r\na\r\n:1\r\n")
    w.data_received(b"*3\r\n$12\r\nsunsubscribe\r\n$1\r\na\r\n:0\r\n")
    assert w.lost.done() and w.why
    with pytest.raises(Unavailable):
        await subscribed
