"""The WebSocket gateway: handshake auth, frames in, inbox entries and replies out.

A frame is handled where it arrives (data_received): its Redis work is queued with a
callback, so a socket needs no task and frames of many sockets share one pipeline. The
frames of one socket reach Redis in order over one connection; the rare frame that
needs PostgreSQL (a recipient Redis lost) holds the socket's later frames until done.
Delivery: a session catches up (pending entries, then new ones), then goes live and gets
each new entry pushed by the script that stored it (inbox.py).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from chatnode import auth, frames, inbox, keys, logs, presence, ratelimit
from chatnode.config import Settings
from chatnode.errors import ChatError, CloseCode, Code, Unauthorized, Unavailable
from chatnode.metrics import Metrics
from chatnode.redisio import Batcher
from chatnode.routing import Router
from chatnode.wsserver import Conn

log = logs.get(__name__)

OUT_BUFFER_LOW = 256 * 1024  # past this many unsent bytes a session stops taking entries
OUT_BUFFER_MAX = 4 * 1024 * 1024  # a client this far behind is disconnected
MAX_INVALID_FRAMES = 20
MAX_HELD_FRAMES = 64  # frames waiting on a claim or a slow operation; then reading pauses
RECEIPT_RETRIES = 5
RECEIPT_RETRY_S = 1.0
CLOSE_WAIT_S = 5.0

ACK_FAILED = "could not ack, send the ack again"
UNAVAILABLE = "Redis is unavailable, try again"

Job = Callable[[], Awaitable[bytes | None]]
Delivered = tuple[str, tuple[inbox.Entry, float]]  # msgId, (entry, when sent)


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
        "catching",
        "closed",
        "conn",
        "cursor",
        "early",
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
        "writing",
    )

    def __init__(self, conn: Conn, mobile: str, jti: str, node_id: str) -> None:
        self.conn = conn
        self.mobile = mobile
        self.jti = jti
        self.sid = secrets.token_hex(6)
        self.route = keys.route_value(node_id, self.sid)
        # made on the first frame or when needed: an idle socket carries none of them
        self.send_bucket: ratelimit.Bucket | None = None
        self.frame_bucket: ratelimit.Bucket | None = None
        self.held: list[str | bytes] | None = None  # frames waiting for `ready` or `slow`
        self.slow: list[tuple[Answer, str | None, Job]] | None = None  # need PostgreSQL
        self.answers: list[Answer] | None = None  # answers waiting for an earlier one
        self.early: list[list[inbox.Entry]] | None = None  # pushes before GO_LIVE answered
        self.outbox: list[bytes] = []
        self.outbytes = 0  # bytes in outbox
        self.queued = 0  # bytes of frames in `answers`, waiting for an earlier answer
        self.unacked: dict[str, tuple[inbox.Entry, float]] = {}  # in the order sent
        self.acking: set[str] | None = None  # acked by the client, XACK not yet answered
        self.refused = 0  # rate-limit refusals in a row
        self.invalid = 0  # invalid frames in a row
        self.ready = False  # the route is claimed: frames are handled
        self.closed = False
        self.writing = False  # queued for the end-of-turn flush
        # delivery: catching up (pending from `cursor`, then new) until live with `token`
        self.catching = True
        self.cursor: str | None = "0"
        self.reading = False
        self.stalled = False  # the catch-up waits for the socket to drain or Redis to return
        self.gen = 0  # bumped when the catch-up restarts: older replies are stale
        self.token: str | None = None
        self.offered: str | None = None


class Gateway:
    """All sessions of this node; also the Listener for what the node's channel brings."""

    def __init__(
        self,
        settings: Settings,
        batcher: Batcher,
        pool: Any,
        router: Router,
        tokens: auth.Tokens,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.batcher = batcher
        self.pool = pool
        self.router = router
        self.tokens = tokens
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self.seen_to_store: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._to_flush: list[Session] = []
        self._flush_scheduled = False
        self.accepting = True

    # -- handshake (wsserver.Handler) ----------------------------------------------

    async def authorize(self, conn: Conn, request: Request) -> tuple[Response | None, Any]:
        """Authenticate in the handshake: a bad token gets HTTP 401 and no socket."""
        url = urlsplit(request.path)
        if url.path.rstrip("/") != "/ws":
            return conn.reject(HTTPStatus.NOT_FOUND, "not found\n"), None
        if not self.accepting:
            return conn.reject(HTTPStatus.SERVICE_UNAVAILABLE, "node restarting\n"), None
        cfg = self.settings
        token = parse_qs(url.query).get("token", [None])[0] or auth.bearer(
            _header(request.headers, "Authorization")
        )
        try:
            # many users behind one address is normal; many bad tokens or one user
            # reconnecting in a loop is not
            limits = [("connect-address", conn.address, cfg.connects_per_address)]
            try:
                claims = await auth.authenticate(self.tokens, self.batcher, self.pool, token)
                limits.append(("connect-user", claims.mobile, cfg.connects_per_user))
            except Unauthorized:
                claims = None
                limits.append(("connect-fail-address", conn.address, cfg.connect_fails_per_address))
            for kind, subject, limit in limits:
                verdict = await ratelimit.hit(
                    self.batcher, kind, subject, limit, cfg.connect_window_s
                )
                if not verdict.allowed:
                    response = conn.reject(HTTPStatus.TOO_MANY_REQUESTS, "rate_limited\n")
                    response.headers["Retry-After"] = str(verdict.retry_after)
                    return response, None
        except ChatError:
            return conn.reject(HTTPStatus.SERVICE_UNAVAILABLE, "unavailable\n"), None
        if claims is None:
            return conn.reject(HTTPStatus.UNAUTHORIZED, "unauthorized\n"), None
        if not self.accepting:
            return conn.reject(HTTPStatus.SERVICE_UNAVAILABLE, "node restarting\n"), None
        return None, claims

    def on_open(self, conn: Conn, claims: auth.Claims) -> Session:
        s = Session(conn, claims.mobile, claims.jti, self.node_id)
        previous = self.sessions.get(s.mobile)
        self.sessions[s.mobile] = s
        if previous is not None:
            self.close(previous, CloseCode.REPLACED, "replaced by a newer connection")
        self.metrics.sockets += 1
        # hello first: nothing else is queued for this session before it
        self.push(s, frames.hello(s.mobile, self.node_id, self.settings.heartbeat_s))
        presence.claim(
            self.batcher,
            s.mobile,
            s.route,
            self.settings.route_ttl_s,
            lambda reply: self._claimed(s, reply),
        )
        return s

    def _claimed(self, s: Session, old: Any) -> None:
        if isinstance(old, Exception):
            self.close(s, CloseCode.INTERNAL, "unavailable")
            return
        parsed = keys.parse_route(old)
        if parsed is not None and parsed[1] != s.sid and parsed[0] != self.node_id:
            # the previous holder's node closes it (on this node that happened at open),
            # even if this session is closed by now: one session per user
            self.router.send(parsed[0], f"k|{s.mobile}|{parsed[1]}")
        if s.closed:
            return
        log.info("socket_open", user=s.mobile, session=s.sid)
        s.ready = True
        self._read_step(s)
        self._release_held(s)

    # -- frames in -----------------------------------------------------------------

    def on_message(self, conn: Conn, data: str | bytes) -> None:
        s: Session = conn.session
        if s.closed:
            return
        if not s.ready or s.slow:
            if s.held is None:
                s.held = []
            s.held.append(data)
            if len(s.held) >= MAX_HELD_FRAMES:
                conn.pause_reading()
            return
        self._on_frame(s, data)

    def _release_held(self, s: Session) -> None:
        """Handle the frames that waited, in order, until one starts a slow operation."""
        held = s.held
        if held is None:
            return
        while held and not s.slow and not s.closed:
            self._on_frame(s, held.pop(0))
        if not held:
            s.held = None
            s.conn.resume_reading()

    def _on_frame(self, s: Session, data: str | bytes) -> None:
        if s.frame_bucket is None:
            s.frame_bucket = ratelimit.Bucket(self.settings.frame_rate, self.settings.frame_burst)
            s.send_bucket = ratelimit.Bucket(self.settings.send_rate, self.settings.send_burst)
        try:
            frame = frames.parse_client(data, s.mobile)
        except frames.FrameError as exc:
            s.invalid += 1
            self._refuse(s, exc.code, exc.message, exc.ref)
            if s.invalid >= MAX_INVALID_FRAMES:
                self.close(s, CloseCode.POLICY, "too many invalid frames")
            return
        s.invalid = 0
        ref = frame.id if isinstance(frame, frames.Send) else None
        if not s.frame_bucket.take():
            self._rate_limited(s, ref)
            return
        match frame:
            case frames.Send():
                if s.send_bucket is not None and not s.send_bucket.take():
                    self._rate_limited(s, frame.id)
                    return
                s.refused = 0
                self._send(s, frame)
            case frames.Ack():
                self._ack(s, frame)
            case frames.Read():
                self._read_receipt(s, frame)
            case frames.Typing():
                self._typing(s, frame)

    def _rate_limited(self, s: Session, ref: str | None) -> None:
        """Refuse one frame; a client that keeps flooding past the limit is closed (1008)."""
        s.refused += 1
        self._refuse(s, Code.RATE_LIMITED, "too many frames, slow down", ref)
        if s.refused >= self.settings.refusals_before_close:
            self.close(s, CloseCode.POLICY, "flooding")

    # Answers (accepted, error) go out in the order of the frames they answer, though
    # some need Redis or PostgreSQL first: a frame whose answer comes later takes its
    # place in s.answers, and answers behind it wait there.

    def _later(self, s: Session) -> Answer:
        """A place for the answer of a frame that needs Redis first."""
        answer = Answer()
        if s.answers is None:
            s.answers = [answer]
        else:
            s.answers.append(answer)
        return answer

    def _answer(self, s: Session, answer: Answer | None, frame: bytes | None) -> None:
        """Give a frame's answer (None: nothing to say); `answer` None means right now."""
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

    def _refuse(
        self, s: Session, code: str, message: str, ref: str | None, answer: Answer | None = None
    ) -> None:
        self.metrics.refuse(code)
        self._answer(s, answer, frames.error(code, message, ref))

    def _slow(self, s: Session, answer: Answer, ref: str | None, job: Job) -> None:
        """Run an operation that needs PostgreSQL; the socket's later frames wait for it."""
        if s.slow is None:
            s.slow = []
        s.slow.append((answer, ref, job))
        if len(s.slow) == 1:
            self._spawn(self._run_slow(s))

    async def _run_slow(self, s: Session) -> None:
        while s.slow:
            answer, ref, job = s.slow[0]
            try:
                frame = await job()
            except ChatError as exc:
                self.metrics.refuse(exc.code)
                frame = frames.error(exc.code, exc.message, ref)
            except Exception:
                log.exception("slow_operation_failed", user=s.mobile)
                frame = frames.error(Code.UNAVAILABLE, "try again later", ref)
            self._answer(s, answer, frame)
            s.slow.pop(0)
        s.slow = None
        self._release_held(s)

    # -- send, ack, read, typing ---------------------------------------------------

    def _send(self, s: Session, frame: frames.Send) -> None:
        started = time.perf_counter()
        ts = presence.now_ms()
        answer = self._later(s)

        def done(reply: Any) -> None:
            try:
                result = inbox.stored(reply)
            except ChatError as exc:
                self._refuse(s, exc.code, exc.message, frame.id, answer)
                return
            if result is None:  # Redis lacks the recipient: reload from PostgreSQL
                self._slow(s, answer, frame.id, lambda: self._send_slow(s, frame, ts, started))
                return
            self._answer(s, answer, self._accepted(frame, result, started))

        inbox.submit_message(self.batcher, s.mobile, frame, ts, self.settings.inbox_limit, done)

    async def _send_slow(self, s: Session, frame: frames.Send, ts: int, started: float) -> bytes:
        result = await inbox.enqueue_message(
            self.batcher, self.pool, s.mobile, frame, ts, self.settings.inbox_limit
        )
        return self._accepted(frame, result, started)

    def _accepted(self, frame: frames.Send, result: inbox.Stored, started: float) -> bytes:
        self.metrics.accepted += 1
        self.metrics.send_latency.observe(time.perf_counter() - started)
        return frames.accepted(frame.id, result.msg_id, result.ts)

    def _ack(self, s: Session, frame: frames.Ack) -> None:
        unacked = s.unacked
        done = [(m, unacked.pop(m)) for m in frame.msg_ids if m in unacked]
        answer = self._later(s)
        if len(done) < len(frame.msg_ids):  # delivered before this socket (a reconnect)
            taken = {m for m, _ in done}
            unknown = [m for m in frame.msg_ids if m not in taken]
            self._slow(s, answer, None, lambda: self._ack_earlier(s, done, unknown))
            return
        self._receipts_for(s, done)
        ids = self._acking(s, done)

        def acked(reply: Any) -> None:
            self._acked(s, ids)
            if isinstance(reply, Exception):
                self._unacked_again(s, done)
                self._refuse(s, Code.UNAVAILABLE, ACK_FAILED, None, answer)
            else:
                self.metrics.acked += len(done)
                self._answer(s, answer, None)

        inbox.submit_ack(self.batcher, s.mobile, ids, acked)

    def _acking(self, s: Session, done: list[Delivered]) -> list[str]:
        """Note ids whose XACK is on its way: a pending read already in flight still
        returns them, and they must not go out again."""
        ids = [m for m, _ in done]
        if s.acking is None:
            s.acking = set(ids)
        else:
            s.acking.update(ids)
        return ids

    def _acked(self, s: Session, ids: list[str]) -> None:
        if s.acking is not None:
            s.acking.difference_update(ids)
            if not s.acking:
                s.acking = None

    async def _ack_earlier(self, s: Session, done: list[Delivered], unknown: list[str]) -> None:
        """Ack entries this socket did not deliver too: look them up in the inbox first."""
        try:
            entries = await inbox.fetch(self.batcher, s.mobile, unknown)
        except ChatError:
            self._unacked_again(s, done)
            raise Unavailable(ACK_FAILED) from None
        done = done + [(e.msg_id, (e, 0.0)) for e in entries if e.kind]
        if not done:
            return
        self._receipts_for(s, done)
        ids = self._acking(s, done)
        try:
            await inbox.ack(self.batcher, s.mobile, ids)
        except ChatError:
            self._unacked_again(s, done)
            raise Unavailable(ACK_FAILED) from None
        finally:
            self._acked(s, ids)
        self.metrics.acked += len(done)

    def _unacked_again(self, s: Session, done: list[Delivered]) -> None:
        """An ack that failed: the entries are pending in Redis still, so keep
        redelivering them (stamped now, which keeps `unacked` in sending order)."""
        now = time.monotonic()
        for msg_id, (entry, _sent) in done:
            s.unacked[msg_id] = (entry, now)

    def _receipts_for(self, s: Session, done: list[Delivered]) -> None:
        """One delivered receipt per sender; queued before the ack (at least once)."""
        by_sender: dict[str, list[str]] = {}
        for _, (entry, _sent) in done:
            if entry.kind == "m":
                by_sender.setdefault(entry.sender, []).append(entry.client_id)
        ts = presence.now_ms()
        for sender, ids in by_sender.items():
            self._receipt(sender, s.mobile, "delivered", ids, ts)

    def _receipt(self, owner: str, by: str, status: str, ids: list[str], ts: int) -> None:
        """Queue a receipt for `owner`; no task unless it fails or Redis lacks `owner`."""

        def done(reply: Any) -> None:
            if isinstance(reply, Exception) or reply[0] == "unknown":
                self._spawn(self._receipt_slow(owner, by, status, ids, ts))

        inbox.submit_receipt(self.batcher, owner, by, status, ids, ts, done)

    async def _receipt_slow(
        self, owner: str, by: str, status: str, ids: list[str], ts: int
    ) -> None:
        """Retry a receipt that failed (or whose owner Redis lacked), a few times."""
        for attempt in range(RECEIPT_RETRIES):
            try:
                await inbox.enqueue_receipt(self.batcher, self.pool, owner, by, status, ids, ts)
                return
            except ChatError as exc:
                if exc.code == Code.UNKNOWN_RECIPIENT:
                    return  # the account is gone: nobody to tell
                log.warning("receipt_failed", user=owner, error=exc.code, attempt=attempt)
                await asyncio.sleep(RECEIPT_RETRY_S * (attempt + 1))

    def _read_receipt(self, s: Session, frame: frames.Read) -> None:
        ts = presence.now_ms()
        ids = list(frame.ids)
        answer = self._later(s)

        async def reload() -> None:  # Redis lacks frame.to: PostgreSQL, or unknown_recipient
            await inbox.enqueue_receipt(
                self.batcher, self.pool, frame.to, s.mobile, "read", ids, ts
            )

        def done(reply: Any) -> None:
            if isinstance(reply, Exception):
                self._refuse(s, Code.UNAVAILABLE, UNAVAILABLE, None, answer)
            elif reply[0] == "unknown":
                self._slow(s, answer, None, reload)
            else:
                self._answer(s, answer, None)

        inbox.submit_receipt(self.batcher, frame.to, s.mobile, "read", ids, ts, done)

    def _typing(self, s: Session, frame: frames.Typing) -> None:
        answer = self._later(s)

        def done(reply: Any) -> None:
            if isinstance(reply, Exception):
                self._refuse(s, Code.UNAVAILABLE, UNAVAILABLE, None, answer)
            else:
                self._answer(s, answer, None)

        presence.typing(self.batcher, s.mobile, frame.to, frame.state, done)

    # -- frames out ---------------------------------------------------------------
    #
    # Frames queued for a socket during one event-loop turn are encoded by websockets'
    # sans-I/O protocol and written with one transport write at the end of the turn. The
    # transport's buffer is the bound: past OUT_BUFFER_LOW the session stops taking
    # entries, past OUT_BUFFER_MAX the client is disconnected, not waited on.

    def push(self, s: Session, frame: bytes) -> None:
        """Queue a frame; it is written at the end of this event-loop turn."""
        if s.closed:
            return
        s.outbox.append(frame)
        s.outbytes += len(frame)
        if not s.writing:
            s.writing = True
            self._to_flush.append(s)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush_all)

    def _flush_all(self) -> None:
        self._flush_scheduled = False
        sessions, self._to_flush = self._to_flush, []
        for s in sessions:
            s.writing = False
            self._flush(s)

    def _lagging(self, s: Session) -> bool:
        """More than OUT_BUFFER_LOW waits to be written to this socket."""
        return s.conn.paused or s.outbytes + s.queued + s.conn.buffered() > OUT_BUFFER_LOW

    def _flush(self, s: Session) -> None:
        if not s.outbox:
            return
        out, s.outbox, s.outbytes = s.outbox, [], 0
        try:
            s.conn.send_texts(out)
        except Exception as exc:  # the socket is going away
            log.info("socket_write_failed", user=s.mobile, error=type(exc).__name__)
            self.close(s, CloseCode.INTERNAL, "write failed")
            return
        if s.conn.buffered() > OUT_BUFFER_MAX:
            self.close(s, CloseCode.POLICY, "client is not reading")
        elif s.conn.paused:
            if not s.catching:
                self._restart(s)  # the client lags: stop pushes, read again once it drains
        elif s.stalled:
            self._read_step(s)  # it waited for this write, which the socket took

    # -- delivery -------------------------------------------------------------------

    def _read_step(self, s: Session) -> None:
        """One step of catching up: a page of pending entries, then GO_LIVE until live."""
        if s.closed or not s.catching or s.reading or not s.ready:
            return
        if self._lagging(s):
            s.stalled = True  # resumed when the socket drains
            return
        s.stalled = False
        s.reading = True
        gen = s.gen
        if s.cursor == "0" and gen:
            # a restart: the route may be live (with a token whose pushes are dropped
            # now); UNLIVE runs before the read, so every entry pushed so far is pending
            inbox.unlive(self.batcher, s.mobile, s.route)
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
            self._read_step(s)
            return
        if isinstance(reply, Exception):
            self._stall(s, reply)
            return
        if reply:
            taken = self._deliver(s, reply)
            if taken:  # the rest, if any, is read again from here once the socket drains
                s.cursor = reply[taken - 1].msg_id
        else:
            s.cursor = None
        self._read_step(s)

    def _on_go_live(self, s: Session, gen: int, token: str, reply: Any) -> None:
        s.reading = False
        if gen != s.gen:
            self._read_step(s)
            return
        if isinstance(reply, Exception):
            self._stall(s, reply)
            return
        if reply == "gone":
            self.close(s, CloseCode.REPLACED, "replaced by a newer connection")
            return
        if reply == "live":
            s.catching, s.token, s.offered = False, token, None
            early, s.early = s.early, None
            for entries in early or ():
                if s.gen != gen:
                    break  # delivering made it catch up again: the rest is pending
                self._deliver(s, entries)
            return
        s.offered, s.early = None, None
        taken = self._deliver(s, reply)
        if taken < len(reply):  # read through the group: the rest is pending now
            s.cursor = inbox.before(reply[taken].msg_id)
        self._read_step(s)

    def _stall(self, s: Session, error: Exception) -> None:
        """A read failed (Redis away): the sweep restarts the catch-up from the start,
        since a GO_LIVE whose answer was lost may have made the route live."""
        log.warning("inbox_read_failed", user=s.mobile, error=type(error).__name__)
        s.gen += 1
        s.cursor, s.token, s.offered, s.early, s.stalled = "0", None, None, None, True

    def _deliver(self, s: Session, entries: list[inbox.Entry]) -> int:
        """Write the entries that fit in the socket's buffer; how many were taken. The
        rest are pending in the group; a live session catches up again to read them."""
        if s.closed:
            return len(entries)
        now = time.monotonic()
        unacked = s.unacked
        gone = []
        sent = taken = 0
        for entry in entries:
            if self._lagging(s):
                if not s.catching:
                    self._restart(s)  # stop pushes until the client drains
                break
            taken += 1
            if not entry.kind:
                gone.append(entry.msg_id)
            elif entry.msg_id not in unacked and not (s.acking and entry.msg_id in s.acking):
                # (else it is out on this socket already, or acked just now)
                unacked[entry.msg_id] = (entry, now)
                # behind answers still due: a receipt never beats the `accepted` it follows
                self._answer(s, None, entry.frame)
                sent += 1
        self.metrics.delivered += sent
        if gone:  # deleted while pending: nothing to send, ack it away
            self.batcher.fire("XACK", keys.inbox(s.mobile), keys.GROUP, *gone)
        return taken

    def _restart(self, s: Session) -> None:
        """Catch up again from the first pending entry; pushes stop until live again."""
        if s.token is not None or s.offered is not None:
            inbox.unlive(self.batcher, s.mobile, s.route)  # stop pushes now, not at the read
        s.gen += 1  # replies in flight are stale now
        s.catching, s.cursor, s.token, s.offered, s.early = True, "0", None, None, None
        self._read_step(s)

    def on_drained(self, conn: Conn) -> None:
        s: Session | None = conn.session
        if s is not None and s.stalled:
            self._read_step(s)

    # -- node-wide sweeps (one task each, never one per socket) --------------------

    def redeliver(self) -> None:
        """Resend entries unacked for longer than the redelivery timeout; retry stalled
        catch-ups (Redis was away)."""
        now = time.monotonic()
        deadline = now - self.settings.redelivery_s
        for s in list(self.sessions.values()):
            if s.stalled and not s.conn.paused:
                self._read_step(s)
            stale = []
            for entry, sent in s.unacked.values():
                if sent > deadline:
                    break  # insertion order is send order
                stale.append(entry)
            for entry in stale:
                if self._lagging(s):
                    break  # the rest goes at a later sweep
                del s.unacked[entry.msg_id]
                s.unacked[entry.msg_id] = (entry, now)
                self._answer(s, None, entry.frame)

    async def refresh_routes(self) -> None:
        """Push back every route's TTL in one pipeline; a lost route means replaced."""
        sessions = [s for s in self.sessions.values() if not s.closed and s.ready]
        ms = presence.now_ms()
        ttl = self.settings.route_ttl_s
        results = await asyncio.gather(
            *(presence.refresh(self.batcher, s.mobile, s.route, ttl, ms) for s in sessions),
            return_exceptions=True,
        )
        for s, result in zip(sessions, results, strict=True):
            if result == 0:
                self.close(s, CloseCode.REPLACED, "replaced by a newer connection")
            elif result == 2:  # Redis lost the route: made again, not live
                self._restart(s)

    # -- what the node's channel brings (routing.Listener) -------------------------

    def on_push(self, owner: str, token: str, entries: list[inbox.Entry] | None) -> None:
        s = self.sessions.get(owner)
        if s is None or s.closed:
            return  # the entries wait as pending for whoever holds the user next
        if entries is None:  # unreadable: they are pending, catch up to read them
            if token == s.token or token == s.offered:
                self._restart(s)
        elif token == s.token:
            self._deliver(s, entries)
        elif token == s.offered:  # pushed after GO_LIVE ran, before its answer came
            if s.early is None:
                s.early = []
            s.early.append(entries)
        # else: from an earlier live period; the catch-up reads those as pending

    def on_kick(self, mobile: str, session: str) -> None:
        s = self.sessions.get(mobile)
        if s is not None and s.sid == session:
            self.close(s, CloseCode.REPLACED, "replaced by a newer connection")

    def on_logout(self, mobile: str, jti: str) -> None:
        s = self.sessions.get(mobile)
        if s is not None and s.jti == jti:
            self.close(s, CloseCode.LOGGED_OUT, "logged out")

    def on_typing(self, to: str, sender: str, state: str) -> None:
        s = self.sessions.get(to)
        if s is not None and s.ready:
            self.push(s, frames.typing(sender, state))

    def on_resync(self) -> None:
        """The channel went away or came back: pushes may be lost, so every session
        catches up again; and a logout meant for a socket here may have been missed."""
        for s in list(self.sessions.values()):
            if s.ready:
                self._restart(s)
                self.batcher.submit(self._revoked_check(s), "EXISTS", keys.revoked(s.jti))

    def _revoked_check(self, s: Session) -> Callable[[Any], None]:
        def done(reply: Any) -> None:
            if reply == 1:
                self.close(s, CloseCode.LOGGED_OUT, "logged out")

        return done

    # -- closing -------------------------------------------------------------------

    def close(self, s: Session, code: int, reason: str) -> None:
        """Close a session's socket; safe to call twice."""
        if s.closed:
            return
        self._flush(s)  # an error frame queued just before still goes out
        s.conn.close(code, reason)
        self._forget(s)

    def on_closed(self, conn: Conn, session: Session) -> None:
        self._forget(session)

    def _forget(self, s: Session) -> None:
        if s.closed:
            return
        s.closed = True
        s.outbox = []
        if self.sessions.get(s.mobile) is s:
            del self.sessions[s.mobile]
        self.metrics.sockets -= 1
        ms = presence.now_ms()
        self.seen_to_store[s.mobile] = ms
        code, reason = s.conn.close_reason
        log.info("socket_closed", user=s.mobile, session=s.sid, code=code, reason=reason)

        def released(reply: Any) -> None:
            if isinstance(reply, Exception):  # the route expires on its own
                log.warning("route_release_failed", user=s.mobile, error=type(reply).__name__)

        presence.release(self.batcher, s.mobile, s.route, ms, released)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Stop accepting and close every socket with 1012 (reconnect elsewhere)."""
        self.accepting = False
        for s in list(self.sessions.values()):
            self.close(s, CloseCode.RESTARTING, "node restarting")
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=CLOSE_WAIT_S)


def _header(headers: Headers, name: str) -> str | None:
    value = headers.get(name)
    return str(value) if value is not None else None
