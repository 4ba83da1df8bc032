"""What nodes say to each other on their Pub/Sub channels (keys.node_channel).

A message is a one-letter tag and `|`-separated fields; no field holds a `|` (mobile
numbers, session ids, tokens, jtis and typing states never do), except the last field of
a push, a JSON array. Pushes are written by Lua (keys.LUA_ROUTES, run by the scripts
that store entries), which takes its tag from PUSH; the rest are written here.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatnode import logs

log = logs.get(__name__)

# `owner`, `mobile` and `to` below name one device's session (keys.session: the number,
# and `:` and the device's id for a device other than `default`).
PUSH = "e"  # e|owner|token|entries: new inbox entries for a live session (JSON, by cjson)
KICK = "k"  # k|mobile|session: a newer session claimed the device; close this one
LOGOUT = "l"  # l|mobile|jti: the token was revoked; close the sessions it opened
TYPING = "t"  # t|to|sender|state: a typing frame for `to` (written by lua.TYPING)
DEVICES = "v"  # v|owner|count: the user has `count` devices now (lua.ADD_DEVICE, DROP_DEVICE)


@dataclass(slots=True)  # not frozen: made per message; a frozen __init__ costs ~5x
class Push:
    owner: str
    token: str
    entries: str  # the JSON array cjson made of XREADGROUP's entries; inbox decodes them


@dataclass(frozen=True, slots=True)
class Kick:
    mobile: str
    session: str


@dataclass(frozen=True, slots=True)
class Logout:
    mobile: str
    jti: str


@dataclass(frozen=True, slots=True)
class Typing:
    to: str
    sender: str
    state: str


@dataclass(frozen=True, slots=True)
class Devices:
    owner: str
    count: int


Message = Push | Kick | Logout | Typing | Devices


def push(owner: str, token: str, entries: str) -> str:
    """A push as the Lua in keys.LUA_ROUTES writes it (tests and tools write it so too)."""
    return f"{PUSH}|{owner}|{token}|{entries}"


def kick(mobile: str, session: str) -> str:
    return f"{KICK}|{mobile}|{session}"


def logout(mobile: str, jti: str) -> str:
    return f"{LOGOUT}|{mobile}|{jti}"


def typing(to: str, sender: str, state: str) -> str:
    return f"{TYPING}|{to}|{sender}|{state}"


def decode(payload: str) -> Message | None:
    """The message a channel payload carries; None (logged) for one this node does not know.

    A push is never refused here: its entries are pending in the group all the same, and
    the listener must hear of it to catch up."""
    kind, _, rest = payload.partition("|")
    if kind == PUSH:
        owner, _, rest = rest.partition("|")
        token, _, entries = rest.partition("|")
        return Push(owner, token, entries)
    parts = rest.split("|")
    if kind == KICK and len(parts) == 2:
        return Kick(parts[0], parts[1])
    if kind == LOGOUT and len(parts) == 2:
        return Logout(parts[0], parts[1])
    if kind == TYPING and len(parts) == 3:
        return Typing(parts[0], parts[1], parts[2])
    if kind == DEVICES and len(parts) == 2 and parts[1].isdigit():
        return Devices(parts[0], int(parts[1]))
    log.warning("channel_message_unknown", kind=kind)
    return None
