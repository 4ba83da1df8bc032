"""Passwords (bcrypt, off the event loop, bounded) and tokens (HS256 JWTs) -> the user."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import bcrypt
import jwt

from chatnode import accounts, keys, logs
from chatnode.errors import Unauthorized, Unavailable
from chatnode.redisio import Batcher

log = logs.get(__name__)

BCRYPT_WORKERS = 2
BCRYPT_WAIT_S = 10.0
BCRYPT_NICE = 10  # niceness of the bcrypt threads (the event loop stays at 0)
MAX_PASSWORD_BYTES = 72


def _yield_cpu() -> None:
    """Run this thread at a lower priority: when bcrypt and the event loop (or Redis) both
    want a core, messaging gets it, and a storm of logins waits instead (Linux sets nice
    per thread; elsewhere this does nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BCRYPT_NICE)


class Passwords:
    """bcrypt on a small thread pool; callers queue on a semaphore with a timeout."""

    def __init__(self, rounds: int, workers: int = BCRYPT_WORKERS) -> None:
        self._rounds = rounds
        self._pool = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="bcrypt", initializer=_yield_cpu
        )
        self._slots = asyncio.Semaphore(workers)
        self._dummy: bytes | None = None

    async def _run(self, fn: Any, *args: Any) -> Any:
        try:
            async with asyncio.timeout(BCRYPT_WAIT_S):
                await self._slots.acquire()
        except TimeoutError:
            raise Unavailable("too many logins in progress, try again") from None
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self._slots.release()

    async def hash(self, password: str) -> str:
        salt = bcrypt.gensalt(self._rounds)
        hashed: bytes = await self._run(bcrypt.hashpw, password.encode(), salt)
        return hashed.decode()

    async def verify(self, password: str, hashed: str | None) -> bool:
        """Check a password. With no hash, or a password no signup could have set, burn the
        same time anyway, so answers and timing don't tell which numbers exist."""
        try:
            raw: bytes | None = password.encode()
        except UnicodeEncodeError:
            raw = None
        usable = raw is not None and len(raw) <= MAX_PASSWORD_BYTES and b"\x00" not in raw
        if hashed is None or not usable:
            if self._dummy is None:
                self._dummy = (await self.hash("not-a-real-password")).encode()
            await self._run(bcrypt.checkpw, b"not-the-password", self._dummy)
            return False
        assert raw is not None
        return bool(await self._run(bcrypt.checkpw, raw, hashed.encode()))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True, slots=True)
class Claims:
    mobile: str
    jti: str
    expires_at: int


class Tokens:
    """Issue and check HS256 JWTs; revocation lives in Redis with PostgreSQL as fallback."""

    def __init__(self, secret: str, ttl_s: int) -> None:
        self._secret = secret
        self.ttl_s = ttl_s
        self._reload: asyncio.Task[int] | None = None

    def reload_revocations(self, batcher: Batcher, pool: Any) -> None:
        """Start copying revocations back into Redis, once however many ask at a time."""
        if self._reload is None or self._reload.done():
            self._reload = asyncio.get_running_loop().create_task(load_revocations(batcher, pool))
            self._reload.add_done_callback(_log_failure)

    def issue(self, mobile: str) -> tuple[str, Claims]:
        now = int(time.time())
        claims = Claims(mobile, secrets.token_urlsafe(16), now + self.ttl_s)
        payload = {"sub": mobile, "jti": claims.jti, "iat": now, "exp": claims.expires_at}
        return jwt.encode(payload, self._secret, algorithm="HS256"), claims

    def decode(self, token: str) -> Claims:
        try:
            payload = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                options={"require": ["sub", "jti", "exp"]},
            )
        except jwt.PyJWTError:
            raise Unauthorized() from None
        sub, jti, exp = payload.get("sub"), payload.get("jti"), payload.get("exp")
        if not isinstance(sub, str) or not isinstance(jti, str) or not isinstance(exp, int):
            raise Unauthorized()
        return Claims(sub, jti, exp)


async def authenticate(tokens: Tokens, batcher: Batcher, pool: Any, token: str | None) -> Claims:
    """The claims of a valid, unexpired, unrevoked token; Unauthorized otherwise.

    Revocations are read from Redis; when Redis lacks them (it lost its data, or is
    away) PostgreSQL answers, and a Redis that answered gets them copied back."""
    if not token:
        raise Unauthorized("a bearer token is required")
    claims = tokens.decode(token)
    try:
        revoked, loaded = await asyncio.gather(
            batcher.call("EXISTS", keys.revoked(claims.jti)),
            batcher.call("EXISTS", keys.REVOCATIONS_LOADED),
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


async def load_revocations(batcher: Batcher, pool: Any) -> int:
    """Copy every unexpired revocation from PostgreSQL into Redis, then mark it done."""
    rows = await accounts.revocations(pool)
    await asyncio.gather(
        *(batcher.call("SET", keys.revoked(jti), "1", "EXAT", exp) for jti, exp in rows)
    )
    await batcher.run("SET", keys.REVOCATIONS_LOADED, "1")
    log.info("revocations_loaded", count=len(rows))
    return len(rows)


def _log_failure(task: asyncio.Task[int]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("revocations_load_failed", error=type(exc).__name__)


def bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return None
