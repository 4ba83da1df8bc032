"""The Redis Streams inbox: enqueue (the send script), receipts, read, ack.

Each user's inbox is one stream with one consumer group per device. An entry stays
until every device of the user has acked it (XACK; then XDEL or XTRIM, lua.ACK_DEVICE
or lua.TRIM). Scripts touch only the owner's hash-tagged keys.

Delivery has two phases. A session that connects catches up: it reads its pending
entries (`0`), then new ones (`>`); the read that finds nothing new also turns its route
live (GO_LIVE, atomically). From then on the send and receipt scripts read each new
entry through the group themselves and publish it to the owner's node with the live
token: one round trip per message, no wake-up and no second read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from chatnode import frames, keys, logs
from chatnode.errors import Blocked, ChatError, InboxFull, Unavailable

log = logs.get(__name__)

READ_COUNT = 200
# The most a reader's count of one sender's messages stored and not read (keys.unread)
# holds. A reader that sends no reads (read receipts off) would bank one for every message
# ever stored, and could later send as many read receipts naming ids nobody can check;
# a full default inbox (CHATNODE_INBOX_LIMIT) of one sender's unread messages is more
# than a person reads back through.
UNREAD_MAX = 10_000


@dataclass(slots=True)  # not frozen: made per message; a frozen __init__ costs ~5x
class Stored:
    msg_id: str
    ts: int
    new: bool = field(default=False, compare=False)  # stored now (not a resend's answer)


@dataclass(slots=True)  # not frozen: made per message; a frozen __init__ costs ~5x
class Entry:
    """One inbox entry as read, with its frame already encoded."""

    msg_id: str
    kind: str  # "m" message, "r" receipt, "o" own send, "y" own read, "" deleted
    sender: str
    client_id: str
    frame: bytes
    device: str = ""  # "o" and "y": the device it came from (that one skips it)


# -- the calls: pure builders of a script's keys and arguments, and readers of replies


def message_call(
    sender: str, send: frames.Send, ts: int, limit: int, window_s: int, push: bool = True
) -> tuple[list[str], list[Any]]:
    """SEND's keys and arguments; `window_s` is the dedupe window (a blocked send's key
    gets it at once, a stored one's at its ack). `push`: the script pushes the entry to
    a live recipient; else nudge_call does, after a replica has it."""
    to = send.to
    keys_ = [
        keys.account(to),
        keys.blocks(to),
        keys.inbox(to),
        keys.dedupe(to, sender, send.id),
        keys.route(to),
        keys.unread(to),
    ]
    ttl = keys.DEDUPE_SAFETY_TTL_S
    pushed = "1" if push else "0"
    return keys_, [sender, send.id, send.body, ts, limit, ttl, to, window_s, pushed, UNREAD_MAX]


def nudge_call(owner: str, msg_id: str) -> tuple[list[str], list[Any]]:
    """NUDGE: push what is new in `owner`'s inbox up to `msg_id` to their live sessions."""
    return [keys.inbox(owner), keys.account(owner)], [owner, msg_id]


def stored(reply: Any) -> Stored | None:
    """What a send script's reply means: Stored, None when Redis lacks the recipient
    (reload them from PostgreSQL), or the refusal raised as a ChatError."""
    if isinstance(reply, Exception):
        raise reply if isinstance(reply, ChatError) else Unavailable("Redis is unavailable")
    status = reply[0]
    if status == "ok":
        return Stored(str(reply[1]), int(reply[2]), len(reply) > 3)
    if status == "unknown":
        return None
    if status == "blocked":
        raise Blocked()
    if status == "full":
        raise InboxFull()
    raise Unavailable(f"unexpected reply {status!r}")


@dataclass(slots=True)  # not frozen: made per message; a frozen __init__ costs ~5x
class Receipt:
    """A receipt for `owner` (who sent the messages): `by` got or read `ids`."""

    owner: str
    by: str
    status: str  # "delivered" or "read"
    ids: list[str]
    ts: int

    def call(self, limit: int) -> tuple[list[str], list[Any]]:
        """The script's keys and arguments, with the bound for an inbox of `limit`.

        A read receipt counts against the inbox limit (`full`: the reader may send the
        read again later). A delivered receipt must not hold up the ack it comes from,
        so it is stored past the limit, up to twice it, and dropped beyond: an owner who
        never acks cannot have receipts of their own sends pile up without end."""
        owner = self.owner
        keys_ = [keys.account(owner), keys.blocks(owner), keys.inbox(owner), keys.route(owner)]
        bound = (limit, "full") if self.status == "read" else (2 * limit, "dropped")
        return keys_, [self.by, self.status, ",".join(self.ids), self.ts, owner, *bound]


def read_call(
    reader: str, device: str, sender: str, ids: list[str], held: set[str]
) -> tuple[list[str], list[Any]]:
    """READ's keys and arguments: which of `ids` (client ids `sender` gave messages to
    `reader`; `held` those out on the reading device's socket) may be receipted as read."""
    flags = ["1" if i in held else "0" for i in ids]
    dedupe = [keys.dedupe(reader, sender, i) for i in ids]
    argv = [sender, keys.group(device), *flags]
    return [keys.inbox(reader), keys.unread(reader), *dedupe], argv


def read_result(ids: list[str], reply: Any) -> tuple[int, int, list[str], int]:
    """READ's reply as (count with no record, count stored but not delivered, the ids
    to receipt, now marked read, how many the reader's unread count gave for them:
    UNREAD gives that back if the receipt cannot be stored)."""
    missing, undelivered, fresh, took = reply
    return int(missing), int(undelivered), [ids[int(i) - 1] for i in fresh or ()], int(took)


def unread_call(reader: str, sender: str, ids: list[str], took: int) -> tuple[list[str], list[Any]]:
    """UNREAD: unmark ids whose read receipt could not be stored, and give the reader's
    count of `sender`'s unread messages back the `took` READ took for them."""
    dedupe = [keys.dedupe(reader, sender, i) for i in ids]
    argv = [sender, took, keys.DEDUPE_SAFETY_TTL_S, UNREAD_MAX]
    return [keys.unread(reader), *dedupe], argv


def own_call(owner: str, limit: int, fields: list[str]) -> tuple[list[str], list[Any]]:
    """lua.OWN: an entry of the owner's own doing (kind `o` or `y`, `fields` as XADD takes
    them) for their other devices; stored up to twice the inbox limit, dropped past it."""
    return [keys.inbox(owner), keys.account(owner), keys.route(owner)], [owner, 2 * limit, *fields]


def own_send_fields(sender: str, send: frames.Send, ts: int, device: str) -> list[str]:
    """A copy of a send (from `device`) for the sender's other devices."""
    head = ["k", "o", "f", sender, "r", send.to, "i", send.id]
    return [*head, "b", send.body, "t", str(ts), "d", device]


def own_read_fields(reader: str, sender: str, ids: list[str], ts: int, device: str) -> list[str]:
    """A `read` (from `device`) of `sender`'s messages, for the reader's other devices."""
    by = ["by", reader]
    return ["k", "y", "f", sender, "i", ",".join(ids), "t", str(ts), "d", device, *by]


def acked_messages(entries: Iterable[Entry]) -> list[tuple[str, str]]:
    """(sender, client id) of the messages among acked `entries`: whose dedupe keys
    `shorten` shortens. Receipts have none, nor have entries deleted while pending
    (nothing is known of them)."""
    return [(e.sender, e.client_id) for e in entries if e.kind == "m"]


def shorten(owner: str, messages: list[tuple[str, str]], window_s: int) -> list[tuple[Any, ...]]:
    """Each acked message's dedupe key ((sender, client id), from acked_messages)
    shortened to the window, never lengthened: a repeated ack changes nothing, and a key
    gone (unacked for 30 days) is not made again. Plain commands in the owner's slot,
    riding in the ack's pipeline without waiting for its answer, so an ack can fail
    while its keys are shortened (a connection lost after Redis ran them, or on a
    cluster a redirect that gives up); the entries are then delivered and acked again
    (same msgIds), and the one harm is a resend of such a message after the window,
    stored twice."""
    return [("EXPIRE", keys.dedupe(owner, s, c), window_s, "LT") for s, c in messages]


def ack_device_call(owner: str, device: str, ids: list[str]) -> tuple[list[str], list[Any]]:
    """lua.ACK_DEVICE: `device`'s ack of the entries `ids` of the owner's inbox (XACK;
    XDEL of what every listed device is done with, at once if it is the only one)."""
    return [keys.inbox(owner), keys.account(owner)], [keys.group(device), *ids]


def first_acks_call(owner: str, device: str, ids: list[str]) -> tuple[list[str], list[Any]]:
    """lua.FIRST_ACKS: which of `ids` no other device of the owner has acked yet."""
    return [keys.inbox(owner), keys.account(owner)], [keys.group(device), *ids]


# -- delivery: the owner's node reads pending entries, then goes live (pushes)


def pending_call(mobile: str, device: str, cursor: str) -> tuple[Any, ...]:
    """Pending entries (delivered to the device, unacked) after `cursor`, oldest first."""
    box = keys.inbox(mobile)
    return (
        "XREADGROUP",
        "GROUP",
        keys.group(device),
        keys.CONSUMER,
        "COUNT",
        READ_COUNT,
        "STREAMS",
        box,
        cursor,
    )


def lost_group(reply: Any) -> bool:
    """The reply of a read says Redis lost the stream (and its group)."""
    return isinstance(reply, Exception) and str(reply).startswith("NOGROUP")


def make_group_call(mobile: str, device: str) -> tuple[Any, ...]:
    return ("XGROUP", "CREATE", keys.inbox(mobile), keys.group(device), "0", "MKSTREAM")


def pending_entries(reply: Any) -> list[Entry] | Exception:
    """A pending read's reply as a list of Entry (or the error)."""
    if isinstance(reply, Exception):
        return reply
    return _decoded(lambda: [decode(i, f) for _, items in reply or () for i, f in items])


def go_live_call(
    mobile: str, device: str, route: str, token: str, ttl_s: int
) -> tuple[list[str], list[Any]]:
    """GO_LIVE: read new entries; when there are none, turn the route live with `token`."""
    keys_ = [keys.inbox(mobile), keys.route(mobile, device)]
    return keys_, [route, token, READ_COUNT, ttl_s, keys.group(device)]


def go_live_result(reply: Any) -> list[Entry] | str | Exception:
    """A list of Entry (read them, then call again), "live", "gone" (another session
    holds the user now), or the error."""
    if isinstance(reply, Exception):
        return reply
    if reply[0] == "more":
        return _decoded(lambda: [decode(msg_id, fields) for msg_id, fields in reply[1]])
    return str(reply[0])


def _decoded(make: Callable[[], list[Entry]]) -> list[Entry] | Exception:
    """Entries made from a reply, or Unavailable if the reply was not what we wrote (the
    session then stalls and reads again, instead of waiting for an answer forever)."""
    try:
        return make()
    except Exception as exc:
        log.error("inbox_reply_malformed", error=type(exc).__name__)
        return Unavailable("the inbox reply could not be read")


def unlive_call(mobile: str, device: str, route: str) -> tuple[list[str], list[Any]]:
    """UNLIVE: stop pushes to this session; entries wait in the inbox until it reads them."""
    return [keys.route(mobile, device)], [route]


def pushed_entries(data: str) -> list[Entry] | None:
    """The entries of a push (cjson's array of XREADGROUP's entries, channel.Push); None
    if they cannot be read (they are pending in the group all the same)."""
    try:
        return [decode(str(msg_id), fields) for msg_id, fields in orjson.loads(data)]
    except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
        return None


def before(msg_id: str) -> str:
    """The stream id just before `msg_id`: reading pending entries after it starts there."""
    ms, _, seq = msg_id.partition("-")
    if int(seq) > 0:
        return f"{ms}-{int(seq) - 1}"
    return f"{int(ms) - 1}-{2**64 - 1}" if int(ms) > 0 else "0"


def decode(msg_id: str, raw: list[str] | dict[str, str] | None) -> Entry:
    """One stream entry (its field list as Redis sends it) as an Entry with its frame."""
    if not raw:  # deleted while pending: nothing to send, ack it away
        return Entry(msg_id, "", "", "", b"")
    fields = raw if isinstance(raw, dict) else dict(zip(raw[::2], raw[1::2], strict=True))
    sender = fields.get("f", "")
    client_id = fields.get("i", "")
    ts = int(fields.get("t", "0"))
    kind = fields.get("k")
    if kind == "r":
        ids = client_id.split(",") if client_id else []
        frame = frames.receipt(msg_id, fields.get("s", ""), sender, ids, ts)
        return Entry(msg_id, "r", sender, client_id, frame)
    if kind == "o":  # the user's own send, for their other devices: `to` the recipient
        to = fields.get("r", "")
        frame = frames.message(msg_id, client_id, sender, fields.get("b", ""), ts, to)
        return Entry(msg_id, "o", sender, client_id, frame, fields.get("d", ""))
    if kind == "y":  # the user's own read on another device: `sender` sent what was read
        ids = client_id.split(",") if client_id else []
        frame = frames.receipt(msg_id, "read", fields.get("by", ""), ids, ts, sender)
        return Entry(msg_id, "y", sender, client_id, frame, fields.get("d", ""))
    frame = frames.message(msg_id, client_id, sender, fields.get("b", ""), ts)
    return Entry(msg_id, "m", sender, client_id, frame)
