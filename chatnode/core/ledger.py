"""What is out on one socket: sent and not acked, and acked with the XACK on its way."""

from __future__ import annotations

from chatnode import inbox


class Ledger:
    """The entries out on a socket, in the order sent (a resend moves one last), and
    those the client acked whose removal from Redis is not yet answered.

    Bounded by the unacked caps (CHATNODE_UNACKED_MAX_ENTRIES and _BYTES): `full` says
    when the socket takes no more; the rest waits in Redis."""

    __slots__ = ("acking", "out", "out_bytes")

    def __init__(self) -> None:
        self.out: dict[str, tuple[inbox.Entry, float]] = {}  # msgId -> (entry, when sent)
        self.out_bytes = 0  # frame bytes of `out`
        self.acking: dict[str, inbox.Entry] | None = None

    def hold(self, entry: inbox.Entry, sent: float) -> None:
        """Note an entry as out on this socket (or sent again, which moves it last)."""
        old = self.out.pop(entry.msg_id, None)
        if old is not None:
            self.out_bytes -= len(old[0].frame)
        self.out[entry.msg_id] = (entry, sent)
        self.out_bytes += len(entry.frame)

    def release(self, msg_id: str) -> tuple[inbox.Entry, float] | None:
        """Forget an entry the client acked; None if it was not out on this socket."""
        held = self.out.pop(msg_id, None)
        if held is not None:
            self.out_bytes -= len(held[0].frame)
        return held

    def knows(self, msg_id: str) -> bool:
        """Out on this socket, or acked with its removal on the way."""
        return msg_id in self.out or (self.acking is not None and msg_id in self.acking)

    def full(self, max_entries: int, max_bytes: int) -> bool:
        return len(self.out) >= max_entries or self.out_bytes >= max_bytes

    def holds(self, sender: str) -> set[str]:
        """Client ids of `sender`'s messages out on this socket (unacked, or acked with
        the XACK on its way): what a read receipt may name besides acked messages."""
        out = [e for e, _ in self.out.values()]
        out += self.acking.values() if self.acking else ()
        return {e.client_id for e in out if e.kind == "m" and e.sender == sender}

    def acking_now(self, entries: list[inbox.Entry]) -> list[str]:
        """Note entries whose XACK is on its way: a pending read already in flight still
        returns them, and they must not go out again. Their ids."""
        if self.acking is None:
            self.acking = {}
        for entry in entries:
            self.acking[entry.msg_id] = entry
        return [e.msg_id for e in entries]

    def acked(self, ids: list[str]) -> None:
        """The removal of these ids is answered (done or failed)."""
        acking = self.acking
        if acking is not None:
            for msg_id in ids:
                acking.pop(msg_id, None)
            if not acking:
                self.acking = None

    def stale(self, deadline: float) -> list[inbox.Entry]:
        """Entries sent before `deadline`, oldest first."""
        out = []
        for entry, sent in self.out.values():
            if sent > deadline:
                break  # insertion order is send order
            out.append(entry)
        return out
