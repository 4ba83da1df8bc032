"""A typed asyncio client of chatnode (docs/PROTOCOL.md, v1 to v2).

`Api` speaks the REST side (sign up, log in, devices, blocks, last seen, log out).
`Connection` holds one device's socket: it reconnects with full-jitter exponential
back-off, resends every send not yet accepted with its id (the server stores it once),
drops entries it has seen by `msgId`, acks an entry only after the application's handler
has returned (or, iterating, once the application asks for the next event), and says
what state it is in and why it closed.

    async with Api("http://127.0.0.1:8080") as api:
        login = await api.login("+15550000001", "password123", device="laptop")
        async with Connection(api.ws_url, login.token) as conn:
            sent = await conn.send("+15550000002", "hi")
            receipt = await conn.receipt_for(sent.id, "delivered")

Every wait has a timeout, and every buffer a bound: at most `max_outbox` sends wait for
`accepted`, `max_events` events wait for the application, `max_seen` msgIds are kept
for dedupe.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

log = logging.getLogger("chatnode.client")

__all__ = [
    "Accepted",
    "Api",
    "Blocked",
    "ChatError",
    "Closed",
    "Conflict",
    "Connection",
    "Device",
    "Event",
    "InboxFull",
    "Internal",
    "InvalidCredentials",
    "InvalidData",
    "InvalidFrame",
    "InvalidRequest",
    "LastSeen",
    "LoggedOut",
    "Login",
    "Message",
    "MessageTooBig",
    "NotFound",
    "OutboxFull",
    "PayloadTooLarge",
    "ProtocolBroken",
    "RateLimited",
    "Receipt",
    "Replaced",
    "ServerError",
    "State",
    "StateChange",
    "TooLarge",
    "TooManyDevices",
    "Typing",
    "Unauthorized",
    "Unavailable",
    "UnknownRecipient",
]

# -- errors: one class per protocol error code (docs/PROTOCOL.md, "Error codes")


class ChatError(Exception):
    """An error the server answered: `code` is the protocol's, `status` the HTTP status
    (None on the socket), `ref` the client id of the refused send (socket only)."""

    code = "internal"

    def __init__(self, message: str, status: int | None = None, ref: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.ref = ref


class InvalidRequest(ChatError):
    code = "invalid_request"


class Unauthorized(ChatError):
    code = "unauthorized"


class InvalidCredentials(ChatError):
    code = "invalid_credentials"


class NotFound(ChatError):
    code = "not_found"


class Conflict(ChatError):
    code = "conflict"


class PayloadTooLarge(ChatError):
    code = "payload_too_large"


class Internal(ChatError):
    code = "internal"


class RateLimited(ChatError):
    code = "rate_limited"
    retry_after: float | None = None  # seconds (HTTP's Retry-After)


class Unavailable(ChatError):
    code = "unavailable"


class InvalidFrame(ChatError):
    code = "invalid_frame"


class UnknownRecipient(ChatError):
    code = "unknown_recipient"


class TooLarge(ChatError):
    code = "too_large"


class Blocked(ChatError):
    code = "blocked"


class InboxFull(ChatError):
    code = "inbox_full"


class TooManyDevices(ChatError):
    code = "too_many_devices"


class OutboxFull(ChatError):
    """Client side: `max_outbox` sends already wait for `accepted`."""

    code = "outbox_full"


class Closed(ChatError):
    """The connection closed for good (`close_code`, or None when the client closed it
    or a handshake was refused with `status`); nothing more will be sent or received."""

    code = "closed"

    def __init__(self, message: str, close_code: int | None = None, status: int | None = None):
        super().__init__(message, status)
        self.close_code = close_code


class Replaced(Closed):
    """4001: a newer connection of this device opened (do not reconnect in a loop)."""

    code = "replaced"


class LoggedOut(Closed):
    """4003, or a handshake answered 401: logged out, the token expired or was revoked,
    or the device was removed. Log in again."""

    code = "logged_out"


class MessageTooBig(Closed):
    """1009: a message over 64 KiB."""

    code = "too_big"


class InvalidData(Closed):
    """1007: a text message that was not valid UTF-8."""

    code = "invalid_data"


class ProtocolBroken(Closed):
    """1002: the WebSocket framing was broken."""

    code = "protocol_error"


ERRORS: dict[str, type[ChatError]] = {
    c.code: c
    for c in (
        InvalidRequest,
        Unauthorized,
        InvalidCredentials,
        NotFound,
        Conflict,
        PayloadTooLarge,
        Internal,
        RateLimited,
        Unavailable,
        InvalidFrame,
        UnknownRecipient,
        TooLarge,
        Blocked,
        InboxFull,
        TooManyDevices,
    )
}

# Send errors after which the same frame goes again later (PROTOCOL.md, `send`).
RETRIED = frozenset({"unavailable", "rate_limited", "inbox_full"})
# Async callbacks of events nobody waits for (state, typing, accepted, errors)
# running at once; past this, such an event's callback is skipped (logged), as events()
# drops them when full. close() waits this long for those still running.
MAX_CALLBACK_TASKS = 1000
CALLBACK_DRAIN_S = 5.0

# Close codes after which the client stops (PROTOCOL.md, "Close codes"); the rest
# reconnect: 1012 at once, 1008 after the longest back-off, 1011, 1006 and others with
# back-off.
FINAL_CLOSES: dict[int, tuple[type[Closed], str]] = {
    4001: (Replaced, "replaced: a newer connection of this device opened"),
    4003: (LoggedOut, "logged out, the token expired, or the device was removed"),
    1009: (MessageTooBig, "a message too big"),
    1007: (InvalidData, "a text message that was not UTF-8"),
    1002: (ProtocolBroken, "a WebSocket protocol error"),
}


def error_for(
    code: str, message: str, status: int | None = None, ref: str | None = None
) -> ChatError:
    """The typed error of a protocol error code (an unknown code: ChatError)."""
    cls = ERRORS.get(code)
    if cls is None:
        err = ChatError(message, status, ref)
        err.code = code
        return err
    return cls(message, status, ref)


# -- what the server sends


@dataclass(frozen=True, slots=True)
class Message:
    """A `message`. `to` is set on a copy of your own send from another device (v2)."""

    msg_id: str
    id: str
    sender: str
    body: str
    ts: int
    to: str | None = None


@dataclass(frozen=True, slots=True)
class Receipt:
    """A `receipt`: `by` got (`delivered`) or read (`read`) your messages `ids`. `sender`
    is set on your own read from another device (v2): the messages were `sender`'s."""

    msg_id: str
    status: Literal["delivered", "read"]
    by: str
    ids: tuple[str, ...]
    ts: int
    sender: str | None = None


@dataclass(frozen=True, slots=True)
class Typing:
    sender: str
    typing: bool


class State(enum.Enum):
    CONNECTING = "connecting"  # no socket yet, or between attempts
    LIVE = "live"  # `hello` came: sends go, entries arrive
    LAGGING = "lagging"  # live, but a send has waited more than `lag_after_s`
    CLOSED = "closed"  # for good: `Connection.closed_by` says why


@dataclass(frozen=True, slots=True)
class StateChange:
    state: State
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ServerError:
    """An `error` frame that answers no send of this client (an ack, a read, typing)."""

    error: ChatError


Event = Message | Receipt | Typing | StateChange | ServerError


@dataclass(frozen=True, slots=True)
class Accepted:
    id: str
    msg_id: str
    ts: int


# -- REST


@dataclass(frozen=True, slots=True)
class Login:
    token: str
    expires_in: int
    device_id: str | None  # a login that named its device (v2)


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    name: str
    created_at: str
    last_seen: str | None


@dataclass(frozen=True, slots=True)
class LastSeen:
    mobile: str
    username: str
    last_seen: str | None  # "online", an ISO time, or None (never, or they blocked you)

    @property
    def online(self) -> bool:
        return self.last_seen == "online"


class Api:
    """The REST side of one node (or a load balancer in front of several). `ws_url` is
    the socket's URL: given, or the HTTP URL's host with `ws_port` and path `/ws`."""

    def __init__(
        self,
        base_url: str,
        ws_url: str | None = None,
        *,
        ws_port: int | None = None,
        timeout_s: float = 15.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        if ws_url is None:
            parts = urlsplit(self.base_url)
            scheme = "wss" if parts.scheme == "https" else "ws"
            host = parts.hostname or "127.0.0.1"
            port = ws_port if ws_port is not None else parts.port
            netloc = f"{host}:{port}" if port else host
            ws_url = urlunsplit((scheme, netloc, "/ws", "", ""))
        self.ws_url = ws_url
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _call(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> dict[str, Any]:
        if self._http is None:  # idle connections go before the server's 10 s do
            connector = aiohttp.TCPConnector(keepalive_timeout=5)
            self._http = aiohttp.ClientSession(timeout=self._timeout, connector=connector)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            async with self._http.request(
                method, self.base_url + path, json=body, headers=headers
            ) as resp:
                text = await resp.text()
                retry_after = resp.headers.get("Retry-After")
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as e:
            raise Unavailable(f"{method} {path}: {e.__class__.__name__}: {e}") from e
        try:
            answer = orjson.loads(text) if text else {}
        except ValueError:
            answer = {}
        if not isinstance(answer, dict):
            answer = {}
        if status >= 400:  # {"success": false, "error": {"code", "message"}}
            body = answer.get("error")
            body = body if isinstance(body, dict) else {}
            err = error_for(
                str(body.get("code", "internal")), str(body.get("message", text)), status
            )
            if isinstance(err, RateLimited) and retry_after:
                with contextlib.suppress(ValueError):
                    err.retry_after = float(retry_after)
            raise err
        return answer

    async def signup(self, name: str, mobile: str, password: str) -> str:
        """Sign up; the new user's id."""
        body = {"name": name, "mobileNo": mobile, "password": password}
        return str((await self._call("POST", "/auth/signup", body))["id"])

    async def login(self, mobile: str, password: str, device: str | None = None) -> Login:
        """Log in as `device` (v2: a name; made if new), or as a v1 client (`default`)."""
        body: dict[str, Any] = {"mobileNo": mobile, "password": password}
        if device is not None:
            body["device"] = device
        a = await self._call("POST", "/auth/login", body)
        device_id = a.get("deviceId")
        return Login(
            str(a["token"]), int(a["expiresIn"]), None if device_id is None else str(device_id)
        )

    async def logout(self, token: str) -> None:
        await self._call("POST", "/auth/logout", token=token)

    async def devices(self, token: str) -> list[Device]:
        data = (await self._call("GET", "/devices", token=token))["data"]
        return [
            Device(str(d["deviceId"]), str(d["name"]), str(d["createdAt"]), d.get("lastSeen"))
            for d in data
        ]

    async def remove_device(self, token: str, device_id: str) -> None:
        await self._call("DELETE", f"/devices/{quote(device_id, safe='')}", token=token)

    async def block(self, token: str, mobile: str) -> None:
        await self._call("POST", "/block-action/block", {"blockedUserMobileNo": mobile}, token)

    async def unblock(self, token: str, mobile: str) -> None:
        await self._call("DELETE", f"/block-action/unblock?mobileNo={quote(mobile)}", token=token)

    async def blocked(self, token: str) -> list[str]:
        """The numbers you blocked, oldest block first."""
        data = (await self._call("GET", "/block-action/list", token=token))["data"]
        return [str(d["mobileNo"]) for d in data]

    async def last_seen(self, token: str, mobile: str) -> LastSeen:
        d = (await self._call("GET", f"/profile/lastseen?mobileNo={quote(mobile)}", token=token))[
            "data"
        ]
        return LastSeen(str(d["mobileNo"]), str(d["username"]), d.get("lastSeen"))


# -- the socket


def new_id() -> str:
    """A client id for a send: 22 characters of [A-Za-z0-9_-]."""
    return secrets.token_urlsafe(16)


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """Full jitter: a uniform wait in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap_s, base_s * (2 ** min(attempt, 30))))


@dataclass
class _Outgoing:
    frame: str
    to: str
    future: asyncio.Future[Accepted]
    since: float
    tries: int = 0
    on_wire: bool = False  # sent on the current socket, answer due
    retry_at: float = 0.0


Handler = Callable[[Any], Awaitable[None] | None]


@dataclass
class _Handlers:
    message: Handler | None = None
    receipt: Handler | None = None
    typing: Handler | None = None
    state: Handler | None = None
    error: Handler | None = None
    accepted: Handler | None = None


class Connection:
    """One device's socket, kept open until `close()` or a final close code.

    `ws_url` is one URL (a load balancer's), or several (nodes): each attempt after a
    failure or a closed socket takes the next. Events go to the callbacks given
    (`on_message`, `on_receipt`, `on_typing`, `on_state`; `on_error` for every `error`
    frame as a ServerError, those that answer a send too, which `send()` raises or the
    client retries; `on_accepted` for each Accepted; plain or async functions), or,
    without callbacks for them, to `events()`. An entry (`Message`, `Receipt`) is acked
    once its callback returned, or once the loop over `events()` asks for the next
    event; an entry whose callback raised is not acked (the server sends it again after
    a reconnect)."""

    def __init__(
        self,
        ws_url: str | list[str],
        token: str,
        *,
        on_message: Handler | None = None,
        on_receipt: Handler | None = None,
        on_typing: Handler | None = None,
        on_state: Handler | None = None,
        on_error: Handler | None = None,
        on_accepted: Handler | None = None,
        backoff_base_s: float = 0.25,
        backoff_cap_s: float = 15.0,
        open_timeout_s: float = 10.0,
        lag_after_s: float = 5.0,
        max_outbox: int = 1000,
        max_events: int = 1000,
        max_seen: int = 20_000,
    ) -> None:
        self.urls = [ws_url] if isinstance(ws_url, str) else list(ws_url)
        self.url_index = 0  # which of `urls` the next attempt takes
        self.token = token
        self._handlers = _Handlers(
            on_message, on_receipt, on_typing, on_state, on_error, on_accepted
        )
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.open_timeout_s = open_timeout_s
        self.lag_after_s = lag_after_s
        self.max_outbox = max_outbox
        self.max_seen = max_seen
        self.state = State.CONNECTING
        self.closed_by: Closed | None = None
        self.hello: dict[str, Any] = {}
        self.connects = 0  # sockets opened so far
        self.redelivered = 0  # entries that came again after they were handled (dropped)
        self._outbox: OrderedDict[str, _Outgoing] = OrderedDict()
        self._accepted: OrderedDict[str, Accepted] = OrderedDict()  # the latest max_outbox
        self._seen: OrderedDict[str, None] = OrderedDict()  # msgIds handed over (dedupe)
        self._events: asyncio.Queue[Event] = asyncio.Queue(max_events)
        self._unacked: deque[str] = deque()  # handed to events(), acked at the next ask
        self._pending: set[str] = set()  # msgIds queued for or handed to events(), unacked
        self._receipt_waiters: dict[tuple[str, str], asyncio.Future[Receipt]] = {}
        # the latest receipts by (client id, status), for receipt_for called late
        self._receipts: OrderedDict[tuple[str, str], Receipt] = OrderedDict()
        self._ws: ClientConnection | None = None
        self._runner: asyncio.Task[None] | None = None
        self._callbacks: set[asyncio.Task[Any]] = set()  # async callbacks still running
        self._live = asyncio.Event()
        self._closed = asyncio.Event()
        self._wake = asyncio.Event()  # something for the pump to write

    # -- lifetime

    async def __aenter__(self) -> Connection:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, wait_live_s: float | None = 15.0) -> None:
        """Start connecting; wait (at most `wait_live_s`; None: not at all) for `hello`.
        Raises Closed if the connection closed for good meanwhile."""
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name="chatnode-client")
            self._runner.add_done_callback(self._ran)
        if wait_live_s is not None:
            try:
                await self.wait_live(wait_live_s)
            except BaseException:  # not live in time, or closed: nothing keeps retrying
                await self.close()
                raise

    def _not_in_a_handler(self, what: str) -> None:
        """Handlers run on the task that reads the socket: waiting there for an answer
        would wait for ever (the answer is not read until the handler returns)."""
        if self._runner is not None and asyncio.current_task() is self._runner:
            raise RuntimeError(f"{what}() cannot wait inside a handler: use queue()")

    def _ran(self, task: asyncio.Task[None]) -> None:
        """The loop ended: a bug in it ends the connection for good, and says so."""
        if not task.cancelled() and task.exception() is not None:
            self._finish(Closed(f"the client failed: {task.exception()!r}"))

    async def wait_live(self, timeout_s: float) -> None:
        """Wait (at most `timeout_s`) until the socket is live; Closed if it closed."""
        if not self._live.is_set() and self.closed_by is None:
            waiters = {asyncio.ensure_future(e.wait()) for e in (self._live, self._closed)}
            try:
                async with asyncio.timeout(timeout_s):
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
        if self.closed_by is not None:
            raise self.closed_by

    async def close(self) -> None:
        """Close for good: the socket closes with 1000, sends waiting fail with Closed;
        async callbacks still running get CALLBACK_DRAIN_S to end, then are cancelled."""
        self._finish(Closed("closed by the client"))
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await ws.close()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
        running = [t for t in self._callbacks if t is not asyncio.current_task()]
        if not running:
            return
        late: set[asyncio.Task[Any]] = set(running)
        try:
            _, late = await asyncio.wait(running, timeout=CALLBACK_DRAIN_S)
        finally:  # close() itself cancelled: those left are cancelled all the same
            for task in late:
                task.cancel()
        if late:  # one that ignores its cancel is left behind, not waited for forever
            await asyncio.wait(late, timeout=CALLBACK_DRAIN_S)

    def _finish(self, why: Closed) -> None:
        if self.closed_by is not None:
            return
        self.closed_by = why
        for out in self._outbox.values():
            if not out.future.done():
                out.future.set_exception(why)
        self._outbox.clear()
        for fut in self._receipt_waiters.values():
            if not fut.done():
                fut.set_exception(why)
        self._receipt_waiters.clear()
        self._closed.set()
        self._set_state(State.CLOSED, str(why))

    def _set_state(self, state: State, reason: str = "") -> None:
        if state is self.state and state is not State.CLOSED:
            return
        self.state = state
        if state is State.LIVE or state is State.LAGGING:
            self._live.set()
        else:
            self._live.clear()
        self._emit(StateChange(state, reason), self._handlers.state)

    # -- sending

    async def send(
        self, to: str, body: str, id: str | None = None, timeout_s: float = 30.0
    ) -> Accepted:
        """Send `body` to `to` and wait (at most `timeout_s`) for `accepted`. The send is
        resent with the same id after every reconnect, and after `unavailable`,
        `rate_limited` or `inbox_full`, until it is accepted or refused for good (a
        typed ChatError). If the wait times out, the send stays in the outbox and goes
        on being resent: `accepted(id)` waits for it again; `cancel(id)` drops it."""
        self.queue(to, body, id=(cid := id or new_id()))
        return await self.accepted(cid, timeout_s)

    def queue(self, to: str, body: str, id: str | None = None) -> str:
        """Put a send in the outbox without waiting; its client id."""
        if self.closed_by is not None:
            raise self.closed_by
        cid = id or new_id()
        if cid in self._outbox:
            return cid
        if len(self._outbox) >= self.max_outbox:
            raise OutboxFull(f"{self.max_outbox} sends already wait for accepted")
        frame = _text({"type": "send", "id": cid, "to": to, "body": body})
        fut: asyncio.Future[Accepted] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_consume)
        self._outbox[cid] = _Outgoing(frame, to, fut, time.monotonic())
        self._wake.set()
        return cid

    async def accepted(self, id: str, timeout_s: float = 30.0) -> Accepted:
        """The `accepted` of the send with this id: waited for (at most `timeout_s`), or
        one of the latest `max_outbox` already in. KeyError: no such send."""
        done = self._accepted.get(id)
        if done is not None:
            return done
        self._not_in_a_handler("accepted")
        out = self._outbox.get(id)
        if out is None:
            raise KeyError(f"no send with id {id!r} waits")
        return await asyncio.wait_for(asyncio.shield(out.future), timeout_s)

    def cancel(self, id: str) -> bool:
        """Drop a send from the outbox (it may have been stored already)."""
        out = self._outbox.pop(id, None)
        if out is None:
            return False
        out.future.cancel()
        return True

    def resend_waiting(self, older_than_s: float) -> None:
        """Send again, on the socket now open, each send that has waited more than
        `older_than_s` for its answer (stored once, whatever the answer's fate)."""
        now = time.monotonic()
        for out in self._outbox.values():
            if now - out.since > older_than_s:
                out.on_wire = False
        self._wake.set()

    @property
    def outbox(self) -> list[str]:
        """Client ids of the sends not accepted yet, oldest first."""
        return list(self._outbox)

    async def read(self, to: str, ids: list[str]) -> None:
        """Tell `to` that you read their messages `ids` (client ids), 100 at a time."""
        for i in range(0, len(ids), 100):
            await self._send_now({"type": "read", "to": to, "ids": ids[i : i + 100]})

    async def typing(self, to: str, typing: bool = True) -> None:
        """Typing to `to`, or stopped. Best effort: dropped when not live."""
        if self._ws is not None and self._live.is_set():
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(
                    _text({"type": "typing", "to": to, "state": "start" if typing else "stop"})
                )

    async def _send_now(self, frame: dict[str, Any], timeout_s: float = 15.0) -> None:
        await self.wait_live(timeout_s)
        ws = self._ws
        if ws is None:
            raise Unavailable("the socket closed; try again")
        try:
            await ws.send(_text(frame))
        except ConnectionClosed as e:
            raise Unavailable("the socket closed; try again") from e

    async def receipt_for(
        self, id: str, status: str = "delivered", timeout_s: float = 30.0
    ) -> Receipt:
        """The receipt (`delivered` or `read`) of your message with client id `id`: one
        of the latest `max_seen` already in, or waited for (at most `timeout_s`)."""
        key = (id, status)
        if key in self._receipts:
            return self._receipts[key]
        if self.closed_by is not None:
            raise self.closed_by
        self._not_in_a_handler("receipt_for")
        fut = self._receipt_waiters.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._receipt_waiters[key] = fut
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        finally:  # (a timed-out future stays for other callers, bounded below)
            if fut.done() and self._receipt_waiters.get(key) is fut:
                del self._receipt_waiters[key]
            while len(self._receipt_waiters) > self.max_outbox:
                old = self._receipt_waiters.pop(next(iter(self._receipt_waiters)))
                if not old.done():
                    old.set_exception(TimeoutError("too many receipts waited for"))
                    _consume(old)

    # -- receiving

    async def events(self) -> AsyncIterator[Event]:
        """Events without a callback of their own, in order. The entries among them are
        acked when the loop asks for the next event (on whichever socket is open then).
        Ends when the connection closes. Drain it: once `max_events` wait, the socket
        stops reading (the server holds the rest, and may close a socket that does not
        read with 1008, after which the client reconnects)."""
        while True:
            await self._ack_handed()
            if self.closed_by is not None and self._events.empty():
                return
            getter = asyncio.ensure_future(self._events.get())
            closer = asyncio.ensure_future(self._closed.wait())
            try:
                done, _ = await asyncio.wait({getter, closer}, return_when="FIRST_COMPLETED")
            finally:
                closer.cancel()
            if getter not in done:
                getter.cancel()
                if self._events.empty():
                    return
                continue
            event = getter.result()
            if isinstance(event, Message | Receipt):
                self._unacked.append(event.msg_id)
            try:
                yield event
            except GeneratorExit:  # the loop left early: its last entry was not handled
                if isinstance(event, Message | Receipt) and event.msg_id in self._unacked:
                    self._unacked.remove(event.msg_id)
                    self._pending.discard(event.msg_id)
                raise

    async def _ack_handed(self) -> None:
        if not self._unacked:
            return
        ids = list(self._unacked)
        self._unacked.clear()
        for msg_id in ids:
            self._pending.discard(msg_id)
            self._remember(msg_id)
        await self._ack(ids)  # (on the socket open now: an earlier socket's entries too)

    async def _ack(self, ids: list[str]) -> None:
        ws = self._ws
        if ws is None or not ids:
            return  # not acked: the server sends them again, dedupe drops them
        with contextlib.suppress(ConnectionClosed):
            for i in range(0, len(ids), 1000):
                await ws.send(_text({"type": "ack", "msgIds": ids[i : i + 1000]}))

    def _remember(self, msg_id: str) -> None:
        self._seen[msg_id] = None
        if len(self._seen) > self.max_seen:
            self._seen.popitem(last=False)

    def _emit(self, event: Event, handler: Handler | None) -> None:
        """A non-entry event: to its callback, or to events() (dropped when that is full:
        state changes and typing are not worth blocking the socket for)."""
        if handler is not None:
            self._call(handler, event)
            return
        with contextlib.suppress(asyncio.QueueFull):
            self._events.put_nowait(event)

    def _call(self, handler: Handler, value: Any) -> None:
        """A callback that nobody waits for; an async one runs as a task of its own,
        kept (at most MAX_CALLBACK_TASKS) until it ends or close() ends it. What it
        raises is the application's: logged, never the connection's end."""
        try:
            result = handler(value)
        except Exception:
            log.exception("a chatnode.client callback raised")
            return
        if not asyncio.iscoroutine(result):
            return
        if len(self._callbacks) >= MAX_CALLBACK_TASKS:
            result.close()
            log.warning("chatnode.client callbacks are behind: skipped for %r", value)
            return
        task = asyncio.ensure_future(result)
        self._callbacks.add(task)
        task.add_done_callback(self._callbacks.discard)
        task.add_done_callback(_logged)

    async def _entry(self, event: Message | Receipt, handler: Handler | None) -> None:
        if event.msg_id in self._seen:  # again (a lost ack, a reconnect): ack it again
            self.redelivered += 1
            await self._ack([event.msg_id])
            return
        if event.msg_id in self._pending:  # again, while events() still holds it
            self.redelivered += 1
            return
        if isinstance(event, Receipt):
            for cid in event.ids:
                self._receipts[(cid, event.status)] = event
                fut = self._receipt_waiters.get((cid, event.status))
                if fut is not None and not fut.done():
                    fut.set_result(event)
            while len(self._receipts) > self.max_seen:
                self._receipts.popitem(last=False)
        if handler is None:
            self._pending.add(event.msg_id)
            await self._events.put(event)  # full: the socket waits (the server holds)
            return
        try:
            result = handler(event)
            if asyncio.iscoroutine(result):
                await result
        except Exception as e:  # not acked: it comes again after a reconnect
            self._emit(ServerError(Internal(f"handler failed: {e!r}")), self._handlers.error)
            return
        self._remember(event.msg_id)
        await self._ack([event.msg_id])

    # -- the loop

    async def _run(self) -> None:
        attempt = 0
        while self.closed_by is None:
            self._set_state(State.CONNECTING, "connecting" if attempt == 0 else f"retry {attempt}")
            wait = None
            url = self.urls[self.url_index % len(self.urls)]
            self.url_index += 1  # a failure or a closed socket: the next URL next time
            try:
                async with asyncio.timeout(self.open_timeout_s):
                    ws = await connect(
                        url,
                        additional_headers={"Authorization": f"Bearer {self.token}"},
                        open_timeout=self.open_timeout_s,
                        max_size=2**20,
                        compression=None,
                    )
            except InvalidStatus as e:
                status = e.response.status_code
                if status == 401:
                    self._finish(LoggedOut("the token was refused: log in again", status=401))
                    return
                if status == 429:
                    retry = e.response.headers.get("Retry-After", "1")
                    with contextlib.suppress(ValueError):
                        wait = max(1.0, float(retry))
            except Exception:  # refused, unreachable, timed out: try again
                pass
            else:
                self.connects += 1
                code = await self._serve(ws)
                if code in FINAL_CLOSES:
                    cls, why = FINAL_CLOSES[code]
                    self._finish(cls(why, close_code=code))
                    return
                if self.hello:
                    attempt = 0  # it was up: the next try starts the back-off again
                if code == 1012:  # the node drains: any other node, at once
                    continue
                if code == 1008:  # flooding, or not reading: back off the longest
                    wait = self.backoff_cap_s
            if self.closed_by is not None:
                return
            delay = (
                wait
                if wait is not None
                else backoff_s(attempt, self.backoff_base_s, self.backoff_cap_s)
            )
            attempt += 1
            await asyncio.sleep(delay)

    async def _serve(self, ws: ClientConnection) -> int | None:
        """Read one socket until it closes; its close code."""
        self._ws = ws
        self.hello = {}
        for out in self._outbox.values():
            out.on_wire = False
        pump = asyncio.create_task(self._pump(ws))
        try:
            async for data in ws:
                try:
                    frame = orjson.loads(data)
                    if isinstance(frame, dict):
                        await self._on_frame(frame)
                except (ValueError, KeyError, TypeError) as e:  # not the protocol's frame
                    bad = Internal(f"a frame the client cannot read: {e!r}: {data[:200]!r}")
                    self._emit(ServerError(bad), self._handlers.error)
        except ConnectionClosed:
            pass
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
            self._ws = None
            if self.closed_by is None:
                self._set_state(State.CONNECTING, f"socket closed ({ws.close_code})")
        return ws.close_code

    async def _on_frame(self, f: dict[str, Any]) -> None:
        kind = f.get("type")
        h = self._handlers
        if kind == "hello":
            self.hello = f
            self._set_state(State.LIVE, f"on node {f.get('node')}")
            self._wake.set()  # the outbox goes again, in order
        elif kind == "accepted":
            self._on_accepted(f)
        elif kind == "error":
            self._on_error(f)
        elif kind == "message":
            to = f.get("to")
            msg = Message(
                str(f["msgId"]),
                str(f["id"]),
                str(f["from"]),
                str(f["body"]),
                int(f["ts"]),
                None if to is None else str(to),
            )
            await self._entry(msg, h.message)
        elif kind == "receipt":
            sender = f.get("from")
            receipt = Receipt(
                str(f["msgId"]),
                f["status"],
                str(f["by"]),
                tuple(f["ids"]),
                int(f["ts"]),
                None if sender is None else str(sender),
            )
            await self._entry(receipt, h.receipt)
        elif kind == "typing":
            self._emit(Typing(str(f["from"]), f.get("state") == "start"), h.typing)
        if self.state is not State.CLOSED and self.hello:
            self._check_lag()

    def _on_accepted(self, f: dict[str, Any]) -> None:
        out = self._outbox.pop(str(f.get("id")), None)
        if out is None or out.future.done():
            return
        done = Accepted(str(f["id"]), str(f["msgId"]), int(f["ts"]))
        out.future.set_result(done)
        self._accepted[done.id] = done
        if len(self._accepted) > self.max_outbox:
            self._accepted.popitem(last=False)
        if self._handlers.accepted is not None:
            self._call(self._handlers.accepted, done)

    def _on_error(self, f: dict[str, Any]) -> None:
        """An error frame: to on_error; if it answers a send of the outbox, that send
        goes again after a back-off (unavailable, rate_limited, inbox_full) or fails."""
        ref = f.get("ref")
        err = error_for(str(f.get("code")), str(f.get("message", "")), None, ref)
        self._emit(ServerError(err), self._handlers.error)
        out_id = ref if isinstance(ref, str) else ""
        out = self._outbox.get(out_id)
        if out is None:
            return
        if err.code in RETRIED:
            out.on_wire = False
            out.tries += 1
            out.retry_at = time.monotonic() + backoff_s(out.tries, 0.5, self.backoff_cap_s)
            self._wake.set()
        else:
            del self._outbox[out_id]
            out.future.set_exception(err)

    def _check_lag(self) -> None:
        now = time.monotonic()
        late = any(o.on_wire and now - o.since > self.lag_after_s for o in self._outbox.values())
        if late and self.state is State.LIVE:
            self._set_state(State.LAGGING, f"a send waits more than {self.lag_after_s} s")
        elif not late and self.state is State.LAGGING:
            self._set_state(State.LIVE, "caught up")

    async def _pump(self, ws: ClientConnection) -> None:
        """Write the outbox to the socket once it is live: each send once per socket, in
        order; a refused one again after its back-off."""
        while True:
            self._wake.clear()
            next_retry = None
            if self.hello:
                now = time.monotonic()
                for out in list(self._outbox.values()):
                    if out.on_wire:
                        continue
                    if out.retry_at > now:
                        next_retry = min(next_retry or out.retry_at, out.retry_at)
                        continue
                    out.on_wire = True
                    await ws.send(out.frame)
                self._check_lag()
            timeout = (
                self.lag_after_s if next_retry is None else max(0.0, next_retry - time.monotonic())
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()


def _text(frame: dict[str, Any]) -> str:
    return orjson.dumps(frame).decode()


def _consume(fut: asyncio.Future[Any]) -> None:
    """Nobody may wait for a send's future: its exception is not worth a warning."""
    if not fut.cancelled():
        fut.exception()


def _logged(task: asyncio.Task[Any]) -> None:
    """What an async callback raised is the application's: logged, never the end."""
    if not task.cancelled() and task.exception() is not None:
        log.error("a chatnode.client callback raised", exc_info=task.exception())
