"""Users, auth events, revoked tokens and last seen in PostgreSQL (the source of truth)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from chatnode.errors import Conflict, TooManyDevices, Unavailable

QUERY_TIMEOUT_S = 5.0
SCHEMA_PATH = Path(__file__).with_name("schema.sql")


@dataclass(frozen=True, slots=True)
class User:
    id: int
    mobile: str
    name: str
    password_hash: str
    last_seen: datetime | None


@dataclass(frozen=True, slots=True)
class RedisCopy:
    """What Redis holds for one user: name, whom they blocked, who blocked them, and
    their devices (keys.device_key of each)."""

    name: str
    blocked: list[str]
    blocked_by: list[str]
    devices: list[str]


async def create_pool(dsn: str, *, max_size: int = 10) -> Any:
    return await asyncpg.create_pool(
        dsn, min_size=1, max_size=max_size, timeout=QUERY_TIMEOUT_S, command_timeout=QUERY_TIMEOUT_S
    )


@asynccontextmanager
async def connection(pool: Any) -> AsyncIterator[Any]:
    """A pooled connection; an unreachable or failing database becomes Unavailable."""
    try:
        async with pool.acquire(timeout=QUERY_TIMEOUT_S) as conn:
            yield conn
    except (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as e:
        raise Unavailable("the database is unavailable") from e
    except asyncpg.exceptions.CannotConnectNowError as e:
        raise Unavailable("the database is starting") from e


async def migrate(pool: Any) -> None:
    """Apply schema.sql; every statement in it is idempotent."""
    async with connection(pool) as conn:
        await conn.execute("SELECT pg_advisory_lock(4242)")
        try:
            await conn.execute(SCHEMA_PATH.read_text())
        finally:
            await conn.execute("SELECT pg_advisory_unlock(4242)")


async def create_user(pool: Any, mobile: str, name: str, password_hash: str, node: str) -> int:
    """Insert a user and its signup event; Conflict if the number is taken."""
    async with connection(pool) as conn, conn.transaction():
        user_id = await conn.fetchval(
            "INSERT INTO users (mobile_no, name, password_hash) VALUES ($1, $2, $3) "
            "ON CONFLICT (mobile_no) DO NOTHING RETURNING id",
            mobile,
            name,
            password_hash,
        )
        if user_id is None:
            raise Conflict("this mobile number is already registered")
        await conn.execute(
            "INSERT INTO auth_events (user_id, kind, node) VALUES ($1, 'signup', $2)", user_id, node
        )
    return int(user_id)


async def find_user(pool: Any, mobile: str) -> User | None:
    async with connection(pool) as conn:
        row = await conn.fetchrow(
            "SELECT id, mobile_no, name, password_hash, last_seen FROM users WHERE mobile_no = $1",
            mobile,
        )
    if row is None:
        return None
    return User(row["id"], row["mobile_no"], row["name"], row["password_hash"], row["last_seen"])


async def is_registered(pool: Any, mobile: str) -> bool:
    """Whether a user has this number: signup asks before paying for a bcrypt hash."""
    async with connection(pool) as conn:
        return bool(await conn.fetchval("SELECT 1 FROM users WHERE mobile_no = $1", mobile))


async def account_exists(pool: Any, uid: int, mobile: str) -> bool:
    """Whether account `uid` exists and has this number (a token names both)."""
    async with connection(pool) as conn:
        return bool(
            await conn.fetchval("SELECT 1 FROM users WHERE id = $1 AND mobile_no = $2", uid, mobile)
        )


async def record_event(pool: Any, user_id: int, kind: str, node: str) -> None:
    async with connection(pool) as conn:
        await conn.execute(
            "INSERT INTO auth_events (user_id, kind, node) VALUES ($1, $2, $3)", user_id, kind, node
        )


async def redis_copy(pool: Any, mobile: str) -> RedisCopy | None:
    """What Redis must hold for `mobile`, read from PostgreSQL; None if no such user."""
    async with connection(pool) as conn:
        row = await conn.fetchrow(
            "SELECT u.name,"
            " ARRAY(SELECT b.mobile_no FROM blocks k JOIN users b ON b.id = k.blocked_id"
            "       WHERE k.blocker_id = u.id) AS blocked,"
            " ARRAY(SELECT b.mobile_no FROM blocks k JOIN users b ON b.id = k.blocker_id"
            "       WHERE k.blocked_id = u.id) AS blocked_by,"
            " ARRAY(SELECT CASE WHEN d.name = 'default' THEN '' ELSE d.id::text END"
            "       FROM devices d WHERE d.user_id = u.id ORDER BY d.id) AS devices"
            " FROM users u WHERE u.mobile_no = $1",
            mobile,
        )
    if row is None:
        return None
    blocked, blocked_by = list(row["blocked"]), list(row["blocked_by"])
    return RedisCopy(row["name"], blocked, blocked_by, list(row["devices"]))


async def revoke_token(pool: Any, user_id: int, jti: str, expires_at: datetime, node: str) -> None:
    async with connection(pool) as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO revoked_tokens (jti, expires_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            jti,
            expires_at,
        )
        await conn.execute(
            "INSERT INTO auth_events (user_id, kind, node) VALUES ($1, 'logout', $2)", user_id, node
        )
        await conn.execute("DELETE FROM revoked_tokens WHERE expires_at < now()")


async def revocations(pool: Any) -> list[tuple[str, int]]:
    """Every revoked token not yet expired: (jti, expiry as a Unix time)."""
    async with connection(pool) as conn:
        rows = await conn.fetch(
            "SELECT jti, extract(epoch FROM expires_at)::bigint AS exp"
            " FROM revoked_tokens WHERE expires_at > now()"
        )
    return [(r["jti"], int(r["exp"])) for r in rows]


async def is_revoked(pool: Any, jti: str) -> bool:
    async with connection(pool) as conn:
        return bool(await conn.fetchval("SELECT 1 FROM revoked_tokens WHERE jti = $1", jti))


async def store_last_seen(pool: Any, seen: Iterable[tuple[str, int]]) -> None:
    """Write last-seen times (mobile, ms since epoch) in one statement."""
    await _stamp(
        pool,
        "UPDATE users u SET last_seen = v.ts FROM unnest($1::text[], $2::timestamptz[])"
        " AS v(m, ts) WHERE u.mobile_no = v.m AND (u.last_seen IS NULL OR u.last_seen < v.ts)",
        seen,
    )


async def _stamp(pool: Any, sql: str, seen: Iterable[tuple[Any, int]]) -> None:
    """Run one UPDATE taking the (key, ms since epoch) pairs as two arrays, if any."""
    pairs = list(seen)
    if not pairs:
        return
    times = [datetime.fromtimestamp(ms / 1000, UTC) for _, ms in pairs]
    async with connection(pool) as conn:
        await conn.execute(sql, [k for k, _ in pairs], times)


@dataclass(frozen=True, slots=True)
class Device:
    id: int
    name: str
    created_at: datetime
    last_seen: datetime


async def login_device(
    pool: Any, user_id: int, name: str, most: int, jti: str, expires_at: datetime
) -> int:
    """The id of `user_id`'s device `name`, made if new (TooManyDevices past `most`); the
    token `jti` is recorded as the device's, and the device is seen now. One transaction
    holding the user's row, so two logins cannot both pass the limit."""
    async with connection(pool) as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id)
        device_id = await conn.fetchval(
            "UPDATE devices SET last_seen = now() WHERE user_id = $1 AND name = $2 RETURNING id",
            user_id,
            name,
        )
        if device_id is None:
            count = await conn.fetchval("SELECT count(*) FROM devices WHERE user_id = $1", user_id)
            if count >= most:
                raise TooManyDevices()
            device_id = await conn.fetchval(
                "INSERT INTO devices (user_id, name) VALUES ($1, $2) RETURNING id", user_id, name
            )
        await conn.execute(
            "INSERT INTO device_tokens (jti, device_id, expires_at) VALUES ($1, $2, $3)",
            jti,
            device_id,
            expires_at,
        )
    return int(device_id)


async def list_devices(pool: Any, user_id: int) -> list[Device]:
    async with connection(pool) as conn:
        rows = await conn.fetch(
            "SELECT id, name, created_at, last_seen FROM devices WHERE user_id = $1 ORDER BY id",
            user_id,
        )
    return [Device(r["id"], r["name"], r["created_at"], r["last_seen"]) for r in rows]


async def device_exists(pool: Any, user_id: int, device_id: int) -> bool:
    async with connection(pool) as conn:
        return bool(
            await conn.fetchval(
                "SELECT 1 FROM devices WHERE id = $1 AND user_id = $2", device_id, user_id
            )
        )


async def remove_device(
    pool: Any, user_id: int, device_id: int, node: str, idle_days: float | None = None
) -> tuple[str, list[tuple[str, int]]] | None:
    """Remove one of `user_id`'s devices: its unexpired tokens are revoked in the same
    transaction, which holds the user's row as a login does (so no login of the device
    can slip a token in between). `idle_days`: only if it is still unseen that long (the
    idle sweep). Its name and its tokens' (jti, expiry as a Unix time), for Redis and the
    open sockets; None if the user has no such device (or it was seen meanwhile)."""
    async with connection(pool) as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id)
        gone = await conn.fetchval(
            "SELECT name FROM devices WHERE id = $1 AND user_id = $2"
            " AND ($3::float8 IS NULL OR last_seen < now() - make_interval(secs => $3))",
            device_id,
            user_id,
            None if idle_days is None else idle_days * 86400.0,
        )
        if gone is None:
            return None
        rows = await conn.fetch(  # (before the device: its delete cascades to them)
            "DELETE FROM device_tokens WHERE device_id = $1"
            " RETURNING jti, extract(epoch FROM expires_at)::bigint AS exp, expires_at",
            device_id,
        )
        await conn.execute("DELETE FROM devices WHERE id = $1", device_id)
        rows = [r for r in rows if r["exp"] > datetime.now(UTC).timestamp()]
        await conn.executemany(
            "INSERT INTO revoked_tokens (jti, expires_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            [(r["jti"], r["expires_at"]) for r in rows],
        )
        await conn.execute(
            "INSERT INTO auth_events (user_id, kind, node) VALUES ($1, 'device_removed', $2)",
            user_id,
            node,
        )
    return str(gone), [(r["jti"], int(r["exp"])) for r in rows]


async def forget_expired_tokens(pool: Any, most: int = 10_000) -> int:
    """Delete up to `most` expired rows of `device_tokens` (revoked ones are pruned with
    the revocations); how many."""
    async with connection(pool) as conn:
        done = await conn.execute(
            "DELETE FROM device_tokens WHERE jti IN (SELECT jti FROM device_tokens"
            " WHERE expires_at < now() LIMIT $1)",
            most,
        )
    return int(done.split()[-1])


async def idle_devices(pool: Any, idle_days: float, most: int) -> list[tuple[int, str, int]]:
    """(user id, number, device id) of up to `most` devices unseen for `idle_days`."""
    async with connection(pool) as conn:
        rows = await conn.fetch(
            "SELECT d.user_id, u.mobile_no, d.id FROM devices d JOIN users u ON u.id = d.user_id"
            " WHERE d.last_seen < now() - make_interval(secs => $1) ORDER BY d.last_seen LIMIT $2",
            idle_days * 86400.0,
            most,
        )
    return [(r["user_id"], r["mobile_no"], r["id"]) for r in rows]


async def store_device_seen(pool: Any, seen: Iterable[tuple[int, int]]) -> None:
    """Write devices' last-seen times (device id, ms since epoch) in one statement."""
    await _stamp(
        pool,
        "UPDATE devices d SET last_seen = v.ts FROM unnest($1::bigint[], $2::timestamptz[])"
        " AS v(i, ts) WHERE d.id = v.i AND d.last_seen < v.ts",
        seen,
    )


async def ping(pool: Any) -> None:
    async with connection(pool) as conn:
        await conn.fetchval("SELECT 1")
