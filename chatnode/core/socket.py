"""One authenticated socket, without I/O: frames in, Redis calls and frames out.

A frame is handled when it arrives: its Redis work becomes a `Call` whose reply comes
back to this core, so a socket needs no task and frames of many sockets share one
pipeline. The calls of one socket reach Redis in order over one connection. The rare
frame that needs PostgreSQL (a recipient Redis lost) goes to the slow lane, and the
socket's later frames wait until it is done.
"""

from __future__ import annotations

import secrets
from typing import Any

from chatnode import channel, frames, inbox, keys, logs, lua
from chatnode.core.acks import Acks
from chatnode.core.actions import (
    Action,
    Call,
    Close,
    Node,
    Publish,
    Reading,
    StoreMessage,
    WriteBuffer,
)
from chatnode.core.answers import OUT_BUFFER_LOW, Answer, Answers
from chatnode.core.delivery import Delivery
from chatnode.core.lane import SlowLane
from chatnode.core.ledger import Ledger
from chatnode.core.meter import Meter
from chatnode.errors import ChatError, CloseCode, Code

log = logs.get(__name__)

MAX_HELD_FRAMES = 64  # frames waiting on a claim or a slow operation; then reading pauses
TRIM_BATCH = 512  # ids acked with a plain XACK that one lua.TRIM takes at most
TRIM_AFTER_S = 2.0  # a plain XACK's entries wait this long for a trim, then the next

UNAVAILABLE = "Redis is unavailable, try again"


class SocketCore:
    """One socket's state: its answers, what is out on it, its catch-up, its limits."""

    __slots__ = (
        "acks",
        "actions",
        "answers",
        "closed",
        "delivery",
        "device",
        "device_key",
        "expires_at",
        "heard",
        "held",
        "jti",
        "lane",
        "ledger",
        "meter",
        "mobile",
        "named",
        "node",
        "ready",
        "route",
        "session",
        "settings",
        "sid",
        "solo",
        "to_trim",
        "trim_due",
        "wire",
    )

    def __init__(
        self,
        node: Node,
        wire: WriteBuffer,
        mobile: str,
        jti: str,
        expires_at: int = 0,
        device: int = 0,
        named: bool = False,
        device_key: str = keys.DEFAULT_DEVICE,
    ) -> None:
        self.node = node
        self.settings = node.settings
        self.wire = wire  # read only: how far behind the socket's writes are
        self.mobile = mobile
        self.device = device  # devices.id of the token's device
        self.named = named  # its login named it (v2): hello says which
        self.device_key = device_key  # in Redis names: '' for `default` (keys.device_key)
        self.session = keys.session(mobile, device_key)  # this device's name on the node
        self.solo = False  # the user's only device (CLAIM says): its acks are the first
        self.to_trim: list[str] = []  # ids acked with a plain XACK since the last lua.TRIM
        self.trim_due: float | None = None  # when they are trimmed at the latest
        self.heard = False  # the device count came since (not from CLAIM)
        self.jti = jti
        self.expires_at = expires_at  # the token's exp: the socket closes with 4003 after it
        self.sid = secrets.token_hex(6)
        self.route = keys.route_value(node.settings.node_id, self.sid)
        self.actions: list[Action] = []
        self.answers = Answers()
        self.ledger = Ledger()
        self.delivery = Delivery(self)
        self.acks = Acks(self)
        self.meter = Meter(node.settings)
        self.held: list[str | bytes] | None = None  # frames waiting for `ready` or `slow`
        self.lane = SlowLane(self)  # frames that may need PostgreSQL, one at a time
        self.ready = False  # the route is claimed: frames are handled
        self.closed = False

    # -- actions out -----------------------------------------------------------------

    def emit(self, action: Action) -> None:
        self.actions.append(action)

    def lagging(self) -> bool:
        """More than OUT_BUFFER_LOW waits to be written to this socket."""
        wire = self.wire
        return wire.paused or self.answers.waiting() + wire.buffered() > OUT_BUFFER_LOW

    def close(self, code: int, reason: str) -> None:
        """Close the socket; safe to call twice. Frames queued before still go out."""
        if not self.closed:
            self.closed = True
            self.emit(Close(code, reason, self.answers.take()))
            self.answers.shut = True  # nothing more is written

    # -- opening and ending ----------------------------------------------------------

    def start(self) -> None:
        """The socket is open: the send tokens an earlier socket left, the claim; hello
        once the claim is through (_claimed)."""
        cfg = self.settings
        # answered before the claim, so before any frame is handled: reconnecting does
        # not refill them
        self.emit(Call(("GET", keys.send_tokens(self.mobile)), self._restore_send_tokens))
        now = self.now_ms()
        args, argv = lua.claim_call(self.mobile, self.device_key, self.route, cfg.route_ttl_s, now)
        self.emit(Call(args, self._claimed, lua.CLAIM, argv))

    def _claimed(self, reply: Any) -> None:
        if isinstance(reply, Exception):
            self.close(CloseCode.INTERNAL, "unavailable")
            return
        if reply[0] == "removed":  # the device went while this socket opened
            self.close(CloseCode.LOGGED_OUT, "device removed")
            return
        old, account = reply
        if not self.heard:  # (a DEVICES message that came first is newer)
            devices = keys.device_keys(account)
            self.solo = devices is not None and len(devices) == 1
        parsed = keys.parse_route(old)
        if parsed is not None and parsed[1] != self.sid and parsed[0] != self.settings.node_id:
            # the previous holder's node closes it (on this node that happened at open),
            # even if this session is closed by now: one session per device
            self.emit(Publish(parsed[0], self.mobile, channel.kick(self.session, parsed[1])))
        if self.closed:
            return
        log.info("socket_open", user=self.mobile, session=self.sid)
        # hello only now, and first: nothing is queued for this session before it (its
        # frames wait for `ready`), and a peer that saw it finds the route pointing here
        # (typing goes only where a route is)
        cfg = self.settings
        device = str(self.device) if self.named else None  # v1 logins: the v1 hello
        self.answers.push(frames.hello(self.mobile, cfg.node_id, cfg.heartbeat_s, device))
        self.ready = True
        self.delivery.step()
        self.release_held()

    def devices_now(self, count: int) -> None:
        """The user has `count` devices now (channel.DEVICES, or the route sweep's
        REFRESH; 0: not known): with one, no FIRST_ACKS nor own copies."""
        self.heard = True
        self.solo = count == 1

    def _restore_send_tokens(self, reply: Any) -> None:
        self.meter.restore(reply, self.node.clock.monotonic(), self.now_ms() / 1000)

    def ended(self) -> None:
        """The socket is gone (closed by either side): leave the send bucket's level for
        the user's next socket, and release the route (last seen is stamped)."""
        self.closed = True
        self.answers.take()
        self.answers.shut = True
        self.held = None
        saved = self.meter.saved(self.node.clock.monotonic(), self.now_ms() / 1000)
        if saved is not None:
            value, ttl = saved
            self.emit(Call(("SET", keys.send_tokens(self.mobile), value, "EX", ttl)))
        self.trim()
        args, argv = lua.release_call(self.mobile, self.device_key, self.route, self.now_ms())
        self.emit(Call(args, self._released, lua.RELEASE, argv))

    def _released(self, reply: Any) -> None:
        if isinstance(reply, Exception):  # the route expires on its own
            log.warning("route_release_failed", user=self.mobile, error=type(reply).__name__)

    def now_ms(self) -> int:
        return self.node.clock.ms()

    # -- frames in -------------------------------------------------------------------

    def receive(self, data: str | bytes) -> None:
        """A frame arrived; it waits while the route is not claimed or a slow job runs."""
        if self.closed:
            return
        if not self.ready or self.lane.busy:
            if self.held is None:
                self.held = []
            self.held.append(data)
            if len(self.held) >= MAX_HELD_FRAMES:
                self.emit(Reading(False))
            return
        self._on_frame(data)

    def release_held(self) -> None:
        """Handle the frames that waited, in order, until one starts a slow operation."""
        held = self.held
        if held is None:
            return
        while held and not self.lane.busy and not self.closed:
            self._on_frame(held.pop(0))
        if not held:
            self.held = None
            self.emit(Reading(True))

    def _on_frame(self, data: str | bytes) -> None:
        now = self.node.clock.monotonic()
        metered = self.meter.frame(now, len(data))
        try:
            frame = frames.parse_client(data, self.mobile)
        except frames.FrameError as exc:
            if not metered:
                self.rate_limited(exc.ref)
                return
            self.refuse(exc.code, exc.message, exc.ref)
            self.invalid_frame()
            return
        ref = frame.id if isinstance(frame, frames.Send) else None
        if not metered:
            self.rate_limited(ref)
            return
        match frame:
            case frames.Send():
                if not self.meter.send(now):
                    self.rate_limited(frame.id)
                    return
                self._send(frame)
            case frames.Ack():
                self.acks.ack(frame)
            case frames.Read():
                if not self.meter.send(now):
                    self.rate_limited(None)  # a receipt costs what a send does
                    return
                self.acks.read(frame)
            case frames.Typing():
                self._typing(frame)

    # -- refusals --------------------------------------------------------------------

    def refuse(
        self, code: str, message: str, ref: str | None, answer: Answer | None = None
    ) -> None:
        self.node.metrics.refuse(code)
        self.answers.give(answer, frames.error(code, message, ref))

    def rate_limited(self, ref: str | None) -> None:
        """Refuse one frame; a client that keeps flooding past the limit is closed (1008)."""
        self.refuse(Code.RATE_LIMITED, "too many frames, slow down", ref)
        self.count_refusal()

    def count_refusal(self) -> None:
        """Rate-limit refusals and misses (unknown recipients) in a row close the socket."""
        if self.meter.refusal():
            self.close(CloseCode.POLICY, "flooding")

    def invalid_frame(self) -> bool:
        """Count an invalid frame; a burst of them (however many valid ones between)
        closes the socket. False if it closed."""
        if self.meter.invalid_frame(self.node.clock.monotonic()):
            return True
        self.close(CloseCode.POLICY, "too many invalid frames")
        return False

    # -- send and typing -------------------------------------------------------------

    def _send(self, frame: frames.Send) -> None:
        started = self.node.clock.perf()
        ts = self.now_ms()
        answer = self.answers.later()

        def stored(reply: Any) -> None:
            try:
                result = inbox.stored(reply)
            except ChatError as exc:
                self.refuse(exc.code, exc.message, frame.id, answer)
                return
            if result is None:  # Redis lacks the recipient: reload from PostgreSQL
                job = StoreMessage(self.mobile, frame, ts)
                self.lane.add(answer, frame.id, job, lambda r: self._accepted(frame, r, started))
                return
            self.answers.give(answer, self._accepted(frame, result, started))

        cfg = self.settings
        args, argv = inbox.message_call(
            self.mobile, frame, ts, cfg.inbox_limit, cfg.dedupe_window_s, cfg.replica_acks <= 0
        )
        self.emit(Call(args, stored, lua.SEND, argv))

    def _accepted(self, frame: frames.Send, result: Any, started: float) -> bytes:
        if isinstance(result, Exception):
            raise result
        self.meter.refused = 0  # a stored message ends a run of refusals
        metrics = self.node.metrics
        metrics.accepted += 1
        metrics.send_latency.observe(self.node.clock.perf() - started)
        if self.settings.replica_acks > 0:  # a replica has it now (redisio.WAITED): push it
            keys_, argv = inbox.nudge_call(frame.to, result.msg_id)
            self.emit(Call(keys_, None, lua.NUDGE, argv))
        if result.new and not self.solo:  # the user's other devices show it too
            fields = inbox.own_send_fields(self.mobile, frame, result.ts, self.device_key)
            self.own(fields)
        return frames.accepted(frame.id, result.msg_id, result.ts)

    def own(self, fields: list[str]) -> None:
        """An entry of this user's own doing for their other devices (lua.OWN): nobody
        waits for it, and a copy that cannot be stored is dropped."""
        args, argv = inbox.own_call(self.mobile, self.settings.inbox_limit, fields)
        self.emit(Call(args, None, lua.OWN, argv))

    def _typing(self, frame: frames.Typing) -> None:
        answer = self.answers.later()

        def done(reply: Any) -> None:
            if isinstance(reply, Exception):
                self.refuse(Code.UNAVAILABLE, UNAVAILABLE, None, answer)
            else:
                self.answers.give(answer, None)

        args, argv = lua.typing_call(self.mobile, frame.to, frame.state)
        self.emit(Call(args, done, lua.TYPING, argv))

    # -- what the node's channel and timers bring -------------------------------------

    def pushed(self, token: str, entries: list[inbox.Entry] | None) -> None:
        if not self.closed:
            self.delivery.on_push(token, entries)

    def typing_from(self, sender: str, state: str) -> None:
        if self.ready and not self.closed:
            self.answers.push(frames.typing(sender, state))

    def written(self) -> None:
        """The driver wrote the outbox."""
        self.delivery.written(self.wire.paused)

    def drained(self) -> None:
        """The socket's write buffer went below its low mark."""
        self.delivery.drained()

    def tick(self, now: float) -> None:
        """The redelivery sweep."""
        self.delivery.tick(now, self.wire.paused)
        if self.trim_due is not None and now >= self.trim_due:
            self.trim()

    def trimmed_later(self, ids: list[str]) -> None:
        """Entries a plain XACK acked leave the inbox at a trim: with a later XACK's
        reply once the first has waited TRIM_AFTER_S (so the sockets' trims spread
        over time), else at the redelivery sweep after that; at once if TRIM_BATCH ids
        wait or the socket has ended."""
        self.to_trim.extend(ids)
        now = self.node.clock.monotonic()
        if self.trim_due is None:
            self.trim_due = now + TRIM_AFTER_S
        if self.closed or len(self.to_trim) >= TRIM_BATCH or now >= self.trim_due:
            self.trim()

    def trim(self) -> None:
        """Entries acked with a plain XACK leave the inbox (lua.TRIM). A trim that
        fails gives its ids back to the next one while the socket lasts (at most
        TRIM_BATCH wait: past that the oldest are left to a later head trim)."""
        self.trim_due = None
        if not self.to_trim:
            return
        ids, self.to_trim = self.to_trim, []

        def trimmed(reply: Any) -> None:
            if isinstance(reply, Exception):
                log.warning("trim_failed", user=self.mobile, error=type(reply).__name__)
                if not self.closed:
                    self.to_trim = (ids + self.to_trim)[-TRIM_BATCH:]
                    if self.trim_due is None:
                        self.trim_due = self.node.clock.monotonic() + TRIM_AFTER_S

        self.emit(
            Call((keys.inbox(self.mobile), keys.account(self.mobile)), trimmed, lua.TRIM, ids)
        )
