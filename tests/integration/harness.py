"""Real Redis, real PostgreSQL and real node processes for the integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import redis.asyncio as aioredis
import websockets
from websockets.asyncio.client import ClientConnection

from chatnode import client as cn
from chatnode import devstack
from chatnode.devcluster import RedisCluster
from tests.pgutil import ensure_database

TEST_DB = "chatnode_test"
JWT_SECRET = "test-secret-" + "x" * 32
NODE_ENV = {
    "CHATNODE_JWT_SECRET": JWT_SECRET,
    "CHATNODE_BCRYPT_ROUNDS": "4",
    "CHATNODE_HEARTBEAT_S": "2",
    "CHATNODE_REDELIVERY_S": "2",
    "CHATNODE_INBOX_LIMIT": "25",
    "CHATNODE_ROUTE_TTL_S": "6",
    "CHATNODE_LOG_FORMAT": "json",
    # every test client is 127.0.0.1: the per-address and per-user limits have tests of
    # their own on nodes with small limits
    "CHATNODE_SIGNUPS_PER_ADDRESS": "1000000",
    "CHATNODE_LOOKUPS_PER_USER": "1000000",
    "CHATNODE_LOOKUPS_PER_ADDRESS": "1000000",
}
# A node for floods: a big inbox and no send or frame limits worth the name.
FLOOD_ENV = {
    "CHATNODE_INBOX_LIMIT": "5000",
    "CHATNODE_SEND_RATE": "100000",
    "CHATNODE_SEND_BURST": "100000",
    "CHATNODE_FRAME_RATE": "100000",
    "CHATNODE_FRAME_BURST": "100000",
}


@dataclass
class Stack:
    redis_url: str
    database_url: str
    owned: list[Any] = field(default_factory=list)

    def stop(self) -> None:
        for service in reversed(self.owned):
            service.stop()
            if isinstance(service, devstack.PostgresServer):
                shutil.rmtree(service.data_dir, ignore_errors=True)


async def _redis_answers(url: str) -> bool:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


async def clustered(url: str) -> bool:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool((await client.info("cluster")).get("cluster_enabled"))
    finally:
        await client.aclose()


async def on_every_node(redis: Any, *command: Any) -> None:
    """A command with no key on the Redis, or on every node of a cluster."""
    if isinstance(redis, aioredis.RedisCluster):
        for node in redis.get_nodes():
            await node.execute_command(*command)
    else:
        await redis.execute_command(*command)


async def start_stack(tmp: Path) -> Stack:
    """Use the machine's Redis and PostgreSQL when they answer, else start private ones.
    CHATNODE_TEST_REDIS_CLUSTER=1: a private Redis Cluster (3 primaries, a replica each)
    instead of Redis; the tests that run there (scripts/test) run on it."""
    redis_url = os.environ.get("CHATNODE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    owned: list[Any] = []
    embedded = os.environ.get("CHATNODE_TEST_EMBEDDED") == "1"  # prove the no-services path
    if os.environ.get("CHATNODE_TEST_REDIS_CLUSTER") == "1":
        many = await asyncio.to_thread(RedisCluster(tmp / "redis-cluster").start)
        owned.append(many)
        redis_url = many.url
    elif embedded or not await _redis_answers(redis_url):
        server = devstack.RedisServer(tmp / "redis", fsync="everysec").start()
        owned.append(server)
        redis_url = server.url
    database_url = os.environ.get("CHATNODE_TEST_DATABASE_URL", "")
    if not database_url:
        admin = "postgresql://127.0.0.1:5432/postgres"
        if not embedded and await ensure_database(admin, TEST_DB):
            database_url = f"postgresql://127.0.0.1:5432/{TEST_DB}"
        else:
            # PostgreSQL runs unprivileged when we are root: give it a folder it can reach.
            pg_dir = Path(tempfile.mkdtemp(prefix="chatnode-pg-"))
            os.chmod(pg_dir, 0o755)
            try:
                pg = devstack.PostgresServer(pg_dir, database=TEST_DB).start()
            except Exception:
                for service in owned:
                    service.stop()
                raise
            owned.append(pg)
            database_url = pg.url
    stack = Stack(redis_url, database_url, owned)
    done = await asyncio.to_thread(_migrate, database_url)
    if done.returncode != 0:
        stack.stop()
        raise RuntimeError(f"migrate failed: {done.stderr}")
    return stack


def _migrate(database_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatnode", "migrate"],
        env={**os.environ, "CHATNODE_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class NodeProc:
    """One `chatnode serve` process on free ports."""

    def __init__(self, stack: Stack, node_id: str, log_dir: Path, **env: str) -> None:
        self.node_id = node_id
        # below the ephemeral range: an outgoing connection cannot take them meanwhile
        self.http_port = devstack.free_steady_port()
        self.ws_port = devstack.free_steady_port({self.http_port})
        self.env = {
            **os.environ,
            **NODE_ENV,
            "CHATNODE_REDIS_URL": stack.redis_url,
            "CHATNODE_DATABASE_URL": stack.database_url,
            **env,
        }
        self.log_path = log_dir / f"{node_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/ws"

    def start(self) -> NodeProc:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "chatnode",
                "serve",
                "--node-id",
                self.node_id,
                "--http-port",
                str(self.http_port),
                "--ws-port",
                str(self.ws_port),
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"node {self.node_id} exited: {self.log_path.read_text()[-2000:]}"
                )
            if devstack.port_open(self.ws_port, timeout=0.2) and devstack.port_open(self.http_port):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"node {self.node_id} did not start")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 20) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


_counter = random.randrange(10**6)


def new_mobile() -> str:
    """A number no earlier test used: random prefix, counter suffix."""
    global _counter
    _counter += 1
    return f"+9{random.randrange(10**5):05d}{_counter % 10**6:06d}"


class Api:
    """JSON over HTTP to one node."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        raw: bytes | None = None,
        params: dict[str, str] | None = None,
        forwarded_for: str | None = None,
    ) -> tuple[int, dict[str, Any], Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if forwarded_for is not None:
            headers["X-Forwarded-For"] = forwarded_for
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        if data is not None:
            headers["Content-Type"] = "application/json"
        async with self.session.request(
            method,
            self.base + path,
            data=data,
            headers=headers,
            params=params,
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp:
            text = await resp.read()
            try:
                parsed = orjson.loads(text)
            except orjson.JSONDecodeError:
                parsed = {"raw": text.decode(errors="replace")}
            return resp.status, parsed, resp.headers


@dataclass
class User:
    mobile: str
    name: str
    password: str
    token: str


async def new_user(
    api: Api, name: str = "Tester", password: str = "password123", mobile: str | None = None
) -> User:
    mobile = mobile or new_mobile()
    status, body, _ = await api.call(
        "POST", "/auth/signup", {"name": name, "mobileNo": mobile, "password": password}
    )
    assert status == 201, body
    status, body, _ = await api.call(
        "POST", "/auth/login", {"mobileNo": mobile, "password": password}
    )
    assert status == 200, body
    return User(mobile, name, password, body["token"])


class Client:
    """A test WebSocket client that keeps frames it skipped."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.hello: dict[str, Any] = {}
        self.backlog: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, url: str, token: str) -> Client:
        ws = await websockets.connect(f"{url}?token={token}", open_timeout=10, max_size=2**20)
        client = cls(ws)
        client.hello = await client.recv()
        assert client.hello["type"] == "hello", client.hello
        return client

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(orjson.dumps(frame).decode())

    async def recv(self, timeout: float = 10) -> dict[str, Any]:
        if self.backlog:
            return self.backlog.pop(0)
        async with asyncio.timeout(timeout):
            data = await self.ws.recv()
        frame: dict[str, Any] = orjson.loads(data)
        return frame

    async def recv_type(self, kind: str, timeout: float = 10, **match: Any) -> dict[str, Any]:
        """The next frame of this type (and these field values); others are kept for later."""
        return await self.recv_where(
            lambda f: f["type"] == kind and all(f.get(k) == v for k, v in match.items()), timeout
        )

    async def recv_where(self, wanted: Any, timeout: float = 10) -> dict[str, Any]:
        for i, frame in enumerate(self.backlog):
            if wanted(frame):
                del self.backlog[i]
                return frame
        kept: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    frame = orjson.loads(await self.ws.recv())
                    if wanted(frame):
                        return frame
                    kept.append(frame)
        finally:
            self.backlog.extend(kept)

    async def quiet(self, within: float, kind: str | None = None) -> list[dict[str, Any]]:
        """Frames (of this type) arriving within `within` seconds; expected to be none."""
        got: list[dict[str, Any]] = [f for f in self.backlog if kind is None or f["type"] == kind]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while True:
                    frame = orjson.loads(await self.ws.recv())
                    if kind is None or frame["type"] == kind:
                        got.append(frame)
                    else:
                        self.backlog.append(frame)
        return got

    async def send_message(self, to: str, body: str, cid: str | None = None) -> dict[str, Any]:
        """Send and return the answer to it: `accepted` or `error`."""
        cid = cid or f"c{random.randrange(10**12)}"
        await self.send({"type": "send", "id": cid, "to": to, "body": body})
        return await self.recv_where(
            lambda f: (
                (f["type"] == "accepted" and f.get("id") == cid)
                or (f["type"] == "error" and f.get("ref") == cid)
            )
        )

    async def closed(self, timeout: float = 10) -> int | None:
        """Read until the server closes the socket; its close code."""
        with contextlib.suppress(websockets.ConnectionClosed):
            async with asyncio.timeout(timeout):
                while True:
                    self.backlog.append(orjson.loads(await self.ws.recv()))
        return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()


@contextlib.asynccontextmanager
async def connected(url: str, token: str) -> AsyncIterator[Client]:
    client = await Client.connect(url, token)
    try:
        yield client
    finally:
        await client.close()


def stream_id(msg_id: str) -> tuple[int, int]:
    ms, _, seq = msg_id.partition("-")
    return int(ms), int(seq)


class Resilient:
    """The fault tests' client: chatnode.client.Connection (it reconnects to the nodes
    in turn, resends unaccepted sends with the same id, acks every entry once handled,
    drops redeliveries by msgId), plus what the tests count: sends, their accepted
    msgIds, first deliveries in arrival order (as frames), errors, and when trouble
    came (an error frame, a socket lost)."""

    def __init__(self, user: User, urls: list[str]) -> None:
        self.user = user
        self.urls = urls
        self.sent: dict[str, tuple[str, str]] = {}  # cid -> (to, body)
        self.accepted: dict[str, str] = {}  # cid -> msgId
        self.seen: list[dict[str, Any]] = []  # first deliveries, in arrival order
        self.errors: list[dict[str, Any]] = []
        self.troubles: list[float] = []  # when an error came, or the socket closed
        self._was_live = False
        self.conn = cn.Connection(
            urls,
            user.token,
            on_message=self._message,
            on_receipt=self._receipt,
            on_error=self._error,
            on_accepted=self._accepted,
            on_state=self._state,
            backoff_base_s=0.05,
            backoff_cap_s=1.0,
            max_outbox=10_000,
        )

    async def connect(self, deadline_s: float = 60) -> None:
        await self.conn.start(wait_live_s=deadline_s)

    def on_node(self, url: str) -> None:
        self.conn.url_index = self.urls.index(url)

    @property
    def reconnects(self) -> int:
        return max(0, self.conn.connects - 1)

    @property
    def deliveries(self) -> int:
        """Entries that arrived, redeliveries included."""
        return len(self.seen) + self.conn.redelivered

    def _message(self, m: cn.Message) -> None:
        frame = {"type": "message", "msgId": m.msg_id, "id": m.id, "from": m.sender}
        self.seen.append({**frame, "body": m.body, "ts": m.ts, **({"to": m.to} if m.to else {})})

    def _receipt(self, r: cn.Receipt) -> None:
        frame = {"type": "receipt", "msgId": r.msg_id, "status": r.status, "by": r.by}
        self.seen.append({**frame, "ids": list(r.ids), "ts": r.ts})

    def _error(self, e: cn.ServerError) -> None:
        self.errors.append({"code": e.error.code, "ref": e.error.ref, "message": e.error.message})
        self.troubles.append(time.monotonic())

    def _accepted(self, a: cn.Accepted) -> None:
        self.accepted[a.id] = a.msg_id

    def _state(self, change: cn.StateChange) -> None:
        if change.state is cn.State.LIVE:
            self._was_live = True
        elif change.state is cn.State.CONNECTING and self._was_live:
            self._was_live = False
            self.troubles.append(time.monotonic())

    async def send(self, to: str, body: str, cid: str) -> None:
        self.sent[cid] = (to, body)
        self.conn.queue(to, body, id=cid)

    def messages(self) -> list[dict[str, Any]]:
        return [f for f in self.seen if f["type"] == "message"]

    async def close(self) -> None:
        await self.conn.close()


async def settle(clients: list[Resilient], expect: Any, timeout: float = 60) -> None:
    """Wait until `expect()` holds, resending sends unanswered for 3 s now and then."""
    deadline = time.monotonic() + timeout
    last_resend = time.monotonic()
    while not expect():
        assert time.monotonic() < deadline, "the cluster did not settle"
        await asyncio.sleep(0.2)
        if time.monotonic() - last_resend > 3:
            last_resend = time.monotonic()
            for c in clients:
                c.conn.resend_waiting(3.0)


def report(scenario: str, **figures: Any) -> None:
    """Append one scenario's figures to $CHATNODE_CHAOS_REPORT (scripts/chaos reads it)."""
    path = os.environ.get("CHATNODE_CHAOS_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"scenario": scenario, **figures}) + "\n")


async def auth_event_kinds(database_url: str, mobile: str) -> list[tuple[str, str]]:
    """(kind, node) of a user's auth_events rows, oldest first."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT e.kind, e.node FROM auth_events e JOIN users u ON u.id = e.user_id"
            " WHERE u.mobile_no = $1 ORDER BY e.id",
            mobile,
        )
    finally:
        await conn.close()
    return [(r["kind"], r["node"]) for r in rows]


async def eventually(probe: Callable[[], Awaitable[Any]], want: Any, timeout: float = 10) -> Any:
    """Await `probe()` every 0.1 s until it gives `want` or `timeout` passes; its last
    value (for the caller's assert). For state a node settles on its own, such as
    acked entries leaving the stream at the session's next trim."""
    deadline = time.monotonic() + timeout
    while (value := await probe()) != want and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return value
