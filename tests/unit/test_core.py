"""The socket core driven by hand: every transition, with no Redis, socket or loop."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from chatnode import inbox, keys
from chatnode.core.acks import ACK_FAILED
from chatnode.core.actions import (
    CheckKnown,
    Close,
    FetchEntries,
    Publish,
    Reading,
    RunSlow,
    StoreMessage,
    StoreReceipts,
)
from chatnode.core.socket import MAX_HELD_FRAMES, TRIM_AFTER_S, TRIM_BATCH, SocketCore
from chatnode.errors import CloseCode, Unavailable, UnknownRecipient
from tests.unit.corekit import (
    ME,
    PEER,
    Clock,
    Inbox,
    Wire,
    entry,
    feed,
    make,
    name_of,
    parse_push,
    take,
    written,
)


def run(core: SocketCore, model: Inbox) -> list[str]:
    """Answer every call the core makes, in order, until it makes none; their names."""
    names = []
    while True:
        calls, _ = take(core)
        if not calls:
            return names
        for call in calls:
            names.append(name_of(call))
            feed(core, call, model.answer(call))


def opened(**settings: object) -> tuple[SocketCore, Inbox]:
    core = make(**settings)  # type: ignore[arg-type]
    model = Inbox()
    core.start()
    assert written(core) == []  # hello waits for the claim
    assert run(core, model) == ["GET", "CLAIM", "XREADGROUP", "GO_LIVE"]
    assert written(core)[0]["type"] == "hello"
    assert core.ready and not core.delivery.catching
    return core, model


def send(n: int, to: str = PEER) -> str:
    return orjson.dumps({"type": "send", "id": f"s{n}", "to": to, "body": "b"}).decode()


# -- opening -----------------------------------------------------------------------


def test_frames_before_the_claim_wait_and_go_in_order() -> None:
    core = make()
    model = Inbox()
    core.start()
    written(core)
    core.receive(send(1))
    core.receive(send(2))
    calls, _ = take(core)
    assert [name_of(c) for c in calls] == ["GET", "CLAIM"]  # nothing sent yet
    for call in calls:
        feed(core, call, model.answer(call))
    calls, other = take(core)
    assert [name_of(c) for c in calls] == ["XREADGROUP", "SEND", "SEND"]
    assert Reading(True) in other
    assert [c.argv[1] for c in calls[1:]] == ["s1", "s2"]


def test_hello_comes_once_the_route_is_claimed_and_before_anything_else() -> None:
    """A peer that saw this socket's hello finds the route pointing at it: typing sent
    right after the hello arrives (it goes only where a route is, to a ready socket)."""
    core = make()
    model = Inbox()
    core.start()
    core.receive(send(1))  # held until the claim
    calls, _ = take(core)
    assert [name_of(c) for c in calls] == ["GET", "CLAIM"] and written(core) == []
    core.typing_from(PEER, "start")  # before the claim: no route here yet, dropped
    for call in calls:
        feed(core, call, model.answer(call))
    core.typing_from(PEER, "start")
    take(core)
    out = written(core)
    assert [f["type"] for f in out] == ["hello", "typing"]


def test_a_claim_that_fails_closes_with_1011() -> None:
    core = make()
    core.start()
    calls, _ = take(core)
    feed(core, calls[1], Unavailable())
    _, other = take(core)
    assert isinstance(other[0], Close) and other[0].code == CloseCode.INTERNAL
    assert other[0].last == []  # no hello


def test_a_claim_over_a_session_on_another_node_kicks_it() -> None:
    core = make()
    core.start()
    calls, _ = take(core)
    feed(core, calls[1], ["n2|oldsession|tok", keys.account_value([keys.DEFAULT_DEVICE])])
    _, other = take(core)
    assert Publish("n2", ME, f"k|{ME}|oldsession") in other


def test_too_many_held_frames_pause_reading() -> None:
    core = make()
    core.start()
    take(core)
    for n in range(MAX_HELD_FRAMES):
        core.receive(send(n))
    _, other = take(core)
    assert other == [Reading(False)]


def test_saved_send_tokens_are_restored() -> None:
    clock = Clock()
    core = make(clock=clock, send_rate=1, send_burst=5)
    core.start()
    calls, _ = take(core)
    feed(core, calls[0], f"0.000|{clock.ms() / 1000:.3f}")  # an earlier socket spent them
    feed(core, calls[1], [None, keys.account_value([keys.DEFAULT_DEVICE])])
    run(core, Inbox())
    core.receive(send(1))
    _, _ = take(core)
    assert written(core)[-1]["code"] == "rate_limited"


# -- send --------------------------------------------------------------------------


def test_answers_keep_frame_order_though_replies_do_not() -> None:
    core, _ = opened()
    core.receive(send(1))
    core.receive("not json")
    core.receive(send(2))
    calls, _ = take(core)
    assert written(core) == []  # the error waits behind s1's answer
    feed(core, calls[1], ["ok", "2-0", "7"])
    assert written(core) == []
    feed(core, calls[0], ["full"])
    out = written(core)
    assert [(f["type"], f.get("ref") or f.get("id")) for f in out] == [
        ("error", "s1"),
        ("error", None),
        ("accepted", "s2"),
    ]
    assert out[0]["code"] == "inbox_full"


def test_a_recipient_redis_lacks_goes_to_the_slow_lane_and_holds_later_frames() -> None:
    core, _ = opened()
    core.receive(send(1))
    calls, _ = take(core)
    feed(core, calls[0], ["unknown"])
    _, other = take(core)
    assert other == [RunSlow()]
    job = core.lane.next()
    assert isinstance(job, StoreMessage) and job.frame.id == "s1"
    core.receive(send(2))  # held behind the slow job
    assert take(core) == ([], [])
    core.lane.done(UnknownRecipient())
    out = written(core)
    assert out[0]["code"] == "unknown_recipient" and out[0]["ref"] == "s1"
    calls, _ = take(core)
    assert [c.argv[1] for c in calls] == ["s2"] and core.meter.refused == 1
    assert core.lane.next() is None


def test_refusals_in_a_row_close_the_socket() -> None:
    core, _ = opened(send_rate=1, send_burst=1, refusals_before_close=3)
    for n in range(4):
        core.receive(send(n))
    _, other = take(core)
    assert any(isinstance(a, Close) and a.code == CloseCode.POLICY for a in other)


def test_invalid_frames_in_a_burst_close_the_socket() -> None:
    core, _ = opened()
    for _ in range(20):
        core.receive("{")
    _, other = take(core)
    closes = [a for a in other if isinstance(a, Close)]
    assert closes and closes[0].reason == "too many invalid frames"
    assert len(closes[0].last) == 20  # the errors queued before still go out


# -- delivery ----------------------------------------------------------------------


def test_pushes_with_the_live_token_are_written_others_dropped() -> None:
    core, _ = opened()
    token = core.delivery.token
    assert token is not None
    core.pushed(token, [entry(1)])
    core.pushed("stale", [entry(2)])
    assert [f["msgId"] for f in written(core)] == ["1-0"]
    assert list(core.ledger.out) == ["1-0"]


def test_pushes_before_go_live_is_answered_wait_for_it() -> None:
    core = make()
    model = Inbox()
    core.start()
    written(core)
    names = []
    while True:
        calls, _ = take(core)
        go = [c for c in calls if name_of(c) == "GO_LIVE"]
        for call in calls:
            if call in go:
                continue
            names.append(name_of(call))
            feed(core, call, model.answer(call))
        if go:
            break
    assert [f["type"] for f in written(core)] == ["hello"]  # the claim is through
    reply = model.answer(go[0])  # the route is live now; the reply is on its way
    model.message_from_peer(1)
    token, entries = parse_push(model.pushes.popleft())
    core.pushed(token, entries)
    assert written(core) == []
    feed(core, go[0], reply)
    assert [f["msgId"] for f in written(core)] == ["1-0"]


def test_a_lagging_socket_stops_taking_pushes_and_catches_up_when_drained() -> None:
    wire = Wire()
    core = make(wire=wire)
    model = Inbox()
    core.start()
    run(core, model)
    wire.paused = True
    core.written()  # the driver wrote, and the socket's buffer is full
    assert core.delivery.catching
    assert [name_of(c) for c in take(core)[0]] == ["UNLIVE"]
    wire.paused = False
    core.drained()
    assert run(core, model) == ["UNLIVE", "XREADGROUP", "GO_LIVE"]
    assert not core.delivery.catching


def test_a_failed_unlive_starts_the_catch_up_over() -> None:
    core, _ = opened()
    core.delivery.restart()  # e.g. the node's channel came back
    calls, _ = take(core)
    # restart stops pushes at once; the catch-up's first read is behind its own UNLIVE
    assert [name_of(c) for c in calls] == ["UNLIVE", "UNLIVE", "XREADGROUP"]
    gen = core.delivery.gen
    feed(core, calls[0], Unavailable())
    d = core.delivery
    assert d.stalled and d.cursor == "0" and d.gen == gen + 1 and d.token is None
    feed(core, calls[1], 1)
    feed(core, calls[2], [[f"{{u:{ME}}}:inbox", [["1-0", ["k", "m", "f", PEER, "i", "c1"]]]]])
    assert not core.ledger.out  # stale reply: dropped
    assert take(core) == ([], [])  # after a failure only the sweep starts over
    core.tick(core.node.clock.monotonic())
    assert [name_of(c) for c in take(core)[0]] == ["UNLIVE", "XREADGROUP"]


def test_a_failed_read_the_catch_up_restarted_past_waits_for_the_sweep() -> None:
    """GO_LIVE in flight, the catch-up restarts (the node's channel came back), then
    GO_LIVE fails: the new catch-up does not read at once on the back of that failure
    (Redis is likely away), only at the next sweep."""
    core = make()
    model = Inbox()
    core.start()
    while True:
        calls, _ = take(core)
        go = [c for c in calls if name_of(c) == "GO_LIVE"]
        for call in calls:
            if call not in go:
                feed(core, call, model.answer(call))
        if go:
            break
    core.delivery.restart()
    assert [name_of(c) for c in take(core)[0]] == ["UNLIVE"]  # GO_LIVE is still reading
    feed(core, go[0], Unavailable())
    assert take(core) == ([], [])
    assert core.delivery.stalled and core.delivery.failed
    core.tick(core.node.clock.monotonic())
    assert [name_of(c) for c in take(core)[0]] == ["UNLIVE", "XREADGROUP"]


def test_while_redis_is_away_a_catch_up_retries_only_at_the_sweep() -> None:
    """The catch-up's UNLIVE and read both fail (Redis away): no new read comes of the
    failures themselves (that was a loop at event-loop speed), one per sweep tick."""
    core, _ = opened()
    core.delivery.restart()  # the node's channel went away
    for _ in range(3):
        calls, _ = take(core)
        assert [name_of(c) for c in calls] in (
            ["UNLIVE", "UNLIVE", "XREADGROUP"],
            ["UNLIVE", "XREADGROUP"],
        )
        for call in calls:
            feed(core, call, Unavailable())
        assert take(core) == ([], [])
        core.tick(core.node.clock.monotonic())


def test_an_earlier_sockets_ack_racing_the_catch_up_leaves_nothing_out() -> None:
    """An ack of an entry the previous socket got is looked up on the slow lane; the
    catch-up sends the entry again meanwhile. Once acked, it is not out any more (it
    would be sent again at every redelivery timeout)."""
    core = make()
    model = Inbox()
    msg_id = model.message_from_peer(1)
    model.pending.add(1)
    model.delivered_upto = 1  # delivered to the previous socket, not acked
    core.start()
    core.receive(orjson.dumps({"type": "ack", "msgIds": [msg_id]}).decode())
    calls, _ = take(core)
    for call in calls:  # GET, CLAIM; then the pending read is sent, the ack held
        feed(core, call, model.answer(call))
    calls, _ = take(core)
    assert [name_of(c) for c in calls] == ["XREADGROUP"]
    job = core.lane.next()
    assert isinstance(job, FetchEntries)
    feed(core, calls[0], model.answer(calls[0]))  # the catch-up sends it again
    assert msg_id in core.ledger.out
    core.lane.done([inbox.decode(msg_id, model._fields(1))])
    assert core.lane.next() is not None  # StoreReceipts
    core.lane.done(None)
    assert msg_id not in core.ledger.out and not core.ledger.knows(msg_id)


def test_live_delivery_stops_at_the_unacked_entry_cap() -> None:
    core, _ = opened(unacked_max_entries=3)
    token = core.delivery.token
    assert token is not None
    core.pushed(token, [entry(i) for i in range(1, 6)])
    assert list(core.ledger.out) == ["1-0", "2-0", "3-0"] and core.delivery.catching
    take(core)
    core.delivery.step()
    assert core.delivery.stalled and take(core) == ([], [])  # full: nothing read
    core.receive('{"type": "ack", "msgIds": ["1-0"]}')
    assert [name_of(c) for c in take(core)[0]][:2] == ["UNLIVE", "XREADGROUP"]


def test_the_unacked_byte_cap_holds_too() -> None:
    size = len(entry(1).frame)
    core, _ = opened(unacked_max_bytes=2 * size + size // 2)
    assert core.delivery.token is not None
    core.pushed(core.delivery.token, [entry(i) for i in range(1, 6)])
    assert core.ledger.out_bytes == 3 * size
    core.ledger.release("2-0")
    assert core.ledger.out_bytes == 2 * size
    core.ledger.hold(entry(1), 0.0)  # sent again: counted once
    assert core.ledger.out_bytes == 2 * size and list(core.ledger.out) == ["3-0", "1-0"]


def test_unacked_entries_go_again_after_the_redelivery_timeout() -> None:
    clock = Clock()
    core = make(clock=clock, redelivery_s=10)
    model = Inbox()
    core.start()
    run(core, model)
    written(core)
    assert core.delivery.token is not None
    core.pushed(core.delivery.token, [entry(1), entry(2)])
    written(core)
    clock.advance(5)
    core.tick(clock.t)
    assert written(core) == []
    clock.advance(6)
    core.tick(clock.t)
    assert [f["msgId"] for f in written(core)] == ["1-0", "2-0"]
    assert core.ledger.out["1-0"][1] == clock.t  # stamped again


def test_reads_may_name_what_is_out_or_being_acked_only() -> None:
    core = make()
    core.ledger.hold(entry(1), 0.0)
    core.ledger.hold(inbox.Entry("2-0", "r", PEER, "c2", b"r"), 0.0)  # a receipt
    core.ledger.acking_now([entry(3)])
    assert core.ledger.holds(PEER) == {"c1", "c3"}
    assert core.ledger.holds("+15550003333") == set()


# -- acks --------------------------------------------------------------------------


def delivered(core: SocketCore, model: Inbox, n: int) -> list[str]:
    """n messages from PEER, stored, pushed and written to the socket."""
    ids = [model.message_from_peer(i) for i in range(n)]
    while model.pushes:
        token, entries = parse_push(model.pushes.popleft())
        core.pushed(token, entries)
    written(core)
    return ids


def test_an_ack_stores_receipts_first_then_removes_the_entries() -> None:
    clock = Clock()
    core, model = opened(clock=clock)
    ids = delivered(core, model, 2)
    core.receive(orjson.dumps({"type": "ack", "msgIds": ids}).decode())
    calls, _ = take(core)
    assert [name_of(c) for c in calls] == ["RECEIPT"]  # one per sender
    assert calls[0].argv[2] == "p0,p1"
    feed(core, calls[0], ["ok"])
    calls, _ = take(core)
    assert [name_of(c) for c in calls] == ["XACK", "EXPIRE", "EXPIRE"]  # the only device
    assert all(c.defer for c in calls)
    for call in calls:
        feed(core, call, model.answer(call))
    assert not core.ledger.out and core.ledger.acking is None
    assert written(core) == []  # an ack that goes through is not answered
    assert model.entries() == ids  # acked, in the stream until the next trim
    core.tick(clock.monotonic())
    assert run(core, model) == []  # not due yet
    clock.advance(TRIM_AFTER_S)
    core.tick(clock.monotonic())
    calls, _ = take(core)
    assert [name_of(c) for c in calls] == ["TRIM"]
    assert list(calls[0].args) == [keys.inbox(ME), keys.account(ME)]
    assert list(calls[0].argv) == ids
    feed(core, calls[0], model.answer(calls[0]))
    assert model.entries() == []
    clock.advance(TRIM_AFTER_S)
    core.tick(clock.monotonic())
    assert run(core, model) == []  # nothing acked since: no trim


def test_a_trim_rides_with_an_xack_answered_once_the_first_waited() -> None:
    """Trims go at XACK replies once due, so the sockets' trims do not all fall on the
    node's sweep; a failed trim gives its ids back to the next."""
    clock = Clock()
    core, _ = opened(clock=clock)
    core.trimmed_later(["1-0"])
    clock.advance(TRIM_AFTER_S / 2)
    core.trimmed_later(["2-0"])
    assert take(core)[0] == []
    clock.advance(TRIM_AFTER_S / 2)
    core.trimmed_later(["3-0"])
    calls, _ = take(core)
    assert [name_of(c) for c in calls] == ["TRIM"] and list(calls[0].argv) == ["1-0", "2-0", "3-0"]
    assert core.to_trim == [] and core.trim_due is None
    feed(core, calls[0], ConnectionError("lost"))
    assert core.to_trim == ["1-0", "2-0", "3-0"] and core.trim_due is not None
    clock.advance(TRIM_AFTER_S)
    core.tick(clock.monotonic())
    assert [list(c.argv) for c in take(core)[0]] == [["1-0", "2-0", "3-0"]]


def test_a_trim_goes_at_once_when_trim_batch_ids_wait() -> None:
    core, _ = opened()
    core.trimmed_later([f"{i}-0" for i in range(TRIM_BATCH - 1)])
    assert take(core)[0] == []
    core.trimmed_later([f"{TRIM_BATCH}-0"])
    calls, _ = take(core)
    assert [name_of(c) for c in calls] == ["TRIM"] and len(calls[0].argv) == TRIM_BATCH
    assert core.to_trim == []


def test_a_session_that_knows_several_devices_acks_with_the_script() -> None:
    """lua.ACK_DEVICE deletes only what every listed device is done with; no trim."""
    core, model = opened()
    core.devices_now(2)
    ids = delivered(core, model, 1)
    receipt_id = model.receipt_from_peer(["s1"])
    while model.pushes:
        core.pushed(*parse_push(model.pushes.popleft()))
    core.receive(orjson.dumps({"type": "ack", "msgIds": [receipt_id]}).decode())
    calls, _ = take(core)
    assert [name_of(c) for c in calls] == ["ACK_DEVICE"]
    assert list(calls[0].args) == [keys.inbox(ME), keys.account(ME)]
    assert list(calls[0].argv) == [keys.GROUP, receipt_id]
    feed(core, calls[0], model.answer(calls[0]))
    core.tick(core.node.clock.monotonic())
    assert run(core, model) == []
    assert model.entries() == ids


def acking_a_receipt() -> tuple[SocketCore, Inbox]:
    """A one-device session that got a receipt and sent its ack."""
    core, model = opened()
    ids = [model.receipt_from_peer(["s1"])]
    while model.pushes:
        core.pushed(*parse_push(model.pushes.popleft()))
    core.receive(orjson.dumps({"type": "ack", "msgIds": ids}).decode())
    return core, model


def test_an_xack_answered_after_the_socket_ended_trims_at_its_reply() -> None:
    core, model = acking_a_receipt()
    calls, _ = take(core)
    assert [name_of(c) for c in calls] == ["XACK"]
    core.ended()
    assert run(core, model) == ["RELEASE"]  # nothing acked yet: no trim
    feed(core, calls[0], model.answer(calls[0]))
    assert run(core, model) == ["TRIM"]
    assert model.entries() == []


def test_a_socket_that_ends_trims_what_it_acked() -> None:
    core, model = acking_a_receipt()
    assert run(core, model) == ["XACK"]
    core.ended()
    assert run(core, model) == ["TRIM", "RELEASE"]
    assert model.entries() == []


def test_an_ack_removes_and_shortens_with_deferred_calls() -> None:
    """Deferred calls in the acker's slot: one lua.ACK_DEVICE of every id (a device
    linked meanwhile is seen in the same script), then each acked message's dedupe key
    shortened to the window (EXPIRE ... LT); a receipt has no dedupe key."""
    other = "+15550003333"
    core, model = opened(dedupe_window_s=42)
    ids = delivered(core, model, 2)
    model.add({"k": "m", "f": other, "i": "o1", "b": "hi", "t": "1"})
    receipt_id = model.receipt_from_peer(["s1"])
    while model.pushes:
        core.pushed(*parse_push(model.pushes.popleft()))
    written(core)
    acked = [*ids, "3-0", receipt_id]
    core.receive(orjson.dumps({"type": "ack", "msgIds": acked}).decode())
    calls, _ = take(core)
    assert [name_of(c) for c in calls] == ["RECEIPT", "RECEIPT"]  # one per sender
    for call in calls:
        feed(core, call, ["ok"])
    calls, _ = take(core)
    assert [name_of(c) for c in calls] == ["XACK", "EXPIRE", "EXPIRE", "EXPIRE"]
    assert all(c.defer for c in calls)  # one pipeline, with others
    ack, *shorten = calls
    assert list(ack.args[:3]) == ["XACK", keys.inbox(ME), keys.GROUP]
    assert sorted(ack.args[3:]) == sorted(acked)  # receipts too
    assert [c.args for c in shorten] == [
        ("EXPIRE", keys.dedupe(ME, PEER, "p0"), 42, "LT"),
        ("EXPIRE", keys.dedupe(ME, PEER, "p1"), 42, "LT"),
        ("EXPIRE", keys.dedupe(ME, other, "o1"), 42, "LT"),
    ]
    for call in calls:
        feed(core, call, model.answer(call))
    assert core.ledger.acking is None and written(core) == []


def test_an_ack_of_receipts_only_shortens_nothing() -> None:
    core, model = opened()
    ids = [model.receipt_from_peer(["s1"]), model.receipt_from_peer(["s2"])]
    while model.pushes:
        core.pushed(*parse_push(model.pushes.popleft()))
    core.receive(orjson.dumps({"type": "ack", "msgIds": ids}).decode())
    calls, _ = take(core)
    assert [name_of(c) for c in calls] == ["XACK"]  # no receipt, no dedupe key
    assert list(calls[0].args[3:]) == ids


def test_a_receipt_that_cannot_be_stored_keeps_the_entries_unacked() -> None:
    core, model = opened()
    ids = delivered(core, model, 1)
    core.receive(orjson.dumps({"type": "ack", "msgIds": ids}).decode())
    calls, _ = take(core)
    feed(core, calls[0], Unavailable())
    job = core.lane.next()
    assert isinstance(job, StoreReceipts) and job.ack_ids == ids
    assert job.messages == [(PEER, "p0")]  # shortened once the receipts are stored
    core.lane.done(Unavailable())
    assert written(core)[0]["code"] == "unavailable"
    assert list(core.ledger.out) == ids and core.ledger.acking is None


def test_a_failed_ack_answers_unavailable_and_keeps_redelivering() -> None:
    """The ack script fails (Redis away, or refused): the ack is refused, and the entry
    stays out on the socket to go again."""
    core, model = opened()
    ids = delivered(core, model, 1)
    core.receive(orjson.dumps({"type": "ack", "msgIds": ids}).decode())
    calls, _ = take(core)
    feed(core, calls[0], ["ok"])
    ack, _shorten = take(core)[0]
    feed(core, ack, Unavailable())
    error = written(core)[0]
    assert error["code"] == "unavailable" and error["message"] == ACK_FAILED
    assert list(core.ledger.out) == ids and core.ledger.acking is None
    assert core.node.metrics.acked == 0


def test_acking_what_an_earlier_socket_delivered_looks_it_up_first() -> None:
    core, _ = opened()
    core.receive('{"type": "ack", "msgIds": ["5-0"]}')
    job = core.lane.next()
    assert isinstance(job, FetchEntries) and job.msg_ids == ["5-0"]
    core.lane.done([entry(5)])
    job = core.lane.next()  # the same place in the lane: the receipts and the ack
    assert isinstance(job, StoreReceipts) and job.ack_ids == ["5-0"]
    assert job.messages == [(PEER, "c5")]
    assert core.ledger.knows("5-0")  # a pending read in flight must not send it again
    core.lane.done(None)
    assert core.lane.next() is None and not core.ledger.knows("5-0")
    assert core.node.metrics.acked == 1


def test_an_ack_of_ids_being_acked_already_is_answered_at_once() -> None:
    core, model = opened()
    ids = delivered(core, model, 1)
    frame = orjson.dumps({"type": "ack", "msgIds": ids}).decode()
    core.receive(frame)
    take(core)
    core.receive(frame)
    assert take(core) == ([], []) and core.answers.queue is not None


# -- read receipts and typing ------------------------------------------------------


def read(ids: list[str], to: str = PEER) -> str:
    return orjson.dumps({"type": "read", "to": to, "ids": ids}).decode()


def test_a_read_names_only_messages_delivered_each_once() -> None:
    core, model = opened()
    delivered(core, model, 1)
    core.receive(read(["p0", "zz"]))
    calls, _ = take(core)
    assert name_of(calls[0]) == "READ" and calls[0].argv == [PEER, "g", "1", "0"]  # p0 out
    assert list(calls[0].args[:2]) == [keys.inbox(ME), keys.unread(ME)]
    feed(core, calls[0], [1, 0, [1], 0])
    calls, _ = take(core)
    assert name_of(calls[0]) == "RECEIPT" and calls[0].argv[1:3] == ["read", "p0"]
    feed(core, calls[0], ["ok"])
    assert written(core) == []


def test_a_read_of_undelivered_ids_is_an_invalid_frame() -> None:
    core, _ = opened()
    core.receive(read(["p0"]))
    calls, _ = take(core)
    feed(core, calls[0], [0, 1, [], 0])
    assert written(core)[0]["code"] == "invalid_frame"


def test_a_read_with_no_record_asks_whether_the_user_exists() -> None:
    core, _ = opened()
    core.receive(read(["p0"]))
    calls, _ = take(core)
    feed(core, calls[0], [1, 0, [], 0])
    assert core.lane.next() == CheckKnown(PEER)
    core.lane.done(None)
    assert written(core) == []


def test_a_full_inbox_unmarks_the_read() -> None:
    core, model = opened()
    delivered(core, model, 1)
    core.receive(read(["p0"]))
    calls, _ = take(core)
    feed(core, calls[0], [0, 0, [1], 0])
    calls, _ = take(core)
    feed(core, calls[0], ["full"])
    calls, _ = take(core)
    assert [name_of(c) for c in calls] == ["UNREAD"]
    assert list(calls[0].args) == [keys.unread(ME), keys.dedupe(ME, PEER, "p0")]
    assert calls[0].argv == [PEER, 0, keys.DEDUPE_SAFETY_TTL_S, inbox.UNREAD_MAX]
    assert written(core)[0]["code"] == "inbox_full"


def test_a_read_past_the_window_rests_on_the_unread_count() -> None:
    """Acked long ago, p7 has no record left: READ vouches for it from the reader's count
    of PEER's unread messages (no CheckKnown, no error), and the receipt names it."""
    core, _ = opened()
    core.receive(read(["p7", "p8"]))
    calls, _ = take(core)
    feed(core, calls[0], [1, 0, [1], 1])  # p8 found nothing left to count against
    calls, _ = take(core)
    assert name_of(calls[0]) == "RECEIPT" and calls[0].argv[1:3] == ["read", "p7"]
    feed(core, calls[0], ["ok"])
    assert written(core) == [] and core.lane.next() is None


def test_a_read_that_cannot_be_stored_gives_the_count_back() -> None:
    """The receipt fails: UNREAD unmarks the ids and gives back what READ took from the
    count for them, so the client's next read of them counts."""
    core, _ = opened()
    core.receive(read(["p1", "p7", "p8"]))
    calls, _ = take(core)
    feed(core, calls[0], [0, 0, [1, 2, 3], 2])
    calls, _ = take(core)
    assert calls[0].argv[2] == "p1,p7,p8"
    feed(core, calls[0], Unavailable())
    calls, _ = take(core)
    assert [name_of(c) for c in calls] == ["UNREAD"]
    assert calls[0].args[0] == keys.unread(ME) and calls[0].argv[:2] == [PEER, 2]
    assert written(core)[0]["code"] == "unavailable"


def test_typing_goes_through_the_script_and_arrives_for_a_ready_socket() -> None:
    core, _ = opened()
    core.receive(orjson.dumps({"type": "typing", "to": PEER, "state": "start"}).decode())
    calls, _ = take(core)
    assert name_of(calls[0]) == "TYPING" and calls[0].argv == [ME, "start", PEER]
    feed(core, calls[0], 1)
    core.typing_from(PEER, "stop")
    assert written(core) == [{"type": "typing", "from": PEER, "state": "stop"}]


# -- closing -----------------------------------------------------------------------


def test_ending_saves_spent_send_tokens_and_releases_the_route() -> None:
    core, _ = opened(send_rate=1, send_burst=5)
    core.receive(send(1))
    take(core)
    core.ended()
    calls, _ = take(core)
    assert [name_of(c) for c in calls] == ["SET", "RELEASE"]
    assert calls[0].args[-2:] == ("EX", 1)
    core.answers.push(b"x")
    assert core.answers.take() == []  # nothing is written once closed


def test_closing_twice_emits_one_close() -> None:
    core, _ = opened()
    core.close(CloseCode.REPLACED, "replaced")
    core.close(CloseCode.POLICY, "again")
    _, other = take(core)
    assert [a.code for a in other if isinstance(a, Close)] == [CloseCode.REPLACED]


@pytest.mark.parametrize("reply", [["gone"]])
def test_go_live_finding_another_session_closes_with_4001(reply: list[str]) -> None:
    core = make()
    core.start()
    model = Inbox()
    while True:
        calls, _ = take(core)
        go = [c for c in calls if name_of(c) == "GO_LIVE"]
        for c in calls:
            feed(core, c, reply if c in go else model.answer(c))
        if go:
            break
    _, other = take(core)
    assert [a.code for a in other if isinstance(a, Close)] == [CloseCode.REPLACED]


def test_the_core_imports_nothing_that_does_io() -> None:
    """The core is sans-I/O by construction: importing it loads no network library and
    no module of chatnode that opens a connection."""
    code = (
        "import sys, chatnode.core.socket, chatnode.core.actions;"
        "print(' '.join(sorted(sys.modules)))"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True
        ).stdout.split()
    )
    io = {"asyncpg", "aiohttp", "websockets", "redis", "uvloop", "hiredis"}
    io |= {f"chatnode.{m}" for m in ("redisio", "resp", "wsserver", "gateway", "routing")}
    io |= {f"chatnode.{m}" for m in ("presence", "accounts", "blocks", "auth", "slowpath")}
    assert not loaded & io


def test_the_slow_lane_has_one_runner_even_when_held_frames_refill_it() -> None:
    """Two acks of ids an earlier socket delivered, sent before the claim: the second is
    released while the first's job finishes, and joins the running lane (no second
    runner, no job run twice)."""
    core = make()
    model = Inbox()
    core.start()
    core.receive('{"type": "ack", "msgIds": ["5-0"]}')
    core.receive('{"type": "ack", "msgIds": ["6-0"]}')
    calls, _ = take(core)
    for call in calls:
        feed(core, call, model.answer(call))
    _, other = take(core)
    assert other.count(RunSlow()) == 1
    jobs = []
    while (job := core.lane.next()) is not None:
        jobs.append(job)
        core.lane.done([entry(int(job.msg_ids[0][0]))] if isinstance(job, FetchEntries) else None)
        assert RunSlow() not in take(core)[1]
    assert [type(j).__name__ for j in jobs] == [
        "FetchEntries",
        "StoreReceipts",
        "FetchEntries",
        "StoreReceipts",
    ]
    assert [j.msg_ids for j in jobs if isinstance(j, FetchEntries)] == [["5-0"], ["6-0"]]
    assert core.node.metrics.acked == 2 and not core.lane.running
    core.receive('{"type": "ack", "msgIds": ["7-0"]}')  # a new run later starts a runner
    assert RunSlow() in take(core)[1]
