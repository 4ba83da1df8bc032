"""Acks and read receipts on one socket.

An ack stores the delivered receipts first, then acks the entries (XACK; they leave the
stream with it or at the next trim): an entry is acked only once its receipt is
stored, so a receipt that cannot be
stored leaves the entry to be delivered, and acked, again. The acked messages' dedupe
keys are shortened to the dedupe window with them. A read receipt names only messages
its sender delivered to this user, each once (lua.READ; past the dedupe window, as many
as the reader's count of that sender's unread messages vouches for), then goes to the
sender's inbox like any receipt.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from chatnode import frames, inbox, keys, logs, lua
from chatnode.core.actions import (
    Call,
    CheckKnown,
    FetchEntries,
    Next,
    StoreRead,
    StoreReceipts,
)
from chatnode.errors import ChatError, Code, InboxFull, Unavailable

if TYPE_CHECKING:
    from chatnode.core.answers import Answer
    from chatnode.core.socket import SocketCore

log = logs.get(__name__)

ACK_FAILED = "could not ack, send the ack again"
UNAVAILABLE = "Redis is unavailable, try again"
NOT_DELIVERED = "ids named messages not delivered to you yet; they were dropped"

# an acked entry with when it was sent on this socket; -1 if it was not (a reconnect)
Acked = tuple[inbox.Entry, float]


class Acks:
    __slots__ = ("core",)

    def __init__(self, core: SocketCore) -> None:
        self.core = core

    # -- ack -------------------------------------------------------------------------

    def ack(self, frame: frames.Ack) -> None:
        core = self.core
        ledger = core.ledger
        done: list[Acked] = []
        release = ledger.release
        for msg_id in frame.msg_ids:
            held = release(msg_id)
            if held is not None:
                done.append(held)
        unknown: list[str] = []
        if len(done) < len(frame.msg_ids):
            taken = {e.msg_id for e, _ in done}
            # not out on this socket and not being acked already: delivered before (a
            # reconnect)
            unknown = [m for m in frame.msg_ids if m not in taken and not ledger.knows(m)]
        answer = core.answers.later()
        core.delivery.acked()  # room for more entries on this socket
        ids = ledger.acking_now([e for e, _ in done])
        if unknown:
            job = FetchEntries(core.mobile, unknown, core.device_key)
            core.lane.add(answer, None, job, lambda r: self._fetched(done, ids, r))
            return
        if not done:  # every id is being acked already
            core.answers.give(answer, None)
            return
        if core.solo or not any(e.kind == "m" for e, _ in done):
            self._store_receipts(done, ids, answer, self._receipts_for(done))
            return

        def firsts(reply: Any) -> None:
            """Only the first device's ack of a message sends `delivered`; if the check
            fails, this one does (a second `delivered` is harmless, a missing one not)."""
            first = done
            if not isinstance(reply, Exception):
                at = {int(i) - 1 for i in reply}
                first = [d for i, d in enumerate(done) if i in at]
            self._store_receipts(done, ids, answer, self._receipts_for(first))

        args, argv = inbox.first_acks_call(core.mobile, core.device_key, ids)
        core.emit(Call(args, firsts, lua.FIRST_ACKS, argv))

    def _store_receipts(
        self, done: list[Acked], ids: list[str], answer: Answer, receipts: list[inbox.Receipt]
    ) -> None:
        """Store the delivered receipts of acked entries, then remove the entries."""
        core = self.core
        if not receipts:
            self._remove(done, ids, answer)
            return
        waiting = len(receipts)
        failed: list[inbox.Receipt] = []

        def stored(receipt: inbox.Receipt, reply: Any) -> None:
            nonlocal waiting
            waiting -= 1
            if isinstance(reply, Exception) or reply[0] == "unknown":
                failed.append(receipt)  # retried, or its owner loaded, on the slow lane
            if waiting:
                return
            if not failed:
                self._remove(done, ids, answer)
            else:
                messages = inbox.acked_messages(e for e, _ in done)
                job = StoreReceipts(core.mobile, failed, ids, messages, core.device_key)
                core.lane.add(answer, None, job, lambda r: self._stored(done, ids, r))

        limit = core.settings.inbox_limit
        for receipt in receipts:
            args, argv = receipt.call(limit)
            core.emit(Call(args, functools.partial(stored, receipt), lua.RECEIPT, argv))

    def _remove(self, done: list[Acked], ids: list[str], answer: Answer) -> None:
        """This device's ack of entries whose receipts are stored, and the acked
        messages' dedupe keys shortened (inbox.shorten). Nobody waits for them (no
        answer unless the ack fails): they ride with other work. A session that knows
        of one device sends a plain XACK, and the entries leave the stream at its next
        trim (lua.TRIM, SocketCore.trim), which reads every group in the script that
        deletes: a device linked meanwhile keeps what it has not read. With several,
        lua.ACK_DEVICE: XACK, and XDEL of what no other device still needs."""
        core = self.core

        plain = core.solo

        def removed(reply: Any) -> None:
            core.ledger.acked(ids)
            if isinstance(reply, Exception):
                self._unacked_again(done)
                core.refuse(Code.UNAVAILABLE, ACK_FAILED, None, answer)
                return
            core.meter.refused = 0  # an ack that went through ends a run of refusals
            core.node.metrics.acked += len(done)
            core.answers.give(answer, None)
            if plain:  # the entries leave at a trim after this XACK
                core.trimmed_later(ids)

        if plain:
            group = keys.group(core.device_key)
            core.emit(Call(("XACK", keys.inbox(core.mobile), group, *ids), removed, None, (), True))
        else:
            args, argv = inbox.ack_device_call(core.mobile, core.device_key, ids)
            core.emit(Call(args, removed, lua.ACK_DEVICE, argv, True))
        messages = inbox.acked_messages(e for e, _ in done)
        for command in inbox.shorten(core.mobile, messages, core.settings.dedupe_window_s):
            core.emit(Call(command, None, None, (), True))

    def _fetched(self, done: list[Acked], ids: list[str], result: Any) -> Next:
        """Entries acked that this socket did not deliver: found in the inbox, they are
        acked like the others (receipts first)."""
        if isinstance(result, Exception):  # the ids not yet looked up are pending too
            _log_unexpected(result, self.core.mobile)
            self.core.ledger.acked(ids)
            self._unacked_again(done, reread=True)
            raise Unavailable(ACK_FAILED)
        # the catch-up may have sent them again meanwhile: they leave the ledger too
        earlier = [self.core.ledger.release(e.msg_id) or (e, -1.0) for e in result if e.kind]
        done = done + earlier
        ids = ids + self.core.ledger.acking_now([e for e, _ in earlier])
        core = self.core
        messages = inbox.acked_messages(e for e, _ in done)
        receipts = self._receipts_for(done)  # (from every device: a second is harmless)
        job = StoreReceipts(core.mobile, receipts, ids, messages, core.device_key)
        return Next(job, lambda r: self._stored(done, ids, r))

    def _stored(self, done: list[Acked], ids: list[str], result: Any) -> None:
        """The slow lane stored the receipts and removed the entries, or failed: then
        the entries out on this socket stay unacked."""
        core = self.core
        core.ledger.acked(ids)
        if isinstance(result, Exception):
            _log_unexpected(result, core.mobile)
            self._unacked_again(done)
            raise Unavailable(ACK_FAILED)
        core.node.metrics.acked += len(done)

    def _unacked_again(self, done: list[Acked], reread: bool = False) -> None:
        """An ack that failed: the entries are pending in Redis still, so they must
        reach the client again. Those out on this socket stay in the ledger (stamped
        now, which keeps it in sending order) and go again at the redelivery timeout;
        those it did not send (acked from an earlier socket), or that no longer fit
        under the caps, are read again from Redis: the catch-up starts over."""
        core = self.core
        cfg = core.settings
        ledger = core.ledger
        now = core.node.clock.monotonic()
        again = reread
        for entry, sent in done:
            if sent < 0 or ledger.full(cfg.unacked_max_entries, cfg.unacked_max_bytes):
                again = True
            else:
                ledger.hold(entry, now)
        if again and not core.closed:
            core.delivery.restart()

    def _receipts_for(self, done: list[Acked]) -> list[inbox.Receipt]:
        """One delivered receipt per sender of the acked messages."""
        by_sender: dict[str, list[str]] = {}
        for entry, _sent in done:
            if entry.kind == "m":
                by_sender.setdefault(entry.sender, []).append(entry.client_id)
        ts = self.core.now_ms()
        mobile = self.core.mobile
        return [
            inbox.Receipt(sender, mobile, "delivered", ids, ts) for sender, ids in by_sender.items()
        ]

    # -- read receipts ---------------------------------------------------------------

    def read(self, frame: frames.Read) -> None:
        """Ids of messages stored but not delivered are refused (invalid_frame); ids
        with no record (made up, or past the dedupe window) count against the reader's
        unread messages from `to`, and are dropped in silence once none is left."""
        core = self.core
        answer = core.answers.later()
        ids = list(frame.ids)

        def checked(reply: Any) -> None:
            if isinstance(reply, Exception):
                core.refuse(Code.UNAVAILABLE, UNAVAILABLE, None, answer)
                return
            missing, undelivered, fresh, took = inbox.read_result(ids, reply)
            if undelivered and not core.invalid_frame():
                return  # closed
            if fresh:
                receipt = inbox.Receipt(frame.to, core.mobile, "read", fresh, core.now_ms())
                self._store_read(receipt, took, bool(undelivered), answer)
            elif undelivered:
                core.node.metrics.refuse(Code.INVALID_FRAME)
                core.answers.give(answer, frames.error(Code.INVALID_FRAME, NOT_DELIVERED, None))
            elif missing == len(ids):  # no record at all: is there such a user?
                core.lane.add(answer, None, CheckKnown(frame.to), _nothing)
            else:
                core.answers.give(answer, None)  # all receipted already

        held = core.ledger.holds(frame.to)
        args, argv = inbox.read_call(core.mobile, core.device_key, frame.to, ids, held)
        core.emit(Call(args, checked, lua.READ, argv))

    def _store_read(self, receipt: inbox.Receipt, took: int, bad: bool, answer: Answer) -> None:
        """Store a read receipt; if it cannot be, UNREAD unmarks its ids and gives back
        the `took` READ took from the unread count for them."""
        core = self.core
        after = frames.error(Code.INVALID_FRAME, NOT_DELIVERED, None) if bad else None

        def unread() -> None:
            args, argv = inbox.unread_call(core.mobile, receipt.owner, receipt.ids, took)
            core.emit(Call(args, None, lua.UNREAD, argv))

        def reloaded(result: Any) -> bytes | None:  # Redis lacked the owner: PostgreSQL
            if isinstance(result, Exception):
                unread()
                raise result
            return after

        def done(reply: Any) -> None:
            if isinstance(reply, Exception):
                unread()
                core.refuse(Code.UNAVAILABLE, UNAVAILABLE, None, answer)
            elif reply[0] == "unknown":
                core.lane.add(answer, None, StoreRead(receipt), reloaded)
            elif reply[0] == "full":
                unread()
                core.refuse(Code.INBOX_FULL, InboxFull.default_message, None, answer)
            else:  # stored, or dropped by a block as v1 says
                core.meter.refused = 0
                core.answers.give(answer, after)
                if not core.solo:  # the reader's other devices learn it was read
                    ts, device = receipt.ts, core.device_key
                    core.own(
                        inbox.own_read_fields(core.mobile, receipt.owner, receipt.ids, ts, device)
                    )

        args, argv = receipt.call(core.settings.inbox_limit)
        core.emit(Call(args, done, lua.RECEIPT, argv))


def _nothing(result: Any) -> None:
    """The finish of a job whose success needs no answer; its error is the answer."""
    if isinstance(result, Exception):
        raise result


def _log_unexpected(error: Exception, user: str) -> None:
    """A failure that is not a refusal or Redis being away is a bug: log it whole."""
    if not isinstance(error, ChatError):
        log.error("slow_operation_failed", user=user, exc_info=error)
