"""The Redis Streams inbox: enqueue (the send script), receipts, read, ack.

Each user's inbox is one stream with one consumer group. An entry stays until the
user's device acks it (XACK + XDEL). Scripts touch only the owner's hash-tagged keys.

Delivery has two phases. A session that connects catches up: it reads its pending
entries (`0`), then new ones (`>`); the read that finds nothing new also turns its route
live (GO_LIVE, atomically). From then on the send and receipt scripts read each new
entry through the group themselves and publish it to the owner's node with the live
token: one round trip per message, no wake-up and no second read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from redis.exceptions import ResponseError

from chatnode import frames, keys, logs
from chatnode.errors import Blocked, ChatError, InboxFull, Unavailable, UnknownRecipient
from chatnode.redisio import Batcher, Callback, Script, ignore, resolver

log = logs.get(__name__)

READ_COUNT = 200

# KEYS: account, blocks, inbox, dedupe, route of the recipient.
# ARGV: sender, client id, body, ts, inbox limit, dedupe ttl, recipient.
# The dedupe value is `msgId|ts`, then flags: `|b` a blocked send (never stored), `|r` a
# read receipt was sent for it (READ). A blocked send is added and deleted at once: its
# id comes from the stream like every real one (and moves the stream's last id on), and
# the inbox limit applies to it too, so nothing tells a blocked sender it is blocked.
SEND = Script(
    keys.LUA_ROUTES
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
local seen = redis.call('MGET', KEYS[4], KEYS[5])
local prior = seen[1]
if prior then
  local id, ts = string.match(prior, '^([^|]+)|([^|]+)')
  return {'ok', id, ts}
end
local hit = redis.call('SMISMEMBER', KEYS[2], ARGV[1], '<' .. ARGV[1])
if hit[2] == 1 then return {'blocked'} end
if redis.call('XLEN', KEYS[3]) >= tonumber(ARGV[5]) then return {'full'} end
if hit[1] == 1 then
  local id = redis.call('XADD', KEYS[3], '*', 'k', '')
  redis.call('XDEL', KEYS[3], id)
  redis.call('SET', KEYS[4], id .. '|' .. ARGV[4] .. '|b', 'EX', ARGV[6])
  return {'ok', id, ARGV[4]}
end
local id = redis.call('XADD', KEYS[3], '*', 'k', 'm', 'f', ARGV[1], 'i', ARGV[2],
                      'b', ARGV[3], 't', ARGV[4])
redis.call('SET', KEYS[4], id .. '|' .. ARGV[4], 'EX', ARGV[6])
push(KEYS[3], seen[2], ARGV[7])
return {'ok', id, ARGV[4]}
"""
)

# KEYS: the reader's inbox, then the dedupe key of each client id the read frame names
# (sender = the frame's `to`, recipient = the reader). ARGV: per id, 1 if it is out on
# the reader's socket now, else 0. An id may get a read receipt if its message was stored
# for the reader and was delivered: out on the socket, pending in the group (read for
# delivery, e.g. on a socket before a reconnect), or acked (gone from the stream); and if
# it had no read receipt yet. Those are marked read. Ids of sends a block dropped, and
# ids read already, are passed over in silence, like receipts across a block. Returns
# {ids with no record (never sent, or past the dedupe window), ids stored but never
# delivered, indexes of the ids to receipt (1-based)}.
READ = Script(
    """
local fresh, missing, undelivered = {}, 0, 0
for i = 2, #KEYS do
  local v = redis.call('GET', KEYS[i])
  local id, rest = nil, nil
  if v then id, rest = string.match(v, '^([^|]+)|(.*)$') end
  if not id then
    missing = missing + 1
  elseif not string.find(rest, '|[br]') then
    local out = ARGV[i - 1] == '1'
    if not out then
      local held = redis.pcall('XPENDING', KEYS[1], 'g', id, id, 1)
      out = type(held) == 'table' and held[1] ~= nil
    end
    if out or redis.call('XRANGE', KEYS[1], id, id)[1] == nil then
      redis.call('SET', KEYS[i], v .. '|r', 'KEEPTTL')
      fresh[#fresh + 1] = i - 1
    else
      undelivered = undelivered + 1
    end
  end
end
return {missing, undelivered, fresh}
"""
)

# KEYS: the dedupe keys of ids marked read by READ whose receipt could not be stored:
# unmark them, so the client's next read frame for them counts.
UNREAD = Script(
    """
for i = 1, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v and string.sub(v, -2) == '|r' then
    redis.call('SET', KEYS[i], string.sub(v, 1, -3), 'KEEPTTL')
  end
end
return 1
"""
)

# KEYS: account, blocks, inbox, route of the receipt's owner (the original sender).
# ARGV: by, status, comma-joined client ids, ts, owner, a bound on the inbox's length, and
# the answer past it ('full', or 'dropped': not stored, and the caller goes on).
RECEIPT = Script(
    keys.LUA_ROUTES
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
local hit = redis.call('SMISMEMBER', KEYS[2], ARGV[1], '<' .. ARGV[1])
if hit[1] == 1 or hit[2] == 1 then return {'dropped'} end
if redis.call('XLEN', KEYS[3]) >= tonumber(ARGV[6]) then return {ARGV[7]} end
redis.call('XADD', KEYS[3], '*', 'k', 'r', 's', ARGV[2], 'f', ARGV[1], 'i', ARGV[3],
           't', ARGV[4])
push(KEYS[3], redis.call('GET', KEYS[4]), ARGV[5])
return {'ok'}
"""
)

# KEYS: inbox, route. ARGV: our route, the live token to take, count, route ttl.
# The last step of catching up: read what is new; when nothing is, turn the route live
# in the same atomic step, so every later entry is pushed and none falls between.
# 'gone' when another session holds the user; a route Redis lost is made again.
GO_LIVE = Script(
    keys.LUA_ROUTES
    + """
local cur = redis.call('GET', KEYS[2])
if cur and not ours(cur, ARGV[1]) then return {'gone'} end
if not cur then redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[4]) end
local function read()
  return redis.pcall('XREADGROUP', 'GROUP', 'g', 'c', 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
end
local res = read()
if type(res) == 'table' and res.err then  -- Redis lost the group: make it, read again
  redis.pcall('XGROUP', 'CREATE', KEYS[1], 'g', '0', 'MKSTREAM')
  res = read()
  if type(res) == 'table' and res.err then return redis.error_reply(res.err) end
end
if res then return {'more', res[1][2]} end
redis.call('SET', KEYS[2], ARGV[1] .. '|' .. ARGV[2], 'KEEPTTL')
return {'live'}
"""
)

# KEYS: route. ARGV: our route. Pushes stop; the session reads for itself again.
UNLIVE = Script(
    keys.LUA_ROUTES
    + """
local cur = redis.call('GET', KEYS[1])
if ours(cur, ARGV[1]) and cur ~= ARGV[1] then redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL') end
return 1
"""
)


@dataclass(frozen=True, slots=True)
class Stored:
    msg_id: str
    ts: int


@dataclass(frozen=True, slots=True)
class Entry:
    """One inbox entry as read, with its frame already encoded."""

    msg_id: str
    kind: str  # "m" message, "r" receipt, "" deleted while pending
    sender: str
    client_id: str
    frame: bytes


# -- sending: the callback forms run on the hot path, the awaitable forms on the slow one


def _message_call(
    sender: str, send: frames.Send, ts: int, limit: int
) -> tuple[list[str], list[Any]]:
    to = send.to
    keys_ = [
        keys.account(to),
        keys.blocks(to),
        keys.inbox(to),
        keys.dedupe(to, sender, send.id),
        keys.route(to),
    ]
    return keys_, [sender, send.id, send.body, ts, limit, keys.DEDUPE_TTL_S, to]


def submit_message(
    batcher: Batcher, sender: str, send: frames.Send, ts: int, limit: int, callback: Callback
) -> None:
    """Queue the send script; `callback` gets its reply (see `stored`)."""
    batcher.submit_script(callback, SEND, *_message_call(sender, send, ts, limit))


def stored(reply: Any) -> Stored | None:
    """What a send script's reply means: Stored, None when Redis lacks the recipient
    (reload them from PostgreSQL), or the refusal raised as a ChatError."""
    if isinstance(reply, Exception):
        raise reply if isinstance(reply, ChatError) else Unavailable("Redis is unavailable")
    status = reply[0]
    if status == "ok":
        return Stored(str(reply[1]), int(reply[2]))
    if status == "unknown":
        return None
    if status == "blocked":
        raise Blocked()
    if status == "full":
        raise InboxFull()
    raise Unavailable(f"unexpected reply {status!r}")


Loader = Callable[[str], Awaitable[bool]]  # copy a user into Redis; False if no such user


async def _with_reload(
    batcher: Batcher, load: Loader, owner: str, script: Script, keys_: list[str], args: list[Any]
) -> list[Any]:
    """Run an inbox script; if Redis lacks the owner, reload them from PostgreSQL once."""
    reply: list[Any] = await batcher.script(script, keys_, args)
    if reply[0] == "unknown":
        if not await load(owner):
            raise UnknownRecipient()
        reply = await batcher.script(script, keys_, args)
        if reply[0] == "unknown":
            raise UnknownRecipient()
    return reply


async def enqueue_message(
    batcher: Batcher, load: Loader, sender: str, send: frames.Send, ts: int, limit: int
) -> Stored:
    """Store a message, reloading the recipient from PostgreSQL if Redis lacks them."""
    reply = await _with_reload(
        batcher, load, send.to, SEND, *_message_call(sender, send, ts, limit)
    )
    result = stored(reply)
    assert result is not None
    return result


@dataclass(frozen=True, slots=True)
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


def submit_receipt(batcher: Batcher, receipt: Receipt, limit: int, callback: Callback) -> None:
    """Queue the receipt script; its reply is ['ok'], ['dropped'], ['full'] or
    ['unknown'] (Redis lacks the owner)."""
    batcher.submit_script(callback, RECEIPT, *receipt.call(limit))


async def enqueue_receipt(batcher: Batcher, load: Loader, receipt: Receipt, limit: int) -> None:
    """Put a receipt in its owner's inbox, reloading the owner from PostgreSQL if Redis
    lacks them (a block may drop it). UnknownRecipient if there is no such user,
    InboxFull if a read receipt finds the inbox full."""
    reply = await _with_reload(batcher, load, receipt.owner, RECEIPT, *receipt.call(limit))
    if reply[0] == "full":
        raise InboxFull()


def _read_keys(reader: str, sender: str, ids: list[str]) -> list[str]:
    return [keys.inbox(reader), *(keys.dedupe(reader, sender, i) for i in ids)]


def submit_read(
    batcher: Batcher,
    reader: str,
    sender: str,
    ids: list[str],
    held: set[str],
    callback: Callback,
) -> None:
    """Which of `ids` (client ids `sender` gave messages to `reader`; `held` those out on
    the reader's socket) may be receipted as read; they are marked read. The callback
    gets (count with no record, count stored but not delivered, those ids)."""

    def done(reply: Any) -> None:
        if isinstance(reply, Exception):
            callback(reply)
            return
        missing, undelivered, fresh = reply
        callback((int(missing), int(undelivered), [ids[int(i) - 1] for i in fresh or ()]))

    flags = ["1" if i in held else "0" for i in ids]
    batcher.submit_script(done, READ, _read_keys(reader, sender, ids), flags)


def unread(batcher: Batcher, reader: str, sender: str, ids: list[str]) -> None:
    """Unmark ids whose read receipt could not be stored: a later read frame counts."""
    batcher.submit_script(ignore, UNREAD, _read_keys(reader, sender, ids)[1:], [])


# -- delivery: the owner's node reads pending entries, then goes live (pushes)


def read_pending(batcher: Batcher, mobile: str, cursor: str, callback: Callback) -> None:
    """Pending entries (delivered, unacked) after `cursor`, oldest first, as a list of Entry."""

    def done(reply: Any) -> None:
        if isinstance(reply, ResponseError) and "NOGROUP" in str(reply):
            # Redis lost the stream: recreate the group; nothing is pending then
            batcher.fire("XGROUP", "CREATE", keys.inbox(mobile), keys.GROUP, "0", "MKSTREAM")
            reply = []
        if isinstance(reply, Exception):
            callback(reply)
            return
        callback(_decoded(lambda: [decode(i, f) for _, items in reply or () for i, f in items]))

    batcher.submit(
        done,
        "XREADGROUP",
        "GROUP",
        keys.GROUP,
        keys.CONSUMER,
        "COUNT",
        READ_COUNT,
        "STREAMS",
        keys.inbox(mobile),
        cursor,
    )


def go_live(
    batcher: Batcher, mobile: str, route: str, token: str, ttl_s: int, callback: Callback
) -> None:
    """Read new entries; when there are none, turn the route live with `token`.

    The callback gets a list of Entry (read them, then call again), "live", or "gone"
    (another session holds the user now)."""

    def done(reply: Any) -> None:
        if isinstance(reply, Exception):
            callback(reply)
        elif reply[0] == "more":
            callback(_decoded(lambda: [decode(msg_id, fields) for msg_id, fields in reply[1]]))
        else:
            callback(str(reply[0]))

    batcher.submit_script(
        done, GO_LIVE, [keys.inbox(mobile), keys.route(mobile)], [route, token, READ_COUNT, ttl_s]
    )


def _decoded(make: Callable[[], list[Entry]]) -> list[Entry] | Exception:
    """Entries made from a reply, or Unavailable if the reply was not what we wrote (the
    session then stalls and reads again, instead of waiting for an answer forever)."""
    try:
        return make()
    except Exception as exc:
        log.error("inbox_reply_malformed", error=type(exc).__name__)
        return Unavailable("the inbox reply could not be read")


def unlive(batcher: Batcher, mobile: str, route: str, callback: Callback) -> None:
    """Stop pushes to this session; entries wait in the inbox until it reads them."""
    batcher.submit_script(callback, UNLIVE, [keys.route(mobile)], [route])


def parse_push(payload: str) -> tuple[str, str, list[Entry] | None]:
    """A pushed payload `owner|token|json` as (owner, token, entries); entries None if
    they cannot be read (they are pending in the group all the same)."""
    owner, _, rest = payload.partition("|")
    token, _, data = rest.partition("|")
    try:
        items = orjson.loads(data)
        return owner, token, [decode(str(msg_id), fields) for msg_id, fields in items]
    except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
        return owner, token, None


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


def submit_ack(
    batcher: Batcher, mobile: str, msg_ids: list[str], callback: Callback, *, defer: bool = False
) -> None:
    """Remove these entries from `mobile`'s inbox: XDEL, then XACK, in one pipeline
    (with `defer`, the next one that goes out anyway).

    Two plain commands cost Redis less than a script. In this order a connection lost
    between them leaves at worst a pending id whose entry is gone, which a pending read
    finds empty and acks away; never an entry that no read returns again."""
    inbox_key = keys.inbox(mobile)
    failed: list[Exception] = []

    def deleted(reply: Any) -> None:
        if isinstance(reply, Exception):
            failed.append(reply)

    def acked(reply: Any) -> None:
        callback(failed[0] if failed else reply)

    submit = batcher.defer if defer else batcher.submit
    submit(deleted, "XDEL", inbox_key, *msg_ids)
    submit(acked, "XACK", inbox_key, keys.GROUP, *msg_ids)


async def ack(batcher: Batcher, mobile: str, msg_ids: list[str]) -> None:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    submit_ack(batcher, mobile, msg_ids, resolver(fut))
    await fut
