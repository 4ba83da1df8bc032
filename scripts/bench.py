"""chatnode benchmark: paced 1:1 traffic over two nodes, idle sockets, login storm.

Run through `scripts/bench` (it installs chatnode into .venv first). Modes:

    scripts/bench --rate 1500 --duration 20        one paced run
    scripts/bench --sweep                          step the rate until p99 > 100 ms or loss
    scripts/bench --sweep --devices 3              the same with 3 devices (sockets) per user
    scripts/bench --idle 10000                     10,000 idle sockets on each node: RSS
    scripts/bench --rate 1500 --login-storm 50     the same run without, then with 50 logins/s

It starts a private Redis (append-only file, `appendfsync everysec` unless asked), uses
the local PostgreSQL (or starts one) and starts two nodes; `--http/--ws` (and `--pids`
for their CPU) target running nodes instead. Every message is durable in its
recipient's inbox until acked; every recipient acks every message and receipt. Each run
prints a readable table and one JSON line, with the commit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from loadgen import idle_entry, worker_entry  # noqa: E402

from chatnode import devstack  # noqa: E402
from chatnode.devcluster import RedisCluster  # noqa: E402
from tests.pgutil import ensure_database  # noqa: E402

P99_LIMIT_MS = 100.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
PASSWORD = "benchpass1"
SEND_BUCKET = 'chatnode_send_seconds_bucket{le="'


# -- processes, their CPU and memory ---------------------------------------------------


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except OSError:
        return 0


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@dataclass
class Cluster:
    redis: devstack.RedisServer | None
    redis_url: str
    http: list[str] = field(default_factory=list)
    ws: list[str] = field(default_factory=list)
    nodes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    node_pids: list[int] = field(default_factory=list)
    owned_pg: devstack.PostgresServer | None = None
    tmp: Path | None = None
    redis_cluster: RedisCluster | None = None

    def pids(self) -> dict[str, int]:
        """Every process whose CPU is reported: nodes, and Redis (each shard's primary
        and replica on a cluster, named by role and port as they were at the start)."""
        out = {f"node{i + 1}": pid for i, pid in enumerate(self.node_pids)}
        if self.redis is not None and self.redis.proc is not None:
            out["redis"] = self.redis.proc.pid
        rc = self.redis_cluster
        if rc is not None:
            for n, primary in enumerate(sorted(rc.primaries()), 1):
                out[f"shard{n}-primary"] = rc.nodes[primary].proc.pid  # type: ignore[union-attr]
                for replica in rc.replicas_of(primary):
                    out[f"shard{n}-replica"] = rc.nodes[replica].proc.pid  # type: ignore[union-attr]
        return out

    def stop(self) -> None:
        for proc in self.nodes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.nodes:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.redis is not None:
            self.redis.stop()
        if self.redis_cluster is not None:
            self.redis_cluster.stop()
        if self.owned_pg is not None:
            self.owned_pg.stop()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def raise_file_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def target_cluster(args: argparse.Namespace) -> Cluster:
    """Nodes that run already (--http, --ws, optionally --pids for their CPU)."""
    http, ws = args.http.split(","), args.ws.split(",")
    if len(http) != len(ws):
        raise SystemExit("bench: --http and --ws need as many URLs each")
    pids = [int(p) for p in args.pids.split(",")] if args.pids else []
    return Cluster(None, args.redis_url, http=http, ws=ws, node_pids=pids)


def start_cluster(args: argparse.Namespace) -> Cluster:
    """A private Redis, the local PostgreSQL (or a private one) and `--nodes` nodes."""
    tmp = Path(tempfile.mkdtemp(prefix="chatnode-bench-"))
    os.chmod(tmp, 0o755)
    redis = None
    redis_cluster = None
    redis_url = args.redis_url
    if args.redis_cluster:
        redis_cluster = RedisCluster(tmp / "redis-cluster").start()
        redis_url = redis_cluster.url
    elif not redis_url:
        redis = devstack.RedisServer(tmp / "redis", fsync=args.appendfsync).start()
        redis_url = redis.url
    cluster = Cluster(redis, redis_url, tmp=tmp, redis_cluster=redis_cluster)
    database_url = args.database_url
    if not database_url:
        database_url = "postgresql://127.0.0.1:5432/chatnode_bench"
        if not asyncio.run(
            ensure_database("postgresql://127.0.0.1:5432/postgres", "chatnode_bench")
        ):
            cluster.owned_pg = devstack.PostgresServer(tmp / "pg", database="chatnode_bench")
            database_url = cluster.owned_pg.start().url
    env = {
        **os.environ,
        "CHATNODE_REDIS_URL": redis_url,
        "CHATNODE_DATABASE_URL": database_url,
        "CHATNODE_JWT_SECRET": "bench-" + "s" * 40,
        "CHATNODE_BCRYPT_ROUNDS": str(args.bcrypt_rounds),
        "CHATNODE_LOG_FORMAT": "json",
        # every bench user signs up from 127.0.0.1
        "CHATNODE_SIGNUPS_PER_ADDRESS": "1000000",
        "CHATNODE_LOOKUPS_PER_USER": "1000000",
        "CHATNODE_LOOKUPS_PER_ADDRESS": "1000000",
    }
    migrate = subprocess.run(
        [sys.executable, "-m", "chatnode", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if migrate.returncode != 0:
        cluster.stop()
        raise SystemExit(f"bench: migrate failed: {migrate.stderr}")
    for i in range(args.nodes):
        http, ws = devstack.free_port(), devstack.free_port()
        with open(tmp / f"node{i + 1}.log", "wb") as log:
            proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "chatnode", "serve", "--node-id", f"bench-{i + 1}"),
                    *("--http-port", str(http), "--ws-port", str(ws)),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        cluster.nodes.append(proc)
        cluster.node_pids.append(proc.pid)
        cluster.http.append(f"http://127.0.0.1:{http}")
        cluster.ws.append(f"ws://127.0.0.1:{ws}/ws")
        deadline = time.monotonic() + 30
        while not (devstack.port_open(ws) and devstack.port_open(http)):
            if proc.poll() is not None or time.monotonic() > deadline:
                cluster.stop()
                raise SystemExit(f"bench: node {i + 1} failed to start")
            time.sleep(0.05)
    return cluster


def scrape(base: str) -> dict[str, Any]:
    """From a node's /metrics: Redis pipelines and commands, the send-path histogram."""
    out: dict[str, Any] = {"pipelines": 0.0, "commands": 0.0, "send_buckets": {}}
    with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            name, _, value = line.rpartition(" ")
            if name == "chatnode_redis_pipelines_total":
                out["pipelines"] = float(value)
            elif name == "chatnode_redis_commands_total":
                out["commands"] = float(value)
            elif name.startswith(SEND_BUCKET):
                out["send_buckets"][name[len(SEND_BUCKET) : -2]] = float(value)
    return out


def histogram_p99_ms(before: dict[str, float], after: dict[str, float]) -> float | None:
    """The upper bound of the bucket holding the 99th percentile of the run's sends."""
    bounds = sorted(after, key=lambda b: float(b))
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= 0.99 * counts[-1]:
            return float(bound) * 1000
    return None


# -- users -------------------------------------------------------------------------------


async def make_users(http_urls: list[str], count: int, devices: int = 1) -> list[dict[str, Any]]:
    """Sign up and log in `count` fresh users; returns mobile, token and home node index.
    With `devices` > 1 each logs in as that many named devices (`tokens`); with one, a
    v1 login (the default device), as before devices."""
    prefix = random.randrange(10**5)
    users = [{"mobile": f"+8{prefix:05d}{i:06d}", "node": i % len(http_urls)} for i in range(count)]
    sem = asyncio.Semaphore(32)
    async with aiohttp.ClientSession() as http:

        async def one(u: dict[str, Any]) -> None:
            base = http_urls[u["node"]]
            async with sem:
                body = {"name": "bench", "mobileNo": u["mobile"], "password": PASSWORD}
                async with http.post(base + "/auth/signup", json=body) as r:
                    assert r.status == 201, await r.text()
                u["tokens"] = []
                for j in range(devices):
                    named = {**body, "device": f"d{j}"} if devices > 1 else body
                    async with http.post(base + "/auth/login", json=named) as r:
                        assert r.status == 200, await r.text()
                        u["tokens"].append((await r.json())["token"])
                u["token"] = u["tokens"][0]

        await asyncio.gather(*(one(u) for u in users))
    return users


# -- paced traffic -----------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def pair_up(cluster: Cluster, users: list[dict[str, Any]], procs: int) -> list[list[dict]]:
    """Pairs (i, i + n/2) talk both ways, each end on another node; a pair stays in one
    load generator, so loss is judged where both ends are known."""
    half = len(users) // 2
    for i in range(half):
        a, b = users[i], users[i + half]
        if a["node"] == b["node"]:
            b["node"] = (a["node"] + 1) % len(cluster.ws)
        a["target"], b["target"] = b["mobile"], a["mobile"]
    for u in users:
        u["ws"] = cluster.ws[u["node"]]
    groups: list[list[dict[str, Any]]] = [[] for _ in range(procs)]
    for i in range(half):
        groups[i % procs] += [*sockets(cluster, users[i]), *sockets(cluster, users[i + half])]
    return groups


def sockets(cluster: Cluster, u: dict[str, Any]) -> list[dict[str, Any]]:
    """One load-generator socket per device of `u`: device 0 on the user's node (it
    sends), the others spread over the nodes after it."""
    nodes = len(cluster.ws)
    tokens = u.get("tokens") or [u["token"]]
    return [
        {**u, "token": t, "device": j, "ws": cluster.ws[(u["node"] + j) % nodes]}
        for j, t in enumerate(tokens)
    ]


def run_load(
    cluster: Cluster, users: list[dict[str, Any]], rate: float, args: argparse.Namespace
) -> dict[str, Any]:
    """One paced run from `--procs` load generator processes."""
    procs = max(1, args.procs)
    ctx = mp.get_context("spawn")
    pipes, workers = [], []
    for group in pair_up(cluster, users, procs):
        parent, child = ctx.Pipe(duplex=False)
        spec = {
            "users": group,
            "rate": rate / procs,
            "duration": args.duration,
            "drain": args.drain,
            "body_bytes": args.body_bytes,
            "client": args.client,
        }
        proc = ctx.Process(target=worker_entry, args=(spec, child), daemon=True)
        proc.start()
        pipes.append(parent)
        workers.append(proc)
    time.sleep(args.warmup)
    stats = RedisStats(cluster)
    scrape0 = [scrape(u) for u in cluster.http]
    pids = cluster.pids()
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    wall0 = time.monotonic()
    results = []
    for pipe in pipes:
        if not pipe.poll(args.duration + args.drain + 120):
            raise SystemExit("bench: a load generator did not report")
        results.append(pipe.recv())
    wall = time.monotonic() - wall0
    cpu = {name: (cpu_seconds(pid) - cpu0[name]) / wall for name, pid in pids.items()}
    scrape1 = [scrape(u) for u in cluster.http]
    for proc in workers:
        proc.join(timeout=10)
    summary = summarize(results, rate, cpu, args)
    summary["redis_usec_per_msg"], aof = stats.per_message(summary["delivered"])
    if aof:
        summary["redis_aof"] = aof
    summary["redis_io_per_s"] = {
        f"node{i + 1}": {k: round((b[k] - a[k]) / wall, 1) for k in ("pipelines", "commands")}
        for i, (a, b) in enumerate(zip(scrape0, scrape1, strict=True))
    }
    summary["server_send_p99_le_ms"] = {
        f"node{i + 1}": histogram_p99_ms(a["send_buckets"], b["send_buckets"])
        for i, (a, b) in enumerate(zip(scrape0, scrape1, strict=True))
    }
    return summary


def summarize(
    results: list[dict[str, Any]], rate: float, cpu: dict[str, float], args: argparse.Namespace
) -> dict[str, Any]:
    acc, msg, dlv = [], [], []
    errors: dict[str, int] = {}
    sent = accepted = received = dup = missing_receipts = lost = own = 0
    devices = args.devices
    seconds = max(r["send_seconds"] for r in results)
    for i, r in enumerate(results):
        acc += r["accepted_ms"]
        msg += r["message_ms"]
        dlv += r["delivered_ms"]
        sent += r["sent"]
        dup += r["duplicated"]
        missing_receipts += r["missing_receipts"]
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
        got = set(r["received"])  # "<sender>/<client id>#<device>"
        ids = set(r["accepted_ids"])
        accepted += len(ids)
        received += len(got)
        lost += len({f"{i}#{d}" for i in ids for d in range(devices)} - got)  # on any device
        own += r["own"]
        cpu[f"loadgen{i + 1}"] = r["cpu_s"] / seconds

    def pct(values: list[float]) -> dict[str, float]:
        return {
            q: round(percentile(values, v), 2)
            for q, v in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
        }

    return {
        "mode": "rate",
        "commit": commit(),
        "offered_msgs_s": rate,
        "sent_msgs_s": round(sent / seconds, 1),
        "delivered_msgs_s": round(received / seconds, 1),
        "sent": sent,
        "accepted": accepted,
        "delivered": received,
        "lost": lost,
        "duplicated": dup,
        "devices": devices,
        "own_copies_missing": accepted * (devices - 1) - own,  # (a surplus is a duplicate)
        "missing_receipts": missing_receipts,
        "errors": errors,
        "send_to_accepted_ms": pct(acc),
        "send_to_message_ms": pct(msg),
        "send_to_delivered_receipt_ms": pct(dlv),
        "cpu_cores": {k: round(v, 3) for k, v in cpu.items()},
        "users": args.users,
        "procs": args.procs,
        "duration_s": args.duration,
        "body_bytes": args.body_bytes,
        "client": "chatnode.client" if args.client else "sans-I/O",
        "appendfsync": args.appendfsync if args.redis_url == "" else "external",
    }


def held(r: dict[str, Any]) -> bool:
    """The run kept p99 send->message under the limit and lost, doubled or missed nothing."""
    return (
        r["send_to_message_ms"]["p99"] < P99_LIMIT_MS
        and r["lost"] == 0
        and r["duplicated"] == 0
        and not r["errors"]
        and r["sent_msgs_s"] >= 0.97 * r["offered_msgs_s"]
        and r["missing_receipts"] == 0
        and r.get("own_copies_missing", 0) == 0
    )


def print_table(r: dict[str, Any]) -> None:
    print(
        f"commit {r['commit']}  offered {r['offered_msgs_s']}/s  sent {r['sent_msgs_s']}/s  "
        f"delivered {r['delivered_msgs_s']}/s"
    )
    print(
        f"  accepted {r['accepted']}  delivered {r['delivered']}  lost {r['lost']}  "
        f"duplicated {r['duplicated']}  missing receipts {r['missing_receipts']}  "
        f"errors {r['errors']}"
    )
    if r.get("devices", 1) > 1:
        print(
            f"  {r['devices']} devices per user: 'delivered' counts each device's copy; "
            f"own sends missing on the sender's other devices {r['own_copies_missing']}"
        )
    print(f"  {'latency ms':<30}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>9}")
    for key in ("send_to_accepted_ms", "send_to_message_ms", "send_to_delivered_receipt_ms"):
        v = r[key]
        print(f"  {key:<30}{v['p50']:>8}{v['p90']:>8}{v['p99']:>8}{v['max']:>9}")
    print(
        "  /metrics chatnode_send_seconds p99 within (ms): "
        + "  ".join(f"{k} {v}" for k, v in r["server_send_p99_le_ms"].items())
    )
    print(
        "  redis pipelines/commands per s: "
        + "  ".join(f"{k} {v['pipelines']}/{v['commands']}" for k, v in r["redis_io_per_s"].items())
    )
    print("  cpu (cores): " + "  ".join(f"{k} {v}" for k, v in r["cpu_cores"].items()))
    if r.get("redis_usec_per_msg"):
        print(
            "  redis µs per msg (commandstats): "
            + "  ".join(f"{k} {v}" for k, v in r["redis_usec_per_msg"].items())
        )
    if r.get("redis_aof"):
        a = r["redis_aof"]
        print(
            f"  redis append-only file: {a['bytes_per_msg']} B per msg (less across a "
            f"rewrite), {a['rewrites']} rewrites, {a['children_cpu_s']} s CPU in children"
        )
    if "ceiling" in r:
        print(
            f"  redis-benchmark XADD: {r['ceiling']}  chatnode delivered = "
            f"{r.get('fraction_of_xadd_unpipelined', '?')} of unpipelined XADD/s"
        )


def report(r: dict[str, Any], results: list[dict[str, Any]]) -> None:
    print_table(r)
    print(json.dumps(r), flush=True)
    results.append(r)


# -- the machine's ceiling ----------------------------------------------------------------


def redis_ceiling(cluster: Cluster) -> dict[str, float]:
    """redis-benchmark XADD on the same Redis, one command at a time and 16 per pipeline."""
    exe = shutil.which("redis-benchmark")
    if exe is None or not cluster.redis_url or cluster.redis_cluster is not None:
        return {}
    url = urllib.parse.urlsplit(cluster.redis_url)
    host, port = url.hostname or "127.0.0.1", str(url.port or 6379)
    out: dict[str, float] = {}
    for label, pipeline in (("xadd_unpipelined_s", 1), ("xadd_pipelined16_s", 16)):
        done = subprocess.run(
            [
                *(exe, "-h", host, "-p", port, "-n", "100000", "-c", "50", "-P", str(pipeline)),
                *("-q", "XADD", "bench:ceiling", "MAXLEN", "~", "1000", "*", "f", "v"),
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        found = re.findall(r"([0-9.]+) requests per second", done.stdout)
        if found:
            out[label] = float(found[-1])
    return out


def with_ceiling(r: dict[str, Any], cluster: Cluster) -> None:
    r["ceiling"] = redis_ceiling(cluster)
    if r["ceiling"].get("xadd_unpipelined_s"):
        r["fraction_of_xadd_unpipelined"] = round(
            r["delivered_msgs_s"] / r["ceiling"]["xadd_unpipelined_s"], 4
        )


# -- modes ----------------------------------------------------------------------------------


def run_sweep(cluster: Cluster, users: list[dict[str, Any]], args: argparse.Namespace) -> list:
    """Step the rate until a step fails; the highest that held is the answer."""
    results: list[dict[str, Any]] = []
    best = None
    rate = args.sweep_start
    while rate <= args.sweep_max:
        r = run_load(cluster, users, rate, args)
        if not results:
            with_ceiling(r, cluster)
        report(r, results)
        if not held(r):
            break
        best = rate
        rate += args.sweep_step
    summary = {
        "mode": "sweep",
        "commit": commit(),
        "highest_rate_held": best,
        "p99_limit_ms": P99_LIMIT_MS,
        "steps": [[x["offered_msgs_s"], x["send_to_message_ms"]["p99"], held(x)] for x in results],
    }
    print(json.dumps(summary))
    print(
        f"sweep: highest rate that held (p99 send->message < {P99_LIMIT_MS} ms, "
        f"nothing lost, duplicated or missing): {best} msgs/s"
    )
    return [*results, summary]


def run_storm(cluster: Cluster, users: list[dict[str, Any]], args: argparse.Namespace) -> list:
    """The same paced run twice: without logins, then with `--login-storm` logins/s."""
    results: list[dict[str, Any]] = []
    quiet = run_load(cluster, users, args.rate, args)
    report(quiet, results)
    with mp.get_context("spawn").Pool(1) as pool:
        job = pool.apply_async(storm_entry, (cluster.http, users, args))
        stormy = run_load(cluster, users, args.rate, args)
        stormy["login_storm"] = {"per_s": args.login_storm, **job.get(timeout=args.duration + 120)}
    report(stormy, results)
    p99 = quiet["send_to_message_ms"]["p99"], stormy["send_to_message_ms"]["p99"]
    summary = {
        "mode": "login-storm",
        "commit": commit(),
        "rate": args.rate,
        "logins_per_s": args.login_storm,
        "p99_send_to_message_ms_without": p99[0],
        "p99_send_to_message_ms_with": p99[1],
        "p99_moved_ms": round(p99[1] - p99[0], 2),
        **stormy["login_storm"],
    }
    print(json.dumps(summary))
    print(
        f"login storm: p99 send->message {p99[0]} ms without, {p99[1]} ms with "
        f"{args.login_storm} logins/s: moved {summary['p99_moved_ms']} ms "
        f"({summary['logins_ok']} logins answered 200, {summary['logins_failed']} not)"
    )
    return [*results, summary]


def storm_entry(
    http_urls: list[str], users: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    time.sleep(args.warmup + 1)
    return asyncio.run(login_storm(http_urls, users, args.login_storm, args.duration - 2))


async def login_storm(
    http_urls: list[str], users: list[dict[str, Any]], per_s: float, seconds: float
) -> dict[str, Any]:
    """`per_s` logins a second (the users' own, right passwords) for `seconds`."""
    ok = fail = 0
    async with aiohttp.ClientSession() as http:

        async def one(u: dict[str, Any]) -> None:
            nonlocal ok, fail
            body = {"mobileNo": u["mobile"], "password": PASSWORD}
            try:
                async with http.post(
                    http_urls[u["node"]] + "/auth/login",
                    json=body,
                    timeout=aiohttp.ClientTimeout(total=30),
                ) as r:
                    ok, fail = (ok + 1, fail) if r.status == 200 else (ok, fail + 1)
            except (aiohttp.ClientError, TimeoutError):
                fail += 1

        start = time.monotonic()
        tasks = []
        while time.monotonic() - start < seconds:
            due = int(per_s * (time.monotonic() - start)) - len(tasks)
            for _ in range(max(0, due)):
                tasks.append(asyncio.create_task(one(users[len(tasks) % len(users)])))
            await asyncio.sleep(0.02)
        await asyncio.gather(*tasks)
    return {"logins_ok": ok, "logins_failed": fail}


def run_idle(cluster: Cluster, args: argparse.Namespace) -> list:
    """`--idle` authenticated sockets on every node at once, from one process per node;
    each node's RSS growth divided by its sockets."""
    ctx = mp.get_context("spawn")
    pids = cluster.node_pids
    before = [rss_bytes(pid) for pid in pids]
    redis_before = redis_memory(cluster) if cluster.redis_url else {}
    pipes, workers = [], []
    for node in range(len(cluster.ws)):
        users = asyncio.run(make_users([cluster.http[node]], args.idle))
        for u in users:
            u["ws"] = cluster.ws[node]
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=idle_entry, args=({"users": users}, child), daemon=True)
        proc.start()
        pipes.append(parent)
        workers.append(proc)
    opened = [pipe.recv() for pipe in pipes]
    time.sleep(3)
    after = [rss_bytes(pid) for pid in pids]
    redis_after = redis_memory(cluster) if cluster.redis_url else {}
    time.sleep(max(0.0, args.idle_hold - 3))  # past a keepalive round: pings are answered
    for pipe in pipes:
        pipe.send("close")
    finished = [pipe.recv() for pipe in pipes]
    for proc in workers:
        proc.join(timeout=30)
    per_node = []
    for i, (o, f) in enumerate(zip(opened, finished, strict=True)):
        entry: dict[str, Any] = {"node": f"node{i + 1}", "open": o["open"], "failed": o["failures"]}
        entry["closed_by_server"] = f["closed_early"]
        if i < len(pids):
            grown = after[i] - before[i]
            entry["rss_grown_mib"] = round(grown / 2**20, 1)
            entry["rss_per_socket_kib"] = round(grown / max(1, o["open"]) / 1024, 2)
        per_node.append(entry)
    r = {
        "mode": "idle",
        "commit": commit(),
        "sockets_per_node": args.idle,
        "held_s": args.idle_hold,
        "nodes": per_node,
    }
    if redis_after:  # the users were made before: this is what a connected one adds
        grown_redis = sum(redis_after.values()) - sum(redis_before.values())
        r["redis_bytes_per_connected_user"] = round(
            grown_redis / max(1, sum(o["open"] for o in opened)), 1
        )
        print(f"Redis: {r['redis_bytes_per_connected_user']} B per connected user (with signup)")
    for e in per_node:
        print(
            f"commit {r['commit']}  {e['node']}: {e['open']} idle sockets open, "
            f"{e['failed']} failed, {e['closed_by_server']} closed by the server in "
            f"{args.idle_hold:g} s idle, "
            f"{e.get('rss_per_socket_kib', '?')} KiB RSS per socket"
        )
    print(json.dumps(r), flush=True)
    return [r]


# -- Redis memory: per queued message, per connected user --------------------------------


class RedisStats:
    """Redis time per command over one run (INFO commandstats on a single Redis; a
    command a script runs counts both in itself and in the script's EVALSHA), and what
    the append-only file grew by, its rewrites and their CPU (INFO persistence, cpu)."""

    def __init__(self, cluster: Cluster) -> None:
        self.port = 0
        if cluster.redis_url and cluster.redis_cluster is None:
            self.port = urllib.parse.urlsplit(cluster.redis_url).port or 6379
            with redis.Redis(port=self.port, socket_timeout=10) as client:
                self.before = client.info("commandstats")
                self.cpu0 = client.info("cpu")
                self.aof0 = client.info("persistence")

    def per_message(self, delivered: int) -> tuple[dict[str, float], dict[str, float]]:
        """Microseconds of Redis time per delivered message, by command, largest first;
        and the append-only file's bytes per message, rewrites and their CPU. Both empty
        on a cluster."""
        if not self.port or not delivered:
            return {}, {}
        with redis.Redis(port=self.port, socket_timeout=10) as client:
            after = client.info("commandstats")
            cpu1, aof1 = client.info("cpu"), client.info("persistence")
        kids = ("used_cpu_user_children", "used_cpu_sys_children")
        aof = {
            "children_cpu_s": round(sum(cpu1[k] - self.cpu0[k] for k in kids), 2),
            "rewrites": aof1.get("aof_rewrites", 0) - self.aof0.get("aof_rewrites", 0),
            "bytes_per_msg": round(
                (aof1.get("aof_current_size", 0) - self.aof0.get("aof_current_size", 0)) / delivered
            ),
        }
        out = {}
        for name, v in after.items():
            usec = v["usec"] - self.before.get(name, {}).get("usec", 0)
            out[name.removeprefix("cmdstat_")] = round(usec / delivered, 2)
        top = sorted(out.items(), key=lambda kv: -kv[1])
        return {k: v for k, v in top if v >= 0.05}, aof


def redis_memory(cluster: Cluster) -> dict[str, int]:
    """used_memory of the Redis, or of each primary of a cluster (by shard)."""
    rc = cluster.redis_cluster
    if rc is not None:
        ports = {f"shard{n}": p for n, p in enumerate(sorted(rc.primaries()), 1)}
    else:
        url = urllib.parse.urlsplit(cluster.redis_url)
        ports = {"redis": url.port or 6379}
    out = {}
    for name, port in ports.items():
        with redis.Redis(port=port, socket_timeout=10) as client:
            out[name] = int(client.info("memory")["used_memory"])
    return out


async def queue_messages(users: list[dict[str, Any]], ws: list[str], per: int, body: str) -> int:
    """Each of the first half of `users` sends `per` messages to one of the second half,
    who never connect; returns how many were accepted."""
    half = len(users) // 2
    accepted = 0

    async def one(sender: dict[str, Any], to: str) -> None:
        nonlocal accepted
        url = f"{ws[sender['node'] % len(ws)]}?token={sender['token']}"
        async with websockets.connect(url, max_size=2**22) as conn:
            await asyncio.wait_for(conn.recv(), 10)  # hello
            for i in range(per):
                frame = {"type": "send", "id": f"q{i}", "to": to, "body": body}
                await conn.send(json.dumps(frame))
            got = 0
            async with asyncio.timeout(120):
                while got < per:
                    if json.loads(await conn.recv())["type"] == "accepted":
                        got += 1
            accepted += got

    await asyncio.gather(*(one(users[i], users[half + i]["mobile"]) for i in range(half)))
    return accepted


def run_backlog(cluster: Cluster, args: argparse.Namespace) -> list:
    """Redis memory per queued (stored, unacked) message: users/2 senders each send
    backlog/(users/2) messages of --body-bytes to a recipient who never connects."""
    users = asyncio.run(make_users(cluster.http, args.users))
    time.sleep(1)
    before = redis_memory(cluster)
    per = max(1, args.backlog // (len(users) // 2))
    body = "x" * args.body_bytes
    accepted = asyncio.run(queue_messages(users, cluster.ws, per, body))
    time.sleep(1)
    after = redis_memory(cluster)
    grown = {k: after[k] - before[k] for k in after}
    r = {
        "mode": "backlog",
        "commit": commit(),
        "queued": accepted,
        "body_bytes": args.body_bytes,
        "redis_grown_bytes": grown,
        "bytes_per_queued_message": round(sum(grown.values()) / max(1, accepted), 1),
    }
    print(
        f"commit {r['commit']}  {accepted} messages of {args.body_bytes} B queued for "
        f"{len(users) // 2} offline users: Redis grew {sum(grown.values()):,} B "
        f"({r['bytes_per_queued_message']} B a message; by shard {grown})"
    )
    print(json.dumps(r), flush=True)
    return [r]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rate", type=float, default=1500, help="offered msgs/s")
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--drain", type=float, default=15)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--users", type=int, default=200)
    p.add_argument(
        "--devices",
        type=int,
        default=1,
        help="sockets per user, each a named device (1: a v1 login); device 0 sends",
    )
    p.add_argument("--procs", type=int, default=2, help="load generator processes")
    p.add_argument(
        "--client",
        action="store_true",
        help="drive the load through chatnode.client.Connection (the reference client)",
    )
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--body-bytes", type=int, default=100)
    p.add_argument("--bcrypt-rounds", type=int, default=4, help="cost of the set-up hashes")
    p.add_argument("--appendfsync", default="everysec", choices=["always", "everysec", "no"])
    p.add_argument("--redis-url", default="", help="use a running Redis")
    p.add_argument(
        "--redis-cluster",
        action="store_true",
        help="run on a private Redis Cluster (3 primaries, a replica each); CPU per shard",
    )
    p.add_argument("--database-url", default="", help="use a running PostgreSQL")
    p.add_argument("--http", default="", help="comma-separated HTTP URLs of running nodes")
    p.add_argument("--ws", default="", help="their WebSocket URLs (ws://host:port/ws)")
    p.add_argument("--pids", default="", help="their PIDs, to report their CPU")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-start", type=float, default=1000)
    p.add_argument("--sweep-step", type=float, default=500)
    p.add_argument("--sweep-max", type=float, default=12000)
    p.add_argument("--idle", type=int, default=0, help="idle sockets on each node")
    p.add_argument(
        "--idle-hold", type=float, default=35, help="seconds to hold them (heartbeat is 30)"
    )
    p.add_argument("--login-storm", type=float, default=0, help="logins/s, run against none")
    p.add_argument(
        "--backlog", type=int, default=0, help="queue this many messages: Redis bytes each"
    )
    p.add_argument("--json-out", default="")
    args = p.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the finally below stops every process we started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise_file_limit()
    cluster = target_cluster(args) if args.http else start_cluster(args)
    try:
        if args.idle:
            results = run_idle(cluster, args)
        elif args.backlog:
            results = run_backlog(cluster, args)
        else:
            users = asyncio.run(make_users(cluster.http, args.users, args.devices))
            if args.sweep:
                results = run_sweep(cluster, users, args)
            elif args.login_storm:
                results = run_storm(cluster, users, args)
            else:
                results = []
                r = run_load(cluster, users, args.rate, args)
                with_ceiling(r, cluster)
                report(r, results)
    finally:
        cluster.stop()
    if args.json_out:
        Path(args.json_out).write_text("\n".join(json.dumps(r) for r in results) + "\n")


if __name__ == "__main__":
    main()
