"""Redis Cluster: each command to the primary that owns its key's slot.

One redisio.Batcher per primary keeps what makes the single-Redis path fast: every
command for a shard in one event-loop turn goes out as one pipeline. The slot map comes
from CLUSTER SLOTS, asked of any node known (the URL's, then every node the map named),
again after a MOVED, a lost connection or a CLUSTERDOWN (at most every MAP_MIN_S), and
every MAP_REFRESH_S.

A command the cluster did not run (MOVED, ASK, TRYAGAIN, CLUSTERDOWN) is sent again: to
the new owner, to the ASK target after ASKING, or to the same slot after a back-off. Its
slot is held meanwhile, until every command sent for it before is answered: later
commands for that slot wait and go in their order, so the sends of one socket still
reach an inbox in the order the client made them. A command gives up (unavailable)
REDIRECT_DEADLINE_S after it was first sent. A command whose connection was lost is not
sent again (it may have run): the caller hears it is unavailable, as on a single Redis.

Commands with no key (PING, INFO, SCRIPT) go to any primary; `each` runs one on every
primary. Scripts are loaded on every primary's connection when it opens (redisio).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

from chatnode import logs
from chatnode.errors import Unavailable
from chatnode.lua import Script
from chatnode.redisio import COMMAND_TIMEOUT_S, Batcher, Commands, ignore
from chatnode.resp import Callback, Redirect, Reply, options
from chatnode.slotmap import ask, key_slot, online_replicas, parse_slots

log = logs.get(__name__)

REDIRECT_DEADLINE_S = 3.0
RETRY_MIN_S = 0.02
RETRY_MAX_S = 0.4
MAP_REFRESH_S = 10.0  # slots can move without telling us until a command hits them
MAP_RETRY_S = 0.2  # while a primary is unreachable: ask for the map this often
# Each node asked for the map answers within this or the next is asked: a paused node
# (connected, answering nothing) must not hold every map read for a command's timeout.
MAP_ASK_S = 1.0
# Map reads at most this often: every command failing (a dead primary, CLUSTERDOWN) asks
# for one, and each opens a connection of its own.
MAP_MIN_S = 0.1
# A node that left the map keeps its connection this long at most, for the replies (a
# MOVED, most likely) of the commands already on their way there.
RETIRE_S = 2 * COMMAND_TIMEOUT_S
REPLICA_COUNT_S = 1.0  # how often each primary's attached replicas are counted


class _Pending:
    """A command the cluster did not run yet, waiting to be sent again."""

    __slots__ = ("args", "ask", "callback", "deadline", "seq", "slot", "tries")

    def __init__(self, seq: int, slot: int, args: tuple[Any, ...], callback: Callback) -> None:
        self.seq = seq
        self.slot = slot
        self.args = args
        self.callback = callback
        self.deadline = time.monotonic() + REDIRECT_DEADLINE_S
        self.ask: str | None = None
        self.tries = 0


class _Held:
    """A slot whose commands wait behind one the cluster redirected."""

    __slots__ = ("flying", "queue", "timer")

    def __init__(self) -> None:
        self.queue: list[_Pending] = []  # in the order they were first submitted
        self.flying = 0  # sent again, not answered yet
        self.timer: asyncio.TimerHandle | None = None


class Cluster(Commands):
    """The Batcher interface over every primary of a Redis Cluster."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = COMMAND_TIMEOUT_S,
        on_pipeline: Callable[[int], None] | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self._opts = options(url)
        self._timeout = timeout
        self._on_pipeline = on_pipeline
        self.on_lost = on_lost  # a primary's connection was lost: writes may be lost too
        self.replicas = 0  # WAIT for this many replicas (set_replicas)
        self.replica_wait_ms = 1000
        self._seed = f"{self._opts.get('host', '127.0.0.1')}:{self._opts.get('port', 6379)}"
        self._known: list[str] = [self._seed]
        self._slots: list[str] = []
        self._shards: dict[str, Batcher] = {}
        self._held: dict[int, _Held] = {}
        self._out: dict[int, int] = {}  # slot: commands sent once, not answered yet
        self._seq = itertools.count()
        self._retiring: set[Batcher] = set()
        self._asked: dict[str, float] = {}  # ASK targets outside the map: when last asked
        self._tasks: set[asyncio.Task[None]] = set()
        self._map_read_at = -MAP_MIN_S
        self._refreshing: asyncio.Task[None] | None = None
        self._stale = False
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False

    # -- the map ---------------------------------------------------------------------

    async def start(self) -> None:
        """Read the slot map (raises if no node answers), then keep it fresh."""
        await self._read_map()
        self._watcher = asyncio.get_running_loop().create_task(self._watch_map())

    def set_replicas(self, replicas: int, wait_ms: int) -> None:
        """WAIT for `replicas` after each pipeline with writes, on every primary."""
        self.replicas, self.replica_wait_ms = replicas, wait_ms
        for shard in self._shards.values():
            shard.set_replicas(replicas, wait_ms)

    @property
    def primaries(self) -> list[str]:
        return list(self._shards)

    def owner(self, slot: int) -> dict[str, Any]:
        """Connection options of the primary serving `slot` (routing subscribes there)."""
        return self._node_opts(self._slots[slot])

    def _node_opts(self, addr: str) -> dict[str, Any]:
        host, _, port = addr.rpartition(":")
        return {**self._opts, "host": host, "port": int(port), "db": 0}

    async def _read_map(self) -> None:
        self._map_read_at = time.monotonic()
        error: Exception | None = None
        for addr in list(self._known):
            try:
                reply = await asyncio.wait_for(
                    ask(self._node_opts(addr), ("CLUSTER", "SLOTS")), MAP_ASK_S
                )
            except Exception as exc:
                error = exc
                continue
            if isinstance(reply, Exception):
                error = reply
                continue
            if not reply:  # a node that knows no cluster (reset, or new and not met yet)
                error = Unavailable(f"{addr} serves no slots")
                continue
            self._apply(reply)
            return
        raise Unavailable(f"no Redis Cluster node answered: {error}")

    def _apply(self, reply: list[Any]) -> None:
        slots, nodes = parse_slots(reply, self._opts.get("host", "127.0.0.1"))
        known = [self._seed, *nodes]
        if "" in slots:
            log.warning("redis_cluster_slots_uncovered", count=slots.count(""))
            for slot, addr in enumerate(slots):  # keep what we knew for those
                if not addr and self._slots:
                    slots[slot] = self._slots[slot]
        self._known = list(dict.fromkeys(known + self._known))[:64]
        changed = slots != self._slots
        self._slots = slots
        for addr in set(slots) - set(self._shards) - {""}:
            self._shards[addr] = self._shard(addr)
        now = time.monotonic()
        self._asked = {a: t for a, t in self._asked.items() if now - t < MAP_REFRESH_S}
        for addr in set(self._shards) - set(slots) - set(self._asked):
            self._retire(self._shards.pop(addr))
        if changed:
            log.info("redis_cluster_map", primaries=len(self._shards))

    def _shard(self, addr: str) -> Batcher:
        return Batcher(
            "",
            opts=self._node_opts(addr),
            timeout=self._timeout,
            on_pipeline=self._on_pipeline,
            redirects=True,
            replicas=self.replicas,
            replica_wait_ms=self.replica_wait_ms,
            on_lost=self._lost,
        )

    def _retire(self, shard: Batcher) -> None:
        """Close a node's connection once it left the map, when the commands on their way
        there are answered (a MOVED, an ASK target's reply): closing it at once would fail
        them as unavailable, though they may have run."""
        self._retiring.add(shard)
        task = asyncio.get_running_loop().create_task(self._drain(shard))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, shard: Batcher) -> None:
        try:
            for _ in range(round(RETIRE_S / MAP_RETRY_S)):
                if not shard.backlog:
                    break
                await asyncio.sleep(MAP_RETRY_S)
        finally:
            self._retiring.discard(shard)
            await shard.close()

    def _lost(self) -> None:
        self._stale = True
        if self.on_lost is not None and not self._closed:
            try:
                self.on_lost()
            except Exception:
                log.exception("redis_cluster_on_lost_failed")

    async def refresh(self) -> None:
        """Read the map now (routing does before it subscribes again)."""
        try:
            await self._read_map()
        except Exception as exc:
            log.warning("redis_cluster_map_failed", error=str(exc)[:200])

    def refresh_soon(self) -> None:
        """Read the map again at the next chance (a MOVED, a failover, CLUSTERDOWN)."""
        self._stale = True
        if self._refreshing is None and not self._closed:
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        try:
            wait = self._map_read_at + MAP_MIN_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._stale = False
            await self._read_map()
        except Exception as exc:
            self._stale = True
            log.warning("redis_cluster_map_failed", error=str(exc)[:200])
        finally:
            self._refreshing = None

    async def _watch_map(self) -> None:
        last = counted = time.monotonic()
        while not self._closed:
            await asyncio.sleep(MAP_RETRY_S)
            now = time.monotonic()
            if self._stale or now - last > MAP_REFRESH_S:
                last = now
                if self._refreshing is None:
                    self.refresh_soon()
            if self.replicas and now - counted > REPLICA_COUNT_S:
                counted = now
                await self._count_replicas()

    async def _count_replicas(self) -> None:
        """Each primary waits for CHATNODE_REPLICA_ACKS replicas, or for as many as are
        attached and in sync if fewer (slotmap.online_replicas). A primary whose
        replicas are all gone (its replica was just promoted, and the old primary is
        dead) then takes writes as a single Redis would, instead of refusing them all
        until a replica comes back. A replica that is attached but slow or paused still
        counts: writes wait for it, and fail as unavailable if it does not answer.

        INFO goes on a connection of its own: on the shard's, it would wait behind the
        pipelines whose WAIT blocks for want of that replica, and never be counted."""
        shards = list(self._shards.items())
        infos = await asyncio.gather(
            *(self._ask_in_time(addr, ("INFO", "replication")) for addr, _ in shards)
        )
        for (_, shard), info in zip(shards, infos, strict=True):
            if info is None or isinstance(info, Exception):
                continue
            shard.set_replicas(min(self.replicas, online_replicas(info)), self.replica_wait_ms)

    async def _ask_in_time(self, addr: str, command: tuple[Any, ...]) -> Any:
        try:
            return await asyncio.wait_for(ask(self._node_opts(addr), command), REPLICA_COUNT_S)
        except Exception:
            return None

    # -- commands --------------------------------------------------------------------

    def submit(self, callback: Callback, *args: Any) -> None:
        slot = key_slot(args)
        if slot is None:
            self._any().submit(callback, *args)
            return
        held = self._held.get(slot) if self._held else None
        pending = _Pending(next(self._seq), slot, args, callback)
        if held is not None:
            held.queue.append(pending)
            return
        self._send(pending, False)

    def _send(self, p: _Pending, retry: bool) -> None:
        if p.ask is not None:
            # a node joining the cluster is in no map until a slot is its own
            self._asked[p.ask] = time.monotonic()
            shard = self._shards.get(p.ask) or self._ask_shard(p.ask)
            shard.submit(ignore, "ASKING")
        else:
            # a slot no primary served when the map was read: any node tells its owner
            shard = self._shards.get(self._slots[p.slot]) or self._any()
        if not retry:
            self._out[p.slot] = self._out.get(p.slot, 0) + 1
        shard.submit(self._watch(p, retry), *p.args)

    def _ask_shard(self, addr: str) -> Batcher:
        shard = self._shards[addr] = self._shard(addr)
        self.refresh_soon()
        return shard

    def _watch(self, p: _Pending, retry: bool) -> Callback:
        def reply(value: Reply) -> None:
            if not retry:
                self._returned(p.slot)
            if isinstance(value, Redirect):
                self._redirected(p, value, retry)
                return
            if isinstance(value, Unavailable):
                self.refresh_soon()
            if retry:
                self._landed(p.slot)
            elif p.slot in self._held:
                self._landed(p.slot, counted=True)  # the slot may wait for it
            p.callback(value)

        return reply

    def _returned(self, slot: int) -> None:
        left = self._out[slot] - 1
        if left:
            self._out[slot] = left
        else:
            del self._out[slot]

    def _redirected(self, p: _Pending, error: Redirect, retry: bool) -> None:
        held = self._held.get(p.slot)
        if held is None:
            held = self._held[p.slot] = _Held()
        if retry:
            held.flying -= 1
        text = str(error)
        kind = text.split(" ", 1)[0]
        p.tries += 1
        if time.monotonic() > p.deadline or self._closed:
            log.warning("redis_cluster_gave_up", reply=text[:80])
            with contextlib.suppress(Exception):
                p.callback(Unavailable("Redis Cluster is unavailable"))
            self._landed(p.slot, counted=True)
            return
        # at once after a MOVED or an ASK, but not in a loop: two nodes that disagree
        # about a slot (a failover still settling) would bounce it at full speed
        delay = min(RETRY_MIN_S * 2 ** (p.tries - 1), RETRY_MAX_S)
        p.ask = None
        if kind == "MOVED":
            addr = text.split()[2]
            self._slots[p.slot] = addr
            if addr not in self._shards:
                self._shards[addr] = self._shard(addr)
            self.refresh_soon()
            delay = 0.0 if p.tries <= 2 else delay
        elif kind == "ASK":
            p.ask = text.split()[2]
            delay = 0.0 if p.tries <= 2 else delay
        elif kind == "CLUSTERDOWN":  # a failover; TRYAGAIN: keys split by a migration
            self.refresh_soon()
        bisect.insort(held.queue, p, key=lambda q: q.seq)
        if held.timer is None:
            held.timer = asyncio.get_running_loop().call_later(delay, self._release, p.slot)

    def _landed(self, slot: int, counted: bool = False) -> None:
        """A command sent again was answered: the slot goes on when all of them are, and
        every command sent before the slot was held (one still on its way to the old
        owner may come back MOVED: it goes before those that waited)."""
        held = self._held.get(slot)
        if held is None:
            return
        if not counted:
            held.flying -= 1
        if held.flying <= 0 and held.timer is None and slot not in self._out:
            if held.queue:
                self._release(slot)
            else:
                del self._held[slot]

    def _release(self, slot: int) -> None:
        held = self._held.get(slot)
        if held is None:
            return
        held.timer = None
        if held.flying > 0 or slot in self._out:
            return  # the rest goes when those are answered
        queue, held.queue = held.queue, []
        if not queue:
            del self._held[slot]
            return
        for p in queue:
            held.flying += 1
            self._send(p, True)

    def _any(self) -> Batcher:
        shard = self._shards.get(self._seed)
        return shard if shard is not None else next(iter(self._shards.values()))

    # -- the Batcher interface ---------------------------------------------------------

    @property
    def backlog(self) -> int:
        held = sum(len(h.queue) + h.flying for h in self._held.values())
        return held + sum(s.backlog for s in self._shards.values())

    def congested(self) -> bool:
        return any(s.congested() for s in self._shards.values())

    def when_relieved(self, callback: Callable[[], None]) -> None:
        for shard in self._shards.values():
            if shard.congested():
                shard.when_relieved(lambda: self.when_relieved(callback))
                return
        callback()

    def submit_script(
        self, callback: Callback, script: Script, keys_: Sequence[str], args: Sequence[Any]
    ) -> None:
        self.submit(callback, "EVALSHA", script.sha, len(keys_), *keys_, *args)

    def defer(self, callback: Callback, *args: Any) -> None:
        # a deferred command's order matters as much as a submitted one's; what it saves
        # (a write of its own) a cluster's shards save with their own batching
        self.submit(callback, *args)

    async def each(self, *args: Any) -> list[Any]:
        """Run a command with no key on every primary."""
        futures = []
        for shard in list(self._shards.values()):
            futures.append(shard.call(*args))
        return list(await asyncio.gather(*futures))

    async def close(self) -> None:
        self._closed = True
        for task in (self._watcher, self._refreshing, *self._tasks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for held in self._held.values():
            if held.timer is not None:
                held.timer.cancel()
            for p in held.queue:
                with contextlib.suppress(Exception):
                    p.callback(Unavailable("Redis is unavailable"))
        self._held.clear()
        await asyncio.gather(*(s.close() for s in [*self._shards.values(), *self._retiring]))
