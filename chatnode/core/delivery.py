"""Delivery on one socket: catch up (pending entries, then new ones), then go live.

Catching up reads through the consumer group: pending entries from `0` in pages, then
GO_LIVE, which reads what is new and, when nothing is, turns the route live with a fresh
token in the same atomic step. Live, the send and receipt scripts push each new entry
with that token, and pushes with any other token are dropped: their entries are pending,
and the next catch-up reads them. A session catches up again when its socket lags, when
the node's channel goes away or comes back, and when Redis lost its route; it does not
go live while the channel is away, since pushes would be lost on the way.

What one socket holds unacked is capped (CHATNODE_UNACKED_MAX_ENTRIES and _BYTES): a
client that reads but never acks stops taking entries there, the rest wait in Redis, and
its acks make room again. A socket's memory on the node is bounded whatever its backlog.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from chatnode import inbox, keys, logs, lua
from chatnode.core.actions import Call
from chatnode.core.answers import OUT_BUFFER_LOW
from chatnode.errors import CloseCode

if TYPE_CHECKING:
    from chatnode.core.socket import SocketCore

log = logs.get(__name__)

OWN_KINDS = frozenset({"o", "y"})  # entries a device made itself: it skips them


class Delivery:
    """Inbox entries to one socket, in stored order, each at least once."""

    __slots__ = (
        "catching",
        "core",
        "cursor",
        "early",
        "failed",
        "gen",
        "offered",
        "reading",
        "stalled",
        "token",
    )

    def __init__(self, core: SocketCore) -> None:
        self.core = core
        self.catching = True  # pending from `cursor`, then new, until live
        self.cursor: str | None = "0"
        self.reading = False
        self.stalled = False  # the catch-up waits for the socket to drain or Redis to return
        self.failed = False  # stalled by a failed read: only the sweep retries it
        self.gen = 0  # bumped when the catch-up restarts: older replies are stale
        self.token: str | None = None  # the live token pushes carry
        self.offered: str | None = None  # the token GO_LIVE is taking
        self.early: list[list[inbox.Entry]] | None = None  # pushes before GO_LIVE answered

    # -- catching up ---------------------------------------------------------------

    def step(self) -> None:
        """One step of catching up: a page of pending entries, then GO_LIVE until live."""
        core = self.core
        if core.closed or not self.catching or self.reading or not core.ready:
            return
        if self.blocked():
            self.stalled = True  # resumed when the socket drains or acks make room
            return
        self.stalled = self.failed = False
        self.reading = True
        gen = self.gen
        if self.cursor == "0" and gen:
            # a restart: the route may be live (with a token whose pushes are dropped
            # now); UNLIVE runs before the read, so every entry pushed so far is pending
            self._unlive()
        if self.cursor is not None:
            core.emit(
                Call(
                    inbox.pending_call(core.mobile, core.device_key, self.cursor),
                    lambda r: self._on_pending(gen, r),
                )
            )
            return
        if not core.node.channel_up():
            # pushes would be lost while this node hears nothing: go live once it does
            self.reading, self.stalled = False, True
            return
        token = secrets.token_hex(4)
        self.offered = token
        ttl = core.settings.route_ttl_s
        args, argv = inbox.go_live_call(core.mobile, core.device_key, core.route, token, ttl)
        core.emit(
            Call(
                args,
                lambda reply: self._on_go_live(gen, token, inbox.go_live_result(reply)),
                lua.GO_LIVE,
                argv,
            )
        )

    def _on_pending(self, gen: int, reply: Any) -> None:
        self.reading = False
        if inbox.lost_group(reply):  # Redis lost the stream: nothing is pending then
            self.core.emit(Call(inbox.make_group_call(self.core.mobile, self.core.device_key)))
            reply = []
        reply = inbox.pending_entries(reply)
        if gen != self.gen:  # the catch-up restarted meanwhile
            self._stale_reply(reply)
            return
        if isinstance(reply, Exception):
            self._stall(reply)
            return
        if reply:
            taken = self.deliver(reply)
            if taken:  # the rest, if any, is read again from here once the socket drains
                self.cursor = reply[taken - 1].msg_id
        else:
            self.cursor = None
        self.step()

    def _on_go_live(self, gen: int, token: str, reply: Any) -> None:
        self.reading = False
        if gen != self.gen:
            self._stale_reply(reply)
            return
        if isinstance(reply, Exception):
            self._stall(reply)
            return
        if reply == "gone":
            self.core.close(CloseCode.REPLACED, "replaced by a newer connection")
            return
        if reply == "live":
            self.catching, self.token, self.offered = False, token, None
            early, self.early = self.early, None
            for entries in early or ():
                if self.gen != gen:
                    break  # delivering made it catch up again: the rest is pending
                self.deliver(entries)
            return
        self.offered, self.early = None, None
        taken = self.deliver(reply)
        if taken < len(reply):  # read through the group: the rest is pending now
            self.cursor = inbox.before(reply[taken].msg_id)
        self.step()

    def blocked(self) -> bool:
        """The socket takes no more entries for now: it lags, or holds its cap unacked.
        (Ledger.full and SocketCore.lagging, inline: it runs once per entry.)"""
        core = self.core
        cfg = core.settings
        ledger = core.ledger
        if len(ledger.out) >= cfg.unacked_max_entries or ledger.out_bytes >= cfg.unacked_max_bytes:
            return True
        wire, answers = core.wire, core.answers
        return wire.paused or answers.outbytes + answers.queued + wire.buffered() > OUT_BUFFER_LOW

    def _unlive(self) -> None:
        """Stop pushes under the session's token. If that fails, the route may still be
        live with a token the session no longer takes, and entries pushed meanwhile would
        wait pending until the next reconnect: the catch-up starts over (with UNLIVE)."""

        def done(reply: Any) -> None:
            if isinstance(reply, Exception) and not self.core.closed:
                self._stall(reply)

        core = self.core
        args, argv = inbox.unlive_call(core.mobile, core.device_key, core.route)
        core.emit(Call(args, done, lua.UNLIVE, argv))

    def _stale_reply(self, reply: Any) -> None:
        """The reply of a read the catch-up restarted past: the new catch-up goes on from
        here, unless the read failed or one failed since. After a failure only the sweep
        retries: no loop at event-loop speed while Redis is away."""
        if isinstance(reply, Exception):
            self.stalled = self.failed = True
        elif not self.failed:
            self.step()

    def _stall(self, error: Exception) -> None:
        """A read failed (Redis away): the sweep restarts the catch-up from the start,
        since a GO_LIVE whose answer was lost may have made the route live."""
        log.warning("inbox_read_failed", user=self.core.mobile, error=type(error).__name__)
        self.gen += 1
        self.cursor, self.token, self.offered, self.early = "0", None, None, None
        self.stalled = self.failed = True

    def restart(self) -> None:
        """Catch up again from the first pending entry; pushes stop until live again."""
        if self.token is not None or self.offered is not None:
            self._unlive()  # stop pushes now, not at the read
        self.gen += 1  # replies in flight are stale now
        self.catching, self.cursor, self.token, self.offered, self.early = (
            True,
            "0",
            None,
            None,
            None,
        )
        self.step()

    # -- writing entries -------------------------------------------------------------

    def deliver(self, entries: list[inbox.Entry]) -> int:
        """Write the entries that fit; how many were taken. The rest are pending in the
        group; a live session catches up again to read them."""
        core = self.core
        if core.closed:
            return len(entries)
        now = core.node.clock.monotonic()
        ledger = core.ledger
        gone = []
        mine = []
        sent = taken = 0
        for entry in entries:
            if self.blocked():
                if not self.catching:
                    self.restart()  # stop pushes until the client drains or acks
                break
            taken += 1
            if not entry.kind:
                gone.append(entry.msg_id)
                ledger.release(entry.msg_id)  # acked, and its XDEL went through
            elif entry.kind in OWN_KINDS and (entry.device == core.device_key or not core.named):
                # this device's own send or read, or a copy a v1 client (a login naming
                # no device) would not understand: done with it unseen
                mine.append(entry.msg_id)
            elif not ledger.knows(entry.msg_id):  # (else out already, or acked just now)
                ledger.hold(entry, now)
                core.answers.give(None, entry.frame)
                sent += 1
        core.node.metrics.delivered += sent
        if gone:  # deleted while pending: nothing to send, ack it away
            group = keys.group(core.device_key)
            core.emit(Call(("XACK", keys.inbox(core.mobile), group, *gone)))
        if mine:  # (a failed ack leaves them pending: the next catch-up skips them again)
            args, argv = inbox.ack_device_call(core.mobile, core.device_key, mine)
            core.emit(Call(args, None, lua.ACK_DEVICE, argv))
        return taken

    def on_push(self, token: str, entries: list[inbox.Entry] | None) -> None:
        """Entries a script pushed for this socket's user."""
        if entries is None:  # unreadable: they are pending, catch up to read them
            if token == self.token or token == self.offered:
                self.restart()
        elif token == self.token:
            self.deliver(entries)
        elif token == self.offered:  # pushed after GO_LIVE ran, before its answer came
            if self.early is None:
                self.early = []
            self.early.append(entries)
        # else: from an earlier live period; the catch-up reads those as pending

    def written(self, paused: bool) -> None:
        """After a write to the socket: a live one that lags stops taking pushes; a
        catch-up that waited for the write goes on."""
        if paused:
            if not self.catching:
                self.restart()
        elif self.stalled:
            self.step()

    def drained(self) -> None:
        if self.stalled:
            self.step()

    def acked(self) -> None:
        """Acks made room: a catch-up that waited for it goes on."""
        if self.stalled and not self.reading:
            self.step()

    def tick(self, now: float, paused: bool) -> None:
        """The redelivery sweep: resend entries unacked for longer than the redelivery
        timeout; retry a stalled catch-up (Redis was away)."""
        core = self.core
        if self.stalled and not paused:
            self.step()
        for entry in core.ledger.stale(now - core.settings.redelivery_s):
            if core.lagging():
                break  # the rest goes at a later sweep
            core.ledger.hold(entry, now)
            core.answers.give(None, entry.frame)
