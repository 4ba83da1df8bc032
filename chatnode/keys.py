"""Every Redis key, group and channel name. A user's keys share one hash tag."""

from __future__ import annotations

from chatnode import channel

GROUP = "g"
CONSUMER = "c"  # one session per user, so one consumer per inbox
# A dedupe key's TTL while its message is unacked; the ack drops it to the dedupe window
# (CHATNODE_DEDUPE_WINDOW_S; core.acks, slowpath.ack). A recipient may be offline for
# days, so this is no window: it bounds the keys whose entry left without that EXPIRE (a
# connection lost after the XACK, before the EXPIRE) or was never acked at all.
DEDUPE_SAFETY_TTL_S = 30 * 24 * 3600
SEEN_TTL_S = 400 * 24 * 3600


def _tag(mobile: str) -> str:
    return "{u:" + mobile + "}"


def account(mobile: str) -> str:
    """Present while Redis knows the user; its absence means 'ask PostgreSQL'."""
    return _tag(mobile) + ":acct"


def blocks(mobile: str) -> str:
    """Set: 'N' for each N this user blocked, '<N' for each N that blocked this user."""
    return _tag(mobile) + ":blocks"


def inbox(mobile: str) -> str:
    return _tag(mobile) + ":inbox"


def route(mobile: str) -> str:
    return _tag(mobile) + ":route"


def seen(mobile: str) -> str:
    return _tag(mobile) + ":seen"


def dedupe(recipient: str, sender: str, client_id: str) -> str:
    """The msgId given to sender's client id; in the recipient's slot like the inbox."""
    return f"{_tag(recipient)}:sent:{sender}:{client_id}"


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
    return "chatnode:revoked:" + jti


# Present once this Redis holds every unexpired revocation from PostgreSQL; its absence
# means Redis lost its data (or never had it): revocations are checked in PostgreSQL
# then, and copied back.
REVOCATIONS_LOADED = "chatnode:revoked:loaded"


NODE_CHANNEL_PREFIX = "chatnode:node:"


def node_channel(node_id: str) -> str:
    return NODE_CHANNEL_PREFIX + node_id


def route_value(node_id: str, session: str) -> str:
    """The route of a session that is catching up: `node|session`."""
    return f"{node_id}|{session}"


def parse_route(value: str | None) -> tuple[str, str] | None:
    """(node, session) of a route value, live or not."""
    if not value:
        return None
    node, _, rest = value.partition("|")
    return node, rest.partition("|")[0]


# Lua shared by the scripts that read or write routes (inbox.py, presence.py).
# ours(cur, mine): the route value `cur` belongs to the session whose route is `mine`.
# push(inbox, route, owner): if the route is live, read what is new in the inbox through
# the consumer group (so Redis records it as delivered and unacked) and publish it to
# the node holding the owner, tagged with the live token. Never raises: it runs after
# the XADD, and a script that fails after its XADD would make a retry store twice.
LUA_ROUTES = f"""
local function ours(cur, mine)
  return cur ~= false and cur ~= nil
    and (cur == mine or string.sub(cur, 1, #mine + 1) == mine .. '|')
end
local function push(inbox, route, owner)
  if not route then return end
  local node, token = string.match(route, '^([^|]+)|[^|]+|(.+)$')
  if not node then return end
  local res = redis.pcall('XREADGROUP', 'GROUP', '{GROUP}', '{CONSUMER}', 'COUNT', 100,
                          'STREAMS', inbox, '>')
  if type(res) == 'table' and res[1] then
    redis.pcall('PUBLISH', '{NODE_CHANNEL_PREFIX}' .. node,
                '{channel.PUSH}|' .. owner .. '|' .. token .. '|' .. cjson.encode(res[1][2]))
  end
end
"""
