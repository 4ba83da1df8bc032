"""The Redis Streams inbox: enqueue (the send script), receipts, read, ack.

Each user's inbox is one stream with one consumer group. An entry stays until the
user's device acks it (XACK + XDEL). Scripts touch only the owner's hash-tagged keys.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from chatnode import blocks, frames, keys
from chatnode.errors import Blocked, InboxFull, UnknownRecipient
from chatnode.redisio import Batcher, Script

READ_COUNT = 200

# KEYS: account, blocks, inbox, dedupe, route of the recipient.
# ARGV: sender, client id, body, ts, inbox limit, dedupe ttl.
SEND = Script(
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
local prior = redis.call('GET', KEYS[4])
if prior then
  local sep = string.find(prior, '|', 1, true)
  return {'ok', string.sub(prior, 1, sep - 1), string.sub(prior, sep + 1), ''}
end
local hit = redis.call('SMISMEMBER', KEYS[2], ARGV[1], '<' .. ARGV[1])
if hit[2] == 1 then return {'blocked'} end
local id
local route = ''
if hit[1] == 1 then
  local now = redis.call('TIME')
  id = ARGV[4] .. '-' .. now[2]
else
  if redis.call('XLEN', KEYS[3]) >= tonumber(ARGV[5]) then return {'full'} end
  id = redis.call('XADD', KEYS[3], '*', 'k', 'm', 'f', ARGV[1], 'i', ARGV[2],
                  'b', ARGV[3], 't', ARGV[4])
  route = redis.call('GET', KEYS[5]) or ''
end
redis.call('SET', KEYS[4], id .. '|' .. ARGV[4], 'EX', ARGV[6])
return {'ok', id, ARGV[4], route}
"""
)

# KEYS: account, blocks, inbox, route of the receipt's owner (the original sender).
# ARGV: by, status, comma-joined client ids, ts.
RECEIPT = Script(
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
local hit = redis.call('SMISMEMBER', KEYS[2], ARGV[1], '<' .. ARGV[1])
if hit[1] == 1 or hit[2] == 1 then return {'dropped'} end
redis.call('XADD', KEYS[3], '*', 'k', 'r', 's', ARGV[2], 'f', ARGV[1], 'i', ARGV[3],
           't', ARGV[4])
return {'ok', redis.call('GET', KEYS[4]) or ''}
"""
)

# KEYS: inbox. ARGV: entry ids. Acked entries leave the stream at once.
ACK = Script(
    """
redis.call('XACK', KEYS[1], 'g', unpack(ARGV))
return redis.call('XDEL', KEYS[1], unpack(ARGV))
"""
)


@dataclass(frozen=True, slots=True)
class Stored:
    msg_id: str
    ts: int
    route: str


@dataclass(frozen=True, slots=True)
class Entry:
    """One inbox entry as read, with its frame already encoded."""

    msg_id: str
    kind: str  # "m" message, "r" receipt
    sender: str
    client_id: str
    frame: bytes


async def _with_reload(
    batcher: Batcher, pool: Any, owner: str, script: Script, keys_: list[str], args: list[Any]
) -> list[Any]:
    """Run an inbox script; if Redis lacks the owner, reload them from PostgreSQL once."""
    reply: list[Any] = await batcher.script(script, keys_, args)
    if reply[0] == "unknown":
        if not await blocks.load_into_redis(pool, batcher, owner):
            raise UnknownRecipient()
        reply = await batcher.script(script, keys_, args)
        if reply[0] == "unknown":
            raise UnknownRecipient()
    return reply


async def enqueue_message(
    batcher: Batcher, pool: Any, sender: str, send: frames.Send, ts: int, limit: int
) -> Stored:
    """Store a message in the recipient's inbox; the reply comes after the XADD."""
    to = send.to
    reply = await _with_reload(
        batcher,
        pool,
        to,
        SEND,
        [
            keys.account(to),
            keys.blocks(to),
            keys.inbox(to),
            keys.dedupe(to, sender, send.id),
            keys.route(to),
        ],
        [sender, send.id, send.body, ts, limit, keys.DEDUPE_TTL_S],
    )
    status = reply[0]
    if status == "blocked":
        raise Blocked()
    if status == "full":
        raise InboxFull()
    return Stored(str(reply[1]), int(reply[2]), str(reply[3]))


def _receipt_call(
    owner: str, by: str, status: str, ids: list[str], ts: int
) -> tuple[list[str], list[Any]]:
    keys_ = [keys.account(owner), keys.blocks(owner), keys.inbox(owner), keys.route(owner)]
    return keys_, [by, status, ",".join(ids), ts]


def submit_receipt(
    batcher: Batcher, owner: str, by: str, status: str, ids: list[str], ts: int
) -> asyncio.Future[list[Any]]:
    """Queue the receipt script; its reply is ['ok', route], ['dropped'] or ['unknown']."""
    return batcher.script(RECEIPT, *_receipt_call(owner, by, status, ids, ts))


async def enqueue_receipt(
    batcher: Batcher, pool: Any, owner: str, by: str, status: str, ids: list[str], ts: int
) -> str | None:
    """Put a receipt in `owner`'s inbox (reloading `owner` from PostgreSQL if Redis lacks
    them); its route, or None if a block stopped it. UnknownRecipient if no such user."""
    reply = await _with_reload(
        batcher, pool, owner, RECEIPT, *_receipt_call(owner, by, status, ids, ts)
    )
    return str(reply[1]) if reply[0] == "ok" else None


async def ensure_group(batcher: Batcher, mobile: str) -> None:
    try:
        await batcher.run("XGROUP", "CREATE", keys.inbox(mobile), keys.GROUP, "0", "MKSTREAM")
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def read(
    batcher: Batcher, mobile: str, cursor: str, count: int = READ_COUNT
) -> asyncio.Future[list[Entry]]:
    """Read through the group: an id as cursor gives pending entries, '>' new ones."""
    result: asyncio.Future[list[Entry]] = asyncio.get_running_loop().create_future()

    def done(fut: asyncio.Future[Any]) -> None:
        if result.done():
            return
        if fut.cancelled():
            result.cancel()
            return
        exc = fut.exception()
        if exc is not None:
            if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                # Redis lost the stream: recreate the group; the caller reads again later
                batcher.fire("XGROUP", "CREATE", keys.inbox(mobile), keys.GROUP, "0", "MKSTREAM")
            result.set_exception(exc)
            return
        entries = [
            decode(msg_id, fields) for _, items in fut.result() or () for msg_id, fields in items
        ]
        result.set_result(entries)

    batcher.call(
        "XREADGROUP",
        "GROUP",
        keys.GROUP,
        keys.CONSUMER,
        "COUNT",
        count,
        "STREAMS",
        keys.inbox(mobile),
        cursor,
    ).add_done_callback(done)
    return result


def decode(msg_id: str, raw: list[str] | dict[str, str] | None) -> Entry:
    """One stream entry (its field list as Redis sends it) as an Entry with its frame."""
    if not raw:  # deleted while pending: nothing to send, ack it away
        return Entry(msg_id, "", "", "", b"")
    fields = raw if isinstance(raw, dict) else dict(zip(raw[::2], raw[1::2], strict=True))
    sender = fields.get("f", "")
    client_id = fields.get("i", "")
    ts = int(fields.get("t", "0"))
    if fields.get("k") == "r":
        ids = client_id.split(",") if client_id else []
        frame = frames.receipt(msg_id, fields.get("s", ""), sender, ids, ts)
        return Entry(msg_id, "r", sender, client_id, frame)
    frame = frames.message(msg_id, client_id, sender, fields.get("b", ""), ts)
    return Entry(msg_id, "m", sender, client_id, frame)


async def fetch(batcher: Batcher, mobile: str, msg_ids: list[str]) -> list[Entry]:
    """The entries of `mobile`'s inbox with these ids (those still there), one pipeline."""
    replies = await asyncio.gather(
        *(batcher.call("XRANGE", keys.inbox(mobile), m, m) for m in msg_ids)
    )
    return [decode(item[0], item[1]) for reply in replies for item in reply or ()]


async def ack(batcher: Batcher, mobile: str, msg_ids: list[str]) -> None:
    await batcher.script(ACK, [keys.inbox(mobile)], msg_ids)
