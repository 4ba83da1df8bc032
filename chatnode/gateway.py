"""The WebSocket gateway: handshake auth, sessions, frames in and their answers.

A frame is handled where it arrives (data_received): its Redis work is queued with a
callback, so a socket needs no task and frames of many sockets share one pipeline. The
frames of one socket reach Redis in order over one connection; the rare frame that
needs PostgreSQL (a recipient Redis lost) holds the socket's later frames until done.
Frames out go through the outbox (session.py); inbox entries through delivery.py.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from chatnode import auth, frames, inbox, keys, logs, netaddr, presence, ratelimit
from chatnode.config import Settings
from chatnode.delivery import Delivery
from chatnode.errors import (
    ChatError,
    CloseCode,
    Code,
    InboxFull,
    Unauthorized,
    Unavailable,
    UnknownRecipient,
)
from chatnode.metrics import Metrics
from chatnode.recipients import Recipients
from chatnode.redisio import Batcher
from chatnode.routing import Router
from chatnode.session import Answer, Job, Outbox, Session
from chatnode.wsserver import Conn

log = logs.get(__name__)

MAX_INVALID_FRAMES = 20  # in a burst; then the socket closes with 1008
INVALID_REFILL_PER_S = 0.2  # one more invalid frame forgiven every 5 s
# Frame bytes metered with frames: CHATNODE_FRAME_RATE and _BURST times this many bytes.
BYTES_PER_FRAME = 2048
MAX_HELD_FRAMES = 64  # frames waiting on a claim or a slow operation; then reading pauses
CLOSE_WAIT_S = 5.0

ACK_FAILED = "could not ack, send the ack again"
UNAVAILABLE = "Redis is unavailable, try again"
NOT_DELIVERED = "ids named messages not delivered to you yet; they were dropped"

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
        self.recipients = Recipients(pool, batcher)
        self._paused: set[Session] = set()  # reading paused while Redis is congested
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
            address = netaddr.limit_subject(
                netaddr.client_address(
                    conn.address, request.headers.get_all("X-Forwarded-For"), cfg.trusted_proxies
                )
            )
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
        s = Session(conn, claims.mobile, claims.jti, self.node_id, claims.expires_at)
        previous = self.sessions.get(s.mobile)
        self.sessions[s.mobile] = s
        if previous is not None:
            self.close(previous, CloseCode.REPLACED, "replaced by a newer connection")
        self.metrics.sockets += 1
        # hello first: nothing else is queued for this session before it
        self.outbox.push(s, frames.hello(s.mobile, self.node_id, self.settings.heartbeat_s))
        # the send tokens a previous socket of this user left (answered before the claim,
        # so before any frame is handled): reconnecting does not refill them
        self.batcher.submit(
            lambda reply: self._restore_send_tokens(s, reply), "GET", keys.send_tokens(s.mobile)
        )
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
        if self.batcher.congested():
            self._pause_for_redis(s)
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
        if s.frame_bucket is None or s.byte_bucket is None or s.invalid is None:
            self._meter(s)
            assert s.frame_bucket is not None and s.byte_bucket is not None
            assert s.invalid is not None
        # metered before parsing: invalid and oversized frames cost what valid ones do
        metered = s.frame_bucket.take() and s.byte_bucket.take(cost=len(data))
        try:
            frame = frames.parse_client(data, s.mobile)
        except frames.FrameError as exc:
            if not metered:
                self._rate_limited(s, exc.ref)
                return
            self._refuse(s, exc.code, exc.message, exc.ref)
            if not s.invalid.take():  # a burst of them, however many valid ones between
                self.close(s, CloseCode.POLICY, "too many invalid frames")
            return
        ref = frame.id if isinstance(frame, frames.Send) else None
        if not metered:
            self._rate_limited(s, ref)
            return
        match frame:
            case frames.Send():
                if s.send_bucket is not None and not s.send_bucket.take():
                    self._rate_limited(s, frame.id)
                    return
                self._send(s, frame)
            case frames.Ack():
                self._ack(s, frame)
            case frames.Read():
                if s.send_bucket is not None and not s.send_bucket.take():
                    self._rate_limited(s, None)  # a receipt costs what a send does
                    return
                self._read_receipt(s, frame)
            case frames.Typing():
                self._typing(s, frame)

    def _meter(self, s: Session) -> None:
        """The socket's buckets, made on its first frame: idle sockets carry none."""
        cfg = self.settings
        s.frame_bucket = ratelimit.Bucket(cfg.frame_rate, cfg.frame_burst)
        s.byte_bucket = ratelimit.Bucket(
            cfg.frame_rate * BYTES_PER_FRAME, cfg.frame_burst * BYTES_PER_FRAME
        )
        if s.send_bucket is None:  # else restored from an earlier socket
            s.send_bucket = ratelimit.Bucket(cfg.send_rate, cfg.send_burst)
        s.invalid = ratelimit.Bucket(INVALID_REFILL_PER_S, MAX_INVALID_FRAMES - 1)

    def _restore_send_tokens(self, s: Session, reply: Any) -> None:
        if not isinstance(reply, str):
            return  # none saved (or Redis is away): a full bucket
        tokens, _, stamp = reply.partition("|")
        try:
            left, at = float(tokens), float(stamp)
        except ValueError:
            return
        cfg = self.settings
        bucket = ratelimit.Bucket(cfg.send_rate, cfg.send_burst)
        bucket.tokens = min(
            cfg.send_burst, max(0.0, left) + max(0.0, time.time() - at) * cfg.send_rate
        )
        s.send_bucket = bucket

    def _save_send_tokens(self, s: Session) -> None:
        """Leave the send bucket's level for the user's next socket, on any node, for as
        long as it takes to refill."""
        bucket = s.send_bucket
        if bucket is None:
            return
        bucket.take(cost=0)  # refill up to now
        missing = bucket.burst - bucket.tokens
        if missing < 1:
            return
        ttl = max(1, math.ceil(missing / bucket.rate))
        value = f"{bucket.tokens:.3f}|{time.time():.3f}"
        self.batcher.fire("SET", keys.send_tokens(s.mobile), value, "EX", ttl)

    def _pause_for_redis(self, s: Session) -> None:
        """Redis is behind: stop reading this socket until the backlog shrinks."""
        if s in self._paused:
            return
        s.conn.pause_reading()
        self._paused.add(s)
        if len(self._paused) == 1:
            self.batcher.when_relieved(self._resume_paused)

    def _resume_paused(self) -> None:
        paused, self._paused = self._paused, set()
        for s in paused:
            if not s.closed and s.held is None:
                s.conn.resume_reading()

    def _rate_limited(self, s: Session, ref: str | None) -> None:
        """Refuse one frame; a client that keeps flooding past the limit is closed (1008)."""
        self._refuse(s, Code.RATE_LIMITED, "too many frames, slow down", ref)
        self._count_refusal(s)

    def _count_refusal(self, s: Session) -> None:
        """Rate-limit refusals and misses (unknown recipients) in a row close the socket."""
        s.refused += 1
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
        while s.slow and not s.closed:
            answer, ref, job = s.slow[0]
            missed = False
            try:
                frame = await job()
            except ChatError as exc:
                self.metrics.refuse(exc.code)
                frame = frames.error(exc.code, exc.message, ref)
                missed = exc.code == Code.UNKNOWN_RECIPIENT
            except Exception:
                log.exception("slow_operation_failed", user=s.mobile)
                frame = frames.error(Code.UNAVAILABLE, "try again later", ref)
            self.outbox.answer(s, answer, frame)
            s.slow.pop(0)
            if missed:
                self._count_refusal(s)  # each miss may have cost a database look-up
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
            self.outbox.answer(s, answer, self._accepted(s, frame, result, started))

        inbox.submit_message(self.batcher, s.mobile, frame, ts, self.settings.inbox_limit, done)

    async def _send_slow(self, s: Session, frame: frames.Send, ts: int, started: float) -> bytes:
        result = await inbox.enqueue_message(
            self.batcher, self.recipients.load, s.mobile, frame, ts, self.settings.inbox_limit
        )
        return self._accepted(s, frame, result, started)

    def _accepted(
        self, s: Session, frame: frames.Send, result: inbox.Stored, started: float
    ) -> bytes:
        s.refused = 0  # a stored message ends a run of refusals
        self.metrics.accepted += 1
        self.metrics.send_latency.observe(time.perf_counter() - started)
        return frames.accepted(frame.id, result.msg_id, result.ts)

    def _ack(self, s: Session, frame: frames.Ack) -> None:
        """Delivered receipts first, then XDEL and XACK: an entry leaves the inbox only
        once its receipt is stored, so a receipt that cannot be stored leaves the entry
        to be delivered, and acked, again."""
        done = [(m, held) for m in frame.msg_ids if (held := s.release(m)) is not None]
        answer = self.outbox.later(s)
        self.delivery.acked(s)  # room for more entries on this socket
        taken = {m for m, _ in done}
        acking = s.acking or {}
        # not out on this socket and not being acked already: delivered before (a reconnect)
        unknown = [m for m in frame.msg_ids if m not in taken and m not in acking]
        if unknown:
            ids = self._acking(s, done)
            self._slow(s, answer, None, lambda: self._ack_earlier(s, done, ids, unknown))
            return
        if not done:  # every id is being acked already
            self.outbox.answer(s, answer, None)
            return
        ids = self._acking(s, done)
        receipts = self._receipts_for(s, done)
        if not receipts:
            self._remove(s, done, ids, answer)
            return
        waiting = len(receipts)
        failed: list[inbox.Receipt] = []

        def stored(receipt: inbox.Receipt, reply: Any) -> None:
            nonlocal waiting
            waiting -= 1
            if isinstance(reply, Exception) or reply[0] == "unknown":
                failed.append(receipt)  # retried, or its owner loaded, on the slow path
            if waiting:
                return
            if not failed:
                self._remove(s, done, ids, answer)
            else:
                self._slow(s, answer, None, lambda: self._ack_slow(s, done, ids, failed))

        for receipt in receipts:
            inbox.submit_receipt(
                self.batcher, receipt, self.settings.inbox_limit, functools.partial(stored, receipt)
            )

    def _remove(self, s: Session, done: list[Delivered], ids: list[str], answer: Answer) -> None:
        """XDEL and XACK entries whose receipts are stored."""

        def acked(reply: Any) -> None:
            self._acked(s, ids)
            if isinstance(reply, Exception):
                self._unacked_again(s, done)
                self._refuse(s, Code.UNAVAILABLE, ACK_FAILED, None, answer)
            else:
                s.refused = 0  # an ack that went through ends a run of refusals
                self.metrics.acked += len(done)
                self.outbox.answer(s, answer, None)

        # nobody waits for it (no answer unless it fails): it rides with other work
        inbox.submit_ack(self.batcher, s.mobile, ids, acked, defer=True)

    def _acking(self, s: Session, done: list[Delivered]) -> list[str]:
        """Note ids whose XACK is on its way: a pending read already in flight still
        returns them, and they must not go out again."""
        if s.acking is None:
            s.acking = {}
        for msg_id, (entry, _sent) in done:
            s.acking[msg_id] = entry
        return [m for m, _ in done]

    def _acked(self, s: Session, ids: list[str]) -> None:
        acking = s.acking
        if acking is not None:
            for msg_id in ids:
                acking.pop(msg_id, None)
            if not acking:
                s.acking = None

    async def _ack_earlier(
        self, s: Session, done: list[Delivered], ids: list[str], unknown: list[str]
    ) -> None:
        """Ack entries this socket did not deliver too: look them up in the inbox first."""
        try:
            entries = await inbox.fetch(self.batcher, s.mobile, unknown)
        except ChatError:
            self._acked(s, ids)
            self._unacked_again(s, done)
            raise Unavailable(ACK_FAILED) from None
        earlier = [(e.msg_id, (e, 0.0)) for e in entries if e.kind]
        await self._ack_slow(s, done + earlier, ids + self._acking(s, earlier))

    async def _ack_slow(
        self,
        s: Session,
        done: list[Delivered],
        ids: list[str],
        receipts: list[inbox.Receipt] | None = None,
    ) -> None:
        """Store the receipts (loading their owners from PostgreSQL if need be), then
        XDEL and XACK; if a receipt cannot be stored the entries stay unacked."""
        if receipts is None:
            receipts = self._receipts_for(s, done)
        try:
            for receipt in receipts:
                try:
                    await inbox.enqueue_receipt(
                        self.batcher, self.recipients.load, receipt, self.settings.inbox_limit
                    )
                except UnknownRecipient:
                    pass  # the sender's account is gone: nobody to tell
            if ids:
                await inbox.ack(self.batcher, s.mobile, ids)
        except ChatError:
            self._unacked_again(s, [d for d in done if d[1][1]])  # those out on this socket
            raise Unavailable(ACK_FAILED) from None
        finally:
            self._acked(s, ids)
        self.metrics.acked += len(done)

    def _unacked_again(self, s: Session, done: list[Delivered]) -> None:
        """An ack that failed: the entries are pending in Redis still, so keep
        redelivering them (stamped now, which keeps `unacked` in sending order)."""
        now = time.monotonic()
        for _msg_id, (entry, _sent) in done:
            s.hold(entry, now)

    def _receipts_for(self, s: Session, done: list[Delivered]) -> list[inbox.Receipt]:
        """One delivered receipt per sender of the acked messages."""
        by_sender: dict[str, list[str]] = {}
        for _, (entry, _sent) in done:
            if entry.kind == "m":
                by_sender.setdefault(entry.sender, []).append(entry.client_id)
        ts = presence.now_ms()
        return [
            inbox.Receipt(sender, s.mobile, "delivered", ids, ts)
            for sender, ids in by_sender.items()
        ]

    def _read_receipt(self, s: Session, frame: frames.Read) -> None:
        """A read receipt names only messages its sender delivered to this user, each
        once (inbox.READ); it then goes to the sender's inbox like any receipt. Ids of
        messages stored but not delivered are refused (invalid_frame); ids with no
        record (made up, or past the dedupe window) are dropped in silence."""
        answer = self.outbox.later(s)

        def checked(reply: Any) -> None:
            if isinstance(reply, Exception):
                self._refuse(s, Code.UNAVAILABLE, UNAVAILABLE, None, answer)
                return
            missing, undelivered, fresh = reply
            if undelivered:
                assert s.invalid is not None
                if not s.invalid.take():
                    self.close(s, CloseCode.POLICY, "too many invalid frames")
                    return
            if fresh:
                receipt = inbox.Receipt(frame.to, s.mobile, "read", fresh, presence.now_ms())
                self._store_read(s, receipt, bool(undelivered), answer)
            elif undelivered:
                self.metrics.refuse(Code.INVALID_FRAME)
                self.outbox.answer(s, answer, frames.error(Code.INVALID_FRAME, NOT_DELIVERED, None))
            elif missing == len(frame.ids):  # no record at all: is there such a user?
                self._slow(s, answer, None, lambda: self._known(frame.to))
            else:
                self.outbox.answer(s, answer, None)  # all receipted already

        held = s.holds(frame.to)
        inbox.submit_read(self.batcher, s.mobile, frame.to, list(frame.ids), held, checked)

    def _store_read(self, s: Session, receipt: inbox.Receipt, bad: bool, answer: Answer) -> None:
        limit = self.settings.inbox_limit
        after = frames.error(Code.INVALID_FRAME, NOT_DELIVERED, None) if bad else None

        def unread() -> None:
            inbox.unread(self.batcher, s.mobile, receipt.owner, receipt.ids)

        async def reload() -> bytes | None:  # Redis lacks the owner: PostgreSQL
            try:
                await inbox.enqueue_receipt(self.batcher, self.recipients.load, receipt, limit)
            except ChatError:
                unread()
                raise
            return after

        def done(reply: Any) -> None:
            if isinstance(reply, Exception):
                unread()
                self._refuse(s, Code.UNAVAILABLE, UNAVAILABLE, None, answer)
            elif reply[0] == "unknown":
                self._slow(s, answer, None, reload)
            elif reply[0] == "full":
                unread()
                self._refuse(s, Code.INBOX_FULL, InboxFull.default_message, None, answer)
            else:  # stored, or dropped by a block as v1 says
                s.refused = 0
                self.outbox.answer(s, answer, after)

        inbox.submit_receipt(self.batcher, receipt, limit, done)

    async def _known(self, to: str) -> None:
        """UnknownRecipient unless `to` has an account (Redis, else PostgreSQL)."""
        if not await self.batcher.run("EXISTS", keys.account(to)):
            if not await self.recipients.load(to):
                raise UnknownRecipient()

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
        """Push back every route's TTL in one pipeline; a lost route means replaced.
        Sockets whose token expired or was revoked close with 4003 on the same pass (a
        logout's message to this node may have been lost)."""
        now = time.time()
        for s in list(self.sessions.values()):
            if s.expires_at and s.expires_at <= now:
                self.close(s, CloseCode.LOGGED_OUT, "token expired")
        sessions = [s for s in self.sessions.values() if not s.closed and s.ready]
        ms = presence.now_ms()
        ttl = self.settings.route_ttl_s
        revoked = self._revocations(sessions)
        results = await asyncio.gather(
            *(presence.refresh(self.batcher, s.mobile, s.route, ttl, ms) for s in sessions),
            return_exceptions=True,
        )
        for s, result in zip(sessions, results, strict=True):
            if result == 0:
                self.close(s, CloseCode.REPLACED, "replaced by a newer connection")
            elif result == 2:  # Redis lost the route: made again, not live
                self.delivery.restart(s)
        for s in await revoked:
            self.close(s, CloseCode.LOGGED_OUT, "logged out")

    async def _revocations(self, sessions: list[Session]) -> list[Session]:
        """The sessions whose token was revoked, asked in the sweep's pipeline; none when
        Redis is away or lost its revocations (they are copied back for the next pass)."""
        loaded = self.batcher.call("EXISTS", keys.REVOCATIONS_LOADED)
        checks = [self.batcher.call("EXISTS", keys.revoked(s.jti)) for s in sessions]
        try:
            if not await loaded:
                self.tokens.reload_revocations(self.batcher, self.pool)
                await asyncio.gather(*checks, return_exceptions=True)
                return []
            found = await asyncio.gather(*checks, return_exceptions=True)
        except ChatError:
            await asyncio.gather(*checks, return_exceptions=True)
            return []
        return [s for s, hit in zip(sessions, found, strict=True) if hit == 1]

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
        self._save_send_tokens(s)
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
