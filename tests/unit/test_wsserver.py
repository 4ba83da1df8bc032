"""chatnode.wsserver.Conn and Server.sweep: websockets' sans-I/O protocol with our I/O
around it, driven with bytes; the transport only records what is written."""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import random
from typing import Any, cast

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.uri import parse_uri

from chatnode.wsserver import CONTROL_BURST, CONTROL_RATE, Conn, Server, text_frame


class Transport:
    def __init__(self) -> None:
        self.data = b""
        self.eof = self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        self.data += data

    def write_eof(self) -> None:
        self.eof = True

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else None

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Handler:
    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.messages: list[str | bytes] = []
        self.closed: list[Any] = []

    async def authorize(self, conn: Conn, request: Request) -> tuple[Response | None, Any]:
        if self.refuse:
            return conn.reject(401, "unauthorized\n"), None
        return None, "grant"

    def on_open(self, conn: Conn, grant: Any) -> Any:
        return {"grant": grant}

    def on_message(self, conn: Conn, data: str | bytes) -> None:
        self.messages.append(data)

    def on_drained(self, conn: Conn) -> None:
        pass

    def on_closed(self, conn: Conn, session: Any) -> None:
        self.closed.append(session)


def server(handler: Handler, **kw: Any) -> Server:
    opts = {"max_size": 1024, "heartbeat_s": 10.0, "write_high": 1 << 16, **kw}
    return Server(handler, **opts)


def request_bytes() -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /ws?token=t HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def client_frame(op: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(op, data, fin).serialize(mask=True)


def server_frames(data: bytes) -> list[Frame]:
    """The frames a server wrote after its 101 response."""
    body = data.split(b"\r\n\r\n", 1)[1]
    peer = ClientProtocol(parse_uri("ws://127.0.0.1/ws"), state=State.OPEN)
    peer.receive_data(body)
    return [e for e in peer.events_received() if isinstance(e, Frame)]


async def opened(handler: Handler | None = None, **kw: Any) -> tuple[Conn, Transport, Handler]:
    h = handler or Handler()
    conn = Conn(server(h, **kw))
    t = Transport()
    conn.connection_made(t)  # type: ignore[arg-type]
    conn.data_received(request_bytes())
    for _ in range(5):
        await asyncio.sleep(0)  # the handshake runs in a task
    return conn, t, h


async def test_handshake_then_text_and_binary_messages() -> None:
    conn, t, h = await opened()
    assert t.data.startswith(b"HTTP/1.1 101 ")
    assert conn.session == {"grant": "grant"} and conn.deadline == 0.0
    conn.data_received(client_frame(Opcode.TEXT, '{"a":"é"}'.encode()))
    conn.data_received(client_frame(Opcode.BINARY, b"\x00\x01"))
    assert h.messages == ['{"a":"é"}', b"\x00\x01"]


async def test_refused_handshake_sends_the_response_and_no_session() -> None:
    conn, t, h = await opened(Handler(refuse=True))
    assert t.data.startswith(b"HTTP/1.1 401 ") and t.eof
    assert conn.session is None
    conn.data_received(client_frame(Opcode.TEXT, b"ignored"))
    assert h.messages == []


async def test_a_fragmented_message_arrives_whole() -> None:
    conn, _, h = await opened()
    conn.data_received(client_frame(Opcode.TEXT, b'{"type":', fin=False))
    conn.data_received(client_frame(Opcode.CONT, b'"ack",', fin=False))
    conn.data_received(client_frame(Opcode.CONT, b'"msgIds":[]}'))
    assert h.messages == ['{"type":"ack","msgIds":[]}']


async def test_text_that_is_not_utf8_closes_with_1007() -> None:
    conn, t, h = await opened()
    conn.data_received(client_frame(Opcode.TEXT, b"\xff\xfe"))
    (close,) = server_frames(t.data)
    assert Close.parse(close.data).code == 1007
    assert h.messages == [] and h.closed == [{"grant": "grant"}]


async def test_a_frame_over_max_size_closes_with_1009() -> None:
    conn, t, h = await opened()
    conn.data_received(client_frame(Opcode.TEXT, b"x" * 2000))
    (close,) = server_frames(t.data)
    assert Close.parse(close.data).code == 1009
    assert len(h.closed) == 1


async def test_ping_gets_a_pong_and_a_client_close_is_echoed() -> None:
    conn, t, h = await opened()
    conn.data_received(client_frame(Opcode.PING, b"p1"))
    conn.data_received(client_frame(Opcode.CLOSE, Close(1000, "bye").serialize()))
    pong, close = server_frames(t.data)
    assert pong.opcode is Opcode.PONG and pong.data == b"p1"
    assert Close.parse(close.data).code == 1000
    assert t.eof and len(h.closed) == 1


async def test_close_sends_the_code_once_and_tells_the_handler_once() -> None:
    conn, t, h = await opened()
    conn.close(4001, "replaced")
    conn.close(4001, "replaced")
    (close,) = server_frames(t.data)
    assert Close.parse(close.data) == Close(4001, "replaced")
    assert len(h.closed) == 1 and conn.deadline > 0


async def test_sweep_pings_then_closes_a_silent_peer_then_aborts_it() -> None:
    conn, t, _ = await opened(heartbeat_s=10.0, close_timeout=2.0)
    srv = conn.server
    start = conn.next_ping
    srv.sweep(start - 1)
    assert server_frames(t.data) == []
    srv.sweep(start)
    (ping,) = server_frames(t.data)
    assert ping.opcode is Opcode.PING
    conn.data_received(client_frame(Opcode.PONG, ping.data))
    srv.sweep(start + 10)  # answered: another ping, no close
    assert [f.opcode for f in server_frames(t.data)] == [Opcode.PING, Opcode.PING]
    srv.sweep(start + 20)  # this one was not answered
    last = server_frames(t.data)[-1]
    assert last.opcode is Opcode.CLOSE and Close.parse(last.data).code == 1011
    assert not t.aborted
    srv.sweep(conn.deadline + 0.1)
    assert t.aborted


async def test_sweep_aborts_a_connection_that_never_finishes_its_handshake() -> None:
    srv = server(Handler(), open_timeout=10.0)
    conn = Conn(srv)
    t = Transport()
    conn.connection_made(t)  # type: ignore[arg-type]
    srv.sweep(conn.deadline - 0.1)
    assert not t.aborted
    srv.sweep(conn.deadline + 0.1)
    assert t.aborted


async def test_frames_that_come_with_a_close_frame_still_count() -> None:
    conn, _, h = await opened()
    conn.data_received(
        client_frame(Opcode.TEXT, b"last words")
        + client_frame(Opcode.CLOSE, Close(1000, "").serialize())
        + client_frame(Opcode.TEXT, b"after the close")
    )
    assert h.messages == ["last words"] and len(h.closed) == 1


class EofFails(Transport):
    """uvloop's transport raises from write_eof when the peer reset the socket (OSError)
    or its handle is closed (RuntimeError)."""

    def __init__(self, error: Exception | None = None) -> None:
        super().__init__()
        self.error = error or OSError(107, "Transport endpoint is not connected")

    def write_eof(self) -> None:
        raise self.error


async def opened_on(t: Transport, h: Handler, srv: Server | None = None) -> Conn:
    conn = Conn(srv or server(h))
    conn.connection_made(t)  # type: ignore[arg-type]
    conn.data_received(request_bytes())
    for _ in range(5):
        await asyncio.sleep(0)
    return conn


@pytest.mark.parametrize(
    "error", [OSError(107, "Transport endpoint is not connected"), RuntimeError("closed")]
)
async def test_a_failing_write_eof_aborts_the_transport_instead_of_raising(
    error: Exception,
) -> None:
    h = Handler()
    t = EofFails(error)
    conn = await opened_on(t, h)
    conn.close(1012, "node restarting")
    conn.data_received(client_frame(Opcode.CLOSE, Close(1012, "").serialize()))
    assert t.aborted and not t.closed and len(h.closed) == 1


async def test_a_peer_eof_with_a_failing_write_eof_aborts_the_transport() -> None:
    conn, _, _ = await opened()
    t = EofFails()
    conn.transport = t  # type: ignore[assignment]
    assert conn.eof_received() is False
    assert t.aborted


async def test_a_refused_handshake_with_a_failing_write_eof_aborts_the_transport() -> None:
    h = Handler(refuse=True)
    t = EofFails()
    await opened_on(t, h)
    assert t.data.startswith(b"HTTP/1.1 401 ") and t.aborted


async def test_a_transport_that_cannot_write_eof_is_closed() -> None:
    class NoEof(Transport):
        def can_write_eof(self) -> bool:
            return False

    h = Handler(refuse=True)
    t = NoEof()
    await opened_on(t, h)
    assert t.closed and not t.eof and not t.aborted


async def test_closing_every_socket_goes_on_past_sockets_whose_write_eof_raises() -> None:
    """What a drain does: close each socket with 1012, then each peer echoes the close
    (the server's EOF follows); the failing sockets are aborted, and the sweep after it
    still pings and times out the others."""
    h = Handler()
    srv = server(h, heartbeat_s=10.0, close_timeout=2.0)
    transports = [EofFails(), Transport(), EofFails(RuntimeError("closed")), Transport()]
    conns = [await opened_on(t, h, srv) for t in transports]
    live = await opened_on(Transport(), h, srv)  # not closed: the sweep pings it
    for conn in conns:
        conn.close(1012, "node restarting")
    for conn in conns:
        conn.data_received(client_frame(Opcode.CLOSE, Close(1012, "").serialize()))
    assert [t.aborted for t in transports] == [True, False, True, False]
    assert [t.eof for t in transports] == [False, True, False, True]
    assert len(h.closed) == 4
    srv.sweep(live.next_ping)
    assert [f.opcode for f in server_frames(cast(Transport, live.transport).data)] == [Opcode.PING]
    srv.sweep(conns[1].deadline + 0.1)  # the closes that did not finish are aborted
    assert transports[1].aborted and transports[3].aborted


# -- the short way for plain frames (Conn._fast_frames, text_frame)


async def test_plain_frames_take_the_short_way_and_the_first_other_ends_it() -> None:
    conn, t, h = await opened()
    assert conn._fast  # nothing was read after the request: the parser stands at a frame
    conn.data_received(
        client_frame(Opcode.TEXT, b"one")
        + client_frame(Opcode.PING, b"p")
        + b"".join(client_frame(Opcode.BINARY, bytes([i])) for i in range(3))
    )
    conn.data_received(client_frame(Opcode.TEXT, "é".encode() * 100))  # 2-byte length
    assert conn._fast and h.messages == ["one", b"\x00", b"\x01", b"\x02", "é" * 100]
    (pong,) = server_frames(t.data)
    assert pong.opcode is Opcode.PONG and pong.data == b"p"
    frame = client_frame(Opcode.TEXT, b"cut by tcp")
    conn.data_received(frame[:5])  # a frame cut short: websockets from here on
    assert not conn._fast
    conn.data_received(frame[5:] + client_frame(Opcode.TEXT, b"next"))
    assert h.messages[-2:] == ["cut by tcp", "next"]


async def test_bytes_read_after_the_request_keep_websockets_parsing() -> None:
    """A client that sent a frame before the 101 (the RFC says it waits): websockets'
    parser may stand inside a frame, so every frame goes to it."""
    h = Handler()
    conn = Conn(server(h))
    t = Transport()
    conn.connection_made(t)  # type: ignore[arg-type]
    frame = client_frame(Opcode.TEXT, b"early")
    conn.data_received(request_bytes() + frame[:6])  # a header, no payload yet
    for _ in range(5):
        await asyncio.sleep(0)
    assert t.data.startswith(b"HTTP/1.1 101 ") and not conn._fast
    conn.data_received(frame[6:] + client_frame(Opcode.TEXT, b"then"))
    assert h.messages == ["early", "then"]  # read whole, by websockets


def raw_frame(
    rng: random.Random, op: int, payload: bytes, head: int = 0x80, masked: bool = True
) -> bytes:
    """A client frame as bytes, its length mostly in the shortest form, sometimes in a
    longer one (which websockets reads, and which takes the socket off the short way)."""
    size = len(payload)
    forms = [n for n, fits in ((0, size < 126), (1, size < 65536), (2, True)) if fits]
    form = forms[0] if rng.random() < 0.95 else rng.choice(forms)
    bits = 0x80 if masked else 0
    if form == 0:
        out = bytes((head | op, bits | size))
    elif form == 1:
        out = bytes((head | op, bits | 126)) + size.to_bytes(2, "big")
    else:
        out = bytes((head | op, bits | 127)) + size.to_bytes(8, "big")
    if not masked:
        return out + payload
    mask = rng.randbytes(4)
    return out + mask + bytes(b ^ mask[k % 4] for k, b in enumerate(payload))


def plain_frame(rng: random.Random, limit: int) -> bytes:
    """A frame websockets reads and the socket lives on: data up to the limit, pings
    and pongs, a fragmented message, odd length forms."""
    kind = rng.choice(["text"] * 4 + ["binary"] * 2 + ["edge", "ping", "pong"])
    if rng.random() < 0.03:
        kind = "frag"
    if kind == "text":
        text = rng.choice(["x", "é", "{}"]) * rng.randrange(0, 300)
        return raw_frame(rng, 1, text.encode())
    if kind == "binary":
        return raw_frame(rng, 2, rng.randbytes(rng.randrange(0, 200)))
    if kind == "edge":
        return raw_frame(rng, 2, b"e" * rng.choice([0, 125, 126, limit - 1, limit]))
    if kind in ("ping", "pong"):
        return raw_frame(rng, 9 if kind == "ping" else 10, rng.randbytes(rng.randrange(0, 126)))
    return raw_frame(rng, 1, b"a", head=0) + raw_frame(rng, 0, b"b")


def last_frame(rng: random.Random, limit: int) -> bytes:
    """Nothing, or a frame after which the socket closes: over the limit, bad UTF-8, a
    close, or one the RFC refuses (RSV bits, unmasked, a reserved opcode, a control
    frame over 125 bytes or not final, a stray continuation)."""
    choices = [
        b"",
        raw_frame(rng, 2, b"z" * (limit + 1)),
        raw_frame(rng, 1, b"ok\xff"),
        raw_frame(rng, 8, Close(1000, "bye").serialize()),
        raw_frame(rng, 1, b"rsv", head=0x80 | 0x40),
        raw_frame(rng, 1, b"bare", masked=False) + client_frame(Opcode.TEXT, b"x" * 40),
        raw_frame(rng, rng.choice([3, 7, 11, 15]), b"op"),
        raw_frame(rng, 9, b"p" * 126),
        raw_frame(rng, 9, b"p", head=0),
        raw_frame(rng, 0, b"stray"),
    ]
    return rng.choice(choices)


@pytest.mark.parametrize("limit", [1024, 65536])
@pytest.mark.parametrize("seed", range(100))
async def test_any_stream_in_any_pieces_is_read_as_websockets_reads_it(
    seed: int, limit: int
) -> None:
    """Random frames websockets reads, then maybe one that ends the socket, cut into
    random reads: the same messages, the same bytes written, the same end as websockets
    alone, and at most two writes a read (a read's pongs go in one). Not covered, and
    not the same: frames of one read after one that fails the socket, which websockets
    (parsing the whole read first) would still answer (wsserver's docstring)."""
    rng = random.Random(seed)
    frames = [plain_frame(rng, limit) for _ in range(rng.randrange(1, 30))]
    frames.append(last_frame(rng, limit))
    stream = b"".join(frames)
    # reads end mostly where a frame does (as a client writes them), sometimes inside one
    ends = list(itertools.accumulate(len(f) for f in frames))[:-1]
    cuts = {rng.choice(ends) if ends and rng.random() < 0.8 else rng.randrange(1, len(stream))}
    cuts |= {rng.choice(ends) for _ in range(rng.randrange(0, 8)) if ends}
    cuts = sorted(c for c in cuts if 0 < c < len(stream))
    reads = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    seen = []
    for fast in (True, False):
        conn, t, h = await opened(max_size=limit)
        conn._fast = fast
        writes = Writes(t)
        for read in reads:
            conn.data_received(read)
        assert writes.count <= 2 * len(reads)
        seen.append((h.messages, t.data.split(b"\r\n\r\n", 1)[1], h.closed, conn.close_reason))
    assert seen[0] == seen[1]


class Writes:
    """Counts a transport's writes from now on."""

    def __init__(self, t: Transport) -> None:
        self.count = 0
        write = t.write

        def counted(data: bytes) -> None:
            self.count += 1
            write(data)

        t.write = counted  # type: ignore[method-assign]


async def test_a_read_of_many_pings_is_answered_in_one_write() -> None:
    conn, t, _ = await opened()
    writes = Writes(t)
    conn.data_received(client_frame(Opcode.PING, b"") * CONTROL_BURST)
    assert writes.count == 1 and conn._fast
    assert [f.opcode for f in server_frames(t.data)] == [Opcode.PONG] * CONTROL_BURST


async def test_a_handshake_read_in_pieces_still_takes_the_short_way() -> None:
    h = Handler()
    conn = Conn(server(h))
    conn.connection_made(Transport())  # type: ignore[arg-type]
    request = request_bytes()
    for k in range(0, len(request), 7):
        conn.data_received(request[k : k + 7])
    for _ in range(5):
        await asyncio.sleep(0)
    assert conn._fast and conn._pre is None
    conn.data_received(client_frame(Opcode.TEXT, b"hi"))
    assert h.messages == ["hi"]


@pytest.mark.parametrize("size", [5, 126, 300])
async def test_a_frame_cut_at_any_byte_is_read_whole(size: int) -> None:
    frame = client_frame(Opcode.TEXT, b"c" * size)
    for k in range(1, len(frame)):
        conn, _, h = await opened()
        conn.data_received(frame[:k])
        conn.data_received(frame[k:] + client_frame(Opcode.TEXT, b"after"))
        assert h.messages == ["c" * size, "after"], k


async def test_nothing_is_answered_after_a_frame_fails_the_socket() -> None:
    """Bad UTF-8, then a ping in the same read: the close goes out, and no pong after
    it (websockets, parsing the whole read first, would answer the ping before)."""
    conn, t, h = await opened()
    conn.data_received(client_frame(Opcode.TEXT, b"\xff") + client_frame(Opcode.PING, b"p"))
    close = Frame(Opcode.CLOSE, Close(1007, "invalid UTF-8").serialize())
    assert t.data.split(b"\r\n\r\n", 1)[1] == close.serialize(mask=False)  # and no more
    assert t.eof and len(h.closed) == 1


async def test_a_long_handshake_is_not_kept_and_never_takes_the_short_way() -> None:
    conn = Conn(server(Handler()))
    conn.connection_made(Transport())  # type: ignore[arg-type]
    request = request_bytes()
    padding = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 4000) for i in range(5))
    conn.data_received(request[:-2] + padding)
    assert conn._pre is None  # past MAX_HANDSHAKE_BYTES: nothing more is kept
    conn.data_received(b"\r\n")
    for _ in range(5):
        await asyncio.sleep(0)
    assert conn.session is not None and not conn._fast


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_a_text_frame_is_written_as_websockets_writes_it(size: int) -> None:
    payload = b"y" * size
    assert text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False)


async def opened_on_its_way(
    short_way: bool, t: Transport | None = None, **kw: Any
) -> tuple[Conn, Transport, Handler]:
    """An open socket, on the short way or (after a fragment) on websockets' parser."""
    h = Handler()
    conn = Conn(server(h, **kw))
    t = t or Transport()
    conn.connection_made(t)  # type: ignore[arg-type]
    conn.data_received(request_bytes())
    for _ in range(5):
        await asyncio.sleep(0)
    if not short_way:  # a fragment hands every later read to websockets
        conn.data_received(client_frame(Opcode.TEXT, b"part", fin=False))
    assert conn._fast is short_way
    return conn, t, h


class Unread(Transport):
    """A transport whose peer never reads: everything written stays buffered."""

    def get_write_buffer_size(self) -> int:
        return len(self.data)

    def write(self, data: bytes) -> None:
        assert not self.aborted, "written after the abort"
        super().write(data)


@pytest.mark.parametrize("short_way", [True, False])
async def test_a_peer_that_floods_pings_and_never_reads_is_aborted(short_way: bool) -> None:
    """Each ping is owed a pong; a peer that never reads them is aborted once twice
    max_buffered bytes wait, by the short way and by websockets alike."""
    conn, t, _ = await opened_on_its_way(short_way, Unread(), max_buffered=5_000)
    pings = client_frame(Opcode.PING, b"p" * 125) * 10  # 1,270 bytes of pongs owed
    reads = 0
    while not t.aborted and reads < 100:
        conn.data_received(pings)
        reads += 1
    assert t.aborted and reads == 8  # the 101 and 8 x 1,270 bytes: past the bound
    conn.data_received(pings)  # read before the transport reports the loss: not written


@pytest.mark.parametrize("short_way", [True, False])
@pytest.mark.parametrize("op", [Opcode.PING, Opcode.PONG])
async def test_pings_or_pongs_past_the_burst_close_the_socket(short_way: bool, op: Opcode) -> None:
    """CONTROL_BURST pings or pongs pass; the next closes the socket with 1008 (no pong
    for it on the short way); more while it closes abort it."""
    conn, t, _ = await opened_on_its_way(short_way)
    conn.data_received(client_frame(op, b"") * CONTROL_BURST)
    assert conn.ws.state is State.OPEN
    conn.data_received(client_frame(op, b""))
    assert conn.close_reason == (1008, "too many pings")
    pongs = [f for f in server_frames(t.data) if f.opcode is Opcode.PONG]
    assert len(pongs) == (CONTROL_BURST if op is Opcode.PING else 0) + (
        1 if op is Opcode.PING and not short_way else 0  # websockets answers before
    )
    assert not t.aborted
    conn.data_received(client_frame(op, b""))
    assert t.aborted


async def test_pings_come_back_at_the_rate() -> None:
    """Spent, the budget refills at CONTROL_RATE a second."""
    conn, _, _ = await opened_on_its_way(True)
    conn.data_received(client_frame(Opcode.PING, b"") * CONTROL_BURST)
    assert conn._controls is not None
    conn._controls.stamp -= 5.0  # five seconds later
    conn.data_received(client_frame(Opcode.PING, b"") * int(5 * CONTROL_RATE))
    assert conn.ws.state is State.OPEN
    conn.data_received(client_frame(Opcode.PING, b""))
    assert conn.close_reason == (1008, "too many pings")


async def test_the_sweep_closes_a_socket_with_more_than_max_buffered_unsent() -> None:
    """Whatever wrote it (here the gateway's frames, which the peer does not read), a
    socket with more than max_buffered unsent is closed by the next sweep."""
    conn, _, h = await opened_on_its_way(True, Unread(), max_buffered=5_000)
    srv = conn.server
    conn.send_texts([b"x" * 1000] * 4)
    srv.sweep(0.0)
    assert conn.ws.state is State.OPEN  # under 5,000
    conn.send_texts([b"x" * 1000])
    srv.sweep(0.0)
    assert conn.close_reason == (1008, "client is not reading") and len(h.closed) == 1
