"""chatnode.inbox's pure parts: what a send script's reply means, stream ids, decoding."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import ResponseError

from chatnode import frames, inbox, keys
from chatnode.errors import Blocked, InboxFull, Unavailable


def stream_key(msg_id: str) -> tuple[int, int]:
    ms, _, seq = msg_id.partition("-")
    return int(ms), int(seq)


@pytest.mark.parametrize(
    ("msg_id", "previous"),
    [
        ("1700000000000-5", "1700000000000-4"),
        ("1700000000000-0", f"1699999999999-{2**64 - 1}"),
        ("0-1", "0-0"),
        ("0-0", "0"),
    ],
)
def test_before_is_the_id_just_before(msg_id: str, previous: str) -> None:
    assert inbox.before(msg_id) == previous


@given(ms=st.integers(0, 2**48), seq=st.integers(0, 2**64 - 1))
def test_nothing_lies_between_before_and_the_id(ms: int, seq: int) -> None:
    msg_id = f"{ms}-{seq}"
    prev = inbox.before(msg_id)
    if prev != "0":
        assert stream_key(prev) < stream_key(msg_id)
        p_ms, p_seq = stream_key(prev)
        assert (p_ms, p_seq + 1) == (ms, seq) or (p_ms + 1, 0) == (ms, seq)


def test_stored_reads_each_reply_of_the_send_script() -> None:
    assert inbox.stored(["ok", "1-0", "1700"]) == inbox.Stored("1-0", 1700)
    assert inbox.stored(["unknown"]) is None
    with pytest.raises(Blocked):
        inbox.stored(["blocked"])
    with pytest.raises(InboxFull):
        inbox.stored(["full"])
    with pytest.raises(Unavailable):
        inbox.stored(Unavailable())
    with pytest.raises(Unavailable):
        inbox.stored(ResponseError("NOGROUP"))  # any other error: try again later
    with pytest.raises(Unavailable):
        inbox.stored(["what"])


def test_decode_of_an_entry_deleted_while_pending_has_no_kind() -> None:
    assert inbox.decode("1-0", None).kind == ""
    assert inbox.decode("1-0", []).kind == ""


def test_decode_of_a_receipt_lists_its_ids() -> None:
    entry = inbox.decode("9-0", ["k", "r", "s", "read", "f", "+15550000001", "i", "a,b", "t", "7"])
    assert json.loads(entry.frame) == {
        "type": "receipt",
        "msgId": "9-0",
        "status": "read",
        "by": "+15550000001",
        "ids": ["a", "b"],
        "ts": 7,
    }


def test_a_send_keeps_its_dedupe_key_until_the_ack_a_blocked_one_the_window() -> None:
    send = frames.Send("c-1", "+15550000002", "hi")
    keys_, argv = inbox.message_call("+15550000001", send, 7, 100, 42)
    assert keys_[3] == keys.dedupe("+15550000002", "+15550000001", "c-1")
    assert argv[5] == keys.DEDUPE_SAFETY_TTL_S and argv[7] == 42  # lua.SEND's ARGV[6], [8]


def test_a_send_counts_in_the_recipients_unread_counts() -> None:
    send = frames.Send("c-1", "+15550000002", "hi")
    keys_, argv = inbox.message_call("+15550000001", send, 7, 100, 42)
    assert keys_[5] == keys.unread("+15550000002") and argv[9] == inbox.UNREAD_MAX


def test_only_acked_messages_are_shortened() -> None:
    me, peer = "+15550000002", "+15550000001"
    entries = [
        inbox.decode("1-0", ["k", "m", "f", peer, "i", "a-1", "b", "hi", "t", "1"]),
        inbox.decode("2-0", ["k", "r", "s", "delivered", "f", peer, "i", "x-1", "t", "1"]),
        inbox.decode("3-0", None),  # deleted while pending
    ]
    messages = inbox.acked_messages(entries)
    assert messages == [(peer, "a-1")]
    ids = ["1-0", "2-0", "3-0"]  # every entry leaves the inbox
    assert inbox.ack_device_call(me, keys.DEFAULT_DEVICE, ids) == (
        [keys.inbox(me), keys.account(me)],
        [keys.GROUP, *ids],
    )
    assert inbox.shorten(me, messages, 600) == [("EXPIRE", keys.dedupe(me, peer, "a-1"), 600, "LT")]


def test_the_unread_counts_sit_in_the_readers_slot() -> None:
    me, peer = "+15550000002", "+15550000001"
    assert keys.unread(me).endswith(f":u:{me}:unread")
    assert keys.slot(keys.unread(me)) == keys.slot(keys.dedupe(me, peer, "a-1"))
    assert keys.slot(keys.unread(me)) == keys.slot(keys.inbox(me))
