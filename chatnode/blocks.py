"""Block lists: PostgreSQL is the truth, Redis holds a copy in each user's slot.

A user's Redis set holds 'N' for each N they blocked and '<N' for each N that blocked
them, so a send checks both directions with one SMISMEMBER on the recipient's slot.
A user whose account key is missing from Redis is reloaded from PostgreSQL before any
send to them is judged.
"""

from __future__ import annotations

import asyncio
from typing import Any

from chatnode import accounts, keys
from chatnode.accounts import connection
from chatnode.errors import InvalidRequest, NotFound
from chatnode.redisio import Batcher, Script

# KEYS: account, blocks, inbox. ARGV: name, then the set members.
LOAD = Script(
    """
if #ARGV > 1 then redis.call('SADD', KEYS[2], unpack(ARGV, 2)) end
redis.pcall('XGROUP', 'CREATE', KEYS[3], 'g', '0', 'MKSTREAM')
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""
)


async def load_into_redis(pool: Any, batcher: Batcher, mobile: str) -> bool:
    """Copy one user from PostgreSQL into Redis; False if no such user."""
    copy = await accounts.redis_copy(pool, mobile)
    if copy is None:
        return False
    members = [*copy.blocked, *(keys.blocked_marker(m) for m in copy.blocked_by)]
    await batcher.script(
        LOAD, [keys.account(mobile), keys.blocks(mobile), keys.inbox(mobile)], [copy.name, *members]
    )
    return True


async def block(pool: Any, batcher: Batcher, me: str, target: str) -> None:
    """Record that `me` blocks `target` (idempotent); NotFound if target is unknown."""
    if target == me:
        raise InvalidRequest("you cannot block yourself")
    async with connection(pool) as conn:
        found = await conn.fetchval(
            "WITH t AS (SELECT id FROM users WHERE mobile_no = $2),"
            " ins AS (INSERT INTO blocks (blocker_id, blocked_id)"
            "   SELECT u.id, t.id FROM users u, t WHERE u.mobile_no = $1"
            "   ON CONFLICT DO NOTHING)"
            " SELECT count(*) FROM t",
            me,
            target,
        )
    if not found:
        raise NotFound("no user has this mobile number")
    await _mirror(batcher, "SADD", me, target)


async def unblock(pool: Any, batcher: Batcher, me: str, target: str) -> None:
    """Lift a block; NotFound if target is unknown or not blocked by `me`."""
    async with connection(pool) as conn:
        deleted = await conn.fetchval(
            "WITH d AS (DELETE FROM blocks k USING users a, users b"
            " WHERE a.mobile_no = $1 AND b.mobile_no = $2"
            " AND k.blocker_id = a.id AND k.blocked_id = b.id RETURNING 1)"
            " SELECT count(*) FROM d",
            me,
            target,
        )
    # SREM either way: a retry after a failed mirror must still lift the Redis copy
    await _mirror(batcher, "SREM", me, target)
    if not deleted:
        raise NotFound("this number is unknown or not blocked")


async def _mirror(batcher: Batcher, command: str, me: str, target: str) -> None:
    await asyncio.gather(
        batcher.run(command, keys.blocks(me), target),
        batcher.run(command, keys.blocks(target), keys.blocked_marker(me)),
    )


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
