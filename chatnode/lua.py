"""Lua scripts: the Script type, and the scripts of the socket path with their calls.

Each script here touches only the keys of one user (one hash tag, so one cluster slot):
the recipient's for SEND, READ, UNREAD and TYPING, the owner's for RECEIPT,
GO_LIVE, UNLIVE and the route scripts (CLAIM, REFRESH, RELEASE). Group and consumer
names come from keys.py. Every Script made anywhere is loaded on every Redis connection
(redisio.py) and called by SHA.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from chatnode import channel, keys

SCRIPTS: list[Script] = []  # every script made, loaded by each connection
TRUST_SCAN = 200  # entries READ looks through for undelivered ones, at most


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script loaded once per connection and called by SHA."""

    source: str
    # With replica acks on, its reply waits for a replica (redisio.WAITED); False for a
    # script whose loss in a failover breaks nothing (NUDGE)
    waits: bool = True
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())
        SCRIPTS.append(self)


def _script(source: str, waits: bool = True) -> Script:
    """A Script with the group and consumer names of keys.py in place of $GROUP and
    $CONSUMER."""
    names = {
        "$GROUP": keys.GROUP,
        "$CONSUMER": keys.CONSUMER,
        "$SCAN": str(TRUST_SCAN),
        "$TYPING": channel.TYPING,
        "$DEVICES": channel.DEVICES,
    }
    for name, value in names.items():
        source = source.replace(name, value)
    return Script(source, waits)


# Lua: trim_acked(inbox, acct, ids) deletes the head of the inbox every group an entry
# waits for is done with (before the group's first pending entry, or else the entry
# after its last-delivered id: one XTRIM MINID), then, of the entries `ids` (any order)
# past that head (acked out of order), those every such group is done with (delivered
# to it and not pending in it: one XPENDING over their range per group with entries
# pending; XDEL), and returns how many went.
# The groups an entry waits for are those of the devices the account value `acct`
# lists (a listed device with no group is done with nothing), or, with no account,
# every group the stream has: as lua.ACK_DEVICE. It reads them in the same script that
# deletes, so a device linked at any moment keeps what it has not read. lua.TRIM runs
# it on the ids a session acked with a plain XACK; a store whose inbox is full runs
# its trim_head before refusing (_when_full).
LUA_TRIM = (
    keys.LUA_DELIVERED
    + keys.LUA_DEVICES
    + """
local function waited_by(inbox, acct)
  local last, pending = groups_of(inbox)
  if not acct then return last, pending end
  local l, p = {}, {}
  for _, k in ipairs(devices(acct)) do
    local g = group_of(k)
    l[g], p[g] = last[g] or false, pending[g] or 0
  end
  return l, p
end
local function trim_head(inbox, last, pending)  -- how many went, and the new head's id
  local head = nil
  for g, upto in pairs(last) do
    if not upto then return 0 end  -- a listed device with no group needs them all
    local need
    if pending[g] > 0 then  -- its first pending entry
      need = redis.call('XPENDING', inbox, g)[2]
    else  -- the entry after its last-delivered one
      local ms, seq = string.match(upto, '^(%d+)-(%d+)$')
      need = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
    end
    if not head or id_cmp(need, head) < 0 then head = need end
  end
  if not head then return 0 end
  return redis.call('XTRIM', inbox, 'MINID', head), head
end
local function trim_acked(inbox, acct, ids)
  local last, pending = waited_by(inbox, acct)
  local n, head = trim_head(inbox, last, pending)
  if not head then return n end  -- no group, or a listed device with none: nothing is done
  local rest, lo, hi = {}, nil, nil  -- the ids past the head (acked out of order)
  for _, id in ipairs(ids) do
    if id_cmp(id, head) >= 0 then
      rest[#rest + 1] = id
      if not lo or id_cmp(id, lo) < 0 then lo = id end
      if not hi or id_cmp(id, hi) > 0 then hi = id end
    end
  end
  if #rest == 0 then return n end
  local held = {}  -- each group's pending ids in [lo, hi]
  for g, count in pairs(pending) do
    if count > 0 then
      held[g] = {}
      for _, e in ipairs(redis.call('XPENDING', inbox, g, lo, hi, count)) do
        held[g][e[1]] = true
      end
    end
  end
  local gone = {}
  for _, id in ipairs(rest) do
    local done = true
    for g, upto in pairs(last) do
      if id_cmp(id, upto) > 0 or (held[g] and held[g][id]) then
        done = false
        break
      end
    end
    if done then gone[#gone + 1] = id end
  end
  if #gone > 0 then n = n + redis.call('XDEL', inbox, unpack(gone)) end
  return n
end
"""
)


def _when_full(inbox: str, acct: str, limit: str, refuse: str) -> str:
    """Lua statements: `refuse` (a return) if the inbox `inbox` holds `limit` entries or
    more once the head every device is done with has gone (LUA_TRIM's trim_head, run
    only when the length alone reaches the limit; `acct` is the account value). Lua
    expressions. Only the head: a refused store costs a few commands more than an
    XLEN, not a scan of the inbox."""
    return f"""
if redis.call('XLEN', {inbox}) >= tonumber({limit}) then
{LUA_TRIM}
  trim_head({inbox}, waited_by({inbox}, {acct}))
  if redis.call('XLEN', {inbox}) >= tonumber({limit}) then {refuse} end
end
"""


# KEYS: account, blocks, inbox, dedupe, route, unread counts (keys.unread) of the
# recipient.
# ARGV: sender, client id, body, ts, inbox limit, dedupe ttl, recipient, dedupe window,
# push ('1': push the entry now; '0': NUDGE does, once a replica has it), the unread
# counts' cap (their TTL is the dedupe ttl).
# The dedupe value is `msgId|ts`, then flags: `|b` a blocked send (never stored), `|r` a
# read receipt was sent for it (READ). A blocked send is added and deleted at once: its
# id comes from the stream like every real one (and moves the stream's last id on), and
# the inbox limit applies to it too, so nothing tells a blocked sender it is blocked.
# A stored message's key lives until its ack shortens it to the window (EXPIRE ... LT,
# inbox.shorten); a blocked send is never acked, so its key gets the window at
# once. A stored message counts once in the recipient's unread count of the sender (a
# resend is answered above, before it), capped, so that READ can vouch for it once its
# key is gone; the counts get their TTL when a sender's count starts (not at every
# message: one command less).
SEND = _script(
    """
local seen = redis.call('MGET', KEYS[1], KEYS[4], KEYS[5])
if not seen[1] then return {'unknown'} end
local prior = seen[2]
if prior then
  local id, ts = string.match(prior, '^([^|]+)|([^|]+)')
  return {'ok', id, ts}
end
local hit = redis.call('SMISMEMBER', KEYS[2], ARGV[1], '<' .. ARGV[1])
if hit[2] == 1 then return {'blocked'} end
"""
    + _when_full("KEYS[3]", "seen[1]", "ARGV[5]", "return {'full'}")
    + """
if hit[1] == 1 then
  local id = redis.call('XADD', KEYS[3], '*', 'k', '')
  redis.call('XDEL', KEYS[3], id)
  redis.call('SET', KEYS[4], id .. '|' .. ARGV[4] .. '|b', 'EX', ARGV[8])
  return {'ok', id, ARGV[4], 'new'}
end
local id = redis.call('XADD', KEYS[3], '*', 'k', 'm', 'f', ARGV[1], 'i', ARGV[2],
                      'b', ARGV[3], 't', ARGV[4])
redis.call('SET', KEYS[4], id .. '|' .. ARGV[4], 'EX', ARGV[6])
local count = redis.call('HINCRBY', KEYS[6], ARGV[1], '1')
if count == 1 then
  redis.call('EXPIRE', KEYS[6], ARGV[6])
elseif count > tonumber(ARGV[10]) then
  redis.call('HSET', KEYS[6], ARGV[1], ARGV[10])
end
local stored = {'ok', id, ARGV[4], 'new'}
if ARGV[9] ~= '1' then return stored end
"""
    + keys.lua_push_all("KEYS[3]", "seen[1]", "seen[3]", "ARGV[7]", "stored")
)

# KEYS: the owner's inbox, account, default device's route. ARGV: owner, a bound on the
# inbox's length, then an entry's fields. An entry of the owner's own doing (a copy of
# their send, `o`; their read, `y`) for their other devices: stored and pushed to each
# unless the inbox is past the bound or Redis does not know the owner (then dropped: a
# copy is a courtesy, the message itself is in the recipient's inbox). 1 if stored.
OWN = _script(
    """
local known = redis.call('MGET', KEYS[2], KEYS[3])
if not known[1] then return 0 end
"""
    + _when_full("KEYS[1]", "known[1]", "ARGV[2]", "return 0")
    + """
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
"""
    + keys.lua_push_all("KEYS[1]", "known[1]", "known[2]", "ARGV[1]", "1")
)

# KEYS: inbox, account of the owner. ARGV: owner, a msgId. With replica acks, SEND
# stores without pushing; once a WAIT says a replica has the entry, this pushes what is
# new in the inbox up to that entry to each of the owner's devices (entries after it
# may not be on a replica yet; their own NUDGE pushes them). Stream ids grow with each
# XADD and a replica receives writes in order, so a replica that has the entry has
# every one before it.
NUDGE = _script(
    keys.LUA_ROUTES
    + """
push_all(KEYS[1], redis.call('GET', KEYS[2]), ARGV[1], ARGV[2])
return 1
""",
    waits=False,  # it pushes only what a WAIT confirmed; nobody reads its reply
)

# KEYS: the reader's inbox, the reader's unread counts (keys.unread), then the dedupe
# key of each client id the read frame names (sender = the frame's `to`, recipient = the
# reader). ARGV: the sender, the reading device's group, then per id 1 if it is out on
# the reader's socket now, else 0. An id may get a read receipt if its message was
# stored for the reader and was delivered: out on the socket, read by the device's group
# (at or before its last-delivered id: pending in it, e.g. on a socket before a
# reconnect, or acked by it and not yet trimmed), or gone from the stream (acked by
# every device); and if it had no read receipt yet. Those are marked read, and each
# leaves the sender's count (SEND counted it) while the count lasts. Ids of sends a
# block dropped, and ids read already, are passed over in silence, like receipts across
# a block. An id with no record (its key expired: acked more than the dedupe window ago,
# or never sent) is taken on trust while the sender's count of messages stored and not
# read lasts, one each, less the sender's messages not delivered yet (after the group's
# last-delivered id: the count holds them too, and a read must not stand for one of
# them); with more than TRUST_SCAN entries waiting, or no group, nothing is taken on
# trust. The server cannot tell which message such an id names any more, only that there
# is one. Returns {ids with no record and nothing left to count them against, ids stored
# but never delivered, indexes of the ids to receipt (1-based, in frame order), how many
# the count gave}.
READ = _script(
    keys.LUA_DELIVERED
    + """
local fresh, gone, undelivered = {}, {}, 0
local left = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local took = 0
local group = ARGV[2]
local upto = nil  -- the group's last-delivered id (false: no group), read once if needed
local function delivered(id)  -- to the group: pending in it, or acked by it
  if upto == nil then upto = delivered_upto(KEYS[1], group) or false end
  return upto and id_cmp(id, upto) <= 0
end
for i = 3, #KEYS do
  local v = redis.call('GET', KEYS[i])
  local id, rest = nil, nil
  if v then id, rest = string.match(v, '^([^|]+)|(.*)$') end
  if not id then
    gone[#gone + 1] = i - 2
  elseif not string.find(rest, '|[br]') then
    if ARGV[i] == '1' or delivered(id) or redis.call('XRANGE', KEYS[1], id, id)[1] == nil then
      redis.call('SET', KEYS[i], v .. '|r', 'KEEPTTL')
      fresh[#fresh + 1] = i - 2
      if took < left then took = took + 1 end
    else
      undelivered = undelivered + 1
    end
  end
end
local missing, room = 0, 0
if #gone > 0 and took < left then
  local last = delivered_upto(KEYS[1], group)
  if last then
    local ahead = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', $SCAN + 1)
    if #ahead <= $SCAN then
      room = left
      for _, e in ipairs(ahead) do
        if e[2][2] == 'm' and e[2][4] == ARGV[1] then room = room - 1 end
      end
    end
  end
end
for _, k in ipairs(gone) do
  if took < room then
    took = took + 1
    fresh[#fresh + 1] = k
  else
    missing = missing + 1
  end
end
if took >= left and left > 0 then
  redis.call('HDEL', KEYS[2], ARGV[1])
elseif took > 0 then
  redis.call('HINCRBY', KEYS[2], ARGV[1], -took)
end
table.sort(fresh)
return {missing, undelivered, fresh, took}
"""
)

# KEYS: the reader's unread counts, then the dedupe keys of the ids READ gave a read
# receipt that could not be stored. ARGV: the sender, how many READ took from the count
# for them, the counts' TTL, their cap. Unmark them and give the count back what READ
# took, so the client's next read frame for them counts.
UNREAD = _script(
    """
for i = 2, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v and string.find(v, '|r', 1, true) then
    redis.call('SET', KEYS[i], (string.gsub(v, '|r', '')), 'KEEPTTL')
  end
end
local back = tonumber(ARGV[2])
if back > 0 then
  if redis.call('HINCRBY', KEYS[1], ARGV[1], back) > tonumber(ARGV[4]) then
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
  end
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return back
"""
)

# KEYS: account, blocks, inbox, default device's route of the receipt's owner (the
# original sender); it goes to each of the owner's devices.
# ARGV: by, status, comma-joined client ids, ts, owner, a bound on the inbox's length, and
# the answer past it ('full', or 'dropped': not stored, and the caller goes on).
RECEIPT = _script(
    """
local known = redis.call('MGET', KEYS[1], KEYS[4])
if not known[1] then return {'unknown'} end
local hit = redis.call('SMISMEMBER', KEYS[2], ARGV[1], '<' .. ARGV[1])
if hit[1] == 1 or hit[2] == 1 then return {'dropped'} end
"""
    + _when_full("KEYS[3]", "known[1]", "ARGV[6]", "return {ARGV[7]}")
    + """
redis.call('XADD', KEYS[3], '*', 'k', 'r', 's', ARGV[2], 'f', ARGV[1], 'i', ARGV[3],
           't', ARGV[4])
"""
    + keys.lua_push_all("KEYS[3]", "known[1]", "known[2]", "ARGV[5]", "{'ok'}")
)

# KEYS: inbox, route (of this device). ARGV: our route, the live token to take, count,
# route ttl, the device's group.
# The last step of catching up: read what is new; when nothing is, turn the route live
# in the same atomic step, so every later entry is pushed and none falls between.
# 'gone' when another session holds the user; a route Redis lost is made again.
GO_LIVE = _script(
    keys.LUA_ROUTES
    + """
local cur = redis.call('GET', KEYS[2])
if cur and not ours(cur, ARGV[1]) then return {'gone'} end
if not cur then redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[4]) end
local function read()
  return redis.pcall('XREADGROUP', 'GROUP', ARGV[5], '$CONSUMER', 'COUNT', ARGV[3],
                     'STREAMS', KEYS[1], '>')
end
local res = read()
if type(res) == 'table' and res.err then  -- Redis lost the group: make it, read again
  redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[5], '0', 'MKSTREAM')
  res = read()
  if type(res) == 'table' and res.err then return redis.error_reply(res.err) end
end
if res then return {'more', res[1][2]} end
redis.call('SET', KEYS[2], ARGV[1] .. '|' .. ARGV[2], 'KEEPTTL')
return {'live'}
"""
)

# KEYS: route. ARGV: our route. Pushes stop; the session reads for itself again.
UNLIVE = _script(
    keys.LUA_ROUTES
    + """
local cur = redis.call('GET', KEYS[1])
if ours(cur, ARGV[1]) and cur ~= ARGV[1] then redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL') end
return 1
"""
)


# -- the route: who holds a user (presence.py reads it for last seen)

# KEYS: route (of the device), seen, inbox, account. ARGV: our route, ttl, now ms, seen
# ttl, the device's group. Point the device's route at this session (catching up, not
# live); the reply is {the previous holder's route, the account value} (how many
# devices the user has: with one, an ack needs no script), or {'removed'} if the list
# lacks the device (removed meanwhile: the socket closes with 4003). The device's group
# is made here if Redis lacks it.
CLAIM = _script(
    keys.LUA_DEVICES
    + """
local acct = redis.call('GET', KEYS[4])
if listed(acct) then
  local found = false
  for _, k in ipairs(devices(acct)) do if group_of(k) == ARGV[5] then found = true end end
  if not found then return {'removed'} end
end
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
redis.pcall('XGROUP', 'CREATE', KEYS[3], ARGV[5], '0', 'MKSTREAM')
return {old or false, acct}
"""
)

# KEYS: the device's route, seen, account. ARGV: our route, ttl, now ms, seen ttl, the
# device's group. {status, how many devices the account lists (0: not known)}; status
# 1: still ours (TTL pushed back); 0: another session holds the device now; 2: the
# route was gone (Redis lost it) and is back, not live: the session catches up; 3: the
# list lacks the device (removed: the socket closes with 4003, if the logout message
# has not closed it yet). The count keeps the session's `solo` (FIRST_ACKS asked or not,
# own copies made or not) true to the list even if a channel.DEVICES message was lost.
REFRESH = _script(
    keys.LUA_ROUTES
    + """
local count = 0
local acct = redis.call('GET', KEYS[3])
if acct then
  local found = false
  for _, k in ipairs(devices(acct)) do
    count = count + 1
    if group_of(k) == ARGV[5] then found = true end
  end
  if listed(acct) and not found then return {3, count} end
end
local cur = redis.call('GET', KEYS[1])
if cur and not ours(cur, ARGV[1]) then return {0, count} end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
if cur then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return {1, count}
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return {2, count}
"""
)

# KEYS: route, seen. ARGV: our route, now ms, seen ttl.
RELEASE = _script(
    keys.LUA_ROUTES
    + """
if ours(redis.call('GET', KEYS[1]), ARGV[1]) then redis.call('DEL', KEYS[1]) end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return 1
"""
)


def claim_call(
    mobile: str, device: str, route: str, ttl_s: int, ms: int
) -> tuple[list[str], list[Any]]:
    """CLAIM: point the device's route at this session; the reply is [the previous route
    or None, the account value]. Last seen is stamped too, so a node that dies before its
    first refresh still leaves a plausible time behind."""
    box = keys.inbox(mobile)
    keys_ = [keys.route(mobile, device), keys.seen(mobile), box, keys.account(mobile)]
    return keys_, [route, ttl_s, ms, keys.SEEN_TTL_S, keys.group(device)]


def release_call(mobile: str, device: str, route: str, ms: int) -> tuple[list[str], list[Any]]:
    """RELEASE: the route goes if it is still this session's; last seen is stamped."""
    return [keys.route(mobile, device), keys.seen(mobile)], [route, ms, keys.SEEN_TTL_S]


# KEYS: account, blocks, default device's route of the recipient. ARGV: sender, state,
# recipient. To each connected device of the recipient's (channel.typing, written here
# per device); 1 if it went to a node, 0 if no block-free route exists.
TYPING = _script(
    keys.LUA_ROUTES
    + """
local known = redis.call('MGET', KEYS[1], KEYS[3])
if not known[1] then return 0 end
local hit = redis.call('SMISMEMBER', KEYS[2], ARGV[1], '<' .. ARGV[1])
if hit[1] == 1 or hit[2] == 1 then return 0 end
local sent = 0
for _, k in ipairs(devices(known[1])) do
  local route = known[2]
  if k ~= '' then route = redis.call('GET', route_key(KEYS[3], k)) end
  if route then
    redis.call('SPUBLISH', channel(string.match(route, '^[^|]+'), KEYS[3]),
               '$TYPING|' .. ARGV[3] .. suffix(k) .. '|' .. ARGV[1] .. '|' .. ARGV[2])
    sent = 1
  end
end
return sent
"""
)


def typing_call(sender: str, to: str, state: str) -> tuple[list[str], list[Any]]:
    """TYPING: forward a typing frame to the recipient's node unless a block stands
    between them."""
    return [keys.account(to), keys.blocks(to), keys.route(to)], [sender, state, to]


# -- devices: which groups an entry waits for (docs/ARCHITECTURE.md, "Devices")

# Lua (after keys.LUA_DELIVERED) telling whether a group is done with an entry: it was
# delivered to the group (at or before its last-delivered id) and is no longer pending
# in it.
LUA_ACKED = """
local function done_with(inbox, last, pending, group, id)
  local upto = last[group]
  if not upto or id_cmp(id, upto) > 0 then return false end
  if pending[group] == 0 then return true end  -- nothing pending: no XPENDING to ask
  return redis.call('XPENDING', inbox, group, id, id, 1)[1] == nil
end
local function groups_but(acct, own)  -- the groups of the listed devices but `own`
  local out = {}
  for _, k in ipairs(devices(acct)) do
    if group_of(k) ~= own then out[#out + 1] = group_of(k) end
  end
  return out
end
"""

# KEYS: inbox, account. ARGV: the acking device's group, then entry ids. Every ack:
# XACK for this device; XDEL of the entries every other listed device is done with too
# (without the account, every other group the stream has). When the account lists this
# device alone, XDEL and XACK at once, with no look at the groups: that test comes
# first, before the functions the other case needs are made (every ack of a one-device
# user takes it). One script, so a device linked at any moment (lua.ADD_DEVICE, in the
# same slot) is seen before an entry it still needs is deleted. Returns how many were
# deleted.
ACK_DEVICE = _script(
    """
local own = ARGV[1]
local acct = redis.call('GET', KEYS[2])
local solo = false
if not acct then
elseif own == '$GROUP' then solo = """
    + keys.lua_default_alone("acct")
    + """
elseif string.sub(own, 1, #'$GROUP') == '$GROUP' then  -- a named device: listed alone?
  local k = string.sub(own, #'$GROUP' + 1)  -- ('0' or a comma: no device key, the general path)
  solo = k ~= '0' and not string.find(k, ',', 1, true) and acct == '\1' .. k
end
if solo then  -- the only device: nobody else needs them
  local gone = redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
  redis.call('XACK', KEYS[1], own, unpack(ARGV, 2))
  return gone
end
"""
    + keys.LUA_ROUTES
    + LUA_ACKED
    + """
local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
local others = groups_but(acct, own)
redis.call('XACK', KEYS[1], own, unpack(ids))
local last, pending = groups_of(KEYS[1])
if not acct then  -- not known now: every group the stream has must be done
  for g, _ in pairs(last) do if g ~= own then others[#others + 1] = g end end
end
local gone = {}
for _, id in ipairs(ids) do
  local all = true
  for _, g in ipairs(others) do
    if not done_with(KEYS[1], last, pending, g, id) then all = false; break end
  end
  if all then gone[#gone + 1] = id end
end
if #gone > 0 then redis.call('XDEL', KEYS[1], unpack(gone)) end
return #gone
""",
    waits=False,  # a lost ack redelivers the same msgIds: nothing to wait for
)

# KEYS: inbox, account. ARGV: entry ids a session acked with a plain XACK
# (core.acks). LUA_TRIM: XTRIM of the head every device is done with (with it, what an
# earlier session acked and did not trim), then XDEL of those ids past it every device
# is done with. Sent by core.socket.SocketCore.trim. Returns how many went.
TRIM = _script(
    LUA_TRIM
    + """
return trim_acked(KEYS[1], redis.call('GET', KEYS[2]), ARGV)
""",
    waits=False,  # lost in a failover, the entries stay acked: a later trim takes them
)

# KEYS: inbox, account. ARGV: the acking device's group, then entry ids. Read only:
# the (1-based) indexes of the ids no other device of the user is done with yet: their
# ack is the first, and only the first sends the `delivered` receipt.
FIRST_ACKS = _script(
    keys.LUA_ROUTES
    + LUA_ACKED
    + """
local others = groups_but(redis.call('GET', KEYS[2]), ARGV[1])
local last, pending = groups_of(KEYS[1])
local first = {}
for i = 2, #ARGV do
  local seen = false
  for _, g in ipairs(others) do
    if done_with(KEYS[1], last, pending, g, ARGV[i]) then seen = true; break end
  end
  if not seen then first[#first + 1] = i - 1 end
end
return first
""",
    waits=False,  # reads only
)

# Lua writing an account value back from device keys, and telling the user's connected
# devices how many devices there are now (channel.DEVICES): with one, no FIRST_ACKS.
LUA_DEVICE_LIST = """
local function store_devices(acct_key, list)
  local enc = {}
  for _, d in ipairs(list) do if d == '' then enc[#enc + 1] = '0' else enc[#enc + 1] = d end end
  redis.call('SET', acct_key, '\1' .. table.concat(enc, ','))
end
local function tell_devices(acct_key, list, mobile)
  for _, d in ipairs(list) do
    local route = redis.call('GET', route_key(acct_key, d))
    if route then
      redis.call('SPUBLISH', channel(string.match(route, '^[^|]+'), acct_key),
                 '$DEVICES|' .. mobile .. suffix(d) .. '|' .. #list)
    end
  end
end
"""

# KEYS: account, inbox, loading. ARGV: the device key ('' for default), its group, the
# user. A device made at login joins the account's list, with its group from the first
# entry still in the inbox. Without a list (Redis does not know the user, or holds the
# value of before devices) the account is dropped and a reload in flight stopped (it
# may have read PostgreSQL before the device was made); the next send reloads it.
# Returns how many devices are listed (-1: dropped).
ADD_DEVICE = _script(
    keys.LUA_ROUTES
    + LUA_DEVICE_LIST
    + """
local acct = redis.call('GET', KEYS[1])
if not listed(acct) then redis.call('DEL', KEYS[1], KEYS[3]); return -1 end
local list = devices(acct)
for _, d in ipairs(list) do if d == ARGV[1] then return #list end end
list[#list + 1] = ARGV[1]
store_devices(KEYS[1], list)
redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[2], '0', 'MKSTREAM')
tell_devices(KEYS[1], list, ARGV[3])
return #list
"""
)

# KEYS: account, inbox, the device's route, loading. ARGV: the device key, its group,
# the user. A removed device leaves the list, its group and route go. Its entries are
# released by PRUNE. Without a list the account is dropped, as in ADD_DEVICE. Returns
# how many devices are left (-1: dropped).
DROP_DEVICE = _script(
    keys.LUA_ROUTES
    + LUA_DEVICE_LIST
    + """
redis.pcall('XGROUP', 'DESTROY', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[3])
local acct = redis.call('GET', KEYS[1])
if not listed(acct) then redis.call('DEL', KEYS[1], KEYS[4]); return -1 end
local list = {}
for _, d in ipairs(devices(acct)) do if d ~= ARGV[1] then list[#list + 1] = d end end
store_devices(KEYS[1], list)
tell_devices(KEYS[1], list, ARGV[3])
return #list
"""
)

# KEYS: inbox, account. ARGV: where to start ('-', or '(' and the last id done), how
# many entries to look at. XDEL the entries every listed device is done with (after a
# device went); with no device listed, or no account, none. Returns the last id looked
# at, or '' when the inbox is done.
PRUNE = _script(
    keys.LUA_ROUTES
    + LUA_ACKED
    + """
local acct = redis.call('GET', KEYS[2])
if not acct then return '' end
local groups = groups_but(acct, nil)
local last, pending = groups_of(KEYS[1])
if #groups == 0 then return '' end
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])
local gone = {}
for _, e in ipairs(entries) do
  local all = true
  for _, g in ipairs(groups) do
    if not done_with(KEYS[1], last, pending, g, e[1]) then all = false; break end
  end
  if all then gone[#gone + 1] = e[1] end
end
if #gone > 0 then redis.call('XDEL', KEYS[1], unpack(gone)) end
if #entries < tonumber(ARGV[2]) then return '' end
return entries[#entries][1]
"""
)
