"""The WebSocket gateway: the driver between sockets and their cores.

A socket's state machine is its `SocketCore` (core/); the gateway feeds it events (a
frame, a Redis reply, a push from the node's channel, a sweep) and carries out what it
asks for: Redis calls into the batcher in order, slow jobs one at a time per socket,
its frames written with one transport write at the end of the event-loop turn, reading
paused or resumed, the socket closed. The handshake (auth, connection limits) is in
handshake.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from websockets.http11 import Request, Response

from chatnode import auth, handshake, inbox, keys, logs, routesweep
from chatnode.config import Settings
from chatnode.core.actions import Call, Close, Node, Publish, Reading, RunSlow, Then
from chatnode.core.answers import OUT_BUFFER_MAX
from chatnode.core.socket import SocketCore
from chatnode.errors import CloseCode
from chatnode.metrics import Metrics
from chatnode.recipients import Recipients
from chatnode.redisio import Redis, ignore
from chatnode.routing import Router
from chatnode.slowpath import SlowPath
from chatnode.tasks import TaskSet
from chatnode.wsserver import NOT_READING, Conn

log = logs.get(__name__)

CLOSE_WAIT_S = 5.0


class Session:
    """A socket with its core; `writing`: queued for the end-of-turn flush."""

    __slots__ = ("acting", "conn", "core", "gone", "writing")

    def __init__(self, conn: Conn, core: SocketCore) -> None:
        self.conn = conn
        self.core = core
        self.writing = False
        self.acting = False  # in act: actions the core adds meanwhile join its loop
        self.gone = False  # forgotten: the core has ended


class Gateway:
    """All sessions of this node; also the Listener for what the node's channel brings."""

    def __init__(
        self,
        settings: Settings,
        batcher: Redis,
        pool: Any,
        router: Router,
        tokens: auth.Tokens,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.batcher = batcher
        self.pool = pool
        self.router = router
        self.tokens = tokens
        self.metrics = metrics
        self.node = Node(settings, metrics, channel_up=lambda: router.connected.is_set())
        self.sessions: dict[str, Session] = {}  # by keys.session: one per device
        self.seen_to_store: dict[str, int] = {}
        self.device_seen_to_store: dict[int, int] = {}  # devices.id -> ms
        self.slowpath = SlowPath(
            batcher,
            Recipients(pool, batcher),
            settings.inbox_limit,
            settings.dedupe_window_s,
            push=settings.replica_acks <= 0,
        )
        self.tasks = TaskSet()
        self._paused: set[Session] = set()  # reading paused while Redis is congested
        self._to_flush: list[Session] = []
        self._flush_scheduled = False
        self.accepting = True

    # -- the socket's life (wsserver.Handler) ----------------------------------------

    async def authorize(self, conn: Conn, request: Request) -> tuple[Response | None, Any]:
        """Authenticate in the handshake: a bad token gets HTTP 401 and no socket."""
        return await handshake.authorize(self, conn, request)

    def on_open(self, conn: Conn, claims: auth.Claims) -> Session:
        core = SocketCore(
            self.node,
            conn,
            claims.mobile,
            claims.jti,
            claims.expires_at,
            claims.device,
            claims.named,
            claims.device_key,
        )
        s = Session(conn, core)
        previous = self.sessions.get(core.session)  # one session per device
        self.sessions[core.session] = s
        if previous is not None:
            self.close(previous, CloseCode.REPLACED, "replaced by a newer connection")
        self.metrics.sockets += 1
        self.device_seen_to_store[core.device] = core.now_ms()
        core.start()
        self.act(s)
        return s

    def on_message(self, conn: Conn, data: str | bytes) -> None:
        s: Session = conn.session
        if s.gone:
            return
        if self.batcher.congested():
            self._pause_for_redis(s)
        s.core.receive(data)
        self.act(s)

    def on_drained(self, conn: Conn) -> None:
        s: Session | None = conn.session
        if s is not None and not s.gone:
            s.core.drained()
            self.act(s)

    def on_closed(self, conn: Conn, session: Session) -> None:
        self._forget(session)

    # -- carrying out what a core asks for -------------------------------------------

    def act(self, s: Session) -> None:
        """Carry out what the core asked for, in order (also what carrying it out makes
        it ask: a close ends the core, which releases the route); then have the frames
        it queued written at the end of the turn."""
        core = s.core
        if core.actions and not s.acting:
            s.acting = True
            try:
                self._carry_out(s)
            finally:
                s.acting = False
        # (if acting, the loop further up the stack takes the new actions)
        if core.answers.outbox and not s.writing and not s.gone:
            s.writing = True
            self._to_flush.append(s)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush_all)

    def _carry_out(self, s: Session) -> None:
        actions = s.core.actions
        batcher = self.batcher
        replied = self._replied
        i = 0
        try:
            while i < len(actions):  # carrying one out may add more: taken in turn
                action = actions[i]
                i += 1
                if type(action) is Call:  # (most of them)
                    then = action.then
                    callback = ignore if then is None else replied(s, then)
                    if action.script is not None:
                        script, args, argv = action.script, action.args, action.argv
                        if action.defer:
                            batcher.defer(callback, "EVALSHA", script.sha, len(args), *args, *argv)
                        else:
                            batcher.submit_script(callback, script, args, argv)
                    elif action.defer:
                        batcher.defer(callback, *action.args)
                    else:
                        batcher.submit(callback, *action.args)
                elif isinstance(action, Close):
                    self._close(s, action)
                elif isinstance(action, Reading):
                    if action.on:
                        if s not in self._paused:  # (Redis congestion keeps it paused)
                            s.conn.resume_reading()
                    else:
                        s.conn.pause_reading()
                elif isinstance(action, Publish):
                    self.router.send(action.node, action.mobile, action.payload)
                elif isinstance(action, RunSlow):
                    self.tasks.spawn(self._run_slow(s))
        finally:
            del actions[:i]  # (those not reached, if one failed, wait for the next event)

    def _replied(self, s: Session, then: Then) -> Callable[[Any], None]:
        """The batcher's callback for a call: the event of its reply, fed to the core
        (the Call's continuation), then what the core asked for is carried out."""

        def callback(reply: Any) -> None:
            try:
                then(reply)
            except Exception:  # a bug: an answer may never come, so the socket goes
                log.exception("socket_event_failed", user=s.core.mobile)
                s.core.close(CloseCode.INTERNAL, "internal error")
            self.act(s)  # what the core asked for, before it failed too

        return callback

    async def _run_slow(self, s: Session) -> None:
        """The socket's slow-lane runner: its jobs one at a time, until the lane is empty."""
        core = s.core
        lane = core.lane
        try:
            while (job := lane.next()) is not None:
                try:
                    result = await self.slowpath.run(job)
                except Exception as exc:
                    result = exc
                lane.done(result)
                self.act(s)
        finally:
            if lane.running:  # it ended other than by an empty lane: a bug, or cancelled
                log.error("slow_lane_failed", user=core.mobile, exc_info=True)
                lane.running, lane.queue = False, None
                core.close(CloseCode.INTERNAL, "internal error")
                self.act(s)

    def _flush_all(self) -> None:
        self._flush_scheduled = False
        sessions, self._to_flush = self._to_flush, []
        for s in sessions:
            s.writing = False
            if not s.gone:
                try:
                    self._flush(s)
                except Exception:  # a bug: this socket goes, the others are written
                    log.exception("socket_flush_failed", user=s.core.mobile)
                    s.core.close(CloseCode.INTERNAL, "internal error")
                self.act(s)

    def _flush(self, s: Session) -> None:
        """Write what is queued for this socket now."""
        out = s.core.answers.take()
        if not out:
            return
        try:
            s.conn.send_texts(out)
        except Exception as exc:  # the socket is going away
            log.info("socket_write_failed", user=s.core.mobile, error=type(exc).__name__)
            s.core.close(CloseCode.INTERNAL, "write failed")
            return
        if s.conn.buffered() > OUT_BUFFER_MAX:
            s.core.close(CloseCode.POLICY, NOT_READING)
        else:
            s.core.written()

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
            if not s.gone and s.core.held is None:
                s.conn.resume_reading()

    # -- closing ---------------------------------------------------------------------

    def close(self, s: Session, code: int, reason: str) -> None:
        """Close a session's socket; safe to call twice."""
        s.core.close(code, reason)
        self.act(s)

    def _close(self, s: Session, close: Close) -> None:
        if s.gone:
            return
        try:
            if close.last:  # an error frame queued just before still goes out
                s.conn.send_texts(close.last)
            s.conn.close(close.code, close.reason)
        except Exception as exc:
            log.info("socket_write_failed", user=s.core.mobile, error=type(exc).__name__)
            s.conn.abort()
        finally:
            self._forget(s)

    def _forget(self, s: Session) -> None:
        if s.gone:
            return
        s.gone = True
        core = s.core
        if self.sessions.get(core.session) is s:
            del self.sessions[core.session]
        self.metrics.sockets -= 1
        self.seen_to_store[core.mobile] = self.device_seen_to_store[core.device] = core.now_ms()
        code, reason = s.conn.close_reason
        log.info("socket_closed", user=core.mobile, session=core.sid, code=code, reason=reason)
        core.ended()
        self.act(s)

    async def drain(self) -> None:
        """Stop accepting and close every socket with 1012 (reconnect elsewhere)."""
        self.accepting = False
        for s in list(self.sessions.values()):
            self.close(s, CloseCode.RESTARTING, "node restarting")
        await self.tasks.wait(CLOSE_WAIT_S)

    # -- node-wide sweeps (one task each, never one per socket) ----------------------

    def redeliver(self) -> None:
        """The redelivery sweep: entries unacked too long go again; stalled catch-ups
        are retried."""
        now = self.node.clock.monotonic()
        for s in list(self.sessions.values()):
            s.core.tick(now)
            self.act(s)

    async def refresh_routes(self) -> None:
        """The route sweep (routesweep.py): TTLs, expired and revoked tokens."""
        await routesweep.refresh_routes(self)

    # -- what the node's channel brings (routing.Listener) ---------------------------

    def on_push(self, owner: str, token: str, entries: list[inbox.Entry] | None) -> None:
        s = self.sessions.get(owner)
        if s is not None:
            s.core.pushed(token, entries)
            self.act(s)
        # else: the entries wait as pending for whoever holds the user next

    def on_kick(self, mobile: str, session: str) -> None:
        s = self.sessions.get(mobile)
        if s is not None and s.core.sid == session:
            self.close(s, CloseCode.REPLACED, "replaced by a newer connection")

    def on_logout(self, mobile: str, jti: str) -> None:
        s = self.sessions.get(mobile)
        if s is not None and s.core.jti == jti:
            self.close(s, CloseCode.LOGGED_OUT, "logged out")

    def on_typing(self, to: str, sender: str, state: str) -> None:
        s = self.sessions.get(to)
        if s is not None:
            s.core.typing_from(sender, state)
            self.act(s)

    def on_devices(self, owner: str, count: int) -> None:
        s = self.sessions.get(owner)
        if s is not None:
            s.core.devices_now(count)

    def on_resync(self) -> None:
        """The channel went away or came back: pushes may be lost, so every session
        catches up again; and a logout meant for a socket here may have been missed."""
        for s in list(self.sessions.values()):
            if s.core.ready and not s.gone:
                s.core.delivery.restart()
                self.act(s)
                self.batcher.submit(self._revoked_check(s), "EXISTS", keys.revoked(s.core.jti))

    def _revoked_check(self, s: Session) -> Any:
        def done(reply: Any) -> None:
            if reply == 1:
                self.close(s, CloseCode.LOGGED_OUT, "logged out")

        return done
