"""Passwords (bcrypt, off the event loop, bounded) and tokens (HS256 JWTs) -> the user."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeGuard

import bcrypt
import jwt

from chatnode import accounts, keys, logs
from chatnode.errors import ChatError, Unauthorized, Unavailable
from chatnode.redisio import Redis

log = logs.get(__name__)

BCRYPT_WORKERS = 2
BCRYPT_WAIT_S = 10.0
BCRYPT_NICE = 10  # niceness of the bcrypt threads (the event loop stays at 0)
MAX_PASSWORD_BYTES = 72
ACCOUNT_CACHE_TTL_S = 60.0
ACCOUNT_CACHE_MAX = 100_000
MAX_UID = 2**63 - 1  # users.id is a BIGINT
MAX_WAITING_PER_CLIENT = 1000  # requests of one address queued for bcrypt; then 503


def _yield_cpu() -> None:
    """Run this thread at a lower priority: when bcrypt and the event loop (or Redis) both
    want a core, messaging gets it, and a storm of logins waits instead (Linux sets nice
    per thread; elsewhere this does nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BCRYPT_NICE)


class FairSlots:
    """`n` slots handed out in turn among the clients waiting for one, a client at a time:
    a client that floods waits behind itself, never in front of the others."""

    def __init__(self, n: int, most_waiting: int = MAX_WAITING_PER_CLIENT) -> None:
        self._free = n
        self._most_waiting = most_waiting
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    async def acquire(self, client: str) -> None:
        if self._free and not self._waiting:
            self._free -= 1
            return
        queue = self._waiting.setdefault(client, deque())
        if len(queue) >= self._most_waiting:
            raise Unavailable("too many logins in progress, try again")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # given a slot just as the wait ended: pass it on
            elif fut in queue:
                queue.remove(fut)
                if not queue and self._waiting.get(client) is queue:
                    del self._waiting[client]
            raise

    def release(self) -> None:
        """Give the slot to the next client in turn (its oldest waiter), else keep it."""
        while self._waiting:
            client, queue = next(iter(self._waiting.items()))
            fut = queue.popleft()
            if queue:
                self._waiting.move_to_end(client)  # its next waiter goes after the others
            else:
                del self._waiting[client]
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1


class Passwords:
    """bcrypt on a small thread pool; callers queue for it with a timeout.

    Every bcrypt call takes one of the `workers` slots, handed out in turn among client
    addresses (FairSlots): a flood of logins from one address, with any accounts, delays
    that address, not everyone's logins. A signup's hash must first take one of
    `workers - 1` signup slots as well, so signups hold at most `workers - 1` threads
    however many arrive, and logins always have a thread signups cannot occupy. With one
    worker there is nothing to keep back, and signups share it."""

    def __init__(self, rounds: int, workers: int = BCRYPT_WORKERS) -> None:
        self._rounds = rounds
        self._pool = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="bcrypt", initializer=_yield_cpu
        )
        self._slots = FairSlots(workers)
        self._signup_slots = asyncio.Semaphore(max(1, workers - 1))
        self._dummy: bytes | None = None

    async def _run(self, client: str, signup: bool, fn: Any, *args: Any) -> Any:
        lane = self._signup_slots if signup else None
        laned = slotted = False
        try:
            try:
                async with asyncio.timeout(BCRYPT_WAIT_S):
                    if lane is not None:
                        await lane.acquire()
                        laned = True
                    await self._slots.acquire(client)
                    slotted = True
            except TimeoutError:
                raise Unavailable("too many logins in progress, try again") from None
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            if slotted:
                self._slots.release()
            if laned and lane is not None:
                lane.release()

    async def hash(self, password: str, client: str = "") -> str:
        """A signup's hash: in the signup lane (see the class)."""
        return await self._hash(password, client, signup=True)

    async def _hash(self, password: str, client: str, *, signup: bool) -> str:
        salt = bcrypt.gensalt(self._rounds)
        hashed: bytes = await self._run(client, signup, bcrypt.hashpw, password.encode(), salt)
        return hashed.decode()

    async def verify(self, password: str, hashed: str | None, client: str = "") -> bool:
        """Check a password. With no hash, or a password no signup could have set, burn the
        same time anyway, so answers and timing don't tell which numbers exist."""
        try:
            raw: bytes | None = password.encode()
        except UnicodeEncodeError:
            raw = None
        usable = raw is not None and len(raw) <= MAX_PASSWORD_BYTES and b"\x00" not in raw
        if hashed is None or not usable:
            if self._dummy is None:
                dummy = await self._hash("not-a-real-password", client, signup=False)
                self._dummy = dummy.encode()
            await self._run(client, False, bcrypt.checkpw, b"not-the-password", self._dummy)
            return False
        assert raw is not None
        return bool(await self._run(client, False, bcrypt.checkpw, raw, hashed.encode()))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True, slots=True)
class Claims:
    mobile: str
    jti: str
    expires_at: int
    uid: int  # users.id of the account the token was issued to
    device: int = 0  # devices.id of the device it was issued to (0 until it is made)
    named: bool = False  # the login named the device (v2); v1 logins get `default`
    default: bool = False  # the device is the one named `default` (keys.device_key)

    @property
    def device_key(self) -> str:
        """The device's key in Redis names: '' for `default`, else its id."""
        return keys.DEFAULT_DEVICE if self.default else str(self.device)


class KnownAccounts:
    """Which (uid, mobile) pairs are real accounts, remembered briefly in this process.

    A signature proves only that we issued a token once; the account may be gone since
    (deleted, or a database restored without it), and a token minted with a leaked secret
    may name any number. So every token's (uid, mobile) must be a row of `users`. A
    found pair is believed for `ttl_s` without asking PostgreSQL again (the check costs
    a dictionary look-up on the hot path), and past that still believed while PostgreSQL
    is unavailable, so a database outage does not turn away reconnecting sockets. Misses
    are not remembered: only holders of the secret can make a token that gets this far.
    The oldest entries go first past `max_entries`."""

    def __init__(
        self, ttl_s: float = ACCOUNT_CACHE_TTL_S, max_entries: int = ACCOUNT_CACHE_MAX
    ) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._checked: OrderedDict[tuple[int, str], float] = OrderedDict()

    async def exists(self, pool: Any, uid: int, mobile: str) -> bool:
        key = (uid, mobile)
        now = time.monotonic()
        checked = self._checked.get(key)
        if checked is not None and now - checked < self._ttl_s:
            return True
        try:
            found = await accounts.account_exists(pool, uid, mobile)
        except Unavailable:
            if checked is not None:
                return True  # known before the outage
            raise
        if found:
            self.remember(uid, mobile)
        else:
            self._checked.pop(key, None)
        return found

    def remember(self, uid: int, mobile: str) -> None:
        """Note a pair just read from PostgreSQL (a login has, so its first handshake on
        this node needs no look-up)."""
        key = (uid, mobile)
        self._checked[key] = time.monotonic()
        self._checked.move_to_end(key)
        while len(self._checked) > self._max:
            self._checked.popitem(last=False)


class Tokens:
    """Issue and check HS256 JWTs; revocation lives in Redis with PostgreSQL as fallback."""

    def __init__(self, secret: str, ttl_s: int) -> None:
        self._secret = secret
        self.ttl_s = ttl_s
        self._reload: asyncio.Task[int] | None = None
        self.known = KnownAccounts()

    def reload_revocations(self, batcher: Redis, pool: Any) -> None:
        """Start copying revocations back into Redis, once however many ask at a time."""
        if self._reload is None or self._reload.done():
            self._reload = asyncio.get_running_loop().create_task(load_revocations(batcher, pool))
            self._reload.add_done_callback(_log_failure)

    def claims(self, mobile: str, uid: int) -> Claims:
        """New claims (a fresh jti, the expiry) for a token not issued yet: the device
        is made with the jti, then the token (`encode`)."""
        return Claims(mobile, secrets.token_urlsafe(16), int(time.time()) + self.ttl_s, uid)

    def encode(self, claims: Claims) -> str:
        payload = {
            "sub": claims.mobile,
            "uid": claims.uid,
            "did": claims.device,
            "jti": claims.jti,
            "iat": claims.expires_at - self.ttl_s,
            "exp": claims.expires_at,
        }
        if claims.named:
            payload["dnm"] = 1
        if claims.default:
            payload["dft"] = 1
        return jwt.encode(payload, self._secret, algorithm="HS256")

    def issue(
        self, mobile: str, uid: int, device: int, named: bool = False, default: bool = False
    ) -> tuple[str, Claims]:
        claims = self.claims(mobile, uid)
        claims = dataclasses.replace(claims, device=device, named=named, default=default)
        return self.encode(claims), claims

    def decode(self, token: str) -> Claims:
        """The claims of a well-signed, unexpired token; a token without the account id
        (issued before it was added) is refused: its owner logs in again. One without the
        device id (issued before devices) is the default device's."""
        try:
            payload = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                options={"require": ["sub", "uid", "jti", "exp"]},
            )
        except jwt.PyJWTError:
            raise Unauthorized() from None
        sub, uid, did, jti, exp = (payload.get(k) for k in ("sub", "uid", "did", "jti", "exp"))
        if not isinstance(sub, str) or not isinstance(jti, str) or not isinstance(exp, int):
            raise Unauthorized()
        if not _an_id(uid) or not (did is None or _an_id(did)):
            raise Unauthorized()
        if did is None:  # issued before devices: the default device (keys.device_key)
            return Claims(sub, jti, exp, uid, 0, False, True)
        return Claims(sub, jti, exp, uid, did, payload.get("dnm") == 1, payload.get("dft") == 1)


def _an_id(value: Any) -> TypeGuard[int]:
    """A BIGSERIAL id as a token may carry it: a positive JSON integer."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_UID


async def authenticate(tokens: Tokens, batcher: Redis, pool: Any, token: str | None) -> Claims:
    """The claims of a valid, unexpired, unrevoked token of an existing account;
    Unauthorized otherwise. Used by the HTTP API and the WebSocket handshake alike.

    Revocations are read from Redis; when Redis lacks them (it lost its data, or is
    away) PostgreSQL answers, and a Redis that answered gets them copied back."""
    if not token:
        raise Unauthorized("a bearer token is required")
    claims = tokens.decode(token)
    if not await tokens.known.exists(pool, claims.uid, claims.mobile):
        raise Unauthorized("this token's account does not exist")
    try:
        revoked, loaded = await asyncio.gather(
            batcher.call("EXISTS", keys.revoked(claims.jti)),
            batcher.call("EXISTS", keys.revocations_loaded(keys.partition(claims.jti))),
        )
    except Unavailable:
        revoked = loaded = None
    if not loaded:
        if loaded is not None:
            tokens.reload_revocations(batcher, pool)
        revoked = await accounts.is_revoked(pool, claims.jti)
    if revoked:
        raise Unauthorized("this token was revoked")
    return claims


async def load_revocations(batcher: Redis, pool: Any) -> int:
    """Copy the unexpired revocations of every partition whose marker Redis lacks from
    PostgreSQL into Redis, then mark those partitions done. On a cluster each shard
    holds the markers of its own partitions, so a shard that lost its data is reloaded
    and the others are left alone."""
    marks = await asyncio.gather(
        *(batcher.call("EXISTS", keys.revocations_loaded(p)) for p in range(keys.PARTITIONS))
    )
    missing = {p for p, mark in enumerate(marks) if not mark}
    if not missing:
        return 0
    rows = [(j, e) for j, e in await accounts.revocations(pool) if keys.partition(j) in missing]
    await asyncio.gather(
        *(batcher.call("SET", keys.revoked(jti), "1", "EXAT", exp) for jti, exp in rows)
    )
    await asyncio.gather(*(batcher.call("SET", keys.revocations_loaded(p), "1") for p in missing))
    log.info("revocations_loaded", count=len(rows), partitions=len(missing))
    return len(rows)


async def revoke_in_redis(batcher: Redis, revoked: list[tuple[str, int]]) -> None:
    """Copy revocations PostgreSQL holds ((jti, expiry as a Unix time)) into Redis.
    Unavailable if Redis took not all of them: the partitions of those then lose their
    marker, so no node trusts Redis alone for them until they are copied back."""
    now = int(time.time())
    results = await asyncio.gather(
        *(
            batcher.call("SET", keys.revoked(jti), "1", "EX", max(1, exp - now))
            for jti, exp in revoked
        ),
        return_exceptions=True,
    )
    failed = [jti for (jti, _), r in zip(revoked, results, strict=True) if isinstance(r, Exception)]
    for part in {keys.partition(jti) for jti in failed}:
        distrust_redis_revocations(batcher, part)
    if failed:
        raise Unavailable("the revocation is stored but Redis could not take it yet")


_distrusting: set[asyncio.Task[None]] = set()


def distrust_redis_revocations(batcher: Redis, part: int) -> None:
    """Delete the marker saying Redis holds every revocation of the token's partition,
    retried for a while in the background (Redis may be away right now)."""

    async def delete() -> None:
        for pause in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0):
            await asyncio.sleep(pause)
            try:
                await batcher.run("DEL", keys.revocations_loaded(part))
                return
            except ChatError:
                continue
        log.error("revocations_marker_not_deleted")

    task = asyncio.get_running_loop().create_task(delete())
    _distrusting.add(task)
    task.add_done_callback(_distrusting.discard)


def _log_failure(task: asyncio.Task[int]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("revocations_load_failed", error=type(exc).__name__)


def bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return None
