"""The socket side tried as an attacker would (issue "Safe on the open internet"): each
test names the attack and the bound that now holds it, on real nodes and a real Redis."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import jwt
import orjson
import pytest
import redis.asyncio as aioredis
import websockets
from websockets.frames import Frame, Opcode

from chatnode import keys
from tests.integration.harness import (
    FLOOD_ENV,
    Api,
    Client,
    NodeProc,
    Stack,
    connected,
    eventually,
    new_mobile,
    new_user,
    stream_id,
)

Cluster = tuple[NodeProc, NodeProc]
STRICT = {
    "CHATNODE_SEND_RATE": "5",
    "CHATNODE_SEND_BURST": "10",
    "CHATNODE_REFUSALS_BEFORE_CLOSE": "30",
    "CHATNODE_INBOX_LIMIT": "8",
    "CHATNODE_UNACKED_MAX_ENTRIES": "1",
}


@pytest.fixture(scope="module")
def strict(stack: Stack, workdir: Path) -> Iterator[Cluster]:
    """Two nodes with small send limits, a small inbox and room for one unacked entry
    per socket."""
    a = NodeProc(stack, "sock-strict-a", workdir, **STRICT).start()
    b = NodeProc(stack, "sock-strict-b", workdir, **STRICT).start()
    yield a, b
    a.stop()
    b.stop()


async def exchange(sender: Client, recipient: Client, to: str, cid: str) -> dict[str, object]:
    """`sender` sends one message; `recipient` gets and acks it. The message frame."""
    await sender.send_message(to, "hi " + cid, cid=cid)
    got = await recipient.recv_type("message", id=cid)
    await recipient.send({"type": "ack", "msgIds": [got["msgId"]]})
    return got


# -- 1. read receipts name only what was delivered, once, within limits ---------------


async def test_read_naming_messages_never_delivered_stores_nothing(
    api_a: Api, cluster: Cluster, redis: aioredis.Redis
) -> None:
    """The attack: read frames to any number with ~100 made-up ids fill that user's inbox.
    Now ids with no record are dropped (the frame still costs a send token), over 100
    ids are refused, and nothing reaches the victim's inbox."""
    mallory, victim = await new_user(api_a), await new_user(api_a)
    ids = [f"{i:064d}" for i in range(100)]
    async with connected(cluster[0].ws, mallory.token) as m:
        for _ in range(5):
            await m.send({"type": "read", "to": victim.mobile, "ids": ids})
        await m.send({"type": "read", "to": victim.mobile, "ids": [*ids, "one-more"]})
        too_many = await m.recv_type("error")
        assert too_many["code"] == "invalid_frame" and "1 to 100" in too_many["message"]
        assert await m.quiet(0.5, "error") == []
    assert await redis.xlen(keys.inbox(victim.mobile)) == 0


async def test_read_of_an_unknown_number_is_unknown_recipient(api_a: Api, cluster: Cluster) -> None:
    mallory = await new_user(api_a)
    async with connected(cluster[1].ws, mallory.token) as m:
        await m.send({"type": "read", "to": new_mobile(), "ids": ["x1"]})
        assert (await m.recv_type("error"))["code"] == "unknown_recipient"


async def test_a_real_read_receipt_goes_once_per_message(
    api_a: Api, cluster: Cluster, redis: aioredis.Redis
) -> None:
    """Real receipts work as before, across nodes; reading the same message again (or a
    flood of reads naming it) stores no second receipt."""
    alice, bob = await new_user(api_a), await new_user(api_a)
    async with connected(cluster[0].ws, alice.token) as a, connected(cluster[1].ws, bob.token) as b:
        await exchange(a, b, bob.mobile, "r1")
        await a.recv_type("receipt", status="delivered")
        for _ in range(5):
            await b.send({"type": "read", "to": alice.mobile, "ids": ["r1"]})
        receipt = await a.recv_type("receipt", status="read")
        assert receipt["ids"] == ["r1"] and receipt["by"] == bob.mobile
        await a.send({"type": "ack", "msgIds": [receipt["msgId"]]})
        assert await a.quiet(1.0, "receipt") == []
        assert await b.quiet(0.2, "error") == []  # re-reading is no error
    # the delivered receipt, unacked; the read one leaves at alice's trim (lua.TRIM)
    assert await eventually(lambda: redis.xlen(keys.inbox(alice.mobile)), 1) == 1


async def test_a_message_stored_but_not_yet_delivered_cannot_be_read(
    strict: Cluster, http: aiohttp.ClientSession, redis: aioredis.Redis
) -> None:
    """Sockets here hold one entry unacked. Bob holds u1; u2 is read for him but waits on
    the node; u3 waits in Redis, never read for delivery: a read naming u3 is refused
    (invalid_frame), u1 and u2 may be read, and only their receipt is stored."""
    api = Api(http, strict[0].http)
    alice, bob = await new_user(api), await new_user(api)
    async with connected(strict[0].ws, alice.token) as a, connected(strict[1].ws, bob.token) as b:
        await asyncio.sleep(0.5)  # bob is live: u1 and u2 are pushed, not read by his catch-up
        await a.send_message(bob.mobile, "first", cid="u1")
        assert (await b.recv_type("message"))["id"] == "u1"
        await a.send_message(bob.mobile, "second", cid="u2")
        await asyncio.sleep(0.5)  # the node stops taking pushes for bob: he is full
        await a.send_message(bob.mobile, "third", cid="u3")
        await b.send({"type": "read", "to": alice.mobile, "ids": ["u3"]})
        assert (await b.recv_type("error"))["code"] == "invalid_frame"
        await b.send({"type": "read", "to": alice.mobile, "ids": ["u1", "u2"]})
        assert await b.quiet(0.5, "error") == []
    entries = await redis.xrange(keys.inbox(alice.mobile))
    assert [(e[1]["s"], e[1]["i"]) for e in entries] == [("read", "u1,u2")]


async def test_two_acks_of_one_message_make_one_delivered_receipt(
    api_a: Api, cluster: Cluster, redis: aioredis.Redis
) -> None:
    alice, bob = await new_user(api_a), await new_user(api_a)
    async with connected(cluster[0].ws, alice.token) as a:
        await a.send_message(bob.mobile, "once", cid="d1")
    async with connected(cluster[1].ws, bob.token) as b:
        got = await b.recv_type("message")
        ack = orjson.dumps({"type": "ack", "msgIds": [got["msgId"]]}).decode()
        await b.ws.send(ack)
        await b.ws.send(ack)
        assert await b.quiet(1.0, "error") == []
    entries = await redis.xrange(keys.inbox(alice.mobile))
    assert [(e[1]["s"], e[1]["i"]) for e in entries] == [("delivered", "d1")]


async def test_delivered_receipts_of_an_owner_who_never_acks_are_bounded(
    strict: Cluster, http: aiohttp.ClientSession, redis: aioredis.Redis
) -> None:
    """Two accounts: M1 sends, M2 acks, M1 never acks. M1's inbox once grew by one
    receipt per message without end; now at most twice the inbox limit (8 here), and
    M2's acks go through all the same."""
    api = Api(http, strict[0].http)
    m1, m2 = await new_user(api), await new_user(api)
    async with connected(strict[0].ws, m1.token) as a, connected(strict[1].ws, m2.token) as b:
        for i in range(20):
            await a.send_message(m2.mobile, "x", cid=f"e{i}")
            got = await b.recv_type("message", id=f"e{i}")
            await b.send({"type": "ack", "msgIds": [got["msgId"]]})
            await asyncio.sleep(0.21)  # within the send rate
        assert await b.quiet(0.5, "error") == []
    assert await redis.xlen(keys.inbox(m1.mobile)) == 16
    assert (
        await eventually(lambda: redis.xlen(keys.inbox(m2.mobile)), 0) == 0
    )  # acked: gone at the trim


async def test_reads_cost_send_tokens(strict: Cluster, http: aiohttp.ClientSession) -> None:
    api = Api(http, strict[0].http)
    alice, bob = await new_user(api), await new_user(api)
    async with connected(strict[0].ws, alice.token) as a, connected(strict[1].ws, bob.token) as b:
        await exchange(a, b, bob.mobile, "t1")
        for _ in range(15):
            await b.send({"type": "read", "to": alice.mobile, "ids": ["t1"]})
        errors = await b.quiet(1.5, "error")
    assert errors and {e["code"] for e in errors} == {"rate_limited"}
    assert len(errors) >= 4  # a burst of 10, less the one ack-free exchange


async def test_read_receipts_count_against_the_inbox_limit(
    strict: Cluster, http: aiohttp.ClientSession, redis: aioredis.Redis
) -> None:
    """Read receipts wait in the sender's inbox like messages, within its limit (8 here)."""
    api = Api(http, strict[0].http)
    alice, bob = await new_user(api), await new_user(api)
    async with connected(strict[0].ws, alice.token) as a, connected(strict[1].ws, bob.token) as b:
        for i in range(4):
            await exchange(a, b, bob.mobile, f"m{i}")
        await a.close()  # alice keeps her 4 delivered receipts unacked
        for _ in range(4):
            await redis.xadd(keys.inbox(alice.mobile), {"k": "m", "f": "x", "i": "p", "t": "1"})
        assert await redis.xlen(keys.inbox(alice.mobile)) == 8
        await b.send({"type": "read", "to": alice.mobile, "ids": ["m0"]})
        assert (await b.recv_type("error"))["code"] == "inbox_full"
    assert await redis.xlen(keys.inbox(alice.mobile)) == 8
    # once there is room, the same read counts (it was not used up by the refusal)
    await redis.xtrim(keys.inbox(alice.mobile), maxlen=0)
    async with connected(strict[1].ws, bob.token) as b:
        await b.send({"type": "read", "to": alice.mobile, "ids": ["m0"]})
        assert await b.quiet(0.5, "error") == []
    assert await redis.xlen(keys.inbox(alice.mobile)) == 1


# -- 2. what one socket holds unacked is bounded --------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_a_reader_that_never_acks_holds_a_bounded_window(
    stack: Stack, workdir: Path, http: aiohttp.ClientSession, redis: aioredis.Redis
) -> None:
    """The attack: read fast, never ack, and the node keeps the whole inbox (here 3,000
    entries of 10 KB, 30 MB) in memory and re-sends it every interval. Now the socket
    gets at most 256 entries / 1 MiB unacked; node RSS stays flat; once it acks, every
    entry comes, once and in order."""
    node = NodeProc(stack, f"window-{time.monotonic_ns()}", workdir, **FLOOD_ENV).start()
    try:
        api = Api(http, node.http)
        alice, bob = await new_user(api), await new_user(api)
        inbox = keys.inbox(bob.mobile)
        body = "x" * 10_000
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(3000):
                pipe.xadd(inbox, {"k": "m", "f": alice.mobile, "i": f"c{i}", "b": body, "t": "1"})
            await pipe.execute()
        assert node.proc is not None
        before = rss_bytes(node.proc.pid)
        async with connected(node.ws, bob.token) as b:
            got: list[dict[str, object]] = []
            with pytest.raises(TimeoutError):  # read for 5 s, past two redelivery rounds
                async with asyncio.timeout(5):
                    while True:
                        got.append(await b.recv(timeout=10))
            held = {str(g["msgId"]) for g in got if g["type"] == "message"}
            # one megabyte of 10 KB frames is 100 of them; redelivery resends the same ones
            assert 90 <= len(held) <= 256
            grown = rss_bytes(node.proc.pid) - before
            assert grown < 12 * 1024 * 1024, f"node grew {grown / 2**20:.1f} MiB"
            # now ack everything as it comes: all 3,000 arrive, in stored order, once
            order: list[str] = []
            seen: set[str] = set()
            for g in got:
                if g["type"] == "message" and g["msgId"] not in seen:
                    seen.add(str(g["msgId"]))
                    order.append(str(g["msgId"]))
            await b.send({"type": "ack", "msgIds": order})
            deadline = time.monotonic() + 60
            while len(seen) < 3000 and time.monotonic() < deadline:
                frame = await b.recv(timeout=10)
                if frame["type"] == "message" and frame["msgId"] not in seen:
                    seen.add(str(frame["msgId"]))
                    order.append(str(frame["msgId"]))
                    await b.send({"type": "ack", "msgIds": [frame["msgId"]]})
        assert len(order) == 3000
        assert order == sorted(order, key=stream_id)
    finally:
        node.stop()


def flood_pings(port: int, token: str, most_bytes: int, most_s: float) -> tuple[int, str]:
    """Open a socket with a tiny receive buffer and send 125-byte pings on it, reading
    nothing after the 101, until `most_bytes` or `most_s`. Bytes sent and how it ended:
    "reset" (the node dropped the socket), "stalled" (it stopped reading) or "open"."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sent = 0
    try:
        sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            got = sock.recv(4096)
            assert got, head
            head += got
        assert head.startswith(b"HTTP/1.1 101 "), head
        batch = Frame(Opcode.PING, b"p" * 125).serialize(mask=True) * 500
        deadline = time.monotonic() + most_s
        while sent < most_bytes and time.monotonic() < deadline:
            sock.sendall(batch)
            sent += len(batch)
        return sent, "open"
    except (ConnectionResetError, BrokenPipeError):
        return sent, "reset"
    except TimeoutError:
        return sent, "stalled"
    finally:
        sock.close()


async def test_a_peer_that_floods_pings_and_never_reads_is_dropped(
    stack: Stack, workdir: Path, http: aiohttp.ClientSession
) -> None:
    """The attack: send pings and never read the pongs, so the node parses every ping
    (no frame limit sees them) and its write buffer for the socket grows with every
    pong. Now the node closes the socket past wsserver.CONTROL_BURST pings and drops it
    at the next (the node's keepalive, which would close it too, is set out of the
    way). The write buffer's own bounds have unit tests (test_wsserver)."""
    node = NodeProc(stack, f"pings-{time.monotonic_ns()}", workdir, CHATNODE_HEARTBEAT_S="60")
    node.start()
    try:
        user = await new_user(Api(http, node.http))
        sent, end = await asyncio.to_thread(flood_pings, node.ws_port, user.token, 64 << 20, 30)
        assert end == "reset", (sent, end)
        assert sent < 16 << 20  # what the kernels hold; the node kept 100 pongs
        assert '"ws_too_many_pings"' in node.log_path.read_text()
        async with connected(node.ws, user.token) as c:  # the node serves on
            assert c.hello["type"] == "hello"
    finally:
        node.stop()


# -- 6. a blocked sender cannot tell ---------------------------------------------------


MSG_ID = re.compile(r"^(\d{13})-(\d{1,3})$")


async def test_blocked_sends_get_ids_shaped_like_real_ones(api_a: Api, cluster: Cluster) -> None:
    """A blocked send's id comes from the blocker's stream like a real one, so it never
    repeats another sender's id there, and it moves the sequence on for the next."""
    you, n, friend = await new_user(api_a), await new_user(api_a), await new_user(api_a)
    status, _, _ = await api_a.call(
        "POST", "/block-action/block", {"blockedUserMobileNo": you.mobile}, token=n.token
    )
    assert status == 200
    async with connected(cluster[0].ws, you.token) as y:
        for i in range(3):  # the same millisecond, if the node is fast enough
            await y.send({"type": "send", "id": f"b{i}", "to": n.mobile, "body": "hello"})
            await y.send({"type": "send", "id": f"r{i}", "to": friend.mobile, "body": "hello"})
        acks = [await y.recv_type("accepted") for _ in range(6)]
    for a in acks:  # the same shape as a real id: Redis time in ms, a small sequence
        match = MSG_ID.match(str(a["msgId"]))
        assert match, a
        assert abs(int(match.group(1)) - int(str(a["ts"]))) < 1000
    blocked = [a["msgId"] for a in acks if str(a["id"]).startswith("b")]
    assert len(set(blocked)) == 3  # never the same id twice
    # the blocker's stream hands out ids in order, blocked or not: another sender's
    # message to n in the same millisecond takes the next one, never the same
    async with (
        connected(cluster[1].ws, friend.token) as f,
        connected(cluster[0].ws, you.token) as y,
    ):
        for i in range(10):
            await f.send({"type": "send", "id": f"f{i}", "to": n.mobile, "body": "hi"})
            await y.send({"type": "send", "id": f"x{i}", "to": n.mobile, "body": "hi"})
        ids = [(await f.recv_type("accepted"))["msgId"] for _ in range(10)]
        ids += [(await y.recv_type("accepted"))["msgId"] for _ in range(10)]
    assert len(set(ids)) == 20


# -- 10. misses cost a refusal each; a socket that keeps missing is closed -------------


async def test_sends_to_numbers_without_accounts_close_the_socket(
    strict: Cluster, http: aiohttp.ClientSession
) -> None:
    """Each miss may cost a database look-up: within the send rate, 30 of them (this
    node's CHATNODE_REFUSALS_BEFORE_CLOSE) close the socket with 1008."""
    api = Api(http, strict[0].http)
    mallory = await new_user(api)
    codes = []
    async with connected(strict[0].ws, mallory.token) as m:
        with contextlib.suppress(websockets.ConnectionClosed):
            for i in range(40):
                await m.send({"type": "send", "id": f"x{i}", "to": new_mobile(), "body": "x"})
                codes.append((await m.recv_type("error"))["code"])
                await asyncio.sleep(0.21)  # within the send rate: only the misses count
        assert await m.closed(timeout=10) == 1008
    assert len(codes) == 30 and set(codes) == {"unknown_recipient"}


# -- 15. sockets do not outlive their tokens -----------------------------------------


async def test_a_socket_closes_when_its_token_expires(
    stack: Stack, workdir: Path, http: aiohttp.ClientSession
) -> None:
    """Tokens live 3 s on this node; routes refresh every 2 s: closed with 4003 by 5 s."""
    node = NodeProc(stack, f"ttl-{time.monotonic_ns()}", workdir, CHATNODE_TOKEN_TTL_S="3")
    try:
        user = await new_user(Api(http, node.start().http))
        started = time.monotonic()
        async with connected(node.ws, user.token) as c:
            assert await c.closed(timeout=12) == 4003
        assert time.monotonic() - started < 3 + 2 + 2
    finally:
        node.stop()


async def test_a_revoked_token_closes_its_socket_without_the_logout_message(
    api_a: Api, cluster: Cluster, redis: aioredis.Redis
) -> None:
    """The logout's message to the socket's node was lost (here: never sent; the
    revocation is written straight to Redis): the periodic pass closes it with 4003."""
    user = await new_user(api_a)
    async with connected(cluster[0].ws, user.token) as c:
        jti = jwt.decode(user.token, options={"verify_signature": False})["jti"]
        await redis.set(keys.revoked(jti), "1", ex=60)
        assert await c.closed(timeout=10) == 4003


# -- 18. frames are metered before they are parsed ------------------------------------


async def test_invalid_frames_between_valid_ones_still_close_the_socket(
    api_a: Api, cluster: Cluster
) -> None:
    """19 invalid 60 KB frames, one valid, repeated: once never stopped, now 1008."""
    user, other = await new_user(api_a), await new_user(api_a)
    junk = "{" + "x" * 60_000
    async with connected(cluster[0].ws, user.token) as c:
        with pytest.raises(websockets.ConnectionClosed):
            for _round in range(5):
                for _ in range(19):
                    await c.ws.send(junk)
                await c.send({"type": "typing", "to": other.mobile, "state": "start"})
                await asyncio.sleep(0.05)
            await c.recv(timeout=5)
            while True:
                await c.recv(timeout=5)
        assert c.ws.close_code == 1008


# -- 19. an ack waits for its delivered receipt -------------------------------------


async def test_an_entry_stays_until_its_delivered_receipt_is_stored(
    api_a: Api, cluster: Cluster, redis: aioredis.Redis
) -> None:
    """The receipt for Alice cannot be stored (her inbox key is broken): Bob's ack leaves
    the entry in his inbox, and it comes again; once Alice's inbox works, the next ack
    stores the receipt and removes the entry."""
    alice, bob = await new_user(api_a), await new_user(api_a)
    async with connected(cluster[0].ws, alice.token) as a:
        await a.send_message(bob.mobile, "hello", cid="k1")
    alice_inbox = keys.inbox(alice.mobile)
    await redis.delete(alice_inbox)
    await redis.set(alice_inbox, "not a stream")  # every XADD to it fails
    async with connected(cluster[1].ws, bob.token) as b:
        got = await b.recv_type("message", id="k1")
        await b.send({"type": "ack", "msgIds": [got["msgId"]]})
        error = await b.recv_type("error")
        assert error["code"] == "unavailable"
        assert await redis.xlen(keys.inbox(bob.mobile)) == 1
        again = await b.recv_type("message", id="k1", timeout=10)  # redelivered (2 s here)
        await redis.delete(alice_inbox)
        await redis.xgroup_create(alice_inbox, keys.GROUP, id="0", mkstream=True)
        await b.send({"type": "ack", "msgIds": [again["msgId"]]})
        assert await b.quiet(1.0, "error") == []
    assert (
        await eventually(lambda: redis.xlen(keys.inbox(bob.mobile)), 0) == 0
    )  # acked: gone at the trim
    entries = await redis.xrange(alice_inbox)
    assert [e[1]["s"] for e in entries] == ["delivered"]


# -- 22. reconnecting does not refill the send bucket --------------------------------


def answered(frame: dict[str, object]) -> bool:
    return frame["type"] in ("accepted", "error")


async def test_reconnecting_does_not_refill_send_tokens(
    strict: Cluster, http: aiohttp.ClientSession
) -> None:
    api = Api(http, strict[0].http)
    alice, bob = await new_user(api), await new_user(api)
    async with connected(strict[0].ws, alice.token) as a:
        for i in range(10):
            await a.send({"type": "send", "id": f"s{i}", "to": bob.mobile, "body": "x"})
        answers = [await a.recv_where(answered) for _ in range(10)]
        assert not [r for r in answers if r.get("code") == "rate_limited"]
    async with connected(strict[1].ws, alice.token) as a:  # another node, at once
        for i in range(5):
            await a.send({"type": "send", "id": f"t{i}", "to": bob.mobile, "body": "x"})
        answers = [await a.recv_where(answered) for _ in range(5)]
    assert sum(r["type"] == "error" and r["code"] == "rate_limited" for r in answers) >= 3


# -- 3. the handshake's address behind a trusted proxy --------------------------------


async def bad_handshake(url: str, forwarded_for: str) -> int:
    try:
        async with websockets.connect(
            url + "?token=bad", additional_headers={"X-Forwarded-For": forwarded_for}
        ):
            return 101
    except websockets.InvalidStatus as exc:
        return exc.response.status_code


@pytest.mark.parametrize("trusted", [True, False])
async def test_handshake_limits_key_on_the_forwarded_address_only_behind_a_trusted_proxy(
    stack: Stack, workdir: Path, redis: aioredis.Redis, trusted: bool
) -> None:
    await redis.delete("chatnode:rl:connect-fail-address:{127.0.0.1}")  # other tests' counts
    env = {"CHATNODE_CONNECT_FAILS_PER_ADDRESS": "3", "CHATNODE_CONNECT_WINDOW_S": "30"}
    if trusted:
        env["CHATNODE_TRUSTED_PROXIES"] = "127.0.0.0/8"
    node = NodeProc(stack, f"xff-{trusted}-{time.monotonic_ns()}", workdir, **env).start()
    try:
        first = f"198.51.100.{time.monotonic_ns() % 250}"
        codes = [await bad_handshake(node.ws, first) for _ in range(5)]
        assert codes == [401, 401, 401, 429, 429]
        # another client address: its own budget behind a trusted proxy; none otherwise
        other = await bad_handshake(node.ws, "203.0.113.9, " + first.replace("100", "101"))
        assert other == (401 if trusted else 429)
    finally:
        node.stop()


async def test_misses_are_remembered_and_a_new_signup_is_still_reached_at_once(
    stack: Stack, api_a: Api, cluster: Cluster, redis: aioredis.Redis
) -> None:
    """A miss is not looked up again for a while; a number that signs up meanwhile is in
    Redis at once (signup copies it there), so sends to it work without a look-up."""
    from chatnode import accounts, redisio
    from chatnode.recipients import Recipients

    batcher = redisio.Batcher(stack.redis_url)
    pool = await accounts.create_pool(stack.database_url, max_size=2)
    try:
        recipients = Recipients(pool, batcher)
        ghost = new_mobile()
        assert not await recipients.load(ghost)
        assert recipients.known_missing(ghost)
        await pool.close()  # a second look-up would fail now: it is not made
        assert not await recipients.load(ghost)
        sender = await new_user(api_a)
        status, _, _ = await api_a.call(
            "POST", "/auth/signup", {"name": "Late", "mobileNo": ghost, "password": "password123"}
        )
        assert status == 201
        async with connected(cluster[1].ws, sender.token) as c:
            assert (await c.send_message(ghost, "welcome"))["type"] == "accepted"
    finally:
        await batcher.close()
        await pool.close()
