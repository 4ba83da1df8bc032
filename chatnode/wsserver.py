"""WebSocket connections on websockets' sans-I/O protocol: one asyncio.Protocol per socket.

websockets' ServerProtocol parses the handshake and the frames and composes the answers
the RFC requires (pongs, close echoes); this module is the thin I/O layer around it. A
connection costs no task: frames reach the handler from data_received, writes go
straight to the transport, and one sweep for all sockets sends keepalive pings and
enforces the handshake, pong and close deadlines (DESIGN.md: no per-connection timer).

The frames nearly every socket carries take a shorter way (websockets' parser costs
~4 us a frame, this one ~0.5): a read of whole, final, masked text or binary frames,
pings or pongs, none over max_size, is parsed here (`_fast_frames`), and text frames
are written here (`text_frame`). At the first read that holds anything else (a close,
a fragment, a frame cut by TCP, a frame the RFC refuses, or once the socket is
closing), the rest of the read and every later one go to websockets, whose parser
then stands where a frame starts. That holds only from a handshake after which no byte
was read before the 101 answer (`_pre`). One difference remains: frames are handled as
they are parsed, so after a frame that fails the socket (bad UTF-8) or that the handler
answers by closing it, the rest of that read gets no answer (websockets, which parses a
whole read before its frames are handled, would still answer a ping in it, or echo its
close frame); a read's pongs go out in one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import time
from typing import Any, Protocol, cast

from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.speedups import apply_mask

from chatnode import logs
from chatnode.bucket import Bucket
from chatnode.errors import CloseCode
from chatnode.tasks import TaskSet

log = logs.get(__name__)

# websockets logs every open and close at INFO; our own logs say it with the user bound.
_WS_LOG = logging.getLogger("chatnode.websockets")
_WS_LOG.setLevel(logging.WARNING)

OPEN_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0
HANDSHAKE_BACKLOG = 1024
KEEPALIVE_TIMEOUT = 1011
INVALID_DATA = 1007
MAX_HANDSHAKE_BYTES = 16_384  # a handshake read past this never takes the short way
# unsent bytes: past this the sweep closes a socket (1008); past twice this, the write
# that crosses it aborts the socket (the app passes core.answers.OUT_BUFFER_MAX)
MAX_BUFFERED = 4 * 1024 * 1024
NOT_READING = "client is not reading"  # (the gateway's close for it too)
# pings and pongs a peer may send: a burst, then so many a second (each costs a parse and
# a pong, and no frame limit of the gateway's sees them)
CONTROL_BURST = 100
CONTROL_RATE = 10.0
TOO_MANY_CONTROLS = "too many pings"
_FIN_TEXT = 0x81
_TEXT, _BINARY, _PONG = Opcode.TEXT.value, Opcode.BINARY.value, Opcode.PONG.value
_PING_PONG = (Opcode.PING.value, _PONG)


class Handler(Protocol):
    """What the gateway does with connections."""

    async def authorize(self, conn: Conn, request: Request) -> tuple[Response | None, Any]:
        """(None, grant) to accept, or (response, None) to refuse the handshake."""
        ...

    def on_open(self, conn: Conn, grant: Any) -> Any:
        """The handshake succeeded; returns the session kept on the connection."""
        ...

    def on_message(self, conn: Conn, data: str | bytes) -> None: ...
    def on_drained(self, conn: Conn) -> None: ...
    def on_closed(self, conn: Conn, session: Any) -> None:
        """Closing started (either side) or the connection was lost."""
        ...


class Conn(asyncio.Protocol):
    """One client socket."""

    __slots__ = (
        "_controls",
        "_fast",
        "_parts",
        "_pre",
        "address",
        "deadline",
        "next_ping",
        "paused",
        "ping_sent",
        "server",
        "session",
        "transport",
        "ws",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.ws = ServerProtocol(max_size=server.max_size, logger=_WS_LOG)
        self.session: Any = None
        self.address = "unknown"
        self.deadline = 0.0  # handshake or close deadline (monotonic); 0 while open
        self.next_ping = 0.0
        self.ping_sent = 0.0  # when the unanswered ping went out; 0 once answered
        self.paused = False  # the write buffer is over its high mark
        self._parts: list[bytes] | None = None  # a fragmented message, with its opcode first
        self._pre: bytearray | None = bytearray()  # what was read before the 101 answer
        self._fast = False  # reads are parsed here (_fast_frames) until one is not
        self._controls: Bucket | None = None  # pings and pongs metered (from the first)

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = self.transport.get_extra_info("peername")
        self.address = str(peer[0]) if peer else "unknown"
        self.deadline = time.monotonic() + self.server.open_timeout
        self.transport.set_write_buffer_limits(high=self.server.write_high)
        self.server.conns.add(self)
        self.server.idle.clear()

    def data_received(self, data: bytes) -> None:
        if self._fast:
            data = self._fast_frames(data)
            if not data:
                return
        elif self._pre is not None:
            self._pre += data
            if len(self._pre) > MAX_HANDSHAKE_BYTES:
                self._pre = None
        ws = self.ws
        ws.receive_data(data)
        events = ws.events_received()
        self._write_out()
        for event in events:
            if isinstance(event, Frame):
                self._on_frame(event)
            elif isinstance(event, Request):
                self.server.tasks.spawn(self._handshake(event))
        if ws.state is not State.OPEN:
            self._ended()  # a close frame, or a frame the protocol refused

    def eof_received(self) -> bool:
        self.ws.receive_eof()
        self._write_out()
        return False  # the transport closes itself

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.session is not None:
            self.server.handler.on_drained(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.conns.discard(self)
        if not self.server.conns:
            self.server.idle.set()
        self._ended()

    def _ended(self) -> None:
        """The session is over once closing starts; the handler hears of it once."""
        if self.session is not None:
            session, self.session = self.session, None
            self.server.handler.on_closed(self, session)

    # -- what the gateway calls ------------------------------------------------------

    def send_texts(self, frames: list[bytes]) -> None:
        """Write UTF-8 JSON text frames in one transport write (after what websockets
        has to send, if anything: a pong)."""
        ws = self.ws
        if ws.state is not State.OPEN or self.transport is None:
            return
        out = ws.data_to_send()
        for frame in frames:
            out.append(text_frame(frame))
        self.transport.write(b"".join(out))

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake; the sweep aborts a peer that does not finish it."""
        if self.ws.state is State.OPEN:
            self.ws.send_close(code, reason)
            self._write_out()
            self.deadline = time.monotonic() + self.server.close_timeout
            self._ended()
        elif self.ws.state is State.CONNECTING:
            self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def reject(self, status: int, text: str) -> Response:
        """A plain-text HTTP refusal of the handshake."""
        return self.ws.reject(status, text)

    @property
    def close_reason(self) -> tuple[int, str]:
        """The close code and reason sent (or received first); 1006 if none."""
        ws = self.ws
        close = ws.close_sent or ws.close_rcvd
        return (close.code, close.reason) if close is not None else (1006, "")

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # -- inside ------------------------------------------------------------------------

    def _fast_frames(self, data: bytes) -> bytes:
        """Handle the whole, final, masked text and binary frames (up to max_size),
        pings and pongs at the start of `data`; the rest, from the first frame that is
        not one of them (or once the socket is closing), is returned for websockets,
        which takes every later read too."""
        end = len(data)
        at = 0
        limit = self.server.max_size
        ws = self.ws
        pinged = False
        while at < end and ws.state is State.OPEN:  # (closing: websockets takes the rest)
            found = _plain_frame(data, at, end, limit)
            if found is None:
                break
            op, start, at = found
            if op == _TEXT or op == _BINARY:
                payload = apply_mask(data[start:at], data[start - 4 : start])
                self._deliver(Opcode.TEXT if op == _TEXT else Opcode.BINARY, payload)
            elif not self._control():
                break  # closing: websockets takes the rest
            elif op == _PONG:
                self.ping_sent = 0.0
            else:  # a ping: the pong websockets would send, written with the others
                ws.send_pong(apply_mask(data[start:at], data[start - 4 : start]))
                pinged = True
        if pinged:
            self._write_out()  # one write for a read's pongs, however many pings
        if at < end:
            self._fast = False
        return data[at:]

    def _on_frame(self, frame: Frame) -> None:
        op = frame.opcode
        data = cast(bytes, frame.data)  # Frame.parse makes bytes
        if op is Opcode.TEXT or op is Opcode.BINARY:
            if frame.fin:
                self._deliver(op, data)
            else:
                self._parts = [bytes([op]), data]
        elif op is Opcode.CONT:
            if self._parts is not None:  # the protocol refuses a stray continuation
                self._parts.append(data)
                if frame.fin:
                    parts, self._parts = self._parts, None
                    self._deliver(Opcode(parts[0][0]), b"".join(parts[1:]))
        elif op is Opcode.PING:
            self._control()  # (websockets has answered it already)
        elif op is Opcode.PONG:
            if self._control():
                self.ping_sent = 0.0
        elif op is Opcode.CLOSE:
            self.deadline = time.monotonic() + self.server.close_timeout

    def _control(self) -> bool:
        """Count a ping or pong from the peer: past CONTROL_BURST, then CONTROL_RATE a
        second, the socket is closed (1008), and aborted if it is closing already."""
        now = time.monotonic()
        if self._controls is None:
            self._controls = Bucket(CONTROL_RATE, CONTROL_BURST, now)
        if self._controls.take(now):
            return True
        if self.ws.state is State.OPEN:
            log.info("ws_too_many_pings", address=self.address)
            self.close(CloseCode.POLICY, TOO_MANY_CONTROLS)
        else:
            self.abort()
        return False

    def _deliver(self, op: Opcode, data: bytes) -> None:
        if self.session is None:
            return  # sent before the handshake finished, or after the session ended
        # (frames parsed together with a close frame that follows them still count)
        payload: str | bytes = data
        if op is Opcode.TEXT:
            try:
                payload = data.decode()
            except UnicodeDecodeError:
                self.ws.fail(INVALID_DATA, "invalid UTF-8")
                self._write_out()
                self.deadline = time.monotonic() + self.server.close_timeout
                self._ended()
                return
        try:
            self.server.handler.on_message(self, payload)
        except Exception:
            log.exception("frame_failed")
            self.close(1011, "internal error")

    async def _handshake(self, request: Request) -> None:
        handler = self.server.handler
        try:
            refusal, grant = await handler.authorize(self, request)
        except Exception:
            log.exception("handshake_failed")
            refusal, grant = self.reject(500, "internal error\n"), None
        if self.transport is None or self.transport.is_closing():
            return  # the client went away meanwhile
        response = self.ws.accept(request) if refusal is None else refusal
        self.ws.send_response(response)
        self._write_out()
        if response.status_code != 101:
            self._pre = None
            return
        self.deadline = 0.0
        self.next_ping = time.monotonic() + self.server.heartbeat_s
        pre, self._pre = self._pre, None
        # the short way only if nothing came after the request (a client waits for the
        # 101, RFC 6455 4.1): websockets' parser then stands where the first frame starts
        self._fast = pre is not None and len(pre) == pre.find(b"\r\n\r\n") + 4
        try:
            self.session = handler.on_open(self, grant)
        except Exception:
            log.exception("open_failed")
            self.close(1011, "internal error")

    def _write_out(self) -> None:
        """Write what websockets has to send. What it writes by itself (pongs, close
        frames) goes around the gateway's check on its own writes: past twice
        max_buffered the socket is aborted (the sweep closes it past max_buffered)."""
        writes = self.ws.data_to_send()
        transport = self.transport
        if not writes or transport is None or transport.is_closing():
            return
        data = b"".join(writes)
        if data:
            transport.write(data)
            if transport.get_write_buffer_size() > 2 * self.server.max_buffered:
                log.info("ws_not_reading", address=self.address)
                transport.abort()
                return
        if writes[-1] == b"":  # the protocol is done: half-close, then the peer closes
            self._half_close(transport)
            if not self.deadline:
                self.deadline = time.monotonic() + self.server.close_timeout

    @staticmethod
    def _half_close(transport: asyncio.Transport) -> None:
        """Send EOF, or close when EOF cannot be sent.

        write_eof raises OSError on a socket the peer already reset (uvloop; asyncio's
        shutdown() too) and RuntimeError on a closed uvloop handle. The socket is dead
        then: abort it, and let the read or the closing of many sockets go on."""
        if not transport.can_write_eof():
            transport.close()
            return
        try:
            transport.write_eof()
        except (OSError, RuntimeError) as exc:
            log.debug("ws_write_eof_failed", error=type(exc).__name__)
            transport.abort()


def _plain_frame(data: bytes, at: int, end: int, limit: int) -> tuple[int, int, int] | None:
    """(opcode, payload start, payload end) of the client frame at `at` in `data` if it
    is whole in data[:end], final, masked, with no RSV bit, under 64 KiB and `limit`, and
    text, binary, or a ping or pong of at most 125 bytes; else None."""
    if end - at < 6:
        return None
    head, size = data[at], data[at + 1]
    op = head & 0x0F
    if head & 0xF0 != 0x80 or not size & 0x80:  # not final, RSV bits, unmasked
        return None
    size &= 0x7F
    start = at + 6
    if size == 126:  # (its two length bytes are there: at least six bytes are)
        start += 2
        size = (data[at + 2] << 8) | data[at + 3]
    elif size == 127:
        return None  # 64 KiB or more: websockets
    if not (op == _TEXT or op == _BINARY or (op in _PING_PONG and size <= 125)):
        return None
    stop = start + size
    if size > limit or stop > end:
        return None
    return op, start, stop


def text_frame(payload: bytes) -> bytes:
    """A final, unmasked text frame (a server's) of UTF-8 `payload`, as websockets
    writes it with no extension."""
    size = len(payload)
    if size < 126:
        return bytes((_FIN_TEXT, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", _FIN_TEXT, 126, size) + payload
    return struct.pack("!BBQ", _FIN_TEXT, 127, size) + payload


class Server:
    """All sockets of one gateway: listening, the sweep, and closing down."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_size: int,
        heartbeat_s: float,
        write_high: int,
        max_buffered: int = MAX_BUFFERED,
        open_timeout: float = OPEN_TIMEOUT_S,
        close_timeout: float = CLOSE_TIMEOUT_S,
    ) -> None:
        self.handler = handler
        self.max_size = max_size
        self.heartbeat_s = heartbeat_s
        self.write_high = write_high
        self.max_buffered = max_buffered
        self.open_timeout = open_timeout
        self.close_timeout = close_timeout
        self.conns: set[Conn] = set()
        self.idle = asyncio.Event()  # set while no connection is open
        self.idle.set()
        self.tasks = TaskSet()  # handshakes waiting for the handler's authorize
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Conn(self), host, port, backlog=HANDSHAKE_BACKLOG, reuse_address=True
        )
        self._sweeper = loop.create_task(self._sweep_forever(), name="ws-sweep")

    async def _sweep_forever(self) -> None:
        period = min(1.0, self.heartbeat_s / 4)
        while True:
            await asyncio.sleep(period)
            try:
                self.sweep(time.monotonic())
            except Exception:
                log.exception("ws_sweep_failed")

    def sweep(self, now: float) -> None:
        """Keepalive pings, the deadlines of handshakes, pongs and closes, and sockets
        with more than max_buffered unsent (whatever wrote it)."""
        for conn in list(self.conns):
            if conn.deadline and now > conn.deadline:
                conn.abort()  # a handshake or a close that took too long
            elif conn.ws.state is State.OPEN and conn.buffered() > self.max_buffered:
                conn.close(CloseCode.POLICY, NOT_READING)
            elif conn.next_ping and now >= conn.next_ping and conn.ws.state is State.OPEN:
                conn.next_ping = now + self.heartbeat_s
                if conn.ping_sent:
                    conn.close(KEEPALIVE_TIMEOUT, "keepalive ping timeout")
                else:
                    conn.ping_sent = now
                    conn.ws.send_ping(os.urandom(4))
                    conn._write_out()

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stop listening; wait for the sockets to finish closing, then abort the rest."""
        self.stop_accepting()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.close_timeout + 1):
                await self.idle.wait()
        for conn in list(self.conns):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.tasks.cancel(1)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await self._server.wait_closed()
