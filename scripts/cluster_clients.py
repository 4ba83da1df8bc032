"""Issue 10, point 1: chatnode.cluster.Cluster or redis-py's cluster client on the send path.

Run through `scripts/cluster-clients`. It starts its own local Redis Cluster (3 primaries,
1 replica each; chatnode.devcluster) in a temporary directory, and stops it at the end,
whatever happens. Each variant gets the same work:

- RECIPIENTS users Redis knows (the account key and the inbox group, as the integration
  tests make them), spread over every shard; the cluster is flushed and they are made
  again before each variant, so no variant runs on a bigger data set than another.
- CONCURRENCY asyncio tasks ("sockets"), each awaiting one SEND call at a time (EVALSHA of
  lua.SEND with inbox.message_call's keys and arguments, push flag "1", a fresh client id
  per call, recipients in turn), for WARMUP seconds unmeasured, then DURATION measured.
- Measured over the window: calls answered per second, this process's CPU
  (time.process_time) per 1,000 calls, the Redis nodes' CPU (all 6, from /proc) per
  1,000 calls, and the p50/p99 latency of the calls answered in the window.

The variants:

  chatnode          chatnode.cluster.Cluster, set_replicas(0, 1000): one redisio.Batcher
                    per primary, every command of one loop turn in one pipeline, one
                    connection per primary, at most 2 pipelines in flight on each.
  chatnode WAIT 1   the same with set_replicas(1, 1000): each pipeline ends with WAIT 1
                    1000, and the SEND replies are held until it answers.
  redis-py          redis.asyncio.cluster.RedisCluster, each call `await rc.evalsha(...)`:
                    a connection from the node's pool per command in flight (max_connections
                    CONCURRENCY + 10 per node, so it never raises MaxConnectionsError).
  redis-py pipe     the same client; a batcher that puts every call made in one loop turn
                    into one rc.pipeline(transaction=False), started with call_soon like
                    redisio.Batcher, executed in a task of its own with
                    raise_on_error=False (no cap on pipelines in flight), each call's
                    future settled from the pipeline's replies. The pipeline splits the
                    calls by primary and answers when every primary has. Calls go in with
                    pipe.execute_command("EVALSHA", ...): redis-py 8.1 blocks pipe.evalsha
                    in cluster pipelines (redis-py issue 2914).

SEND is loaded on every primary with rc.script_load before each variant (chatnode's
connections load every script again when they open).

Both clients parse with hiredis and speak RESP2; every variant uses the same event loop
(uvloop when installed, as chatnode's own entry point does).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio.cluster import ClusterNode, ClusterPipeline
from redis.asyncio.cluster import RedisCluster as PyCluster

from chatnode import frames, inbox, keys, lua
from chatnode.cluster import Cluster
from chatnode.devcluster import RedisCluster

SendCall = Callable[[list[str], list[Any]], Awaitable[Any]]

BODY = "hello, this is a benchmark message of about sixty bytes long"
INBOX_LIMIT = 10**9  # never "full": every call stores a message
WINDOW_S = 600
MAX_DURATION_S = 30.0
DRAIN_S = 10.0  # after the window: how long the sockets' last calls may take
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    name: str
    calls: int = 0
    errors: int = 0
    first_error: str = ""
    note: str = ""
    seconds: float = 0.0
    cpu_s: float = 0.0
    redis_cpu_s: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def row(self) -> str:
        per_k = 1000 / self.calls if self.calls else float("nan")
        lat = sorted(self.latencies)
        p50 = lat[len(lat) // 2] * 1000 if lat else float("nan")
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else float("nan")
        return (
            f"{self.name:<16}{self.calls / self.seconds:>10,.0f}{self.cpu_s * per_k * 1000:>12.1f}"
            f"{self.redis_cpu_s * per_k * 1000:>12.1f}{p50:>9.2f}{p99:>9.2f}{self.errors:>8}"
        )


HEADER = (
    f"{'client':<16}{'calls/s':>10}{'cpu ms/1k':>12}{'redis ms/1k':>12}"
    f"{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
)


def redis_cpu(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes so far (/proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


# -- the load: the same for every variant -----------------------------------------------


async def drive(
    name: str, call: SendCall, recipients: list[str], args: argparse.Namespace, pids: list[int]
) -> Result:
    result = Result(name)
    window = {"on": False, "done": False}

    async def socket(i: int) -> None:
        sender = f"+1555{i:07d}"
        n = 0
        while not window["done"]:
            to = recipients[(i * 7 + n) % len(recipients)]
            send = frames.Send(f"{i}-{n}", to, BODY)
            n += 1
            keys_, argv = inbox.message_call(
                sender, send, int(time.time() * 1000), INBOX_LIMIT, WINDOW_S, push=True
            )
            began = time.perf_counter()
            try:
                reply = await call(keys_, argv)
                ok = isinstance(reply, list) and reply and reply[0] == "ok"
                error = "" if ok else f"reply {reply!r}"[:120]
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:120]
            if window["on"]:
                if error:
                    result.errors += 1
                    result.first_error = result.first_error or error
                else:
                    result.calls += 1
                    result.latencies.append(time.perf_counter() - began)

    tasks = [asyncio.create_task(socket(i)) for i in range(args.concurrency)]
    try:
        await asyncio.sleep(args.warmup)
        window["on"] = True
        wall, cpu, rcpu = time.perf_counter(), time.process_time(), redis_cpu(pids)
        await asyncio.sleep(args.duration)
        window["on"] = False
        result.seconds = time.perf_counter() - wall
        result.cpu_s = time.process_time() - cpu
        result.redis_cpu_s = redis_cpu(pids) - rcpu
        window["done"] = True
        await asyncio.wait(tasks, timeout=DRAIN_S)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return result


# -- the variants -----------------------------------------------------------------------


async def run_chatnode(
    url: str, replicas: int, name: str, recipients: list[str], args: Any, pids: list[int]
) -> Result:
    sizes = [0, 0]  # pipelines, commands (WAITs included)

    def on_pipeline(size: int) -> None:
        sizes[0] += 1
        sizes[1] += size

    c = Cluster(url, on_pipeline=on_pipeline)
    await c.start()
    c.set_replicas(replicas, 1000)
    try:

        def call(keys_: list[str], argv: list[Any]) -> Awaitable[Any]:
            return c.script(lua.SEND, keys_, argv)

        result = await drive(name, call, recipients, args, pids)
        result.note = (
            f"{sizes[1] / max(sizes[0], 1):.1f} commands/pipeline/primary, "
            f"{len(c.primaries)} connections"
        )
        return result
    finally:
        await c.close()


def py_cluster(ports: list[int], connections: int) -> PyCluster:
    nodes = [ClusterNode("127.0.0.1", port) for port in ports]
    return PyCluster(startup_nodes=nodes, decode_responses=True, max_connections=connections)


async def run_redis_py(
    ports: list[int], recipients: list[str], args: Any, pids: list[int]
) -> Result:
    rc = py_cluster(ports, args.concurrency + 10)  # never MaxConnectionsError
    await rc.initialize()
    try:

        def call(keys_: list[str], argv: list[Any]) -> Awaitable[Any]:
            return rc.evalsha(lua.SEND.sha, len(keys_), *keys_, *argv)

        result = await drive("redis-py", call, recipients, args, pids)
        result.note = f"{connections(rc)} connections"
        return result
    finally:
        await rc.aclose()


def connections(rc: PyCluster) -> int:
    """Connections redis-py opened to the primaries (its pools grow on demand)."""
    return sum(len(node._connections) for node in rc.get_primaries())


class TurnPipeline:
    """Every call made in one loop turn goes into one rc.pipeline(transaction=False)."""

    def __init__(self, rc: PyCluster) -> None:
        self.rc = rc
        self.queue: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        self.scheduled = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.pipelines = 0
        self.commands = 0

    def call(self, keys_: list[str], argv: list[Any]) -> Awaitable[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self.queue.append((keys_, argv, fut))
        if not self.scheduled:
            self.scheduled = True
            loop.call_soon(self.flush)
        return fut

    def flush(self) -> None:
        self.scheduled = False
        batch, self.queue = self.queue, []
        if not batch:
            return
        pipe = self.rc.pipeline(transaction=False)
        for keys_, argv, _ in batch:
            # pipe.evalsha raises in redis-py 8.1 (EVALSHA is in PIPELINE_BLOCKED_COMMANDS,
            # redis-py issue 2914); the command itself routes by its keys like any other
            pipe.execute_command("EVALSHA", lua.SEND.sha, len(keys_), *keys_, *argv)
        self.pipelines += 1
        self.commands += len(batch)
        task = asyncio.get_running_loop().create_task(self.execute(pipe, batch))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def execute(
        self, pipe: ClusterPipeline, batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]]
    ) -> None:
        try:
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            replies = [exc] * len(batch)
        for (_, _, fut), reply in zip(batch, replies, strict=True):
            if fut.done():
                continue
            if isinstance(reply, BaseException):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)


async def run_redis_py_pipe(
    ports: list[int], recipients: list[str], args: Any, pids: list[int]
) -> Result:
    rc = py_cluster(ports, args.concurrency + 10)
    await rc.initialize()
    batcher = TurnPipeline(rc)
    try:
        result = await drive("redis-py pipe", batcher.call, recipients, args, pids)
        if batcher.tasks:
            await asyncio.wait(batcher.tasks, timeout=DRAIN_S)
        result.note = (
            f"{batcher.commands / max(batcher.pipelines, 1):.1f} calls/pipeline (all primaries), "
            f"{connections(rc)} connections"
        )
        return result
    finally:
        await rc.aclose()


# -- the cluster --------------------------------------------------------------------------


async def prepare(ports: list[int], count: int) -> list[str]:
    """FLUSHALL on every primary, SEND loaded on each, `count` recipients made again."""
    rc = py_cluster(ports, 20)
    await rc.initialize()
    try:
        await rc.flushall()  # FLUSHALL and SCRIPT LOAD go to every primary (redis-py's flags)
        await rc.script_load(lua.SEND.source)
        if await rc.script_exists(lua.SEND.sha) != [True]:
            raise RuntimeError("SEND is not loaded on every primary")
        rnd = random.Random(42)  # the same recipients every variant and run
        mobiles = list(dict.fromkeys(f"+44{rnd.randrange(10**9):09d}" for _ in range(count)))
        pipe = rc.pipeline(transaction=False)
        for mobile in mobiles:
            pipe.set(keys.account(mobile), "t")
            pipe.xgroup_create(keys.inbox(mobile), keys.GROUP, "0", mkstream=True)
        await pipe.execute()
        return mobiles
    finally:
        await rc.aclose()


async def shard_counts(ports: list[int], recipients: list[str]) -> str:
    rc = py_cluster(ports, 4)
    await rc.initialize()
    try:
        counts: dict[str, int] = {}
        for mobile in recipients:
            node = rc.get_node_from_key(keys.account(mobile))
            name = node.name if node is not None else "none"
            counts[name] = counts.get(name, 0) + 1
        server = await rc.info("server", target_nodes=rc.get_primaries()[0])
        if len(counts) != len(rc.get_primaries()):
            raise RuntimeError(f"recipients do not reach every shard: {counts}")
        spread = ", ".join(f"{n}: {c}" for n, c in sorted(counts.items()))
        return f"redis {server.get('redis_version', '?')}; recipients per primary: {spread}"
    finally:
        await rc.aclose()


async def main(cluster: RedisCluster, args: argparse.Namespace) -> list[Result]:
    ports = cluster.ports
    pids = [s.proc.pid for s in cluster.nodes.values() if s.proc is not None]
    url = cluster.url
    variants: list[tuple[str, Callable[[list[str]], Awaitable[Result]]]] = [
        ("chatnode", lambda r: run_chatnode(url, 0, "chatnode", r, args, pids)),
        ("chatnode WAIT 1", lambda r: run_chatnode(url, 1, "chatnode WAIT 1", r, args, pids)),
        ("redis-py", lambda r: run_redis_py(ports, r, args, pids)),
        ("redis-py pipe", lambda r: run_redis_py_pipe(ports, r, args, pids)),
    ]
    results = []
    for i, (name, run) in enumerate(variants):
        recipients = await prepare(ports, args.recipients)
        if i == 0:
            print(await shard_counts(ports, recipients))
        print(f"running {name} ...", flush=True)
        result = await run(recipients)
        if result.first_error:
            print(f"  ({name}: {result.errors} errors, first: {result.first_error})")
        results.append(result)
    return results


def run_loop(coro: Any) -> tuple[Any, str]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro), "asyncio"
    return uvloop.run(coro), f"uvloop {importlib.metadata.version('uvloop')}"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=200, help="sockets (default 200)")
    p.add_argument("--recipients", type=int, default=1000, help="users (default 1000)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds unmeasured (default 2)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured (default 10)")
    args = p.parse_args(argv)
    args.duration = min(max(args.duration, 1.0), MAX_DURATION_S)
    args.warmup = min(max(args.warmup, 0.0), MAX_DURATION_S)
    return args


def cli(argv: list[str]) -> int:
    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="chatnode-cluster-clients-") as tmp:
        cluster = RedisCluster(Path(tmp) / "cluster")
        try:
            cluster.start()
            results, loop = run_loop(main(cluster, args))
        finally:
            cluster.stop()
    cpus = len(os.sched_getaffinity(0))
    print()
    print(
        f"machine: nproc {cpus}, {platform.machine()}, Python {platform.python_version()}, "
        f"{loop}, redis-py {importlib.metadata.version('redis')}, "
        f"hiredis {importlib.metadata.version('hiredis')}"
    )
    print(
        f"load: {args.concurrency} sockets, 1 SEND in flight each, {args.recipients} recipients, "
        f"{args.warmup:g} s warm-up, {args.duration:g} s measured; cluster 3 primaries + 3 "
        f"replicas on this machine"
    )
    print(HEADER)
    for result in results:
        print(result.row())
    print()
    for result in results:
        print(f"{result.name}: {result.note} (whole run)")
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
