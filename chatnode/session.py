"""One authenticated socket's state, and the outbox that writes to every socket.

Frames queued for a socket during one event-loop turn are encoded by websockets' sans-I/O
protocol and written with one transport write at the end of the turn. Answers
(`accepted`, `error`) go out in the order of the frames they answer, though some need
Redis first: such a frame takes its place in `answers`, and what comes behind it waits
there. The transport's buffer is the bound: past OUT_BUFFER_LOW a session takes no
more entries, past OUT_BUFFER_MAX the client is disconnected, not waited on.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable

from chatnode import inbox, keys, logs, ratelimit
from chatnode.errors import CloseCode
from chatnode.wsserver import Conn

log = logs.get(__name__)

OUT_BUFFER_LOW = 256 * 1024  # past this many unsent bytes a session takes no entries
OUT_BUFFER_MAX = 4 * 1024 * 1024  # a client this far behind is disconnected

Job = Callable[[], Awaitable[bytes | None]]


class Answer:
    """The place of one frame's answer among its socket's answers."""

    __slots__ = ("done", "frame")

    def __init__(self) -> None:
        self.done = False
        self.frame: bytes | None = None


class Session:
    """One authenticated socket and its delivery state."""

    __slots__ = (
        "acking",
        "answers",
        "byte_bucket",
        "catching",
        "closed",
        "conn",
        "cursor",
        "early",
        "expires_at",
        "frame_bucket",
        "gen",
        "held",
        "invalid",
        "jti",
        "mobile",
        "offered",
        "outbox",
        "outbytes",
        "queued",
        "reading",
        "ready",
        "refused",
        "route",
        "send_bucket",
        "sid",
        "slow",
        "stalled",
        "token",
        "unacked",
        "unacked_bytes",
        "writing",
    )

    def __init__(
        self, conn: Conn, mobile: str, jti: str, node_id: str, expires_at: int = 0
    ) -> None:
        self.conn = conn
        self.mobile = mobile
        self.jti = jti
        self.expires_at = expires_at  # the token's exp: the socket closes with 4003 after it
        self.sid = secrets.token_hex(6)
        self.route = keys.route_value(node_id, self.sid)
        # made on the first frame or when needed: an idle socket carries none of them
        self.send_bucket: ratelimit.Bucket | None = None
        self.frame_bucket: ratelimit.Bucket | None = None
        self.byte_bucket: ratelimit.Bucket | None = None
        self.held: list[str | bytes] | None = None  # frames waiting for `ready` or `slow`
        self.slow: list[tuple[Answer, str | None, Job]] | None = None  # need PostgreSQL
        self.answers: list[Answer] | None = None  # answers waiting for an earlier one
        self.early: list[list[inbox.Entry]] | None = None  # pushes before GO_LIVE answered
        self.outbox: list[bytes] = []
        self.outbytes = 0  # bytes in outbox
        self.queued = 0  # bytes of frames in `answers`, waiting for an earlier answer
        # what is out on this socket and not acked, in the order sent; bounded by the
        # unacked caps (delivery.py): past them, entries wait in Redis
        self.unacked: dict[str, tuple[inbox.Entry, float]] = {}
        self.unacked_bytes = 0  # frame bytes held in `unacked`
        # acked by the client, XACK not yet answered: msgId -> entry
        self.acking: dict[str, inbox.Entry] | None = None
        self.refused = 0  # refusals (rate limits, unknown recipients) since the last accepted send
        self.invalid: ratelimit.Bucket | None = None  # invalid frames allowed, refilled slowly
        self.ready = False  # the route is claimed: frames are handled
        self.closed = False
        self.writing = False  # queued for the end-of-turn flush
        # delivery (delivery.py): catching up, pending from `cursor` then new, until live
        self.catching = True
        self.cursor: str | None = "0"
        self.reading = False
        self.stalled = False  # the catch-up waits for the socket to drain or Redis to return
        self.gen = 0  # bumped when the catch-up restarts: older replies are stale
        self.token: str | None = None  # the live token pushes carry
        self.offered: str | None = None  # the token GO_LIVE is taking

    def hold(self, entry: inbox.Entry, sent: float) -> None:
        """Note an entry as out on this socket (or sent again, which moves it last)."""
        old = self.unacked.pop(entry.msg_id, None)
        if old is not None:
            self.unacked_bytes -= len(old[0].frame)
        self.unacked[entry.msg_id] = (entry, sent)
        self.unacked_bytes += len(entry.frame)

    def holds(self, sender: str) -> set[str]:
        """Client ids of `sender`'s messages out on this socket (unacked, or acked with
        the XACK on its way): what a read receipt may name besides acked messages."""
        out = [e for e, _ in self.unacked.values()]
        out += self.acking.values() if self.acking else ()
        return {e.client_id for e in out if e.kind == "m" and e.sender == sender}

    def release(self, msg_id: str) -> tuple[inbox.Entry, float] | None:
        """Forget an entry that was acked; None if it was not out on this socket."""
        held = self.unacked.pop(msg_id, None)
        if held is not None:
            self.unacked_bytes -= len(held[0].frame)
        return held


class Outbox:
    """Writes every session's frames at the end of the event-loop turn."""

    def __init__(
        self,
        close: Callable[[Session, int, str], None],
        written: Callable[[Session], None],
    ) -> None:
        self._close = close
        self._written = written  # after a write: delivery looks at the socket's lag
        self._to_flush: list[Session] = []
        self._scheduled = False

    def push(self, s: Session, frame: bytes) -> None:
        """Queue a frame; it is written at the end of this event-loop turn."""
        if s.closed:
            return
        s.outbox.append(frame)
        s.outbytes += len(frame)
        if not s.writing:
            s.writing = True
            self._to_flush.append(s)
            if not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush_all)

    def later(self, s: Session) -> Answer:
        """A place for the answer of a frame that needs Redis first."""
        answer = Answer()
        if s.answers is None:
            s.answers = [answer]
        else:
            s.answers.append(answer)
        return answer

    def answer(self, s: Session, answer: Answer | None, frame: bytes | None) -> None:
        """Give a frame's answer (None: nothing to say); `answer` None means right now,
        behind any answer still due (inbox entries go this way too, so a receipt never
        beats the `accepted` of its message)."""
        queue = s.answers
        if answer is None:
            if frame is None:
                return
            if not queue:
                self.push(s, frame)
                return
            answer = Answer()
            queue.append(answer)
        answer.done, answer.frame = True, frame
        if frame is not None:
            s.queued += len(frame)
        while queue and queue[0].done:
            head = queue.pop(0)
            if head.frame is not None:
                s.queued -= len(head.frame)
                self.push(s, head.frame)
        if not queue:
            s.answers = None

    def lagging(self, s: Session) -> bool:
        """More than OUT_BUFFER_LOW waits to be written to this socket."""
        return s.conn.paused or s.outbytes + s.queued + s.conn.buffered() > OUT_BUFFER_LOW

    def _flush_all(self) -> None:
        self._scheduled = False
        sessions, self._to_flush = self._to_flush, []
        for s in sessions:
            s.writing = False
            self.flush(s)

    def flush(self, s: Session) -> None:
        """Write what is queued for this socket now."""
        if not s.outbox:
            return
        out, s.outbox, s.outbytes = s.outbox, [], 0
        try:
            s.conn.send_texts(out)
        except Exception as exc:  # the socket is going away
            log.info("socket_write_failed", user=s.mobile, error=type(exc).__name__)
            self._close(s, CloseCode.INTERNAL, "write failed")
            return
        if s.conn.buffered() > OUT_BUFFER_MAX:
            self._close(s, CloseCode.POLICY, "client is not reading")
        else:
            self._written(s)
