"""Every Redis key, group and channel name. A user's keys share one hash tag."""

from __future__ import annotations

GROUP = "g"
CONSUMER = "c"  # one session per user, so one consumer per inbox
DEDUPE_TTL_S = 24 * 3600
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


def blocked_marker(mobile: str) -> str:
    """The member of N's blocks set saying that `mobile` blocked N."""
    return "<" + mobile


def revoked(jti: str) -> str:
    return "chatnode:revoked:" + jti


def node_channel(node_id: str) -> str:
    return "chatnode:node:" + node_id


def route_value(node_id: str, session: str) -> str:
    return f"{node_id}|{session}"


def parse_route(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    node, _, session = value.partition("|")
    return node, session
