"""The WebSocket gateway: handshake auth, sessions, frames in and their answers.

A frame is handled where it arrives (data_received): its Redis work is queued with a
callback, so a socket needs no task and frames of many sockets share one pipeline. The
frames of one socket reach Redis in order over one connection; the rare frame that
needs PostgreSQL (a recipient Redis lost) holds the socket's later frames until done.
Frames out go through the outbox (session.py); inbox entries through delivery.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from chatnode import auth, frames, inbox, keys, logs, presence, ratelimit
from chatnode.config import Settings
from chatnode.delivery import Delivery
from chatnode.errors import ChatError, CloseCode, Code, Unauthorized, Unavailable
from chatnode.metrics import Metrics
from chatnode.redisio import Batcher
from chatnode.routing import Router
from chatnode.session import Answer, Job, Outbox, Session
from chatnode.wsserver import Conn

log = logs.get(__name__)

MAX_INVALID_FRAMES = 20
MAX_HELD_FRAMES = 64  # frames waiting on a claim or a slow operation; then reading pauses
RECEIPT_RETRIES = 5
RECEIPT_RETRY_S = 1.0
CLOSE_WAIT_S = 5.0

ACK_FAILED = "could not ack, send the ack again"
UNAVAILABLE = "Redis is unavailable, try again"

Delivered = tuple[str, tuple[inbox.Entry, float]]  # msgId, (entry, when sent)


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
        self.outbox = Outbox(self.close, self._written)
        self.delivery = Delivery(settings, batcher, router, self.outbox, metrics, self.close)
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
        self.outbox.push(s, frames.hello(s.mobile, self.node_id, self.settings.heartbeat_s))
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
        self.delivery.step(s)
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

    def _refuse(
        self, s: Session, code: str, message: str, ref: str | None, answer: Answer | None = None
    ) -> None:
        self.metrics.refuse(code)
        self.outbox.answer(s, answer, frames.error(code, message, ref))

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
            self.outbox.answer(s, answer, frame)
            s.slow.pop(0)
        s.slow = None
        self._release_held(s)

    # -- send, ack, read, typing ---------------------------------------------------

    def _send(self, s: Session, frame: frames.Send) -> None:
        started = time.perf_counter()
        ts = presence.now_ms()
        answer = self.outbox.later(s)

        def done(reply: Any) -> None:
            try:
                result = inbox.stored(reply)
            except ChatError as exc:
                self._refuse(s, exc.code, exc.message, frame.id, answer)
                return
            if result is None:  # Redis lacks the recipient: reload from PostgreSQL
                self._slow(s, answer, frame.id, lambda: self._send_slow(s, frame, ts, started))
                return
            self.outbox.answer(s, answer, self._accepted(frame, result, started))

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
        answer = self.outbox.later(s)
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
                self.outbox.answer(s, answer, None)

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
        answer = self.outbox.later(s)

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
                self.outbox.answer(s, answer, None)

        inbox.submit_receipt(self.batcher, frame.to, s.mobile, "read", ids, ts, done)

    def _typing(self, s: Session, frame: frames.Typing) -> None:
        answer = self.outbox.later(s)

        def done(reply: Any) -> None:
            if isinstance(reply, Exception):
                self._refuse(s, Code.UNAVAILABLE, UNAVAILABLE, None, answer)
            else:
                self.outbox.answer(s, answer, None)

        presence.typing(self.batcher, s.mobile, frame.to, frame.state, done)

    def _written(self, s: Session) -> None:
        self.delivery.written(s)

    def on_drained(self, conn: Conn) -> None:
        s: Session | None = conn.session
        if s is not None:
            self.delivery.drained(s)

    # -- node-wide sweeps (one task each, never one per socket) --------------------

    def redeliver(self) -> None:
        """The redelivery sweep over this node's sessions (delivery.py)."""
        self.delivery.redeliver(list(self.sessions.values()))

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
                self.delivery.restart(s)

    # -- what the node's channel brings (routing.Listener) -------------------------

    def on_push(self, owner: str, token: str, entries: list[inbox.Entry] | None) -> None:
        s = self.sessions.get(owner)
        if s is not None and not s.closed:
            self.delivery.on_push(s, token, entries)
        # else: the entries wait as pending for whoever holds the user next

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
            self.outbox.push(s, frames.typing(sender, state))

    def on_resync(self) -> None:
        """The channel went away or came back: pushes may be lost, so every session
        catches up again; and a logout meant for a socket here may have been missed."""
        for s in list(self.sessions.values()):
            if s.ready:
                self.delivery.restart(s)
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
        self.outbox.flush(s)  # an error frame queued just before still goes out
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
