"""Every Redis key, group and channel name.

A user's keys share one hash tag: the user's partition, one of PARTITIONS. On Redis
Cluster a partition is one slot, so a script that touches one user's keys runs on one
shard; and each node listens on one sharded channel per partition, so such a script can
publish to the node holding its user (SPUBLISH may only name a channel in the script's
slot). A partition, not the user, is the tag so that a node needs PARTITIONS channels,
not one per user.
"""

from __future__ import annotations

import binascii
import functools
import zlib

from chatnode import channel

GROUP = "g"  # the consumer group of the device named `default`; others add their id
CONSUMER = "c"  # one session per device, so one consumer per group
# A device's key in Redis names: '' for the device named `default` (the keys, group and
# session name of PROTOCOL v1, so a v1 user's data is laid out as before devices), its
# id for any other. The account's value lists them (`account_value`), `0` for ''.
DEFAULT_DEVICE = ""
# What starts an account value that lists devices: a control character, which no name
# (the value before devices) holds.
DEVICES_MARK = "\x01"
# A dedupe key's TTL while its message is unacked; the ack drops it to the dedupe window
# (CHATNODE_DEDUPE_WINDOW_S; inbox.shorten from core.acks and slowpath.ack), so this
# must stay well above the window. A recipient may be offline for days, so this is no
# window: it bounds the keys of messages never acked (their entry lost with a stream
# Redis lost, or waiting for 30 days). A reader's unread counts (`unread`) live as long
# from the last time one of them started (a sender's count went from nothing to 1) or
# was given back: past the dedupe window they stand in for the keys of messages stored
# and not read, and must not outlive an abandoned account. (Not set again at every
# message: that EXPIRE cost Redis a command per message.)
DEDUPE_SAFETY_TTL_S = 30 * 24 * 3600
SEEN_TTL_S = 400 * 24 * 3600


# Fixed for the life of a deployment's data: changing it moves every user's keys.
PARTITIONS = 1024
SLOTS = 16384


def partition(name: str) -> int:
    """The partition of a user (by mobile number) or of a token (by jti)."""
    return zlib.crc32(name.encode()) % PARTITIONS


def part_tag(part: int) -> str:
    return "{p" + str(part) + "}"


@functools.lru_cache(maxsize=65536)  # a send builds five keys of one user: one CRC-32
def _tag(mobile: str) -> str:
    return part_tag(partition(mobile)) + ":u:" + mobile


def slot(key: str) -> int:
    """The Redis Cluster slot of a key: CRC16 (XMODEM) of its hash tag, mod 16384."""
    start = key.find("{")
    if start != -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key.encode(), 0) % SLOTS


def account(mobile: str) -> str:
    """Present while Redis knows the user; its absence means 'ask PostgreSQL'. Its value
    lists the user's devices (account_value); a value without DEVICES_MARK (the name,
    written before devices) means the default device alone until the user is reloaded
    (lua.ADD_DEVICE and DROP_DEVICE drop such a value)."""
    return _tag(mobile) + ":acct"


def account_value(devices: list[str]) -> str:
    """The account key's value: DEVICES_MARK and the device keys, comma-separated, `0`
    for the default device."""
    return DEVICES_MARK + ",".join(d or "0" for d in devices)


def device_keys(value: str | None) -> list[str] | None:
    """The device keys an account value lists; None if Redis does not know the user."""
    if value is None:
        return None
    if not value.startswith(DEVICES_MARK):
        return [DEFAULT_DEVICE]
    return ["" if d == "0" else d for d in value[1:].split(",") if d]


def device_key(device_id: int, name: str) -> str:
    """The key in Redis names of device `device_id` called `name`."""
    return DEFAULT_DEVICE if name == "default" else str(device_id)


def group(device: str = DEFAULT_DEVICE) -> str:
    """The consumer group of one device on its user's inbox."""
    return GROUP + device


def session(mobile: str, device: str = DEFAULT_DEVICE) -> str:
    """The name a node knows one device's session by: the owner of pushes, the subject
    of kicks, logouts and typing on the node channels."""
    return f"{mobile}:{device}" if device else mobile


def blocks(mobile: str) -> str:
    """Set: 'N' for each N this user blocked, '<N' for each N that blocked this user."""
    return _tag(mobile) + ":blocks"


def inbox(mobile: str) -> str:
    return _tag(mobile) + ":inbox"


def route(mobile: str, device: str = DEFAULT_DEVICE) -> str:
    """Which node and session hold one device of the user."""
    return _tag(mobile) + ":route" + (":" + device if device else "")


def seen(mobile: str) -> str:
    return _tag(mobile) + ":seen"


def dedupe(recipient: str, sender: str, client_id: str) -> str:
    """The msgId given to sender's client id; in the recipient's slot like the inbox."""
    return f"{_tag(recipient)}:sent:{sender}:{client_id}"


def unread(reader: str) -> str:
    """Hash: per sender, how many of that sender's messages were stored for the reader
    and not read yet; it vouches for a read receipt once the messages' dedupe keys are
    gone (lua.SEND counts, lua.READ takes, lua.UNREAD gives back). In the reader's slot,
    like the dedupe keys it stands in for."""
    return _tag(reader) + ":unread"


def send_tokens(mobile: str) -> str:
    """The send tokens a user's closed socket had left, while they refill: reconnecting
    does not refill them."""
    return _tag(mobile) + ":sendrl"


def loading(mobile: str) -> str:
    """The nonce of the reload of `mobile` from PostgreSQL in progress (blocks.py)."""
    return account(mobile) + ":loading"


def rate_limit(kind: str, subject: str) -> str:
    """A fixed-window counter (ratelimit.py); hash-tagged by its subject."""
    return f"chatnode:rl:{kind}:{{{subject}}}"


def blocked_marker(mobile: str) -> str:
    """The member of N's blocks set saying that `mobile` blocked N."""
    return "<" + mobile


def revoked(jti: str) -> str:
    """A revoked token, in the partition of its jti."""
    return "chatnode:revoked:" + part_tag(partition(jti)) + ":" + jti


def revocations_loaded(part: int) -> str:
    """Present once Redis holds every unexpired revocation of partition `part` from
    PostgreSQL. Its absence means the shard holding it lost its data (or never had it):
    revocations of that partition are checked in PostgreSQL then, and copied back. One
    per partition, so a shard that loses its data loses its own markers with it."""
    return "chatnode:revloaded:" + part_tag(part)


NODE_CHANNEL_PREFIX = "chatnode:node:"


def node_channel(node_id: str, part: int) -> str:
    """The sharded channel on which node `node_id` hears about users of partition `part`."""
    return NODE_CHANNEL_PREFIX + node_id + ":" + part_tag(part)


def node_channels(node_id: str) -> list[str]:
    """Every channel a node subscribes to: one per partition."""
    return [node_channel(node_id, p) for p in range(PARTITIONS)]


def user_channel(node_id: str, mobile: str) -> str:
    """The channel of `node_id` in `mobile`'s partition."""
    return node_channel(node_id, partition(mobile))


def route_value(node_id: str, session: str) -> str:
    """The route of a session that is catching up: `node|session`."""
    return f"{node_id}|{session}"


def parse_route(value: str | None) -> tuple[str, str] | None:
    """(node, session) of a route value, live or not."""
    if not value:
        return None
    node, _, rest = value.partition("|")
    return node, rest.partition("|")[0]


# Lua for scripts that read an inbox's group: the id of the last entry its consumer
# read (an entry after it was never delivered), or nil when the group is missing; and
# id_cmp, comparing two stream ids (-1, 0, 1).
LUA_DELIVERED = f"""
local function id_cmp(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  if am ~= bm then if am < bm then return -1 end return 1 end
  if as ~= bs then if as < bs then return -1 end return 1 end
  return 0
end
-- name -> last-delivered id of every group of the inbox; and name -> how many entries
-- are pending in it
local function groups_of(inbox)
  local out, pending = {{}}, {{}}
  local groups = redis.pcall('XINFO', 'GROUPS', inbox)
  if type(groups) ~= 'table' or groups.err then return out, pending end
  for _, g in ipairs(groups) do
    local name, id, n = nil, nil, nil
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1] end
      if g[i] == 'last-delivered-id' then id = g[i + 1] end
      if g[i] == 'pending' then n = g[i + 1] end
    end
    if name then out[name], pending[name] = id, n end
  end
  return out, pending
end
local function delivered_upto(inbox, group)
  return groups_of(inbox)[group or '{GROUP}']
end
"""

# Lua for the device keys of an account value (keys.device_keys) and the names made of
# them: devices(value) -> list of keys ('' for the default device); a device's route key
# from any key of its user, its group, its session name.
LUA_DEVICES = f"""
local function listed(acct) return acct and string.sub(acct, 1, 1) == '\1' end
local function devices(acct)
  local out = {{}}
  if not acct then return out end
  if not listed(acct) then out[1] = ''; return out end
  for k in string.gmatch(string.sub(acct, 2), '[^,]+') do
    if k == '0' then out[#out + 1] = '' else out[#out + 1] = k end
  end
  return out
end
local function suffix(k) if k == '' then return '' end return ':' .. k end
local function route_key(key, k)
  return string.match(key, '^(.*):[^:]+$') .. ':route' .. suffix(k)
end
local function group_of(k) return '{GROUP}' .. k end
"""

# push's `before`: with `upto`, only entries up to it (those after may not be on a
# replica yet)
_LUA_UPTO = """if upto then
      local last = delivered_upto(inbox, group)
      if not last then return end
      count = #redis.call('XRANGE', inbox, '(' .. last, upto, 'COUNT', 100)
      if count == 0 then return end
    end"""


def lua_channel(node: str, key: str) -> str:
    """A Lua expression: keys.node_channel of the node named by the Lua expression `node`
    in the slot of the key `key` (its hash tag)."""
    return f"'{NODE_CHANNEL_PREFIX}' .. {node} .. ':' .. string.match({key}, '^{{[^}}]*}}')"


def lua_default_alone(acct: str) -> str:
    """A Lua expression: the account value `acct` (not nil) lists the default device
    alone (account_value: a value without DEVICES_MARK, or the mark and `0`)."""
    return f"(string.byte({acct}) ~= 1 or {acct} == '\\1' .. '0')"


def lua_push(inbox: str, route: str, owner: str, group: str, before: str = "") -> str:
    """Lua statements: if `route` is live, read what is new in `inbox` through `group`
    (so Redis records it as delivered and unacked) and publish it to the node holding
    the route, tagged with its live token (channel.PUSH). Never raises: it runs after an
    XADD, and a script that fails after its XADD would make a retry store twice. The
    arguments are Lua expressions; `before` runs once the route is known live, and may
    set `count` (how many to read: 100 unless it does) or return.

    Scripts inline this where the recipient has the default device alone (no function
    is made: making one costs Redis time on every call); `push` in LUA_ROUTES wraps it
    for the others."""
    return f"""
if {route} then
  local node, token = string.match({route}, '^([^|]+)|[^|]+|(.+)$')
  if node then
    local count = '100'
    {before}
    local res = redis.pcall('XREADGROUP', 'GROUP', {group}, '{CONSUMER}', 'COUNT', count,
                            'STREAMS', {inbox}, '>')
    if type(res) == 'table' and res[1] then
      redis.pcall('SPUBLISH', {lua_channel("node", inbox)},
                  '{channel.PUSH}|' .. {owner} .. '|' .. token .. '|' .. cjson.encode(res[1][2]))
    end
  end
end
"""


# Lua shared by the scripts that read or write routes (inbox.py, presence.py).
# ours(cur, mine): the route value `cur` belongs to the session whose route is `mine`.
# push(inbox, route, owner, upto, group): lua_push as a function, with `upto` (NUDGE).
LUA_ROUTES = (
    LUA_DELIVERED
    + LUA_DEVICES
    + f"""
local function channel(node, key)  -- keys.node_channel: the node's channel in key's slot
  return {lua_channel("node", "key")}
end
local function ours(cur, mine)
  return cur ~= false and cur ~= nil
    and (cur == mine or string.sub(cur, 1, #mine + 1) == mine .. '|')
end
local function push(inbox, route, owner, upto, group)
  group = group or '{GROUP}'
{lua_push("inbox", "route", "owner", "group", _LUA_UPTO)}
end
-- push to every device of the account value `acct`; `first` is the default device's
-- route when the caller read it already (false: it has none)
local function push_all(inbox, acct, owner, upto, first)
  for _, k in ipairs(devices(acct)) do
    local route = first
    if k ~= '' or first == nil then route = redis.call('GET', route_key(inbox, k)) end
    push(inbox, route, owner .. suffix(k), upto, group_of(k))
  end
end
"""
)


def lua_push_all(inbox: str, acct: str, route: str, owner: str, reply: str) -> str:
    """Lua statements that end a script storing an entry: push it to each device the
    account value `acct` lists, then return `reply` (Lua expressions; `route` is the
    default device's route, read already). When `acct` lists the default device alone,
    the push is lua_push inline and the script returns before LUA_ROUTES' functions
    are made: making them costs Redis time on every call that reaches them."""
    return (
        f"""
if {lua_default_alone(acct)} then
{lua_push(inbox, route, owner, f"'{GROUP}'")}
  return {reply}
end
"""
        + LUA_ROUTES
        + f"""
push_all({inbox}, {acct}, {owner}, nil, {route})
return {reply}
"""
    )
