"""The WebSocket gateway: handshake auth, frames in, inbox entries and replies out.

Each socket has a reader (its handler) and, only while it has frames to write, a
writer task draining a bounded outbox; an idle socket costs no task beyond its handler.
Delivery reads the inbox through the consumer group; wake-ups for one socket coalesce.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import weakref
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from redis.exceptions import RedisError
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from chatnode import auth, frames, inbox, keys, logs, presence, ratelimit
from chatnode.config import Settings
from chatnode.errors import (
    ChatError,
    CloseCode,
    Code,
    Unauthorized,
    Unavailable,
    UnknownRecipient,
)
from chatnode.metrics import Metrics
from chatnode.redisio import Batcher
from chatnode.routing import Router

log = logs.get(__name__)

OUT_BUFFER_LOW = 256 * 1024  # read more from the inbox only below this many unsent bytes
OUT_BUFFER_MAX = 4 * 1024 * 1024  # a client this far behind is disconnected
MAX_INVALID_FRAMES = 20
RECEIPT_RETRIES = 5
RESCAN_AFTER_S = 3.0
RECEIPT_RETRY_S = 1.0
CLOSE_WAIT_S = 5.0


class Session:
    """One authenticated socket and its delivery state."""

    __slots__ = (
        "closed",
        "cursor",
        "dirty",
        "frame_bucket",
        "invalid",
        "jti",
        "mobile",
        "opened",
        "outbox",
        "reading",
        "refused",
        "rescanned",
        "route",
        "send_bucket",
        "sid",
        "unacked",
        "writing",
        "ws",
    )

    def __init__(self, ws: ServerConnection, mobile: str, jti: str, node_id: str) -> None:
        self.ws = ws
        # made on the first frame: an idle socket carries none (memory per idle phone)
        self.send_bucket: ratelimit.Bucket | None = None
        self.frame_bucket: ratelimit.Bucket | None = None
        self.refused = 0  # rate-limit refusals in a row
        self.opened = time.monotonic()
        self.rescanned = True  # set False when this socket took the user from another node
        self.mobile = mobile
        self.jti = jti
        self.sid = secrets.token_hex(6)
        self.route = keys.route_value(node_id, self.sid)
        self.outbox: list[bytes] = []
        self.unacked: dict[str, tuple[inbox.Entry, float]] = {}
        self.cursor = "0"  # pending entries first, then '>' for new ones
        self.dirty = False
        self.reading = False
        self.writing = False  # queued for the end-of-turn flush
        self.closed = False
        self.invalid = 0


class Gateway:
    """All sockets of this node; also the Listener for what other nodes publish."""

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
        # handshake -> handler; weak, so a client gone between the two leaves nothing behind
        self._claims: weakref.WeakKeyDictionary[ServerConnection, auth.Claims] = (
            weakref.WeakKeyDictionary()
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._to_flush: list[Session] = []
        self._flush_scheduled = False
        self.accepting = True

    # -- handshake -----------------------------------------------------------------

    async def process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        """Authenticate in the handshake: a bad token gets HTTP 401 and no socket."""
        url = urlsplit(request.path)
        if url.path.rstrip("/") != "/ws":
            return conn.respond(HTTPStatus.NOT_FOUND, "not found\n")
        if not self.accepting:
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "node restarting\n")
        address = str(conn.remote_address[0]) if conn.remote_address else "unknown"
        cfg = self.settings
        token = parse_qs(url.query).get("token", [None])[0] or auth.bearer(
            _header(request.headers, "Authorization")
        )
        try:
            # many users behind one address is normal; many bad tokens or one user
            # reconnecting in a loop is not
            limits = [("connect-address", address, cfg.connects_per_address)]
            try:
                claims = await auth.authenticate(self.tokens, self.batcher, self.pool, token)
                limits.append(("connect-user", claims.mobile, cfg.connects_per_user))
            except Unauthorized:
                claims = None
                limits.append(("connect-fail-address", address, cfg.connect_fails_per_address))
            for kind, subject, limit in limits:
                verdict = await ratelimit.hit(
                    self.batcher, kind, subject, limit, cfg.connect_window_s
                )
                if not verdict.allowed:
                    response = conn.respond(HTTPStatus.TOO_MANY_REQUESTS, "rate_limited\n")
                    response.headers["Retry-After"] = str(verdict.retry_after)
                    return response
        except ChatError:
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "unavailable\n")
        if claims is None:
            return conn.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
        self._claims[conn] = claims
        return None

    # -- one socket ----------------------------------------------------------------

    async def handler(self, ws: ServerConnection) -> None:
        claims = self._claims.pop(ws)
        s = Session(ws, claims.mobile, claims.jti, self.node_id)
        previous = self.sessions.get(s.mobile)
        self.sessions[s.mobile] = s
        if previous is not None:
            self.close(previous, CloseCode.REPLACED, "replaced by a newer connection")
        self.metrics.sockets.inc()
        bound = log.bind(user=s.mobile, session=s.sid)
        # hello first: a wake-up or typing frame may reach this session while it claims
        self.push(s, frames.hello(s.mobile, self.node_id, self.settings.heartbeat_s))
        try:
            try:
                old = await presence.claim(
                    self.batcher, s.mobile, s.route, self.settings.route_ttl_s
                )
                await inbox.ensure_group(self.batcher, s.mobile)
            except ChatError:
                await ws.close(CloseCode.INTERNAL, "unavailable")
                return
            self._kick_elsewhere(s, old)
            self.wake(s)
            bound.info("socket_open")
            async for data in ws:
                if s.closed:
                    break
                await self._on_frame(s, data)
        except ConnectionClosed:
            pass
        except Exception:
            bound.exception("socket_failed")
            await ws.close(CloseCode.INTERNAL, "internal error")
        finally:
            await self._cleanup(s)
            bound.info("socket_closed", code=ws.close_code)

    def _kick_elsewhere(self, s: Session, old: str | None) -> None:
        parsed = keys.parse_route(old)
        if parsed is not None and old != s.route and parsed[0] != self.node_id:
            self.router.send(parsed[0], f"k|{s.mobile}|{parsed[1]}")
            s.rescanned = False  # that node may read for the user until the kick lands

    async def _cleanup(self, s: Session) -> None:
        s.closed = True
        if self.sessions.get(s.mobile) is s:
            del self.sessions[s.mobile]
        self.metrics.sockets.dec()
        ms = presence.now_ms()
        self.seen_to_store[s.mobile] = ms
        try:
            await presence.release(self.batcher, s.mobile, s.route, ms)
        except Exception as exc:  # the route expires on its own
            log.warning("route_release_failed", user=s.mobile, error=type(exc).__name__)

    def close(self, s: Session, code: int, reason: str) -> None:
        """Close a socket from outside its handler; safe to call twice."""
        if s.closed:
            return
        self._flush(s)  # an error frame queued just before still goes out
        s.closed = True
        self._spawn(s.ws.close(code, reason))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- frames in -----------------------------------------------------------------

    async def _on_frame(self, s: Session, data: str | bytes) -> None:
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
        try:
            match frame:
                case frames.Send():
                    if s.send_bucket is not None and not s.send_bucket.take():
                        self._rate_limited(s, frame.id)
                        return
                    s.refused = 0
                    await self._send(s, frame)
                case frames.Ack():
                    await self._ack(s, frame)
                case frames.Read():
                    await self._read_receipt(s, frame)
                case frames.Typing():
                    await self._typing(s, frame)
        except ChatError as exc:
            self._refuse(s, exc.code, exc.message, ref)

    def _rate_limited(self, s: Session, ref: str | None) -> None:
        """Refuse one frame; a client that keeps flooding past the limit is closed (1008)."""
        s.refused += 1
        self._refuse(s, Code.RATE_LIMITED, "too many frames, slow down", ref)
        if s.refused >= self.settings.refusals_before_close:
            self.close(s, CloseCode.POLICY, "flooding")

    def _refuse(self, s: Session, code: str, message: str, ref: str | None) -> None:
        self.metrics.refused.labels(code).inc()
        self.push(s, frames.error(code, message, ref))

    async def _send(self, s: Session, frame: frames.Send) -> None:
        started = time.perf_counter()
        stored = await inbox.enqueue_message(
            self.batcher, self.pool, s.mobile, frame, presence.now_ms(), self.settings.inbox_limit
        )
        self.push(s, frames.accepted(frame.id, stored.msg_id, stored.ts))
        if stored.route:
            self.router.wake(stored.route, frame.to)
        self.metrics.accepted.inc()
        self.metrics.send_latency.observe(time.perf_counter() - started)

    async def _ack(self, s: Session, frame: frames.Ack) -> None:
        done = [(m, s.unacked.pop(m)) for m in frame.msg_ids if m in s.unacked]
        taken = {m for m, _ in done}
        unknown = [m for m in frame.msg_ids if m not in taken]
        if unknown:  # delivered before this socket (a reconnect): look the entries up
            for entry in await inbox.fetch(self.batcher, s.mobile, unknown):
                if entry.kind:
                    done.append((entry.msg_id, (entry, 0.0)))
        if not done:
            return
        by_sender: dict[str, list[str]] = {}
        for _, (entry, _sent) in done:
            if entry.kind == "m":
                by_sender.setdefault(entry.sender, []).append(entry.client_id)
        ts = presence.now_ms()
        for sender, ids in by_sender.items():  # queued before the ack: at least once
            self._receipt(sender, s.mobile, "delivered", ids, ts)
        try:
            await inbox.ack(self.batcher, s.mobile, [m for m, _ in done])
        except (ChatError, RedisError):
            s.unacked.update(done)  # still pending in Redis: keep redelivering
            raise Unavailable("could not ack, send the ack again") from None
        self.metrics.acked.inc(len(done))

    def _receipt(self, owner: str, by: str, status: str, ids: list[str], ts: int) -> None:
        """Queue a receipt for `owner` and wake them; no task unless Redis lacks `owner`."""

        def done(fut: asyncio.Future[list[Any]]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                self._spawn(self._receipt_slow(owner, by, status, ids, ts))
                return
            reply = fut.result()
            if reply[0] == "ok" and reply[1]:
                self.router.wake(reply[1], owner)
            elif reply[0] == "unknown":  # reload from PostgreSQL, then try again
                self._spawn(self._receipt_slow(owner, by, status, ids, ts))

        inbox.submit_receipt(self.batcher, owner, by, status, ids, ts).add_done_callback(done)

    async def _receipt_slow(
        self, owner: str, by: str, status: str, ids: list[str], ts: int
    ) -> None:
        """Retry a receipt that failed (or whose owner Redis lacked), a few times."""
        for attempt in range(RECEIPT_RETRIES):
            try:
                route = await inbox.enqueue_receipt(
                    self.batcher, self.pool, owner, by, status, ids, ts
                )
            except UnknownRecipient:
                return  # the account is gone: nobody to tell
            except ChatError as exc:
                log.warning("receipt_failed", user=owner, error=exc.code, attempt=attempt)
                await asyncio.sleep(RECEIPT_RETRY_S * (attempt + 1))
                continue
            if route:
                self.router.wake(route, owner)
            return

    async def _read_receipt(self, s: Session, frame: frames.Read) -> None:
        route = await inbox.enqueue_receipt(
            self.batcher,
            self.pool,
            frame.to,
            s.mobile,
            "read",
            list(frame.ids),
            presence.now_ms(),
        )
        if route:
            self.router.wake(route, frame.to)

    async def _typing(self, s: Session, frame: frames.Typing) -> None:
        route = await presence.typing_route(self.batcher, s.mobile, frame.to)
        self.router.to_route(route, f"t|{frame.to}|{s.mobile}|{frame.state}")

    # -- frames out ---------------------------------------------------------------
    #
    # Frames queued for a socket during one event-loop turn are encoded by websockets'
    # sans-I/O protocol and written with one transport write at the end of the turn: no
    # writer task, no coroutine per frame. The transport's buffer is the bound: a client
    # that lets it grow past OUT_BUFFER_MAX is disconnected, not waited on.

    def push(self, s: Session, frame: bytes) -> None:
        """Queue a frame; it is written at the end of this event-loop turn."""
        if s.closed:
            return
        s.outbox.append(frame)
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

    def _flush(self, s: Session) -> None:
        if not s.outbox:
            return
        frames_, s.outbox = s.outbox, []
        ws = s.ws
        if ws.protocol.state is not State.OPEN:
            return
        try:
            for frame in frames_:
                ws.protocol.send_text(frame)
            data = b"".join(ws.protocol.data_to_send())
            if data:
                ws.transport.write(data)
        except Exception as exc:  # the socket is going away; its handler cleans up
            log.info("socket_write_failed", user=s.mobile, error=type(exc).__name__)
            self.close(s, CloseCode.INTERNAL, "write failed")
            return
        if ws.transport.get_write_buffer_size() > OUT_BUFFER_MAX:
            self.close(s, CloseCode.POLICY, "client is not reading")

    def _backlogged(self, s: Session) -> bool:
        return bool(s.ws.transport.get_write_buffer_size() > OUT_BUFFER_LOW)

    def wake(self, s: Session) -> None:
        """Something may be waiting in the inbox: read it once, however often woken."""
        if s.closed:
            return
        s.dirty = True
        if s.reading or self._backlogged(s):
            return  # the read in flight loops again; a full buffer waits for the sweep
        s.reading = True
        s.dirty = False
        cursor = s.cursor
        inbox.read(self.batcher, s.mobile, cursor).add_done_callback(
            lambda fut: self._on_read(s, cursor, fut)
        )

    def _on_read(self, s: Session, cursor: str, fut: asyncio.Future[list[inbox.Entry]]) -> None:
        s.reading = False
        if fut.cancelled() or fut.exception() is not None:
            s.dirty = True  # Redis away: the sweep wakes dirty sessions again
            if not fut.cancelled():
                log.warning("inbox_read_failed", user=s.mobile, error=repr(fut.exception()))
            return
        entries = fut.result()
        if cursor != ">":
            s.cursor = entries[-1].msg_id if entries else ">"
            s.dirty = True
        elif len(entries) >= inbox.READ_COUNT:
            s.dirty = True
        self._deliver(s, entries, pending=cursor != ">")
        if s.dirty:
            self.wake(s)

    def _deliver(self, s: Session, entries: list[inbox.Entry], pending: bool = False) -> None:
        if s.closed:
            return
        now = time.monotonic()
        gone = []
        for entry in entries:
            if not entry.kind:
                gone.append(entry.msg_id)
                continue
            if pending and entry.msg_id in s.unacked:
                continue  # a re-read of pending entries: this one is out already
            s.unacked.pop(entry.msg_id, None)
            s.unacked[entry.msg_id] = (entry, now)
            self.push(s, entry.frame)
        if len(entries) > len(gone):
            self.metrics.delivered.inc(len(entries) - len(gone))
        if gone:
            self.batcher.fire("XACK", keys.inbox(s.mobile), keys.GROUP, *gone)

    # -- node-wide sweeps (one task each, never one per socket) --------------------

    def redeliver(self) -> None:
        """Resend entries unacked for longer than the redelivery timeout."""
        now = time.monotonic()
        deadline = now - self.settings.redelivery_s
        for s in list(self.sessions.values()):
            if not s.rescanned and now - s.opened >= RESCAN_AFTER_S and not s.reading:
                # Entries the previous holder's node read while its kick was in flight
                # are pending for this user but were never read here: read pending again.
                s.rescanned = True
                s.cursor = "0"
                s.dirty = True
            if s.dirty:
                self.wake(s)
            stale = []
            for entry, sent in s.unacked.values():
                if sent > deadline:
                    break  # insertion order is send order
                stale.append(entry)
            for entry in stale:
                del s.unacked[entry.msg_id]
                s.unacked[entry.msg_id] = (entry, now)
                self.push(s, entry.frame)

    async def refresh_routes(self) -> None:
        """Push back every route's TTL in one pipeline; a lost route means replaced."""
        sessions = [s for s in self.sessions.values() if not s.closed]
        ms = presence.now_ms()
        ttl = self.settings.route_ttl_s
        results = await asyncio.gather(
            *(presence.refresh(self.batcher, s.mobile, s.route, ttl, ms) for s in sessions),
            return_exceptions=True,
        )
        for s, result in zip(sessions, results, strict=True):
            if result == 0:
                self.close(s, CloseCode.REPLACED, "replaced by a newer connection")
            elif result == 2:  # sends while the route was missing published no wake-up
                self.wake(s)

    # -- what other nodes tell us (routing.Listener) -------------------------------

    def on_wake(self, mobiles: list[str]) -> None:
        for mobile in mobiles:
            s = self.sessions.get(mobile)
            if s is not None:
                self.wake(s)

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
        if s is not None:
            self.push(s, frames.typing(sender, state))

    def on_resync(self) -> None:
        for s in list(self.sessions.values()):
            self.wake(s)

    # -- shutdown ------------------------------------------------------------------

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


def _ignore(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
