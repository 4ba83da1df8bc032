"""A user's devices: listing, removal (its tokens revoked, its socket closed with 4003),
and the sweep that removes devices unseen for CHATNODE_DEVICE_IDLE_DAYS.

PostgreSQL holds the devices and each device's unexpired tokens (accounts.py). Removing
a device revokes those tokens like a logout does: in PostgreSQL in the same transaction
as the removal, then in Redis, then a logout message to the node holding the user for
each, which closes a socket opened with one of them (4003). The route sweep of every
node closes such a socket anyway if that message is lost (routesweep.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from chatnode import accounts, auth, blocks, channel, keys, logs, lua, presence
from chatnode.errors import ChatError, NotFound
from chatnode.redisio import Redis
from chatnode.routing import Router

log = logs.get(__name__)

DEFAULT_NAME = "default"  # the device of a login that names none (PROTOCOL v1 clients)
IDLE_SWEEP_S = 3600.0  # how often each node looks for idle devices, at most
IDLE_BATCH = 100  # devices removed per look, at most


def sweep_period(idle_days: float) -> float:
    """Seconds between a node's looks for idle devices: an hour, or a tenth of the idle
    time when that is shorter (each look also marks the node's connected devices seen)."""
    return max(0.5, min(IDLE_SWEEP_S, idle_days * 86400 / 10))


async def remove(
    pool: Any,
    batcher: Redis,
    router: Router,
    user_id: int,
    mobile: str,
    device_id: int,
    node: str,
    idle_days: float | None = None,
) -> None:
    """Remove one of the user's devices (NotFound if they have no such device, or with
    `idle_days`, if it was seen since): its tokens stop working on every node (as a
    logout's: auth.revoke_in_redis, Unavailable if Redis could not take them) and its
    socket closes with 4003."""
    removed = await accounts.remove_device(pool, user_id, device_id, node, idle_days)
    if removed is None:
        raise NotFound("no such device")
    name, revoked = removed
    device = keys.device_key(device_id, name)
    try:
        await auth.revoke_in_redis(batcher, revoked)
        await close_sessions(batcher, router, mobile, device, [jti for jti, _ in revoked])
        await left(batcher, mobile, device)
    except ChatError:  # the list may still name it: reload the user from PostgreSQL
        log.warning("device_not_released_in_redis", user=mobile, device=device_id)
        blocks.forget(batcher, mobile)
        raise
    log.info("device_removed", user=mobile, device=device_id, tokens=len(revoked))


async def close_sessions(
    batcher: Redis, router: Router, mobile: str, device: str, jtis: list[str]
) -> None:
    """Close the socket one of these tokens of the device opened (4003), on whichever
    node holds the device. Best effort: if the route look-up or the message fails, each
    node's route sweep closes it anyway (revoked token, or a device the list lacks)."""
    try:
        route = await batcher.run("GET", keys.route(mobile, device))
        for jti in jtis:
            router.to_route(route, mobile, channel.logout(keys.session(mobile, device), jti))
    except Exception as exc:
        log.warning("close_failed", user=mobile, error=type(exc).__name__)


async def joined(
    pool: Any, batcher: Redis, user_id: int, mobile: str, device_id: int, device: str
) -> None:
    """A login's device joins the user's list in Redis, with its consumer group (from the
    first entry still in the inbox); the user's connected devices hear how many there
    are now. If that fails, or the device was removed meanwhile (a removal's DROP_DEVICE
    may have run first), Redis's copy of the user is dropped: the next send reloads it
    from PostgreSQL. The login goes on either way."""
    args = [keys.account(mobile), keys.inbox(mobile), keys.loading(mobile)]
    try:
        await batcher.script(lua.ADD_DEVICE, args, [device, keys.group(device), mobile])
        if await accounts.device_exists(pool, user_id, device_id):
            return
    except ChatError as exc:
        log.warning("device_not_in_redis", user=mobile, error=type(exc).__name__)
    blocks.forget(batcher, mobile)


async def left(batcher: Redis, mobile: str, device: str) -> None:
    """A removed device leaves the list in Redis, its group and route go, and the entries
    only it still held leave the inbox (blocks.prune)."""
    box = keys.inbox(mobile)
    args = [keys.account(mobile), box, keys.route(mobile, device), keys.loading(mobile)]
    await batcher.script(lua.DROP_DEVICE, args, [device, keys.group(device), mobile])
    await blocks.prune(batcher, mobile)


def listing(devices: list[accounts.Device]) -> list[dict[str, str]]:
    """GET /devices' data."""
    return [
        {
            "deviceId": str(d.id),
            "name": d.name,
            "createdAt": _iso(d.created_at),
            "lastSeen": _iso(d.last_seen),
        }
        for d in devices
    ]


def _iso(at: datetime) -> str:
    return presence.iso(int(at.timestamp() * 1000))


async def remove_idle(
    pool: Any,
    batcher: Redis,
    router: Router,
    idle_days: float,
    node: str,
) -> int:
    """Remove up to IDLE_BATCH devices unseen for `idle_days`, like DELETE /devices does.
    Nodes may race on one: the loser finds it gone."""
    removed = 0
    for user_id, mobile, device_id in await accounts.idle_devices(pool, idle_days, IDLE_BATCH):
        try:
            args = (pool, batcher, router, user_id, mobile, device_id, node)
            await remove(*args, idle_days=idle_days)
            removed += 1
        except NotFound:  # removed by another node, or seen meanwhile
            continue
    await accounts.forget_expired_tokens(pool)
    if removed:
        log.info("idle_devices_removed", count=removed, idle_days=idle_days)
    return removed
