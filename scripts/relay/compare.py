"""chatnode and the Socket.IO relay side by side, on the same Redis, driven by the same
Node.js load generator (scripts/relay/loadgen.js: `ws` for chatnode, with every message
and receipt acked; socket.io-client for the relay, which stores and acks nothing).

For each, the rate steps up until p99 send->message passes 100 ms or anything is lost;
each step prints one JSON line, and a table closes the run. Run it through
`scripts/compare-relay` (it installs the relay's Node packages first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

import bench  # noqa: E402

from chatnode import devstack  # noqa: E402

P99_LIMIT_MS = 100.0


def step(
    target: str, groups: list[list[dict[str, Any]]], rate: float, seconds: float, pids: dict
) -> dict[str, Any]:
    """One paced run from one load generator process per group."""
    procs = []
    for group in groups:
        spec = {
            "target": target,
            "users": group,
            "rate": rate / len(groups),
            "duration": seconds,
            "drain": 10,
            "bodyBytes": 100,
        }
        proc = subprocess.Popen(
            ["node", str(HERE / "loadgen.js")], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(spec).encode())
        proc.stdin.close()
        procs.append(proc)
    time.sleep(1.0)  # they connect, then wait half a second before sending
    cpu0 = {name: bench.cpu_seconds(pid) for name, pid in pids.items()}
    wall0 = time.monotonic()
    outs = []
    for proc in procs:
        assert proc.stdout is not None
        outs.append(json.loads(proc.stdout.read()))
        proc.wait(timeout=30)
    wall = time.monotonic() - wall0
    cpu = {
        name: round((bench.cpu_seconds(pid) - cpu0[name]) / wall, 3) for name, pid in pids.items()
    }
    sent_s = max(o["seconds"] for o in outs)
    for i, o in enumerate(outs):
        cpu[f"loadgen{i + 1}"] = round(o["cpu_s"] / sent_s, 3)
    latencies = [x for o in outs for x in o["lat"]]
    r: dict[str, Any] = {
        "target": target,
        "commit": bench.commit(),
        "offered_msgs_s": rate,
        "sent_msgs_s": round(sum(o["sent"] for o in outs) / sent_s, 1),
        "delivered_msgs_s": round(sum(o["received"] for o in outs) / sent_s, 1),
        "lost": sum(o["lost"] for o in outs),
        "duplicated": sum(o["dup"] for o in outs),
        "errors": [o["errors"] for o in outs if o["errors"]],
        "send_to_message_ms": {
            q: round(bench.percentile(latencies, v), 2)
            for q, v in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
        },
        "cpu_cores": cpu,
    }
    r["held"] = (
        r["send_to_message_ms"]["p99"] < P99_LIMIT_MS
        and r["lost"] == 0
        and not r["errors"]
        and r["sent_msgs_s"] >= 0.97 * rate
    )
    return r


def start_relays(redis_url: str) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    ports = [devstack.free_port(), devstack.free_port()]
    procs = [
        subprocess.Popen(
            ["node", str(HERE / "relay.js"), str(port), redis_url], stdout=subprocess.DEVNULL
        )
        for port in ports
    ]
    deadline = time.monotonic() + 30
    while not all(devstack.port_open(port) for port in ports):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise SystemExit("compare-relay: the relay did not start")
        time.sleep(0.05)
    return procs, ports


def sweep(
    target: str, groups: list[list[dict[str, Any]]], pids: dict, a: argparse.Namespace
) -> tuple[list[dict[str, Any]], float | None]:
    results, best, rate = [], None, a.start
    while rate <= a.max:
        r = step(target, groups, rate, a.duration, pids)
        print(json.dumps(r), flush=True)
        results.append(r)
        if not r["held"]:
            break
        best = rate
        rate += a.step
    return results, best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--duration", type=float, default=15)
    p.add_argument("--start", type=float, default=1000)
    p.add_argument("--step", type=float, default=500)
    p.add_argument("--max", type=float, default=16000)
    p.add_argument("--procs", type=int, default=2, help="load generator processes")
    p.add_argument("--only", choices=["chatnode", "relay"], default=None)
    a = p.parse_args()
    bench.raise_file_limit()
    cluster = bench.start_cluster(
        argparse.Namespace(
            redis_url="", database_url="", appendfsync="everysec", bcrypt_rounds=4, nodes=2
        )
    )
    relays: list[subprocess.Popen[bytes]] = []
    try:
        users = asyncio.run(bench.make_users(cluster.http, a.users))
        groups = bench.pair_up(cluster, users, a.procs)
        relays, ports = start_relays(cluster.redis_url)
        on_relay = {
            ws: f"http://127.0.0.1:{port}" for ws, port in zip(cluster.ws, ports, strict=True)
        }
        relay_groups = [[{**u, "ws": on_relay[u["ws"]]} for u in g] for g in groups]
        redis_pid = (
            {"redis": cluster.redis.proc.pid} if cluster.redis and cluster.redis.proc else {}
        )
        summary = {}
        if a.only != "relay":
            pids = cluster.pids()
            summary["chatnode"] = sweep("chatnode", groups, pids, a)
        if a.only != "chatnode":
            pids = {"relay1": relays[0].pid, "relay2": relays[1].pid, **redis_pid}
            summary["relay"] = sweep("relay", relay_groups, pids, a)
        print(f"\ncommit {bench.commit()}: highest rate that held (p99 send->message < 100 ms)")
        for target, (results, best) in summary.items():
            print(f"  {target:<9} {best} msgs/s")
            for r in results:
                p99 = r["send_to_message_ms"]["p99"]
                print(
                    f"    {r['offered_msgs_s']:>7} offered  p99 {p99:>7} ms"
                    f"  lost {r['lost']}  cpu {r['cpu_cores']}"
                )
    finally:
        for proc in relays:
            proc.terminate()
        for proc in relays:
            proc.wait(timeout=10)
        cluster.stop()


if __name__ == "__main__":
    main()
