"""The inbox's Lua scripts. Each touches only the keys of one user (one hash tag, so one
cluster slot): the recipient's for SEND and READ, the owner's for RECEIPT, GO_LIVE,
UNLIVE. Group and consumer names come from keys.py."""

from __future__ import annotations

from chatnode import keys
from chatnode.redisio import Script


def _script(source: str) -> Script:
    """A Script with the group and consumer names of keys.py in place of $GROUP and
    $CONSUMER."""
    return Script(source.replace("$GROUP", keys.GROUP).replace("$CONSUMER", keys.CONSUMER))


# KEYS: account, blocks, inbox, dedupe, route of the recipient.
# ARGV: sender, client id, body, ts, inbox limit, dedupe ttl, recipient.
# The dedupe value is `msgId|ts`, then flags: `|b` a blocked send (never stored), `|r` a
# read receipt was sent for it (READ). A blocked send is added and deleted at once: its
# id comes from the stream like every real one (and moves the stream's last id on), and
# the inbox limit applies to it too, so nothing tells a blocked sender it is blocked.
SEND = _script(
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
READ = _script(
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
      local held = redis.pcall('XPENDING', KEYS[1], '$GROUP', id, id, 1)
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
UNREAD = _script(
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
RECEIPT = _script(
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
GO_LIVE = _script(
    keys.LUA_ROUTES
    + """
local cur = redis.call('GET', KEYS[2])
if cur and not ours(cur, ARGV[1]) then return {'gone'} end
if not cur then redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[4]) end
local function read()
  return redis.pcall('XREADGROUP', 'GROUP', '$GROUP', '$CONSUMER', 'COUNT', ARGV[3],
                     'STREAMS', KEYS[1], '>')
end
local res = read()
if type(res) == 'table' and res.err then  -- Redis lost the group: make it, read again
  redis.pcall('XGROUP', 'CREATE', KEYS[1], '$GROUP', '0', 'MKSTREAM')
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
