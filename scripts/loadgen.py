"""The benchmark's load generator: one process drives many chatnode users.

Each user is a plain socket with websockets' sans-I/O client protocol on it (no task per
user), so the generator spends its CPU on frames, not on asyncio machinery, and is not
what limits the run. Every user sends at its share of the paced rate, acks every message
and every receipt it gets (one ack frame per entry, as a phone does), and records:

- send -> accepted, from its own clock;
- send -> message, from the send time the sender wrote into the body;
- send -> delivered receipt, from its own clock;
- duplicates (a msgId delivered twice), and which accepted ids never arrived.

`scripts/bench --client` runs the same load through `chatnode.client.Connection` (a task
and a pump per user, reconnects, outbox, dedupe by msgId, acks after the handler), to
measure the reference client under load; it costs the generator more CPU per message.

With several devices per user (`scripts/bench --devices K`) each device is a socket of
its own: device 0 sends, every device acks what it gets, and loss is judged per device
(each must get every message); a copy of the user's own send on their other devices
is counted apart (`own`).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import orjson
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from chatnode import client as cn

TICK_S = 0.005
SETTLE_S = 2.0  # with several devices: how long copies may trail the last receipt


class Peer(asyncio.Protocol):
    """One user's socket."""

    def __init__(
        self, mobile: str, target: str, url: str, stats: dict[str, Any], device: int = 0
    ) -> None:
        self.mobile = mobile
        self.target = target
        self.device = device  # 0 sends; every device receives
        self.ws = ClientProtocol(parse_uri(url), max_size=2**20)
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sent_at: dict[str, float] = {}  # client id -> send time, until its receipt
        self.accepted: set[str] = set()
        self.got: set[str] = set()
        self.stats = stats
        self.hello = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ws.send_request(self.ws.connect())
        self._flush()

    def _flush(self) -> None:
        data = b"".join(self.ws.data_to_send())
        if data and self.transport is not None:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.ws.receive_data(data)
        now = time.time()
        for event in self.ws.events_received():
            if isinstance(event, Response):
                if event.status_code != 101:
                    self.opened.set_exception(RuntimeError(f"handshake {event.status_code}"))
            elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                self._on_frame(orjson.loads(event.data), now)
        self._flush()

    def _on_frame(self, frame: dict[str, Any], now: float) -> None:
        st = self.stats
        kind = frame["type"]
        if kind == "accepted":
            cid = frame["id"]
            self.accepted.add(cid)
            sent = self.sent_at.get(cid)
            if sent is not None:
                st["accepted_ms"].append((now - sent) * 1000)
        elif kind == "message":
            mid = frame["msgId"]
            if mid in self.got:
                st["duplicated"] += 1
            elif "to" in frame:  # a copy of this user's own send from another device
                self.got.add(mid)
                st["own"] += 1
            else:
                self.got.add(mid)
                st["message_ms"].append((now - float(frame["body"].split(" ", 1)[0])) * 1000)
                st["received"].append(f"{frame['from']}/{frame['id']}#{self.device}")
            self._ack(mid)
        elif kind == "receipt":
            for cid in frame["ids"]:
                sent = self.sent_at.pop(cid, None)
                if sent is not None and frame["status"] == "delivered":
                    st["delivered_ms"].append((now - sent) * 1000)
            self._ack(frame["msgId"])
        elif kind == "hello":
            self.hello = True
            if not self.opened.done():
                self.opened.set_result(None)
        elif kind == "error":
            st["errors"][frame["code"]] = st["errors"].get(frame["code"], 0) + 1

    def _ack(self, msg_id: str) -> None:
        self.ws.send_text(orjson.dumps({"type": "ack", "msgIds": [msg_id]}))

    def send(self, cid: str, body: str) -> None:
        self.sent_at[cid] = time.time()
        self.ws.send_text(
            orjson.dumps({"type": "send", "id": cid, "to": self.target, "body": body})
        )
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("closed before hello"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class ClientPeer:
    """One user's socket as chatnode.client.Connection (`--client`), with the figures a
    Peer records. Redeliveries are the client's to drop: they are counted apart."""

    def __init__(self, u: dict[str, Any], stats: dict[str, Any]) -> None:
        self.mobile = u["mobile"]
        self.target = u.get("target", "")
        self.device = u.get("device", 0)
        self.sent_at: dict[str, float] = {}
        self.accepted: set[str] = set()
        self.stats = stats
        self.conn = cn.Connection(
            u["ws"],
            u["token"],
            on_message=self._message,
            on_receipt=self._receipt,
            on_error=self._error,
            on_accepted=self._accepted,
            max_outbox=1_000_000,  # the paced load decides, not the outbox
            lag_after_s=60,
        )

    async def open(self) -> ClientPeer:
        await self.conn.start(wait_live_s=60)
        return self

    def _accepted(self, a: cn.Accepted) -> None:
        self.accepted.add(a.id)
        sent = self.sent_at.get(a.id)
        if sent is not None:
            self.stats["accepted_ms"].append((time.time() - sent) * 1000)

    def _message(self, m: cn.Message) -> None:
        if m.to is not None:  # a copy of this user's own send from another device
            self.stats["own"] += 1
            return
        self.stats["message_ms"].append((time.time() - float(m.body.split(" ", 1)[0])) * 1000)
        self.stats["received"].append(f"{m.sender}/{m.id}#{self.device}")

    def _receipt(self, r: cn.Receipt) -> None:
        now = time.time()
        for cid in r.ids:
            sent = self.sent_at.pop(cid, None)
            if sent is not None and r.status == "delivered":
                self.stats["delivered_ms"].append((now - sent) * 1000)

    def _error(self, e: cn.ServerError) -> None:
        errors = self.stats["errors"]
        errors[e.error.code] = errors.get(e.error.code, 0) + 1

    def send(self, cid: str, body: str) -> None:
        self.sent_at[cid] = time.time()
        self.conn.queue(self.target, body, id=cid)

    async def close(self) -> None:
        self.stats["redelivered"] = self.stats.get("redelivered", 0) + self.conn.redelivered
        await self.conn.close()


async def connect(u: dict[str, Any], stats: dict[str, Any]) -> Peer:
    """Open one user's socket and wait for its hello."""
    url = f"{u['ws']}?token={u['token']}"
    uri = parse_uri(url)
    _, peer = await asyncio.get_running_loop().create_connection(
        lambda: Peer(u["mobile"], u.get("target", ""), url, stats, u.get("device", 0)),
        uri.host,
        uri.port,
    )
    async with asyncio.timeout(60):
        await peer.opened
    return peer


async def connect_all(
    users: list[dict[str, Any]], stats: dict[str, Any], parallel: int = 50, client: bool = False
) -> tuple[list[Any], int]:
    """Open every user's socket, `parallel` handshakes at a time; (peers, failures).
    `client`: ClientPeers (chatnode.client) instead of Peers."""
    sem = asyncio.Semaphore(parallel)
    failures = 0

    async def one(u: dict[str, Any]) -> Peer | ClientPeer | None:
        nonlocal failures
        async with sem:
            try:
                if client:
                    return await ClientPeer(u, stats).open()
                return await connect(u, stats)
            except (OSError, TimeoutError, RuntimeError, ConnectionError, cn.Closed):
                failures += 1
                return None

    peers = await asyncio.gather(*(one(u) for u in users))
    return [p for p in peers if p is not None], failures


def new_stats() -> dict[str, Any]:
    return {
        "accepted_ms": [],
        "message_ms": [],
        "delivered_ms": [],
        "received": [],
        "duplicated": 0,
        "own": 0,
        "errors": {},
        "sent": 0,
    }


async def worker_main(spec: dict[str, Any]) -> dict[str, Any]:
    stats = new_stats()
    everyone, failures = await connect_all(spec["users"], stats, client=spec.get("client", False))
    if failures:
        raise SystemExit(f"loadgen: {failures} sockets failed to open")
    peers = [p for p in everyone if p.device == 0]  # the senders
    rate, duration = spec["rate"], spec["duration"]
    pad = "x" * max(0, spec["body_bytes"] - 20)
    cpu0 = time.process_time()
    start = time.monotonic()
    sent = 0
    run = os.urandom(4).hex()
    while (elapsed := time.monotonic() - start) < duration:
        due = int(rate * elapsed) - sent
        for _ in range(max(0, due)):
            peer = peers[sent % len(peers)]
            sent += 1
            # fresh per run: a reused id would be a retry, stored once
            peer.send(f"{run}-{sent}", f"{time.time():.6f} {pad}")
        await asyncio.sleep(TICK_S)
    stats["sent"] = sent
    stats["send_seconds"] = time.monotonic() - start
    # drain: wait until every accepted message arrived and every receipt came back
    deadline = time.monotonic() + spec["drain"]
    while time.monotonic() < deadline and any(p.sent_at for p in peers):
        await asyncio.sleep(0.1)
    if len(everyone) > len(peers):
        # a delivered receipt says the first device has it; the copies to the other
        # devices and the senders' own copies may still be on their way (another socket,
        # maybe another process): a moment for them, within the drain, before counting
        await asyncio.sleep(max(0.0, min(SETTLE_S, deadline - time.monotonic())))
    stats["accepted_ids"] = [p.mobile + "/" + cid for p in peers for cid in p.accepted]
    stats["missing_receipts"] = sum(len(p.sent_at) for p in peers)
    stats["cpu_s"] = time.process_time() - cpu0
    await asyncio.gather(*(c for p in everyone if (c := p.close()) is not None))
    return stats


async def idle_main(spec: dict[str, Any], pipe: Any) -> dict[str, Any]:
    """Open the users' sockets, report, keep them open (answering pings) until told."""
    stats = new_stats()
    peers, failures = await connect_all(spec["users"], stats)
    pipe.send({"open": len(peers), "failures": failures})
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, pipe.recv)  # the parent has measured
    closed_early = sum(1 for p in peers if p.transport is None or p.transport.is_closing())
    for p in peers:
        p.close()
    return {"open": len(peers), "failures": failures, "closed_early": closed_early}


def _run(main: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def worker_entry(spec: dict[str, Any], out: Any) -> None:
    """A worker process: run the load, send the figures back through the pipe."""
    out.send(_run(worker_main(spec)))
    out.close()


def idle_entry(spec: dict[str, Any], pipe: Any) -> None:
    """A worker process holding idle sockets; talks to the parent over a duplex pipe."""
    pipe.send(_run(idle_main(spec, pipe)))
    pipe.close()
