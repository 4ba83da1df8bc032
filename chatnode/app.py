"""Wires one node: pools, services, servers, background sweeps; start and stop order."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import web

from chatnode import accounts, api, auth, logs, redisio, session, wsserver
from chatnode.config import Settings
from chatnode.frames import MAX_FRAME_BYTES
from chatnode.gateway import Gateway
from chatnode.metrics import Metrics
from chatnode.routing import Router

log = logs.get(__name__)
SEEN_FLUSH_S = 2.0


class StartupError(Exception):
    """A dependency the node needs at start-up is unreachable."""


def safe_url(url: str) -> str:
    """The URL (or libpq keyword DSN) without its passwords, for people to read.

    Hides the password of the user part, and every `...password=` item of the query or
    of a keyword DSN (password, sslpassword). Errs towards hiding: the user part ends at
    the last '@', since a password may hold '@', '/', '?' or '#' unencoded."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _KEYWORD_SECRET.sub(r"\1***", url)
    userinfo, at, tail = rest.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    else:  # no password there (any '@' is further on)
        userinfo, at, tail = "", "", rest
    head, question, query = tail.partition("?")
    if question:
        query, hash_, fragment = query.partition("#")
        tail = f"{head}?{'&'.join(_hide_item(i) for i in query.split('&'))}{hash_}{fragment}"
    return f"{scheme}{sep}{userinfo}{at}{tail}"


# `password = 'it''s'`, `sslpassword=x`: a libpq keyword DSN's secret values, quoted or not
_KEYWORD_SECRET = re.compile(r"(?i)(\w*password\s*=\s*)('(?:\\.|[^'\\])*'?|\S*)")


def _hide_item(item: str) -> str:
    """One `key=value` query item, its value hidden if the key names a password."""
    key, eq, _ = item.partition("=")
    if eq and unquote_plus(key).strip().lower().endswith("password"):
        return f"{key}=***"
    return item


class Node:
    """One chatnode process: HTTP API and WebSocket gateway on shared pools."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool: Any = None
        self.passwords: auth.Passwords | None = None
        self.gateway: Gateway | None = None
        self.batcher: redisio.Batcher | None = None
        self._ws_server: wsserver.Server | None = None
        self._http: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.started = False

    async def start(self) -> None:
        s = self.settings
        metrics = Metrics()
        try:
            await redisio.check(s.redis_url)
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            raise StartupError(f"cannot reach Redis at {safe_url(s.redis_url)}: {reason}") from None
        self.batcher = redisio.Batcher(s.redis_url, on_pipeline=metrics.count_pipeline)
        try:
            self.pool = await accounts.create_pool(s.database_url)
        except Exception as exc:
            raise StartupError(
                f"cannot reach PostgreSQL at {safe_url(s.database_url)}: {exc}"
            ) from None
        router = Router(s.redis_url, self.batcher, s.node_id)
        tokens = auth.Tokens(s.jwt_secret, s.token_ttl_s)
        self.passwords = auth.Passwords(s.bcrypt_rounds)
        self.gateway = Gateway(s, self.batcher, self.pool, router, tokens, metrics)
        router.listener = self.gateway
        self._tasks = [
            asyncio.create_task(router.listen(), name="pubsub"),
            asyncio.create_task(
                self._every(self._redeliver_tick(), self.gateway.redeliver), name="redeliver"
            ),
            asyncio.create_task(
                self._every_async(s.route_ttl_s / 3, self.gateway.refresh_routes), name="routes"
            ),
            asyncio.create_task(self._every_async(SEEN_FLUSH_S, self._flush_seen), name="seen"),
        ]
        async with asyncio.timeout(5):
            await router.connected.wait()
        services = api.Services(s, self.batcher, self.pool, router, tokens, self.passwords, metrics)
        self._http = web.AppRunner(api.build(services), access_log=None, handle_signals=False)
        await self._http.setup()
        await web.TCPSite(self._http, s.host, s.http_port, shutdown_timeout=2).start()
        self._ws_server = wsserver.Server(
            self.gateway,
            max_size=MAX_FRAME_BYTES,
            heartbeat_s=s.heartbeat_s,
            write_high=session.OUT_BUFFER_LOW,
        )
        await self._ws_server.start(s.host, s.ws_port)
        self.started = True
        log.info("node_started", http_port=s.http_port, ws_port=s.ws_port, host=s.host)

    def _redeliver_tick(self) -> float:
        return max(0.1, min(self.settings.redelivery_s / 4, 5.0))

    async def _every(self, period: float, fn: Any) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                fn()
            except Exception:
                log.exception("sweep_failed", sweep=getattr(fn, "__name__", "?"))

    async def _every_async(self, period: float, fn: Any) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await fn()
            except Exception as exc:
                log.warning(
                    "sweep_failed", sweep=getattr(fn, "__name__", "?"), error=type(exc).__name__
                )

    async def _flush_seen(self) -> None:
        assert self.gateway is not None
        pending, self.gateway.seen_to_store = self.gateway.seen_to_store, {}
        try:
            await accounts.store_last_seen(self.pool, pending.items())
        except Exception:
            for mobile, ms in pending.items():  # keep them for the next flush
                self.gateway.seen_to_store.setdefault(mobile, ms)
            raise

    async def stop(self) -> None:
        """Drain sockets with 1012, then close servers and pools in reverse order."""
        if self._ws_server is not None:
            self._ws_server.stop_accepting()
        if self.gateway is not None:
            await self.gateway.drain()
        if self._ws_server is not None:
            await self._ws_server.close()
        if self._http is not None:
            await self._http.cleanup()
        if self.gateway is not None and self.pool is not None:
            with contextlib.suppress(Exception):
                await self._flush_seen()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.batcher is not None:
            # replies come in order: once this one is back, so are the route releases
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self.batcher.run("PING")
            await self.batcher.close()
        if self.passwords is not None:
            self.passwords.close()
        if self.pool is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3):
                    await self.pool.close()
        if self.started:
            log.info("node_stopped")


async def run(settings: Settings) -> None:
    """Run one node until SIGTERM or SIGINT, then drain and stop."""
    node = Node(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
        await stop.wait()
        log.info("node_draining")
    finally:
        await node.stop()
