"""chatnode.cluster without a Redis: key slots, and the redirect, hold and order logic
driven through fake shards whose replies the test hands out; redisio.Batcher's WAIT
holding fed bytes on a fake transport."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.cluster import key_slot as redis_py_key_slot
from redis.exceptions import ResponseError

from chatnode import cluster as cluster_mod
from chatnode import keys, lua
from chatnode.cluster import Cluster
from chatnode.errors import Unavailable
from chatnode.redisio import UNWAITED_SCRIPTS, Batcher
from chatnode.resp import Redirect, Wire
from chatnode.slotmap import key_slot, online_replicas
from tests.unit.transport import Transport

A, B, C = "127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"


class FakeShard:
    """Stands in for one primary's Batcher: records what it is sent; the test answers."""

    def __init__(self, addr: str) -> None:
        self.addr = addr
        self.sent: list[tuple[tuple[Any, ...], Callable[[Any], None]]] = []
        self.answered = 0
        self.closed = False
        self.replicas: int | None = None

    @property
    def backlog(self) -> int:
        return len(self.sent) - self.answered

    def congested(self) -> bool:
        return False

    def submit(self, callback: Callable[[Any], None], *args: Any) -> None:
        self.sent.append((args, callback))

    def commands(self) -> list[tuple[Any, ...]]:
        return [args for args, _ in self.sent]

    def answer(self, *replies: Any) -> None:
        """The next unanswered commands get these replies, in order."""
        for reply in replies:
            _, callback = self.sent[self.answered]
            self.answered += 1
            callback(reply)

    def set_replicas(self, replicas: int, wait_ms: int) -> None:
        self.replicas = replicas

    async def close(self) -> None:
        self.closed = True
        while self.answered < len(self.sent):
            self.answer(Unavailable("Redis is unavailable"))


class Fixture:
    def __init__(self, cluster: Cluster, shards: dict[str, FakeShard]) -> None:
        self.cluster = cluster
        self.shards = shards
        self.refreshes = 0


@pytest.fixture
def fx(monkeypatch: pytest.MonkeyPatch) -> Fixture:
    """A Cluster whose every slot is on A, with B known; new addresses get fake shards;
    refresh_soon is counted, not run."""
    c = Cluster("redis://127.0.0.1:7000/0")
    shards = {A: FakeShard(A), B: FakeShard(B)}
    f = Fixture(c, shards)
    c._shards = dict(shards)  # type: ignore[assignment]
    c._slots = [A] * keys.SLOTS

    def new_shard(addr: str) -> FakeShard:
        return shards.setdefault(addr, FakeShard(addr))

    def refresh_soon() -> None:
        f.refreshes += 1

    monkeypatch.setattr(c, "_shard", new_shard)
    monkeypatch.setattr(c, "refresh_soon", refresh_soon)
    return f


def key_not_in(slot: int) -> str:
    return next(
        k for k in (keys.part_tag(p) + ":k" for p in range(keys.PARTITIONS)) if keys.slot(k) != slot
    )


K = "{p1}:u:1:inbox"
S = keys.slot(K)
K2 = "{p1}:u:2:inbox"  # another key in the same slot


async def turn(times: int = 3) -> None:
    for _ in range(times):
        await asyncio.sleep(0)


# -- key slots -------------------------------------------------------------------------


def test_key_slot_of_each_command_form() -> None:
    assert key_slot(("GET", K)) == S
    assert key_slot(("EVALSHA", "sha", 2, K, "{p9}:x", "arg")) == S
    assert key_slot(("EVALSHA", "sha", 0, "arg")) is None
    stream = ("XREADGROUP", "GROUP", "g", "c", "COUNT", 10, "STREAMS", K, ">")
    assert key_slot(stream) == S
    assert key_slot(("XGROUP", "CREATE", K, "g", "0", "MKSTREAM")) == S
    assert key_slot(("SPUBLISH", keys.node_channel("n", 1), "x")) == keys.slot(keys.part_tag(1))
    for no_key in [("PING",), ("INFO", "replication"), ("SCRIPT", "LOAD", "return 1")]:
        assert key_slot(no_key) is None
    assert key_slot(("WAIT", 1, 1000)) is None and key_slot(("DBSIZE",)) is None


def test_keys_slot_agrees_with_redis_py_on_hash_tags() -> None:
    for key in [K, "plain", "{}empty-tag", "a{b}c{d}", "{unclosed", "x{}{y}", "{p1023}:q"]:
        assert keys.slot(key) == redis_py_key_slot(key.encode()), key


# -- redirects ---------------------------------------------------------------------------


async def test_moved_updates_the_owner_and_the_command_goes_there(fx: Fixture) -> None:
    got: list[Any] = []
    fx.cluster.submit(got.append, "GET", K)
    fx.shards[A].answer(Redirect(f"MOVED {S} {B}"))
    assert fx.cluster._slots[S] == B and fx.refreshes == 1
    await turn()
    assert fx.shards[B].commands() == [("GET", K)]
    fx.shards[B].answer("v")
    assert got == ["v"]
    assert not fx.cluster._held and not fx.cluster._out
    fx.cluster.submit(got.append, "GET", K2)  # the slot's next command goes straight there
    assert fx.shards[B].commands()[-1] == ("GET", K2)


async def test_ask_sends_asking_then_the_command_and_leaves_the_map(fx: Fixture) -> None:
    got: list[Any] = []
    fx.cluster.submit(got.append, "GET", K)
    fx.shards[A].answer(Redirect(f"ASK {S} {B}"))
    await turn()
    assert fx.shards[B].commands() == [("ASKING",), ("GET", K)]
    assert fx.cluster._slots[S] == A
    fx.shards[B].answer("OK", "v")
    assert got == ["v"]
    fx.cluster.submit(got.append, "GET", K2)
    assert fx.shards[A].commands()[-1] == ("GET", K2)


async def test_tryagain_holds_the_slot_and_keeps_the_order_other_slots_go_on(
    fx: Fixture,
) -> None:
    got: list[Any] = []
    other = key_not_in(S)
    fx.cluster.submit(lambda r: got.append(("first", r)), "SET", K, "1")
    fx.shards[A].answer(Redirect("TRYAGAIN Multiple keys request during rehashing of slot"))
    fx.cluster.submit(lambda r: got.append(("second", r)), "SET", K2, "2")
    fx.cluster.submit(lambda r: got.append(("elsewhere", r)), "GET", other)
    assert fx.shards[A].commands() == [("SET", K, "1"), ("GET", other)]  # not held
    fx.shards[A].answer("x")
    assert got == [("elsewhere", "x")]
    await asyncio.sleep(cluster_mod.RETRY_MIN_S / 2)
    assert len(fx.shards[A].sent) == 2  # the back-off
    await asyncio.sleep(cluster_mod.RETRY_MIN_S)
    assert fx.shards[A].commands()[2:] == [("SET", K, "1"), ("SET", K2, "2")]
    fx.shards[A].answer("OK", "OK")
    assert got[1:] == [("first", "OK"), ("second", "OK")]
    assert not fx.cluster._held


async def test_a_command_still_at_the_old_owner_goes_before_those_that_waited(
    fx: Fixture,
) -> None:
    """Two commands for a slot are out to A when the first comes back MOVED: the slot is
    held until the second is answered too (MOVED as well), so nothing submitted meanwhile
    reaches B before it; then all go, in the order they were submitted."""
    order: list[str] = []

    def cb(name: str) -> Callable[[Any], None]:
        return lambda reply: order.append(name)

    fx.cluster.submit(cb("1"), "SET", K, "1")
    fx.cluster.submit(cb("2"), "SET", K, "2")
    fx.shards[A].answer(Redirect(f"MOVED {S} {B}"))
    await turn()
    fx.cluster.submit(cb("3"), "SET", K, "3")
    await turn()
    assert fx.shards[B].sent == []  # 2 is still out to A
    fx.shards[A].answer(Redirect(f"MOVED {S} {B}"))
    await turn()
    assert [a[2] for a in fx.shards[B].commands()] == ["1", "2", "3"]
    fx.shards[B].answer("OK")
    fx.cluster.submit(cb("4"), "SET", K, "4")  # behind 2 and 3, still flying
    await turn()
    assert len(fx.shards[B].sent) == 3
    fx.shards[B].answer("OK", "OK")
    await turn()
    assert [a[2] for a in fx.shards[B].commands()] == ["1", "2", "3", "4"]
    fx.shards[B].answer("OK")
    assert order == ["1", "2", "3", "4"]
    assert not fx.cluster._held and not fx.cluster._out


async def test_past_the_deadline_a_command_fails_unavailable_and_frees_the_slot(
    fx: Fixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    got: list[Any] = []
    monkeypatch.setattr(cluster_mod, "REDIRECT_DEADLINE_S", 0.05)
    fx.cluster.submit(got.append, "SET", K, "1")
    fx.shards[A].answer(Redirect("CLUSTERDOWN The cluster is down"))
    assert fx.refreshes == 1
    await asyncio.sleep(0.06)  # resent once after the back-off; now past its deadline
    assert len(fx.shards[A].sent) == 2
    fx.shards[A].answer(Redirect("CLUSTERDOWN The cluster is down"))
    assert len(got) == 1 and isinstance(got[0], Unavailable)
    assert not fx.cluster._held
    fx.cluster.submit(got.append, "SET", K, "2")  # the slot is free: sent at once
    assert len(fx.shards[A].sent) == 3


async def test_unavailable_asks_for_the_map_again(fx: Fixture) -> None:
    got: list[Any] = []
    fx.cluster.submit(got.append, "GET", K)
    fx.shards[A].answer(Unavailable("Redis is unavailable"))
    assert fx.refreshes == 1 and isinstance(got[0], Unavailable)
    assert not fx.cluster._out


async def test_a_moved_loop_between_two_nodes_backs_off(fx: Fixture) -> None:
    """Two nodes that disagree about a slot (a failover settling) bounce its command: it
    is sent again at once twice, then with the back-off, not at full speed for the whole
    REDIRECT_DEADLINE_S."""
    got: list[Any] = []
    fx.cluster.submit(got.append, "GET", K)
    deadline = asyncio.get_running_loop().time() + 0.15
    while asyncio.get_running_loop().time() < deadline:
        for here, there in ((A, B), (B, A)):
            shard = fx.shards[here]
            while shard.answered < len(shard.sent):
                shard.answer(Redirect(f"MOVED {S} {there}"))
        await asyncio.sleep(0.001)
    sends = len(fx.shards[A].sent) + len(fx.shards[B].sent)
    assert 3 <= sends <= 7  # at once, at once, then 80, 160 ms apart
    assert not got


async def test_a_slot_the_map_left_unserved_goes_to_any_node(fx: Fixture) -> None:
    fx.cluster._slots[S] = ""
    fx.cluster._seed = B
    got: list[Any] = []
    fx.cluster.submit(got.append, "GET", K)  # no KeyError: a node says who owns it
    assert fx.shards[B].commands() == [("GET", K)]


async def test_a_command_without_a_key_goes_to_the_seed(fx: Fixture) -> None:
    fx.cluster._seed = B
    fx.cluster.submit(lambda r: None, "PING")
    assert fx.shards[B].commands() == [("PING",)]


# -- the map ------------------------------------------------------------------------------


def slots_reply(*owners: tuple[int, int, str]) -> list[Any]:
    out: list[Any] = []
    for first, last, addr in owners:
        host, _, port = addr.rpartition(":")
        out.append([first, last, [host, int(port), "id"]])
    return out


class Mapped:
    """A Cluster seeded with A whose map reads (CLUSTER SLOTS) each node answers with
    `replies[addr]` (refused if none), on fake shards."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.cluster = c = Cluster(f"redis://{A}/0")
        self.shards: dict[str, FakeShard] = {}
        self.asked: list[str] = []
        self.replies: dict[str, Any] = {A: slots_reply((0, keys.SLOTS - 1, A))}
        self.paused: set[str] = set()

        async def ask(opts: dict[str, Any], command: tuple[Any, ...]) -> Any:
            addr = f"{opts['host']}:{opts['port']}"
            self.asked.append(addr)
            if addr in self.paused:
                await asyncio.sleep(60)
            if addr not in self.replies:
                raise ConnectionRefusedError(addr)
            return self.replies[addr]

        monkeypatch.setattr(cluster_mod, "ask", ask)
        monkeypatch.setattr(c, "_shard", lambda a: self.shards.setdefault(a, FakeShard(a)))


@pytest.fixture
async def mapped(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Mapped]:
    m = Mapped(monkeypatch)
    yield m
    await m.cluster.close()


def key_from(first_slot: int) -> str:
    return next(
        k
        for k in (keys.part_tag(p) + ":k" for p in range(keys.PARTITIONS))
        if keys.slot(k) >= first_slot
    )


async def test_a_node_that_knows_no_slots_is_not_taken_for_the_map(mapped: Mapped) -> None:
    """The seed was reset (or replaced by a new node at its address): its empty CLUSTER
    SLOTS would leave the map stale for good; the next node known is asked."""
    mapped.replies[A] = slots_reply((0, 8191, A), (8192, keys.SLOTS - 1, B))
    await mapped.cluster.refresh()
    mapped.replies[A] = []
    mapped.replies[B] = slots_reply((0, keys.SLOTS - 1, B))
    await mapped.cluster.refresh()
    assert mapped.asked[-2:] == [A, B]
    assert set(mapped.cluster._slots) == {B}


async def test_a_paused_node_holds_a_map_read_for_map_ask_s_only(
    mapped: Mapped, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seed is SIGSTOPped (connected, answering nothing): the map is read from the
    next node after MAP_ASK_S, not after a command's whole timeout."""
    monkeypatch.setattr(cluster_mod, "MAP_ASK_S", 0.05)
    mapped.replies[A] = slots_reply((0, 8191, A), (8192, keys.SLOTS - 1, B))
    await mapped.cluster.refresh()
    mapped.paused.add(A)
    mapped.replies[B] = slots_reply((0, keys.SLOTS - 1, B))
    async with asyncio.timeout(1):
        await mapped.cluster.refresh()
    assert mapped.asked[-2:] == [A, B]
    assert set(mapped.cluster._slots) == {B}


async def test_replicas_are_counted_on_a_connection_of_their_own(mapped: Mapped) -> None:
    """INFO replication is asked beside the shard's connection (whose pipelines may all
    be blocked in a WAIT for the replica that died): each primary then waits for as many
    replicas as it has in sync, at most the configured number."""
    mapped.replies[A] = slots_reply((0, 8191, A), (8192, keys.SLOTS - 1, B))
    await mapped.cluster.refresh()
    mapped.cluster.set_replicas(1, 500)
    mapped.replies[A] = (  # one replica attached, still in its first sync: no use to WAIT
        "# Replication\r\nrole:master\r\nconnected_slaves:1\r\n"
        "slave0:ip=127.0.0.1,port=7004,state=wait_bgsave,offset=0,lag=0\r\n"
    )
    mapped.replies[B] = (
        "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n"
        "slave0:ip=127.0.0.1,port=7005,state=online,offset=99,lag=0\r\n"
        "slave1:ip=127.0.0.1,port=7006,state=online,offset=99,lag=1\r\n"
    )
    await mapped.cluster._count_replicas()
    assert mapped.shards[A].replicas == 0 and mapped.shards[B].replicas == 1
    assert mapped.shards[A].sent == [] and mapped.shards[B].sent == []


async def test_map_reads_are_spaced_however_often_they_are_asked_for(mapped: Mapped) -> None:
    """Every failing command asks for the map (a dead primary, CLUSTERDOWN): at most one
    read each MAP_MIN_S, each on a connection of its own."""
    await mapped.cluster.refresh()
    mapped.asked.clear()
    deadline = asyncio.get_running_loop().time() + 0.25
    while asyncio.get_running_loop().time() < deadline:
        mapped.cluster.refresh_soon()
        await asyncio.sleep(0.002)
    assert 1 <= len(mapped.asked) <= 3


async def test_a_node_that_left_the_map_answers_what_was_sent_there_first(
    mapped: Mapped,
) -> None:
    """A map read takes B's slots away while a command is out to B: B's connection stays
    until it answers (MOVED: sent to A), then closes."""
    c, shards = mapped.cluster, mapped.shards
    mapped.replies[A] = slots_reply((0, 8191, A), (8192, keys.SLOTS - 1, B))
    await c.refresh()
    key = key_from(8192)
    got: list[Any] = []
    c.submit(got.append, "GET", key)
    assert shards[B].commands() == [("GET", key)]
    mapped.replies[A] = slots_reply((0, keys.SLOTS - 1, A))
    await c.refresh()
    await turn()
    assert not shards[B].closed and B not in c._shards
    shards[B].answer(Redirect(f"MOVED {keys.slot(key)} {A}"))
    await turn()
    shards[A].answer("v")
    assert got == ["v"]
    await asyncio.sleep(cluster_mod.MAP_RETRY_S + 0.05)
    assert shards[B].closed


async def test_an_ask_target_outside_the_map_survives_the_map_read_it_causes(
    mapped: Mapped,
) -> None:
    """A node joining the cluster is the target of ASKs before any slot is its own (it is
    in no CLUSTER SLOTS reply): the map read the ASK asks for must not close it under
    the command sent there."""
    c, shards = mapped.cluster, mapped.shards
    await c.refresh()
    got: list[Any] = []
    c.submit(got.append, "GET", K)
    shards[A].answer(Redirect(f"ASK {S} {C}"))
    await turn()
    assert shards[C].commands() == [("ASKING",), ("GET", K)]
    await c.refresh()  # C is in no map yet
    await turn()
    assert not shards[C].closed
    shards[C].answer("OK", "v")
    assert got == ["v"]
    c.submit(got.append, "GET", K2)
    shards[A].answer(Redirect(f"ASK {S} {C}"))
    await turn()
    assert shards[C].commands()[2:] == [("ASKING",), ("GET", K2)]  # the same connection


async def test_close_fails_what_the_slots_hold_and_what_comes_back_redirected(
    fx: Fixture,
) -> None:
    got: list[Any] = []
    fx.cluster.submit(got.append, "SET", K, "1")
    fx.cluster.submit(got.append, "SET", K2, "2")
    fx.shards[A].answer(Redirect("TRYAGAIN Multiple keys"))
    fx.cluster.submit(got.append, "SET", K, "3")
    await fx.cluster.close()
    assert len(got) == 3 and all(isinstance(g, Unavailable) for g in got)
    assert not fx.cluster._held


# -- WAIT for replicas: redisio.Batcher holds the replies of writes ------------------------


def waiting_batcher(replicas: int = 1) -> tuple[Batcher, Wire, Transport]:
    b = Batcher("redis://127.0.0.1:1/0", replicas=replicas, replica_wait_ms=500)
    w = Wire(5.0, b._replied, b._load_scripts, True)
    t = Transport()
    w.connection_made(t)  # type: ignore[arg-type]
    b._wire = w
    return b, w, t


async def test_write_replies_wait_for_the_wait_reply() -> None:
    b, w, t = waiting_batcher()
    got: list[Any] = []
    b.submit(lambda r: got.append(("set", r)), "SET", "k", "v")
    b.submit(lambda r: got.append(("xack", r)), "XACK", "s", "g", "1-1")
    b.submit(lambda r: got.append(("script", r)), "EVALSHA", "sha", 1, "k")
    await turn()
    assert t.writes and b"WAIT" in t.writes[0] and t.writes[0].endswith(b"$3\r\n500\r\n")
    w.data_received(b"+OK\r\n:1\r\n$2\r\nok\r\n")
    assert got == [("xack", 1)]  # not a write that waits: delivered at once
    w.data_received(b":1\r\n")  # WAIT: one replica has them
    assert got[1:] == [("set", "OK"), ("script", "ok")]


@pytest.mark.parametrize(
    "wait_reply", [b":0\r\n", b"-ERR WAIT cannot be used with replica instances\r\n"]
)
async def test_too_few_replicas_fail_the_writes_and_error_replies_stay(wait_reply: bytes) -> None:
    b, w, _ = waiting_batcher()
    got: list[Any] = []
    b.submit(got.append, "SET", "k", "v")
    b.submit(got.append, "EVALSHA", "sha", 1, "k")
    b.submit(got.append, "DEL", "k")
    await turn()
    w.data_received(b"+OK\r\n-MOVED 1 127.0.0.1:7002\r\n-BUSYGROUP exists\r\n" + wait_reply)
    assert isinstance(got[0], Unavailable)
    assert isinstance(got[1], Redirect) and str(got[1]).startswith("MOVED")
    assert isinstance(got[2], ResponseError) and str(got[2]).startswith("BUSYGROUP")


async def test_a_lost_connection_fails_the_held_replies_once() -> None:
    """The write answered, the WAIT not yet: the connection goes; the writer hears
    unavailable (the write may be on no replica), once."""
    b, w, _ = waiting_batcher()
    got: list[Any] = []
    b.submit(got.append, "SET", "k", "v")
    await turn()
    w.data_received(b"+OK\r\n")
    assert got == []
    w.connection_lost(ConnectionResetError())
    assert len(got) == 1 and isinstance(got[0], Unavailable)


async def test_no_wait_without_writes_or_without_replicas() -> None:
    b, _, t = waiting_batcher()
    b.submit(lambda r: None, "GET", "k")
    await turn()
    assert b"WAIT" not in t.writes[0]
    b.set_replicas(0, 500)
    b.submit(lambda r: None, "SET", "k", "v")
    await turn()
    assert b"WAIT" not in t.writes[1]


# -- a closed Batcher ---------------------------------------------------------------------


async def test_a_closed_batcher_opens_no_connection_and_fails_late_commands() -> None:
    """A command submitted after close (a timer, a retired cluster node counted) fails
    as unavailable: it does not open a connection nobody would close."""
    b = Batcher("redis://127.0.0.1:1/0")
    await b.close()
    got: list[Any] = []
    b.submit(got.append, "PING")
    await turn()
    assert b._connecting is None
    assert len(got) == 1 and isinstance(got[0], Unavailable)


async def test_closing_a_batcher_is_not_a_lost_connection() -> None:
    lost: list[int] = []
    b = Batcher("redis://127.0.0.1:1/0", on_lost=lambda: lost.append(1))
    w = Wire(5.0, b._replied)
    w.connection_made(Transport())  # type: ignore[arg-type]
    b._wire = w
    w.lost.add_done_callback(b._wire_lost)
    await b.close()
    await turn()
    assert lost == []
    b2 = Batcher("redis://127.0.0.1:1/0", on_lost=lambda: lost.append(2))
    w2 = Wire(5.0, b2._replied)
    w2.connection_made(Transport())  # type: ignore[arg-type]
    b2._wire = w2
    w2.lost.add_done_callback(b2._wire_lost)
    w2.connection_lost(ConnectionResetError())
    await turn()
    assert lost == [2]


def test_online_replicas_counts_only_those_in_sync() -> None:
    info = (
        "role:master\r\nconnected_slaves:3\r\n"
        "slave0:ip=a,port=1,state=online,offset=5,lag=0\r\n"
        "slave1:ip=b,port=2,state=send_bulk,offset=0,lag=0\r\n"
        "slave2:ip=c,port=3,state=online,offset=5,lag=1\r\n"
    )
    assert online_replicas(info) == 2
    assert online_replicas("role:master\r\nconnected_slaves:0\r\n") == 0


def test_scripts_whose_loss_breaks_nothing_do_not_wait_for_a_replica() -> None:
    # a nudge, a read-only look, an ack (lost, it redelivers the same msgIds), a trim
    # (lost, the entries stay acked: the next trim takes them)
    assert UNWAITED_SCRIPTS == {
        lua.NUDGE.sha,
        lua.FIRST_ACKS.sha,
        lua.ACK_DEVICE.sha,
        lua.TRIM.sha,
    }
