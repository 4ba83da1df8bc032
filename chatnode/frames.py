"""One typed value per client frame; parsing with validation, and server frame encoding.

No I/O here: the gateway feeds text in and writes the bytes out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from chatnode.errors import Code

MOBILE_RE = re.compile(r"^\+?[0-9]{7,15}\Z")
CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
MSG_ID_RE = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}\Z")
MAX_ID_PART = 2**64 - 1  # a stream id's parts are unsigned 64-bit numbers
MAX_FRAME_BYTES = 64 * 1024
MAX_BODY_BYTES = 16384
MAX_IDS_PER_FRAME = 1000  # msgIds in one ack
MAX_READ_IDS = 100  # client ids in one read receipt (each becomes part of a stored entry)
TYPING_STATES = ("start", "stop")


def is_mobile(value: object) -> bool:
    return isinstance(value, str) and MOBILE_RE.match(value) is not None


@dataclass(slots=True)  # not frozen: made per message; a frozen __init__ costs ~5x
class Send:
    id: str
    to: str
    body: str
    type: Literal["send"] = "send"


@dataclass(slots=True)  # not frozen: made per message; a frozen __init__ costs ~5x
class Ack:
    msg_ids: tuple[str, ...]
    type: Literal["ack"] = "ack"


@dataclass(frozen=True, slots=True)
class Read:
    to: str
    ids: tuple[str, ...]
    type: Literal["read"] = "read"


@dataclass(frozen=True, slots=True)
class Typing:
    to: str
    state: str
    type: Literal["typing"] = "typing"


ClientFrame = Send | Ack | Read | Typing


class FrameError(Exception):
    """A refused frame: its code, a message for people, and the frame's id if it had one."""

    def __init__(self, code: Code, message: str, ref: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref


def parse_client(data: str | bytes, me: str) -> ClientFrame:
    """Decode and validate one client frame sent by user `me`."""
    if isinstance(data, bytes):
        raise FrameError(Code.INVALID_FRAME, "frames must be UTF-8 JSON text, not binary")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise FrameError(Code.INVALID_FRAME, "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise FrameError(Code.INVALID_FRAME, "frame must be a JSON object")
    raw_id = obj.get("id")
    ref = raw_id if isinstance(raw_id, str) else None
    kind = obj.get("type")
    if kind == "send":
        return _send(obj, me, ref)
    if kind == "ack":
        return Ack(_id_list(obj, "msgIds", MSG_ID_RE, ref, MAX_IDS_PER_FRAME))
    if kind == "read":
        ids = _id_list(obj, "ids", CLIENT_ID_RE, ref, MAX_READ_IDS)
        return Read(_recipient(obj, me, ref), ids)
    if kind == "typing":
        state = obj.get("state")
        if state not in TYPING_STATES:
            raise FrameError(Code.INVALID_FRAME, "state must be 'start' or 'stop'", ref)
        return Typing(_recipient(obj, me, ref), state)
    raise FrameError(Code.INVALID_FRAME, "unknown or missing frame type", ref)


def _send(obj: dict[str, Any], me: str, ref: str | None) -> Send:
    if ref is None or CLIENT_ID_RE.match(ref) is None:
        raise FrameError(Code.INVALID_FRAME, "id must be 1-64 chars of [A-Za-z0-9_-]", ref)
    to = _recipient(obj, me, ref)
    body = obj.get("body")
    if not isinstance(body, str) or body == "":
        raise FrameError(Code.INVALID_FRAME, "body must be a non-empty string", ref)
    try:
        size = len(body.encode("utf-8"))
    except UnicodeEncodeError:
        raise FrameError(Code.INVALID_FRAME, "body is not valid UTF-8", ref) from None
    if size > MAX_BODY_BYTES:
        raise FrameError(Code.TOO_LARGE, f"body is over {MAX_BODY_BYTES} bytes", ref)
    return Send(ref, to, body)


def _recipient(obj: dict[str, Any], me: str, ref: str | None) -> str:
    to = obj.get("to")
    if not is_mobile(to):
        raise FrameError(Code.INVALID_FRAME, "to must be a mobile number", ref)
    assert isinstance(to, str)
    if to == me:
        raise FrameError(Code.INVALID_FRAME, "to must not be yourself", ref)
    return to


def _id_list(
    obj: dict[str, Any], name: str, pattern: re.Pattern[str], ref: str | None, most: int
) -> tuple[str, ...]:
    values = obj.get(name)
    if not isinstance(values, list) or not 0 < len(values) <= most:
        raise FrameError(Code.INVALID_FRAME, f"{name} must be a list of 1 to {most} ids", ref)
    for value in values:
        if not isinstance(value, str) or pattern.match(value) is None:
            raise FrameError(Code.INVALID_FRAME, f"{name} holds a malformed id", ref)
    if pattern is MSG_ID_RE:
        values = [_stream_id(value, name, ref) for value in values]
    return tuple(dict.fromkeys(values))


def _stream_id(value: str, name: str, ref: str | None) -> str:
    """A stream id as Redis writes it: `007-0` and `7-0` name one entry, and must not
    pass for two (an ack would then make two receipts)."""
    ms, _, seq = value.partition("-")
    parts = int(ms), int(seq)
    if max(parts) > MAX_ID_PART:
        raise FrameError(Code.INVALID_FRAME, f"{name} holds an id out of range", ref)
    return f"{parts[0]}-{parts[1]}"


# Server frames: small functions returning the encoded UTF-8 JSON, one per frame type.


def _dump(obj: dict[str, Any]) -> bytes:
    """UTF-8 JSON, written as a text frame as is."""
    return orjson.dumps(obj)


def hello(mobile: str, node: str, heartbeat: float, device: str | None = None) -> bytes:
    """`device`: the device's id for a session whose login named its device (v2); a v1
    login's hello is v1's, field for field."""
    beat: float | int = int(heartbeat) if float(heartbeat).is_integer() else heartbeat
    frame: dict[str, Any] = {"type": "hello", "mobileNo": mobile, "node": node, "heartbeat": beat}
    if device is not None:
        frame["deviceId"] = device
    return _dump(frame)


def accepted(client_id: str, msg_id: str, ts: int) -> bytes:
    return _dump({"type": "accepted", "id": client_id, "msgId": msg_id, "ts": ts})


def message(
    msg_id: str, client_id: str, sender: str, body: str, ts: int, to: str | None = None
) -> bytes:
    """`to`: a copy of the user's own send, for their other devices (v2): `from` is the
    user, `to` the recipient."""
    frame: dict[str, Any] = {
        "type": "message",
        "msgId": msg_id,
        "id": client_id,
        "from": sender,
        "body": body,
        "ts": ts,
    }
    if to is not None:
        frame["to"] = to
    return _dump(frame)


def receipt(
    msg_id: str, status: str, by: str, ids: list[str], ts: int, sender: str | None = None
) -> bytes:
    """`sender`: a `read` the user made on another device (v2): `by` is the user, `from`
    the sender of the messages read."""
    frame: dict[str, Any] = {
        "type": "receipt",
        "msgId": msg_id,
        "status": status,
        "by": by,
        "ids": ids,
        "ts": ts,
    }
    if sender is not None:
        frame["from"] = sender
    return _dump(frame)


def typing(sender: str, state: str) -> bytes:
    return _dump({"type": "typing", "from": sender, "state": state})


def error(code: str, message: str, ref: str | None) -> bytes:
    return _dump({"type": "error", "code": code, "message": message, "ref": ref})
