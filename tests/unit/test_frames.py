"""chatnode.frames: client frame parsing and server frame encoding (PROTOCOL.md)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatnode import frames
from chatnode.errors import Code
from chatnode.frames import Ack, FrameError, Read, Send, Typing, parse_client

ME = "+15550000001"
BOB = "+15550000002"
MSG_ID = "1700000000000-0"


def enc(obj: Any) -> str:
    return json.dumps(obj)


_MISSING = object()


def refused(data: str | bytes, me: str = ME) -> FrameError:
    with pytest.raises(FrameError) as info:
        parse_client(data, me)
    return info.value


def send_frame(**changes: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "send", "id": "c-1", "to": BOB, "body": "hi"}
    frame.update(changes)
    return {k: v for k, v in frame.items() if v is not _MISSING}


# --- valid frames -------------------------------------------------------------------


def test_send_parses_into_send() -> None:
    frame = parse_client(enc({"type": "send", "id": "abc_-XYZ09", "to": BOB, "body": "héllo"}), ME)
    assert frame == Send(id="abc_-XYZ09", to=BOB, body="héllo")
    assert frame.type == "send"


@pytest.mark.parametrize("to", ["1234567", "+1234567", "123456789012345", "+123456789012345"])
def test_send_accepts_every_valid_number_shape(to: str) -> None:
    frame = parse_client(enc(send_frame(to=to)), ME)
    assert isinstance(frame, Send)
    assert frame.to == to


@pytest.mark.parametrize("client_id", ["a", "A" * 64, "_", "-", "a_b-C9"])
def test_send_accepts_every_valid_client_id(client_id: str) -> None:
    frame = parse_client(enc(send_frame(id=client_id)), ME)
    assert isinstance(frame, Send)
    assert frame.id == client_id


def test_send_ignores_unknown_extra_fields() -> None:
    frame = parse_client(enc(send_frame(extra={"x": 1}, ts=5)), ME)
    assert frame == Send(id="c-1", to=BOB, body="hi")


def test_send_body_keeps_text_exactly() -> None:
    body = "  line1\nline2 \u2603 \U0001f600 \x00"
    frame = parse_client(enc(send_frame(body=body)), ME)
    assert isinstance(frame, Send)
    assert frame.body == body


def test_the_same_frame_as_bytes_is_refused_but_as_text_is_fine() -> None:
    text = enc(send_frame())
    assert isinstance(parse_client(text, ME), Send)
    assert refused(text.encode()).code == Code.INVALID_FRAME


def test_ack_parses_into_ack() -> None:
    frame = parse_client(enc({"type": "ack", "msgIds": [MSG_ID, "1-1"]}), ME)
    assert frame == Ack(msg_ids=(MSG_ID, "1-1"))
    assert frame.type == "ack"


def test_ack_drops_duplicate_ids_keeping_order() -> None:
    frame = parse_client(enc({"type": "ack", "msgIds": ["2-0", "1-0", "2-0"]}), ME)
    assert frame == Ack(msg_ids=("2-0", "1-0"))


def test_ack_accepts_the_max_number_of_ids() -> None:
    ids = [f"{i}-0" for i in range(frames.MAX_IDS_PER_FRAME)]
    frame = parse_client(enc({"type": "ack", "msgIds": ids}), ME)
    assert isinstance(frame, Ack)
    assert frame.msg_ids == tuple(ids)


def test_read_parses_into_read() -> None:
    frame = parse_client(enc({"type": "read", "to": BOB, "ids": ["c-1", "c-2"]}), ME)
    assert frame == Read(to=BOB, ids=("c-1", "c-2"))
    assert frame.type == "read"


def test_read_takes_at_most_100_ids() -> None:
    """Each id of a read becomes part of an entry in someone's inbox: a small cap."""
    ids = [f"c{i}" for i in range(frames.MAX_READ_IDS)]
    frame = parse_client(enc({"type": "read", "to": BOB, "ids": ids}), ME)
    assert isinstance(frame, Read) and len(frame.ids) == 100
    err = refused(enc({"type": "read", "to": BOB, "ids": [*ids, "c100"]}))
    assert err.code == Code.INVALID_FRAME and "1 to 100" in err.message


@pytest.mark.parametrize("state", ["start", "stop"])
def test_typing_parses_into_typing(state: str) -> None:
    frame = parse_client(enc({"type": "typing", "to": BOB, "state": state}), ME)
    assert frame == Typing(to=BOB, state=state)
    assert frame.type == "typing"


# --- body size: bytes, not characters ---------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        "a" * 16384,
        "é" * 8192,  # 2 bytes each
        "\u20ac" * 5461 + "a",  # 3 bytes each: 16383 + 1
        "\U0001f600" * 4096,  # 4 bytes each
    ],
    ids=["ascii", "2-byte", "3-byte", "4-byte"],
)
def test_body_of_exactly_16384_utf8_bytes_is_accepted(body: str) -> None:
    assert len(body.encode("utf-8")) == 16384
    frame = parse_client(enc(send_frame(body=body)), ME)
    assert isinstance(frame, Send)
    assert frame.body == body


@pytest.mark.parametrize(
    "body",
    [
        "a" * 16385,
        "é" * 8192 + "a",
        "\U0001f600" * 4096 + "a",
        "é" * 8193,  # only 8193 characters, but 16386 bytes
        "\U0001f600" * 4097,  # 4097 characters, 16388 bytes
    ],
    ids=["ascii", "2-byte+1", "4-byte+1", "2-byte-over", "4-byte-over"],
)
def test_body_over_16384_utf8_bytes_is_too_large(body: str) -> None:
    assert len(body.encode("utf-8")) > 16384
    err = refused(enc(send_frame(body=body)))
    assert err.code == Code.TOO_LARGE
    assert err.ref == "c-1"


def test_body_size_counts_bytes_with_ensure_ascii_json_escapes() -> None:
    # json.dumps escapes non-ASCII as \uXXXX; the size is that of the decoded text.
    body = "é" * 8192
    data = json.dumps(send_frame(body=body), ensure_ascii=True)
    assert isinstance(parse_client(data, ME), Send)
    err = refused(json.dumps(send_frame(body=body + "a"), ensure_ascii=True))
    assert err.code == Code.TOO_LARGE


# --- invalid frames -----------------------------------------------------------------


def test_binary_frame_is_invalid_with_no_ref() -> None:
    err = refused(enc(send_frame()).encode("utf-8"))
    assert err.code == Code.INVALID_FRAME
    assert err.ref is None


@pytest.mark.parametrize("data", ["", "not json", "{", '{"type":"send",}', "NaN", "{'a': 1}"])
def test_non_json_is_invalid_with_no_ref(data: str) -> None:
    err = refused(data)
    assert err.code == Code.INVALID_FRAME
    assert err.ref is None


@pytest.mark.parametrize("value", [[], [1], "send", 1, 1.5, True, None])
def test_non_object_json_is_invalid_with_no_ref(value: Any) -> None:
    err = refused(enc(value))
    assert err.code == Code.INVALID_FRAME
    assert err.ref is None


def test_array_holding_a_valid_frame_is_invalid() -> None:
    err = refused(enc([send_frame()]))
    assert err.code == Code.INVALID_FRAME


@pytest.mark.parametrize("kind", [_MISSING, None, "", "SEND", "Send", "message", "hello", 1, []])
def test_unknown_or_missing_type_is_invalid_with_ref(kind: Any) -> None:
    err = refused(enc(send_frame(type=kind)))
    assert err.code == Code.INVALID_FRAME
    assert err.ref == "c-1"


def test_unknown_type_without_id_has_no_ref() -> None:
    err = refused(enc({"type": "nope"}))
    assert err.code == Code.INVALID_FRAME
    assert err.ref is None


@pytest.mark.parametrize("bad_id", ["", "a" * 65, "has space", "dot.id", "é", "a\n", "a/b", "{x}"])
def test_send_with_malformed_string_id_is_invalid_and_refs_that_id(bad_id: str) -> None:
    err = refused(enc(send_frame(id=bad_id)))
    assert err.code == Code.INVALID_FRAME
    assert err.ref == bad_id


@pytest.mark.parametrize("bad_id", [_MISSING, None, 5, 1.0, True, ["c-1"], {"id": "c-1"}])
def test_send_with_missing_or_non_string_id_is_invalid_with_no_ref(bad_id: Any) -> None:
    err = refused(enc(send_frame(id=bad_id)))
    assert err.code == Code.INVALID_FRAME
    assert err.ref is None


BAD_TO = [
    _MISSING,
    None,
    15550000002,
    "",
    "123456",  # 6 digits
    "1234567890123456",  # 16 digits
    "+",
    "++1234567",
    "1234567+",
    "12345 67",
    "+1-555-0000",
    "abcdefgh",
    "\uff11\uff12\uff13\uff14\uff15\uff16\uff17",  # full-width digits
    "١٢٣٤٥٦٧",  # Arabic-Indic digits
    "1234567\n",
    " 1234567",
    ["1234567"],
]


@pytest.mark.parametrize("to", BAD_TO)
def test_send_with_bad_to_is_invalid(to: Any) -> None:
    err = refused(enc(send_frame(to=to)))
    assert err.code == Code.INVALID_FRAME
    assert err.ref == "c-1"


@pytest.mark.parametrize("to", BAD_TO)
def test_read_with_bad_to_is_invalid(to: Any) -> None:
    frame = {"type": "read", "to": to, "ids": ["c-1"]}
    if to is _MISSING:
        del frame["to"]
    assert refused(enc(frame)).code == Code.INVALID_FRAME


@pytest.mark.parametrize("to", BAD_TO)
def test_typing_with_bad_to_is_invalid(to: Any) -> None:
    frame = {"type": "typing", "to": to, "state": "start"}
    if to is _MISSING:
        del frame["to"]
    assert refused(enc(frame)).code == Code.INVALID_FRAME


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "send", "id": "c-1", "to": ME, "body": "hi"},
        {"type": "read", "to": ME, "ids": ["c-1"]},
        {"type": "typing", "to": ME, "state": "start"},
    ],
    ids=["send", "read", "typing"],
)
def test_to_yourself_is_invalid(frame: dict[str, Any]) -> None:
    err = refused(enc(frame))
    assert err.code == Code.INVALID_FRAME
    # the same frame from someone else is fine
    assert parse_client(enc(frame), BOB).type == frame["type"]


def test_to_is_compared_exactly_as_given() -> None:
    # "+1555..." and "1555..." are different users (PROTOCOL.md: Identity)
    frame = parse_client(enc(send_frame(to=ME.lstrip("+"))), ME)
    assert isinstance(frame, Send)
    assert frame.to == ME.lstrip("+")


def test_send_to_yourself_refs_the_id() -> None:
    assert refused(enc(send_frame(to=ME))).ref == "c-1"


@pytest.mark.parametrize("body", ["", _MISSING, None, 5, ["hi"], {"text": "hi"}, True])
def test_send_with_empty_missing_or_non_string_body_is_invalid(body: Any) -> None:
    err = refused(enc(send_frame(body=body)))
    assert err.code == Code.INVALID_FRAME
    assert err.ref == "c-1"


BAD_MSG_IDS = [
    _MISSING,
    None,
    "1-0",
    [],
    [1],
    ["1"],
    ["1-"],
    ["-1"],
    ["a-0"],
    ["1-0-0"],
    ["1-0 "],
    ["1-0\n"],
    ["*"],
    ["1-0", None],
    ["1-0", 2],
    ["1" * 21 + "-0"],
    {"1-0": True},
    [f"{i}-0" for i in range(frames.MAX_IDS_PER_FRAME + 1)],
]


@pytest.mark.parametrize("msg_ids", BAD_MSG_IDS)
def test_ack_with_bad_msg_ids_is_invalid(msg_ids: Any) -> None:
    frame: dict[str, Any] = {"type": "ack", "msgIds": msg_ids}
    if msg_ids is _MISSING:
        del frame["msgIds"]
    err = refused(enc(frame))
    assert err.code == Code.INVALID_FRAME
    assert err.ref is None


def test_ack_with_bad_msg_ids_refs_a_string_id_if_given() -> None:
    err = refused(enc({"type": "ack", "id": "a-1", "msgIds": []}))
    assert err.ref == "a-1"


BAD_IDS = [
    _MISSING,
    None,
    "c-1",
    [],
    [1],
    [""],
    ["a" * 65],
    ["has space"],
    ["c-1", None],
    ["c-1", "é"],
    {"c-1": True},
    [f"x{i}" for i in range(frames.MAX_READ_IDS + 1)],
]


@pytest.mark.parametrize("ids", BAD_IDS)
def test_read_with_bad_ids_is_invalid(ids: Any) -> None:
    frame: dict[str, Any] = {"type": "read", "to": BOB, "ids": ids}
    if ids is _MISSING:
        del frame["ids"]
    err = refused(enc(frame))
    assert err.code == Code.INVALID_FRAME
    assert err.ref is None


@pytest.mark.parametrize("state", [_MISSING, None, "", "START", "started", "typing", 1, True, []])
def test_typing_with_bad_state_is_invalid(state: Any) -> None:
    frame: dict[str, Any] = {"type": "typing", "to": BOB, "state": state}
    if state is _MISSING:
        del frame["state"]
    err = refused(enc(frame))
    assert err.code == Code.INVALID_FRAME
    assert err.ref is None


def test_frame_error_carries_a_message_for_people() -> None:
    err = refused(enc(send_frame(body="")))
    assert isinstance(err.message, str)
    assert err.message
    assert str(err) == err.message


# --- properties -----------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)

frame_like = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["send", "ack", "read", "typing"]) | json_values,
        "id": st.from_regex(frames.CLIENT_ID_RE) | json_values,
        "to": st.sampled_from([ME, BOB]) | json_values,
        "body": st.text() | json_values,
        "msgIds": st.lists(st.sampled_from([MSG_ID, "1-0", "x"]), max_size=3) | json_values,
        "ids": st.lists(st.from_regex(frames.CLIENT_ID_RE), max_size=3) | json_values,
        "state": st.sampled_from(["start", "stop"]) | json_values,
    },
)


def _parse_or_error(data: str | bytes) -> None:
    try:
        frame = parse_client(data, ME)
    except FrameError as err:
        assert err.code in (Code.INVALID_FRAME, Code.TOO_LARGE)
        assert err.ref is None or isinstance(err.ref, str)
    else:
        assert isinstance(frame, Send | Ack | Read | Typing)


@given(st.text())
def test_arbitrary_text_only_ever_raises_frame_error(data: str) -> None:
    _parse_or_error(data)


@given(st.binary())
def test_arbitrary_bytes_are_always_invalid_frame(data: bytes) -> None:
    err = refused(data)
    assert err.code == Code.INVALID_FRAME
    assert err.ref is None


@given(json_values | frame_like)
def test_arbitrary_json_only_ever_raises_frame_error(value: Any) -> None:
    _parse_or_error(json.dumps(value))


@given(frame_like)
def test_ref_is_the_id_exactly_when_it_is_a_string(value: dict[str, Any]) -> None:
    try:
        frame = parse_client(json.dumps(value), ME)
    except FrameError as err:
        try:  # a lone surrogate is not UTF-8: such a frame is not JSON, so it has no id
            raw = orjson.loads(json.dumps(value)).get("id")
        except orjson.JSONDecodeError:
            raw = None
        assert err.ref == (raw if isinstance(raw, str) else None)
    else:
        assert frame.type == value["type"]
        if isinstance(frame, Send | Read | Typing):
            assert frames.is_mobile(frame.to)
            assert frame.to != ME


@given(
    client_id=st.from_regex(frames.CLIENT_ID_RE),
    to=st.from_regex(frames.MOBILE_RE).filter(lambda m: m != ME),
    body=st.text(min_size=1),
)
def test_every_valid_send_parses_back_to_its_fields(client_id: str, to: str, body: str) -> None:
    data = json.dumps({"type": "send", "id": client_id, "to": to, "body": body})
    if len(body.encode("utf-8")) > frames.MAX_BODY_BYTES:
        assert refused(data).code == Code.TOO_LARGE
    else:
        assert parse_client(data, ME) == Send(client_id, to, body)


def test_lone_surrogate_escape_is_invalid_not_a_crash() -> None:
    err = refused('{"type":"send","id":"c-1","to":"1234567","body":"\\ud800"}')
    assert err.code == Code.INVALID_FRAME


def test_lone_surrogate_in_the_text_itself_is_invalid_not_a_crash() -> None:
    err = refused('{"type":"send","id":"c-1","to":"1234567","body":"\ud800"}')
    assert err.code == Code.INVALID_FRAME


# --- server frames ---------------------------------------------------------------------


def decoded(data: bytes) -> dict[str, Any]:
    assert isinstance(data, bytes)
    obj = json.loads(data.decode("utf-8"))  # sent as a text frame: must be UTF-8
    assert isinstance(obj, dict)
    return obj


def test_hello_has_exactly_the_protocol_fields() -> None:
    obj = decoded(frames.hello(ME, "node-a", 30))
    assert obj == {"type": "hello", "mobileNo": ME, "node": "node-a", "heartbeat": 30}


def test_hello_of_a_named_device_adds_its_id() -> None:
    obj = decoded(frames.hello(ME, "node-a", 30, "7"))
    assert obj == {
        "type": "hello",
        "mobileNo": ME,
        "node": "node-a",
        "heartbeat": 30,
        "deviceId": "7",  # v2
    }


def test_hello_heartbeat_is_an_integer_when_whole_and_kept_when_not() -> None:
    whole = decoded(frames.hello(ME, "n", 30.0, "7"))["heartbeat"]
    assert whole == 30
    assert isinstance(whole, int)
    assert decoded(frames.hello(ME, "n", 0.5, "7"))["heartbeat"] == 0.5


def test_accepted_has_exactly_the_protocol_fields() -> None:
    obj = decoded(frames.accepted("c-1", MSG_ID, 1700000000123))
    assert obj == {"type": "accepted", "id": "c-1", "msgId": MSG_ID, "ts": 1700000000123}


def test_message_has_exactly_the_protocol_fields() -> None:
    obj = decoded(frames.message(MSG_ID, "c-1", BOB, "hé \U0001f600", 1700000000123))
    assert obj == {
        "type": "message",
        "msgId": MSG_ID,
        "id": "c-1",
        "from": BOB,
        "body": "hé \U0001f600",
        "ts": 1700000000123,
    }


@pytest.mark.parametrize("status", ["delivered", "read"])
def test_receipt_has_exactly_the_protocol_fields(status: str) -> None:
    obj = decoded(frames.receipt(MSG_ID, status, BOB, ["c-1", "c-2"], 1700000000123))
    assert obj == {
        "type": "receipt",
        "msgId": MSG_ID,
        "status": status,
        "by": BOB,
        "ids": ["c-1", "c-2"],
        "ts": 1700000000123,
    }


@pytest.mark.parametrize("state", ["start", "stop"])
def test_typing_has_exactly_the_protocol_fields(state: str) -> None:
    assert decoded(frames.typing(BOB, state)) == {"type": "typing", "from": BOB, "state": state}


def test_error_has_exactly_the_protocol_fields() -> None:
    obj = decoded(frames.error(Code.TOO_LARGE, "body is over 16384 bytes", "c-1"))
    assert obj == {
        "type": "error",
        "code": "too_large",
        "message": "body is over 16384 bytes",
        "ref": "c-1",
    }


def test_error_without_ref_sends_null() -> None:
    text = frames.error(Code.INVALID_FRAME, "nope", None)
    obj = decoded(text)
    assert "ref" in obj
    assert obj["ref"] is None
    assert obj["code"] == "invalid_frame"


def test_frame_error_round_trips_into_an_error_frame() -> None:
    err = refused(enc(send_frame(to=ME)))
    obj = decoded(frames.error(err.code, err.message, err.ref))
    assert obj["code"] == "invalid_frame"
    assert obj["ref"] == "c-1"


def test_ack_refuses_stream_ids_past_64_bits() -> None:
    """Redis would answer ERR for the whole ack: refused here, the others unharmed."""
    err = refused(enc({"type": "ack", "msgIds": ["1-0", f"{2**64}-0"]}))
    assert err.code == Code.INVALID_FRAME and "out of range" in err.message
    ok = parse_client(enc({"type": "ack", "msgIds": [f"{2**64 - 1}-{2**64 - 1}"]}), ME)
    assert isinstance(ok, Ack)


def test_ack_ids_are_written_as_redis_writes_them() -> None:
    """Leading zeros name the same entry: one id, not several (each would be a receipt)."""
    frame = parse_client(enc({"type": "ack", "msgIds": ["0005-00", "5-0", "05-0", "6-01"]}), ME)
    assert frame == Ack(msg_ids=("5-0", "6-1"))
