"""Delivery: a session catches up (pending entries, then new ones), then goes live.

Catching up reads through the consumer group: pending entries from `0` in pages, then
GO_LIVE, which reads what is new and, when nothing is, turns the route live with a fresh
token in the same atomic step. Live, the send and receipt scripts push each new entry
with that token (inbox.py), and pushes with any other token are dropped: their entries
are pending, and the next catch-up reads them. A session catches up again when its socket
lags, when the node's channel goes away or comes back, and when Redis lost its route; it
does not go live while the channel is away, since pushes would be lost on the way.

What one socket holds unacked is capped (CHATNODE_UNACKED_MAX_ENTRIES and _BYTES): a
client that reads but never acks stops taking entries there, the rest wait in Redis, and
its acks make room again. A socket's memory on the node is bounded whatever its backlog.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

from chatnode import inbox, keys, logs
from chatnode.config import Settings
from chatnode.errors import CloseCode
from chatnode.metrics import Metrics
from chatnode.redisio import Batcher
from chatnode.routing import Router
from chatnode.session import Outbox, Session

log = logs.get(__name__)


class Delivery:
    """Inbox entries to the sessions of this node, in stored order, each at least once."""

    def __init__(
        self,
        settings: Settings,
        batcher: Batcher,
        router: Router,
        outbox: Outbox,
        metrics: Metrics,
        close: Callable[[Session, int, str], None],
    ) -> None:
        self.settings = settings
        self.batcher = batcher
        self.router = router
        self.outbox = outbox
        self.metrics = metrics
        self._close = close

    # -- catching up ---------------------------------------------------------------

    def step(self, s: Session) -> None:
        """One step of catching up: a page of pending entries, then GO_LIVE until live."""
        if s.closed or not s.catching or s.reading or not s.ready:
            return
        if self.blocked(s):
            s.stalled = True  # resumed when the socket drains or acks make room
            return
        s.stalled = False
        s.reading = True
        gen = s.gen
        if s.cursor == "0" and gen:
            # a restart: the route may be live (with a token whose pushes are dropped
            # now); UNLIVE runs before the read, so every entry pushed so far is pending
            self._unlive(s)
        if s.cursor is not None:
            inbox.read_pending(
                self.batcher, s.mobile, s.cursor, lambda reply: self._on_pending(s, gen, reply)
            )
            return
        if not self.router.connected.is_set():
            # pushes would be lost while this node hears nothing: go live once it does
            s.reading, s.stalled = False, True
            return
        token = secrets.token_hex(4)
        s.offered = token
        inbox.go_live(
            self.batcher,
            s.mobile,
            s.route,
            token,
            self.settings.route_ttl_s,
            lambda reply: self._on_go_live(s, gen, token, reply),
        )

    def _on_pending(self, s: Session, gen: int, reply: Any) -> None:
        s.reading = False
        if gen != s.gen:  # the catch-up restarted meanwhile
            self.step(s)
            return
        if isinstance(reply, Exception):
            self._stall(s, reply)
            return
        if reply:
            taken = self.deliver(s, reply)
            if taken:  # the rest, if any, is read again from here once the socket drains
                s.cursor = reply[taken - 1].msg_id
        else:
            s.cursor = None
        self.step(s)

    def _on_go_live(self, s: Session, gen: int, token: str, reply: Any) -> None:
        s.reading = False
        if gen != s.gen:
            self.step(s)
            return
        if isinstance(reply, Exception):
            self._stall(s, reply)
            return
        if reply == "gone":
            self._close(s, CloseCode.REPLACED, "replaced by a newer connection")
            return
        if reply == "live":
            s.catching, s.token, s.offered = False, token, None
            early, s.early = s.early, None
            for entries in early or ():
                if s.gen != gen:
                    break  # delivering made it catch up again: the rest is pending
                self.deliver(s, entries)
            return
        s.offered, s.early = None, None
        taken = self.deliver(s, reply)
        if taken < len(reply):  # read through the group: the rest is pending now
            s.cursor = inbox.before(reply[taken].msg_id)
        self.step(s)

    def blocked(self, s: Session) -> bool:
        """The socket takes no more entries for now: it lags, or holds its cap unacked."""
        cfg = self.settings
        return (
            len(s.unacked) >= cfg.unacked_max_entries
            or s.unacked_bytes >= cfg.unacked_max_bytes
            or self.outbox.lagging(s)
        )

    def _unlive(self, s: Session) -> None:
        """Stop pushes under the session's token. If that fails, the route may still be
        live with a token the session no longer takes, and entries pushed meanwhile would
        wait pending until the next reconnect: the catch-up starts over (with UNLIVE)."""

        def done(reply: Any) -> None:
            if isinstance(reply, Exception) and not s.closed:
                self._stall(s, reply)

        inbox.unlive(self.batcher, s.mobile, s.route, done)

    def _stall(self, s: Session, error: Exception) -> None:
        """A read failed (Redis away): the sweep restarts the catch-up from the start,
        since a GO_LIVE whose answer was lost may have made the route live."""
        log.warning("inbox_read_failed", user=s.mobile, error=type(error).__name__)
        s.gen += 1
        s.cursor, s.token, s.offered, s.early, s.stalled = "0", None, None, None, True

    def restart(self, s: Session) -> None:
        """Catch up again from the first pending entry; pushes stop until live again."""
        if s.token is not None or s.offered is not None:
            self._unlive(s)  # stop pushes now, not at the read
        s.gen += 1  # replies in flight are stale now
        s.catching, s.cursor, s.token, s.offered, s.early = True, "0", None, None, None
        self.step(s)

    # -- writing entries -------------------------------------------------------------

    def deliver(self, s: Session, entries: list[inbox.Entry]) -> int:
        """Write the entries that fit in the socket's buffer; how many were taken. The
        rest are pending in the group; a live session catches up again to read them."""
        if s.closed:
            return len(entries)
        now = time.monotonic()
        unacked = s.unacked
        gone = []
        sent = taken = 0
        for entry in entries:
            if self.blocked(s):
                if not s.catching:
                    self.restart(s)  # stop pushes until the client drains or acks
                break
            taken += 1
            if not entry.kind:
                gone.append(entry.msg_id)
            elif entry.msg_id not in unacked and not (s.acking and entry.msg_id in s.acking):
                # (else it is out on this socket already, or acked just now)
                s.hold(entry, now)
                self.outbox.answer(s, None, entry.frame)
                sent += 1
        self.metrics.delivered += sent
        if gone:  # deleted while pending: nothing to send, ack it away
            self.batcher.fire("XACK", keys.inbox(s.mobile), keys.GROUP, *gone)
        return taken

    def on_push(self, s: Session, token: str, entries: list[inbox.Entry] | None) -> None:
        """Entries a script pushed for this session's user."""
        if entries is None:  # unreadable: they are pending, catch up to read them
            if token == s.token or token == s.offered:
                self.restart(s)
        elif token == s.token:
            self.deliver(s, entries)
        elif token == s.offered:  # pushed after GO_LIVE ran, before its answer came
            if s.early is None:
                s.early = []
            s.early.append(entries)
        # else: from an earlier live period; the catch-up reads those as pending

    def written(self, s: Session) -> None:
        """After a write to the socket: a live one that lags stops taking pushes; a
        catch-up that waited for the write goes on."""
        if s.conn.paused:
            if not s.catching:
                self.restart(s)
        elif s.stalled:
            self.step(s)

    def drained(self, s: Session) -> None:
        if s.stalled:
            self.step(s)

    def acked(self, s: Session) -> None:
        """Acks made room: a catch-up that waited for it goes on."""
        if s.stalled and not s.reading:
            self.step(s)

    # -- the node-wide sweep (one task, never one per socket) ------------------------

    def redeliver(self, sessions: Iterable[Session]) -> None:
        """Resend entries unacked for longer than the redelivery timeout; retry stalled
        catch-ups (Redis was away)."""
        now = time.monotonic()
        deadline = now - self.settings.redelivery_s
        for s in sessions:
            if s.stalled and not s.conn.paused:
                self.step(s)
            stale = []
            for entry, sent in s.unacked.values():
                if sent > deadline:
                    break  # insertion order is send order
                stale.append(entry)
            for entry in stale:
                if self.outbox.lagging(s):
                    break  # the rest goes at a later sweep
                s.hold(entry, now)
                self.outbox.answer(s, None, entry.frame)
