"""chatnode benchmark: paced 1:1 traffic over two nodes, idle sockets, login storm.

Run through `scripts/bench` (it installs chatnode into .venv first). Modes:

    scripts/bench --rate 1500 --duration 20        one paced run
    scripts/bench --sweep                          step the rate until p99 > 100 ms or loss
    scripts/bench --idle 10000                     idle sockets, node RSS per socket
    scripts/bench --rate 1500 --login-storm 50     messaging while 50 logins/s run

Every message is durable in its recipient's inbox until acked; every recipient acks every
message and receipt. Prints one JSON line per run and a readable table, with the commit.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatnode import devstack  # noqa: E402

P99_LIMIT_MS = 100.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- processes and their CPU ---------------------------------------------------------


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
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return rev + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@dataclass
class Cluster:
    redis: devstack.RedisServer | None
    redis_url: str
    database_url: str
    nodes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    http: list[str] = field(default_factory=list)
    ws: list[str] = field(default_factory=list)
    owned_pg: devstack.PostgresServer | None = None
    tmp: Path | None = None

    def pids(self) -> dict[str, int]:
        out = {f"node{i + 1}": p.pid for i, p in enumerate(self.nodes)}
        if self.redis is not None and self.redis.proc is not None:
            out["redis"] = self.redis.proc.pid
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
        if self.owned_pg is not None:
            self.owned_pg.stop()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_cluster(args: argparse.Namespace) -> Cluster:
    raise_file_limit()
    tmp = Path(tempfile.mkdtemp(prefix="chatnode-bench-"))
    os.chmod(tmp, 0o755)
    redis = None
    redis_url = args.redis_url
    if not redis_url:
        redis = devstack.RedisServer(tmp / "redis", fsync=args.appendfsync).start()
        redis_url = redis.url
    database_url = args.database_url
    owned_pg = None
    if not database_url:
        database_url = "postgresql://127.0.0.1:5432/chatnode_bench"
        if not asyncio.run(
            devstack.ensure_database("postgresql://127.0.0.1:5432/postgres", "chatnode_bench")
        ):
            owned_pg = devstack.PostgresServer(tmp / "pg", database="chatnode_bench").start()
            database_url = owned_pg.url
    cluster = Cluster(redis, redis_url, database_url, owned_pg=owned_pg, tmp=tmp)
    env = {
        **os.environ,
        "CHATNODE_REDIS_URL": redis_url,
        "CHATNODE_DATABASE_URL": database_url,
        "CHATNODE_JWT_SECRET": "bench-" + "s" * 40,
        "CHATNODE_BCRYPT_ROUNDS": str(args.bcrypt_rounds),
        "CHATNODE_LOG_FORMAT": "json",
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
        log = open(tmp / f"node{i + 1}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "chatnode",
                "serve",
                "--node-id",
                f"bench-{i + 1}",
                "--http-port",
                str(http),
                "--ws-port",
                str(ws),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        cluster.nodes.append(proc)
        cluster.http.append(f"http://127.0.0.1:{http}")
        cluster.ws.append(f"ws://127.0.0.1:{ws}/ws")
        deadline = time.monotonic() + 30
        while not (devstack.port_open(ws) and devstack.port_open(http)):
            if proc.poll() is not None or time.monotonic() > deadline:
                cluster.stop()
                raise SystemExit(f"bench: node {i + 1} failed to start")
            time.sleep(0.05)
    return cluster


def scrape(base: str) -> dict[str, float]:
    """Counters from a node's /metrics that tell how well Redis batching works."""
    import urllib.request

    wanted = {
        "chatnode_redis_pipelines_total": "pipelines",
        "chatnode_redis_commands_total": "commands",
    }
    out = dict.fromkeys(wanted.values(), 0.0)
    with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            name, _, value = line.partition(" ")
            if name in wanted:
                out[wanted[name]] = float(value)
    return out


# -- users ---------------------------------------------------------------------------


async def make_users(
    http_urls: list[str], count: int, password: str = "benchpass1"
) -> list[dict[str, Any]]:
    """Sign up and log in `count` fresh users; returns mobile, token and home node index."""
    prefix = random.randrange(10**5)
    users = [{"mobile": f"+8{prefix:05d}{i:06d}", "node": i % len(http_urls)} for i in range(count)]
    sem = asyncio.Semaphore(32)
    async with aiohttp.ClientSession() as http:

        async def one(u: dict[str, Any]) -> None:
            base = http_urls[u["node"]]
            async with sem:
                body = {"name": "bench", "mobileNo": u["mobile"], "password": password}
                async with http.post(base + "/auth/signup", json=body) as r:
                    assert r.status == 201, await r.text()
                async with http.post(base + "/auth/login", json=body) as r:
                    assert r.status == 200, await r.text()
                    u["token"] = (await r.json())["token"]

        await asyncio.gather(*(one(u) for u in users))
    return users


# -- the load generator (runs in worker processes) ------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


class Peer:
    """One benchmark user: a socket that sends, receives and acks everything."""

    __slots__ = ("accepted", "got", "mobile", "pending", "stats", "target", "ws")

    def __init__(self, mobile: str, target: str, stats: dict[str, Any]) -> None:
        self.mobile = mobile
        self.target = target
        self.ws: Any = None
        self.pending: dict[str, float] = {}  # client id -> send time
        self.accepted: set[str] = set()
        self.got: set[str] = set()
        self.stats = stats

    async def reader(self) -> None:
        st = self.stats
        async for raw in self.ws:
            now = time.time()
            frame = orjson.loads(raw)
            kind = frame["type"]
            if kind == "accepted":
                sent = self.pending.get(frame["id"])
                if sent is not None:
                    st["accepted_ms"].append((now - sent) * 1000)
                    self.accepted.add(frame["id"])
            elif kind == "message":
                mid = frame["msgId"]
                if mid in self.got:
                    st["duplicated"] += 1
                else:
                    self.got.add(mid)
                    st["message_ms"].append((now - float(frame["body"].split(" ", 1)[0])) * 1000)
                    st["received"].append(frame["from"] + "/" + frame["id"])
                await self.ws.send(orjson.dumps({"type": "ack", "msgIds": [mid]}).decode())
            elif kind == "receipt":
                for cid in frame["ids"]:
                    sent = self.pending.pop(cid, None)
                    if sent is not None and frame["status"] == "delivered":
                        st["delivered_ms"].append((now - sent) * 1000)
                await self.ws.send(
                    orjson.dumps({"type": "ack", "msgIds": [frame["msgId"]]}).decode()
                )
            elif kind == "error":
                st["errors"][frame["code"]] = st["errors"].get(frame["code"], 0) + 1


async def worker_main(spec: dict[str, Any]) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "accepted_ms": [],
        "message_ms": [],
        "delivered_ms": [],
        "received": [],
        "duplicated": 0,
        "errors": {},
        "sent": 0,
    }
    peers = [Peer(u["mobile"], u["target"], stats) for u in spec["users"]]
    for peer, u in zip(peers, spec["users"], strict=True):
        peer.ws = await websockets.connect(
            f"{u['ws']}?token={u['token']}", compression=None, max_size=2**20, open_timeout=30
        )
        hello = orjson.loads(await peer.ws.recv())
        assert hello["type"] == "hello"
    readers = [asyncio.create_task(p.reader()) for p in peers]
    rate, duration = spec["rate"], spec["duration"]
    pad = "x" * max(0, spec["body_bytes"] - 20)
    cpu0 = time.process_time()
    start = time.monotonic()
    sent = 0
    seq = 0
    run = os.urandom(4).hex()
    while (elapsed := time.monotonic() - start) < duration:
        due = int(rate * elapsed) - sent
        for _ in range(max(0, due)):
            peer = peers[seq % len(peers)]
            seq += 1
            cid = f"{run}-{seq}"  # fresh per run: a reused id is a retry, stored once
            now = time.time()
            peer.pending[cid] = now
            await peer.ws.send(
                orjson.dumps(
                    {"type": "send", "id": cid, "to": peer.target, "body": f"{now:.6f} {pad}"}
                ).decode()
            )
            sent += 1
        await asyncio.sleep(0.005)
    stats["sent"] = sent
    stats["send_seconds"] = time.monotonic() - start
    # drain: wait until every accepted message arrived and every receipt came back
    deadline = time.monotonic() + spec["drain"]
    while time.monotonic() < deadline:
        if all(not p.pending for p in peers):
            break
        await asyncio.sleep(0.1)
    stats["accepted_ids"] = [p.mobile + "/" + cid for p in peers for cid in p.accepted]
    stats["missing_receipts"] = sum(len(p.pending) for p in peers)
    stats["cpu_s"] = time.process_time() - cpu0
    for r in readers:
        r.cancel()
    for p in peers:
        with contextlib.suppress(Exception):
            await p.ws.close()
    return stats


def worker_entry(spec: dict[str, Any], out: Any) -> None:
    try:
        import uvloop

        result = uvloop.run(worker_main(spec))
    except ImportError:
        result = asyncio.run(worker_main(spec))
    out.send(result)
    out.close()


def run_load(
    cluster: Cluster, users: list[dict[str, Any]], rate: float, args: argparse.Namespace
) -> dict[str, Any]:
    """Pairs (i, i + n/2) talk both ways, each on a different node; `procs` generators."""
    half = len(users) // 2
    for i in range(half):
        a, b = users[i], users[i + half]
        if a["node"] == b["node"]:  # keep every pair cross-node
            b["node"] = (a["node"] + 1) % len(cluster.ws)
        a["target"], b["target"] = b["mobile"], a["mobile"]
    for u in users:
        u["ws"] = cluster.ws[u["node"]]
    procs = max(1, args.procs)
    # a pair stays in one process so loss is judged where both ends are known
    groups: list[list[dict[str, Any]]] = [[] for _ in range(procs)]
    for i in range(half):
        groups[i % procs] += [users[i], users[i + half]]
    ctx = mp.get_context("spawn")
    pipes, workers = [], []
    for group in groups:
        parent, child = ctx.Pipe(duplex=False)
        spec = {
            "users": group,
            "rate": rate / procs,
            "duration": args.duration,
            "drain": args.drain,
            "body_bytes": args.body_bytes,
        }
        proc = ctx.Process(target=worker_entry, args=(spec, child), daemon=True)
        proc.start()
        pipes.append(parent)
        workers.append(proc)
    time.sleep(args.warmup)
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
    redis_io = {
        f"node{i + 1}": {k: round((b[k] - a[k]) / wall, 1) for k in a}
        for i, (a, b) in enumerate(zip(scrape0, scrape1, strict=True))
    }
    for proc in workers:
        proc.join(timeout=10)
    summary = summarize(results, rate, cpu, args)
    summary["redis_io_per_s"] = redis_io
    return summary


def summarize(
    results: list[dict[str, Any]], rate: float, cpu: dict[str, float], args: argparse.Namespace
) -> dict[str, Any]:
    acc, msg, dlv = [], [], []
    errors: dict[str, int] = {}
    sent = accepted = received = dup = missing_receipts = lost = 0
    seconds = max(r["send_seconds"] for r in results)
    for r in results:
        acc += r["accepted_ms"]
        msg += r["message_ms"]
        dlv += r["delivered_ms"]
        sent += r["sent"]
        dup += r["duplicated"]
        missing_receipts += r["missing_receipts"]
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
        got = set(r["received"])
        ids = set(r["accepted_ids"])
        accepted += len(ids)
        received += len(got)
        lost += len(ids - got)
    for i, r in enumerate(results):
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
        "appendfsync": args.appendfsync,
    }


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
    print(f"  {'latency ms':<28}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>9}")
    for key in ("send_to_accepted_ms", "send_to_message_ms", "send_to_delivered_receipt_ms"):
        v = r[key]
        print(f"  {key:<28}{v['p50']:>8}{v['p90']:>8}{v['p99']:>8}{v['max']:>9}")
    if "redis_io_per_s" in r:
        print(
            "  redis pipelines/commands per s: "
            + "  ".join(
                f"{k} {v['pipelines']}/{v['commands']}" for k, v in r["redis_io_per_s"].items()
            )
        )
    print("  cpu (cores): " + "  ".join(f"{k} {v}" for k, v in r["cpu_cores"].items()))
    if "ceiling" in r:
        print(
            f"  redis-benchmark XADD: {r['ceiling']}  chatnode delivered = "
            f"{r.get('fraction_of_xadd_unpipelined', '?')} of unpipelined XADD/s"
        )


# -- the machine's ceiling -------------------------------------------------------------


def redis_ceiling(cluster: Cluster) -> dict[str, float]:
    exe = shutil.which("redis-benchmark")
    if exe is None or cluster.redis is None:
        return {}
    out: dict[str, float] = {}
    for label, pipeline in (("xadd_unpipelined_s", 1), ("xadd_pipelined16_s", 16)):
        done = subprocess.run(
            [
                exe,
                "-p",
                str(cluster.redis.port),
                "-n",
                "100000",
                "-c",
                "50",
                "-P",
                str(pipeline),
                "-q",
                "XADD",
                "bench:ceiling",
                "MAXLEN",
                "~",
                "1000",
                "*",
                "f",
                "v",
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


# -- idle and login storm --------------------------------------------------------------


async def idle_sockets(cluster: Cluster, users: list[dict[str, Any]], node: int) -> tuple[int, int]:
    pid = cluster.nodes[node].pid
    before = rss_bytes(pid)
    socks = []
    errors = 0
    sem = asyncio.Semaphore(200)

    async def one(u: dict[str, Any]) -> None:
        nonlocal errors
        async with sem:
            try:
                ws = await websockets.connect(
                    f"{cluster.ws[node]}?token={u['token']}", compression=None, open_timeout=60
                )
                await ws.recv()
                socks.append(ws)
            except Exception:
                errors += 1

    await asyncio.gather(*(one(u) for u in users))
    await asyncio.sleep(3)
    after = rss_bytes(pid)
    per_socket = (after - before) // max(1, len(socks))
    for ws in socks:
        with contextlib.suppress(Exception):
            await ws.close()
    return per_socket, errors


async def login_storm(
    cluster: Cluster, users: list[dict[str, Any]], per_s: float, seconds: float
) -> dict[str, Any]:
    ok = fail = 0
    async with aiohttp.ClientSession() as http:
        start = time.monotonic()
        done = 0
        tasks = []

        async def one(u: dict[str, Any]) -> None:
            nonlocal ok, fail
            base = cluster.http[u["node"]]
            async with http.post(
                base + "/auth/login", json={"mobileNo": u["mobile"], "password": "benchpass1"}
            ) as r:
                if r.status == 200:
                    ok += 1
                else:
                    fail += 1

        while time.monotonic() - start < seconds:
            due = int(per_s * (time.monotonic() - start)) - done
            for _ in range(max(0, due)):
                tasks.append(asyncio.create_task(one(users[done % len(users)])))
                done += 1
            await asyncio.sleep(0.02)
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"logins_ok": ok, "logins_failed": fail}


# -- main ------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rate", type=float, default=1500, help="offered msgs/s")
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--drain", type=float, default=15)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--procs", type=int, default=2, help="load generator processes")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--body-bytes", type=int, default=100)
    p.add_argument("--bcrypt-rounds", type=int, default=4)
    p.add_argument("--appendfsync", default="everysec", choices=["always", "everysec", "no"])
    p.add_argument("--redis-url", default="", help="target a running Redis instead")
    p.add_argument("--database-url", default="")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-start", type=float, default=1000)
    p.add_argument("--sweep-step", type=float, default=500)
    p.add_argument("--sweep-max", type=float, default=8000)
    p.add_argument("--idle", type=int, default=0, help="idle sockets on one node")
    p.add_argument("--login-storm", type=float, default=0, help="logins/s during the run")
    p.add_argument("--json-out", default="")
    args = p.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the finally below stops every process we started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    cluster = start_cluster(args)
    results: list[dict[str, Any]] = []
    try:
        if args.idle:
            users = asyncio.run(make_users(cluster.http[:1], args.idle))
            per_socket, errors = asyncio.run(idle_sockets(cluster, users, 0))
            r = {
                "mode": "idle",
                "commit": commit(),
                "sockets": args.idle,
                "errors": errors,
                "rss_per_socket_bytes": per_socket,
                "rss_per_socket_kib": round(per_socket / 1024, 2),
            }
            print(
                f"commit {r['commit']}  idle sockets {args.idle} on one node: "
                f"{r['rss_per_socket_kib']} KiB RSS per socket, errors {errors}"
            )
            results.append(r)
        else:
            users = asyncio.run(make_users(cluster.http, args.users))
            rates = [args.rate]
            if args.sweep:
                rates = []
                r_ = args.sweep_start
                while r_ <= args.sweep_max:
                    rates.append(r_)
                    r_ += args.sweep_step
            best = None
            for rate in rates:
                storm = None
                if args.login_storm:
                    with mp.get_context("spawn").Pool(1) as pool:
                        storm_job = pool.apply_async(_storm_entry, (cluster.http, users, args))
                        r = run_load(cluster, users, rate, args)
                        storm = storm_job.get(timeout=args.duration + 120)
                else:
                    r = run_load(cluster, users, rate, args)
                if storm is not None:
                    r["login_storm"] = {"per_s": args.login_storm, **storm}
                if rate == rates[0]:
                    r["ceiling"] = redis_ceiling(cluster)
                    if r["ceiling"].get("xadd_unpipelined_s"):
                        r["fraction_of_xadd_unpipelined"] = round(
                            r["delivered_msgs_s"] / r["ceiling"]["xadd_unpipelined_s"], 3
                        )
                print_table(r)
                print(json.dumps(r), flush=True)
                results.append(r)
                held = (
                    r["send_to_message_ms"]["p99"] < P99_LIMIT_MS
                    and r["lost"] == 0
                    and r["duplicated"] == 0
                    and not r["errors"]
                    and r["sent_msgs_s"] >= 0.97 * rate
                    and r["missing_receipts"] == 0
                )
                if args.sweep:
                    if not held:
                        break
                    best = rate
            if args.sweep:
                summary = {
                    "mode": "sweep",
                    "commit": commit(),
                    "highest_rate_held": best,
                    "p99_limit_ms": P99_LIMIT_MS,
                }
                print(json.dumps(summary))
                print(
                    f"sweep: highest rate that held (p99 send->message < {P99_LIMIT_MS} ms, "
                    f"zero loss): {best} msgs/s"
                )
                results.append(summary)
    finally:
        cluster.stop()
    if args.json_out:
        Path(args.json_out).write_text("\n".join(json.dumps(r) for r in results) + "\n")


def _storm_entry(
    http_urls: list[str], users: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    time.sleep(args.warmup + 1)
    c = Cluster(None, "", "", http=http_urls)
    return asyncio.run(login_storm(c, users, args.login_storm, args.duration - 2))


if __name__ == "__main__":
    main()
