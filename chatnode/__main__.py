"""The command line: `chatnode serve`, `chatnode migrate`, `chatnode dev`."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chatnode import accounts, logs
from chatnode.config import (
    KNOWN_PLACEHOLDER_SECRETS,
    MIN_JWT_SECRET_BYTES,
    ConfigError,
    Settings,
)

DEV_DATA_DIR = ".chatnode-dev"
WEB_DIR = Path(__file__).parent / "web"  # the web app, served at `/` by `dev`


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatnode", description="chatnode messaging node")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run one node (HTTP API and WebSocket gateway)")
    serve.add_argument("--http-port", type=int)
    serve.add_argument("--ws-port", type=int)
    serve.add_argument("--node-id")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    sub.add_parser("migrate", help="apply schema.sql to the database (idempotent)")
    dev = sub.add_parser(
        "dev",
        help="embedded Redis (or a Redis Cluster) and PostgreSQL, the schema, N nodes",
    )
    dev.add_argument("--nodes", type=int, default=2)
    dev.add_argument(
        "--redis-cluster",
        action="store_true",
        help="a local Redis Cluster (3 primaries, 3 replicas) instead of one embedded Redis",
    )
    dev.add_argument("--http-port", type=int, default=8080, help="first node's HTTP port")
    dev.add_argument("--ws-port", type=int, default=8765, help="first node's WebSocket port")
    dev.add_argument("--data-dir", default=DEV_DATA_DIR)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            code = serve(args)
        elif args.command == "migrate":
            code = migrate(Settings.from_env())
        else:
            code = dev(args)
    except ConfigError as exc:
        print(f"chatnode: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def serve(args: argparse.Namespace) -> int:
    from chatnode import app

    settings = Settings.from_env(
        http_port=args.http_port, ws_port=args.ws_port, node_id=args.node_id, host=args.host
    )
    refusal = secret_refusal(settings.jwt_secret)
    if refusal is not None:
        print(f"chatnode: {refusal}; serve refuses to start", file=sys.stderr)
        return 2
    logs.configure(settings.node_id, settings.log_format)
    try:
        _run(app.run(settings))
    except app.StartupError as exc:
        print(f"chatnode: {exc}", file=sys.stderr)
        return 1
    return 0


def secret_refusal(secret: str) -> str | None:
    """Why this JWT secret must not sign tokens (anyone could guess it), or None."""
    hint = f"set it to {MIN_JWT_SECRET_BYTES}+ random bytes, e.g. openssl rand -hex 32"
    if not secret:
        return f"CHATNODE_JWT_SECRET is not set ({hint})"
    if secret.strip().lower() in KNOWN_PLACEHOLDER_SECRETS:
        return f"CHATNODE_JWT_SECRET is a known placeholder ({hint})"
    size = len(secret.encode("utf-8", "surrogateescape"))
    if size < MIN_JWT_SECRET_BYTES:
        return f"CHATNODE_JWT_SECRET is {size} bytes, fewer than {MIN_JWT_SECRET_BYTES} ({hint})"
    return None


def migrate(settings: Settings) -> int:
    from chatnode.app import safe_url

    async def apply() -> None:
        pool = await accounts.create_pool(settings.database_url, max_size=1)
        try:
            await accounts.migrate(pool)
        finally:
            await pool.close()

    try:
        _run(apply())
    except Exception as exc:
        print(
            f"chatnode: migrate failed on {safe_url(settings.database_url)}: {exc}", file=sys.stderr
        )
        return 1
    print("chatnode: schema applied")
    return 0


def dev(args: argparse.Namespace) -> int:
    """Embedded services when none are configured, the schema, N nodes; Ctrl-C stops all."""
    from chatnode import devstack

    data = Path(args.data_dir).resolve()
    env = dict(os.environ)
    started: list[Any] = []
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        ports = {p + i for p in (args.http_port, args.ws_port) for i in range(args.nodes)}
        _start_dev_services(data, args.redis_cluster, env, started, frozenset(ports))
        env.setdefault("CHATNODE_JWT_SECRET", secrets.token_hex(32))
        env.setdefault("CHATNODE_LOG_FORMAT", "console")
        env.setdefault("CHATNODE_WEB_DIR", str(WEB_DIR))  # the web app at `/`
        # its socket and its REST go to any node when the one that served the page is
        # away, and each node lets the pages the others served call it
        sockets = [f"ws://127.0.0.1:{args.ws_port + i}/ws" for i in range(args.nodes)]
        apis = ",".join(f"http://127.0.0.1:{args.http_port + i}" for i in range(args.nodes))
        env.setdefault("CHATNODE_WEB_SOCKETS", ",".join(sockets))
        env.setdefault("CHATNODE_WEB_APIS", apis)
        env.setdefault("CHATNODE_CORS_ORIGINS", apis)
        settings = Settings.from_env(env)
        if migrate(settings) != 0:
            return 1
        for i in range(args.nodes):
            proc = _start_dev_node(i, args.http_port + i, args.ws_port + i, env)
            if proc is None:
                return 1
            nodes.append(proc)
        print("chatnode dev is up; Ctrl-C stops everything", flush=True)
        _wait_for_interrupt(nodes)
        return 0
    except devstack.StackError as exc:
        print(f"chatnode: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in nodes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in nodes:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for service in reversed(started):
            service.stop()


def _start_dev_services(
    data: Path,
    redis_cluster: bool,
    env: dict[str, str],
    started: list[Any],
    node_ports: frozenset[int] = frozenset(),
) -> None:
    """Embedded Redis (or a Redis Cluster, on none of `node_ports`) and PostgreSQL where
    `env` names none."""
    from chatnode import devstack

    if redis_cluster and env.get("CHATNODE_REDIS_URL"):
        raise ConfigError("--redis-cluster starts its own Redis; unset CHATNODE_REDIS_URL")
    if not env.get("CHATNODE_REDIS_URL"):
        env["CHATNODE_REDIS_URL"] = _start_dev_redis(data, redis_cluster, started, node_ports)
    if not env.get("CHATNODE_DATABASE_URL"):
        pg = devstack.PostgresServer(data / "postgres").start()
        started.append(pg)
        env["CHATNODE_DATABASE_URL"] = pg.url


def _start_dev_redis(
    data: Path, cluster: bool, started: list[Any], node_ports: frozenset[int]
) -> str:
    """One embedded Redis, or a local Redis Cluster on ports the nodes will not want;
    the URL the nodes are given."""
    from chatnode import devcluster, devstack

    if not cluster:
        redis = devstack.RedisServer(data / "redis").start()
        started.append(redis)
        return redis.url
    rc = devcluster.RedisCluster(data / "redis-cluster", avoid=node_ports)
    started.append(rc)  # stopped by dev's `finally` even if it fails to form
    rc.start()
    primaries, replicas = rc.ports[: rc.shards], rc.ports[rc.shards :]
    print(f"redis cluster: {rc.url}  primaries {primaries}  replicas {replicas}", flush=True)
    return rc.url


def _start_dev_node(i: int, http: int, ws: int, env: dict[str, str]) -> Any:
    from chatnode import devstack

    cmd = [
        sys.executable,
        "-m",
        "chatnode",
        "serve",
        "--http-port",
        str(http),
        "--ws-port",
        str(ws),
        "--node-id",
        f"dev-{i + 1}",
    ]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # dev stops it in order
    for _ in range(600):  # 30 s: a loaded machine starts Python slowly
        if devstack.port_open(ws) or proc.poll() is not None:
            break
        time.sleep(0.05)
    if proc.poll() is not None or not devstack.port_open(ws):
        print(f"chatnode: node dev-{i + 1} failed to start", file=sys.stderr)
        proc.kill()
        return None
    print(f"node dev-{i + 1}: http://127.0.0.1:{http}  ws://127.0.0.1:{ws}/ws", flush=True)
    if env.get("CHATNODE_WEB_DIR"):
        print(f"  the web app: open http://127.0.0.1:{http}/ in two browsers", flush=True)
    return proc


def _wait_for_interrupt(nodes: list[subprocess.Popen[bytes]]) -> None:
    stop = False

    def handle(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    while not stop and all(p.poll() is None for p in nodes):
        time.sleep(0.2)


if __name__ == "__main__":
    main()
