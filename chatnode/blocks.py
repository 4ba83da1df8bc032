"""Block lists: PostgreSQL is the truth, Redis holds a copy in each user's slot.

A user's Redis set holds 'N' for each N they blocked and '<N' for each N that blocked
them, so a send checks both directions with one SMISMEMBER on the recipient's slot.
A user whose account key is missing from Redis is reloaded from PostgreSQL before any
send to them is judged.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

from chatnode import accounts, keys, logs, lua
from chatnode.accounts import connection
from chatnode.errors import InvalidRequest, NotFound, RateLimited, Unavailable
from chatnode.lua import Script
from chatnode.redisio import Redis

log = logs.get(__name__)

PAIR_WAITERS_MAX = 8  # block changes of one pair waiting their turn on a node; then 429
LOAD_CHUNK = 1000  # set members per script call (Lua unpack fails at about 8,000)
LOAD_ATTEMPTS = 4
LOADING_TTL_S = 30
DROP_RETRY_S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
PRUNE_STEP = 500  # inbox entries a PRUNE call looks at
PRUNE_CALLS_MAX = 1000  # PRUNE calls of one prune: 500,000 entries, 25 times a default inbox

# KEYS: account, blocks, inbox, loading. ARGV: nonce, the account value (the user's
# devices, keys.account_value), first (1|0), last (1|0), then up to LOAD_CHUNK set
# members. One chunk of a reload, which replaces the copy: the first chunk clears it
# (and the account key), later chunks add, and only the last sets the account key (and
# makes each device's group if missing), which says the copy is whole, so a half-loaded
# set is never used. Every chunk first checks that the reload is still current (0 if
# not: see load_into_redis).
LOAD = Script(
    keys.LUA_DEVICES
    + """
if redis.call('GET', KEYS[4]) ~= ARGV[1] then return 0 end
if ARGV[3] == '1' then redis.call('DEL', KEYS[1], KEYS[2]) end
if #ARGV > 4 then redis.call('SADD', KEYS[2], unpack(ARGV, 5)) end
if ARGV[4] == '1' then
  for _, k in ipairs(devices(ARGV[2])) do
    redis.pcall('XGROUP', 'CREATE', KEYS[3], group_of(k), '0', 'MKSTREAM')
  end
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('DEL', KEYS[4])
end
return 1
"""
)

# KEYS: blocks, loading. ARGV: SADD or SREM, the member, 1 if PostgreSQL changed. One
# user's half of a block change, made after PostgreSQL committed it; a change also stops
# any reload of this user in flight, which may have read PostgreSQL before it.
MIRROR = Script(
    """
if ARGV[3] == '1' then redis.call('DEL', KEYS[2]) end
redis.call(ARGV[1], KEYS[1], ARGV[2])
return 1
"""
)

_drops: set[asyncio.Task[None]] = set()


async def load_into_redis(pool: Any, batcher: Redis, mobile: str) -> bool:
    """Copy one user from PostgreSQL into Redis, replacing what Redis held; False if no
    such user.

    A reload stores a fresh nonce before it reads PostgreSQL; a block change deletes it
    after its commit. A reload whose nonce is gone by its last chunk may have read the
    state before that change, so it does not mark the copy whole and reads again (or
    stops if another reload finished meanwhile)."""
    for _ in range(LOAD_ATTEMPTS):
        nonce = secrets.token_hex(8)
        await batcher.run("SET", keys.loading(mobile), nonce, "EX", LOADING_TTL_S)
        copy = await accounts.redis_copy(pool, mobile)
        if copy is None:
            return False
        if await _load(batcher, mobile, copy, nonce):
            await prune(batcher, mobile)  # a device gone while Redis's list still had it
            return True
        if await batcher.run("EXISTS", keys.account(mobile)):
            return True
    raise Unavailable("this user's block list keeps changing, try again")


async def _load(batcher: Redis, mobile: str, copy: accounts.RedisCopy, nonce: str) -> bool:
    """Write the copy chunk by chunk, each after the previous one succeeded; False if the
    reload stopped being current."""
    members = [*copy.blocked, *(keys.blocked_marker(m) for m in copy.blocked_by)]
    chunks = [members[i : i + LOAD_CHUNK] for i in range(0, len(members), LOAD_CHUNK)] or [[]]
    keys_ = [keys.account(mobile), keys.blocks(mobile), keys.inbox(mobile), keys.loading(mobile)]
    for i, chunk in enumerate(chunks):
        first, last = int(i == 0), int(i == len(chunks) - 1)
        value = keys.account_value(copy.devices)
        if not await batcher.script(LOAD, keys_, [nonce, value, first, last, *chunk]):
            return False
    return True


_pair_waiting: dict[str, int] = {}
_pair_turns: dict[str, asyncio.Lock] = {}


@contextlib.asynccontextmanager
async def _pair_lock(pool: Any, me: str, target: str) -> AsyncIterator[Any]:
    """Block changes of one pair, PostgreSQL and then Redis, one at a time: a block and
    an unblock racing could otherwise leave Redis with the other's answer. Requests of a
    pair wait their turn in this process before they take a pool connection (at most
    PAIR_WAITERS_MAX of them, then 429), so a burst on one pair cannot fill the pool;
    across nodes, a PostgreSQL advisory lock (a session lock: the pool's reset on
    release unlocks it if the unlock here fails). Yields the connection."""
    key = f"block|{me}|{target}"
    waiting = _pair_waiting.get(key, 0)
    if waiting >= PAIR_WAITERS_MAX:
        raise RateLimited("too many changes of this block at once, try again")
    _pair_waiting[key] = waiting + 1
    turn = _pair_turns.setdefault(key, asyncio.Lock())
    try:
        async with turn, connection(pool) as conn, _advisory(conn, key):
            yield conn
    finally:
        left = _pair_waiting[key] - 1
        if left:
            _pair_waiting[key] = left
        else:
            del _pair_waiting[key]
            del _pair_turns[key]


@contextlib.asynccontextmanager
async def _advisory(conn: Any, key: str) -> AsyncIterator[None]:
    await conn.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", key)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", key)


async def block(pool: Any, batcher: Redis, me: str, target: str) -> None:
    """Record that `me` blocks `target` (idempotent); NotFound if target is unknown."""
    if target == me:
        raise InvalidRequest("you cannot block yourself")
    async with _pair_lock(pool, me, target) as conn:
        row = await conn.fetchrow(
            "WITH t AS (SELECT id FROM users WHERE mobile_no = $2),"
            " ins AS (INSERT INTO blocks (blocker_id, blocked_id)"
            "   SELECT u.id, t.id FROM users u, t WHERE u.mobile_no = $1"
            "   ON CONFLICT DO NOTHING RETURNING 1)"
            " SELECT (SELECT count(*) FROM t) AS found, (SELECT count(*) FROM ins) AS added",
            me,
            target,
        )
        if not row["found"]:
            raise NotFound("no user has this mobile number")
        await _mirror(batcher, "SADD", me, target, changed=row["added"] > 0)


async def unblock(pool: Any, batcher: Redis, me: str, target: str) -> None:
    """Lift a block; NotFound if target is unknown or not blocked by `me`."""
    async with _pair_lock(pool, me, target) as conn:
        deleted = await conn.fetchval(
            "WITH d AS (DELETE FROM blocks k USING users a, users b"
            " WHERE a.mobile_no = $1 AND b.mobile_no = $2"
            " AND k.blocker_id = a.id AND k.blocked_id = b.id RETURNING 1)"
            " SELECT count(*) FROM d",
            me,
            target,
        )
        # SREM either way: a retry after a failed mirror must still lift the Redis copy
        await _mirror(batcher, "SREM", me, target, changed=deleted > 0)
    if not deleted:
        raise NotFound("this number is unknown or not blocked")


async def _mirror(batcher: Redis, command: str, me: str, target: str, *, changed: bool) -> None:
    """Apply a committed block change to both users' Redis copies.

    PostgreSQL is the truth; a Redis copy that missed the change must not outlive it.
    A user whose half failed loses their copy instead (their account key, so the next
    send to them reloads from PostgreSQL). Unavailable only if that failed too: the
    client's retry runs both steps again (both are idempotent), and meanwhile the drop
    is retried in the background."""
    flag = int(changed)
    halves = {me: (command, target, flag), target: (command, keys.blocked_marker(me), flag)}
    results = await asyncio.gather(
        *(
            batcher.script(MIRROR, [keys.blocks(user), keys.loading(user)], list(args))
            for user, args in halves.items()
        ),
        return_exceptions=True,
    )
    missed = [user for user, r in zip(halves, results, strict=True) if isinstance(r, Exception)]
    if not missed:
        return
    log.warning("block_mirror_failed", users=missed)
    try:
        await _drop(batcher, missed)
    except Exception as exc:
        log.warning("block_copy_drop_failed", users=missed, error=type(exc).__name__)
        _drop_later(batcher, missed)
        raise Unavailable(
            "the block is stored but not yet in effect everywhere, try again"
        ) from exc


async def _drop(batcher: Redis, users: list[str]) -> None:
    await asyncio.gather(*(batcher.run("DEL", keys.account(u), keys.loading(u)) for u in users))


async def prune(batcher: Redis, mobile: str) -> None:
    """Delete the inbox entries every device the account lists is done with (lua.PRUNE,
    PRUNE_STEP entries a call): after a device went, and after a reload (the list may have
    named a device that is gone)."""
    box, account = keys.inbox(mobile), keys.account(mobile)
    start = "-"
    for _ in range(PRUNE_CALLS_MAX):  # an inbox holds at most twice its limit
        last = await batcher.script(lua.PRUNE, [box, account], [start, PRUNE_STEP])
        if not last:
            return
        start = "(" + str(last)


def forget(batcher: Redis, mobile: str) -> None:
    """Redis's copy of a user may be wrong (a change to it failed half way): drop it, now
    and again for a while, so the next send reloads the user from PostgreSQL."""
    _drop_later(batcher, [mobile])


def _drop_later(batcher: Redis, users: list[str]) -> None:
    task = asyncio.get_running_loop().create_task(_keep_dropping(batcher, users))
    _drops.add(task)
    task.add_done_callback(_drops.discard)


async def _keep_dropping(batcher: Redis, users: list[str]) -> None:
    """Retry dropping stale copies for about half a minute (while Redis comes back)."""
    for delay in (0.0, *DROP_RETRY_S):
        await asyncio.sleep(delay)
        try:
            await _drop(batcher, users)
        except Exception:
            continue
        log.info("block_copy_dropped", users=users)
        return
    log.error("block_copy_stale", users=users)


async def list_blocked(pool: Any, me: str) -> list[dict[str, str]]:
    async with connection(pool) as conn:
        rows = await conn.fetch(
            "SELECT b.mobile_no, b.name FROM blocks k"
            " JOIN users a ON a.id = k.blocker_id JOIN users b ON b.id = k.blocked_id"
            " WHERE a.mobile_no = $1 ORDER BY k.created_at, b.mobile_no",
            me,
        )
    return [{"mobileNo": r["mobile_no"], "username": r["name"]} for r in rows]


async def has_blocked(pool: Any, blocker: str, blocked: str) -> bool:
    async with connection(pool) as conn:
        return bool(
            await conn.fetchval(
                "SELECT 1 FROM blocks k JOIN users a ON a.id = k.blocker_id"
                " JOIN users b ON b.id = k.blocked_id WHERE a.mobile_no = $1 AND b.mobile_no = $2",
                blocker,
                blocked,
            )
        )
