"""Wires one node: pools, services, servers, background sweeps; start and stop order."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import re
import signal
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import web

from chatnode import (
    accounts,
    api,
    apibase,
    auth,
    devices,
    keys,
    logs,
    presence,
    redisio,
    slotmap,
    wsserver,
)
from chatnode.cluster import Cluster
from chatnode.config import REPLICA_ACKS_AUTO, Settings
from chatnode.core.answers import OUT_BUFFER_LOW, OUT_BUFFER_MAX
from chatnode.frames import MAX_FRAME_BYTES
from chatnode.gateway import Gateway
from chatnode.health import REQUIRED_EVICTION_POLICY, Health
from chatnode.metrics import Metrics
from chatnode.routing import Router

log = logs.get(__name__)
SEEN_FLUSH_S = 2.0
SUBSCRIBE_TIMEOUT_S = 5.0
# Redis's maxmemory-policy is read again this often; /readyz answers 503 once it changes.
EVICTION_CHECK_S = 2.0
# An HTTP connection is closed when it has been idle this long after a response, or has
# not completed a request's headers this long after connecting or after its last response
# (aiohttp's keep-alive timer does both): a slowloris client cannot keep it.
HTTP_KEEPALIVE_S = 10.0
# A request's body must arrive within this; then it is answered 408.
HTTP_BODY_TIMEOUT_S = 10.0
# How long an unread body is still read and ignored after the answer, before closing.
HTTP_LINGER_S = 2.0


class StartupError(Exception):
    """A dependency the node needs at start-up is unreachable or unsafe."""


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


# `password = 'it\'s'`, `sslpassword=x`: a libpq keyword DSN's secret values, quoted or not
_KEYWORD_SECRET = re.compile(r"(?i)(\w*password\s*=\s*)('(?:\\.|[^'\\])*'?|\S*)")


def _hide_item(item: str) -> str:
    """One `key=value` query item, its value hidden if the key names a password."""
    key, eq, _ = item.partition("=")
    if eq and unquote_plus(key).strip().lower().endswith("password"):
        return f"{key}=***"
    return item


async def eviction_policy(batcher: redisio.Redis) -> str | None:
    """Redis's maxmemory-policy from INFO memory (on a cluster, the first primary's that
    is not noeviction, else noeviction); None if INFO does not say."""
    found: list[str | None] = []
    for info in await batcher.each("INFO", "memory"):
        if isinstance(info, Exception):
            raise info
        text = info.decode() if isinstance(info, bytes) else str(info)
        policy = None
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key == "maxmemory_policy":
                policy = value.strip()
        found.append(policy)
    odd = [p for p in found if p != REQUIRED_EVICTION_POLICY]
    return odd[0] if odd else REQUIRED_EVICTION_POLICY


async def fewest_replicas(redis: redisio.Redis) -> int:
    """The fewest replicas in sync any primary has (slotmap.online_replicas): what a
    WAIT can count on."""
    return min(
        (slotmap.online_replicas(i) for i in await redis.each("INFO", "replication")), default=0
    )


@web.middleware
async def body_deadline(request: web.Request, handler: apibase.Handler) -> web.StreamResponse:
    """Read the body (at most client_max_size) within HTTP_BODY_TIMEOUT_S, before the
    handler: a client that trickles it cannot hold a handler and its connection."""
    if request.can_read_body:
        try:
            async with asyncio.timeout(HTTP_BODY_TIMEOUT_S):
                await request.read()  # kept by aiohttp: the handler's read() returns it
        except TimeoutError:
            request.protocol.close()  # no keep-alive after this one
            raise web.HTTPRequestTimeout(reason="the request body took too long") from None
    return await handler(request)


class Node:
    """One chatnode process: HTTP API and WebSocket gateway on shared pools."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool: Any = None
        self.passwords: auth.Passwords | None = None
        self.gateway: Gateway | None = None
        self.batcher: redisio.Redis | None = None
        self._ws_server: wsserver.Server | None = None
        self._http: web.AppRunner | None = None
        self._metrics_http: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.health = Health()
        self.started = False

    async def start(self) -> None:
        s = self.settings
        metrics = Metrics()
        try:
            await redisio.check(s.redis_url)
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            raise StartupError(f"cannot reach Redis at {safe_url(s.redis_url)}: {reason}") from None
        self.batcher, s = await self._connect_redis(s, metrics)
        self.settings = s
        await self._require_noeviction()
        try:
            self.pool = await accounts.create_pool(s.database_url)
        except Exception as exc:
            raise StartupError(
                f"cannot reach PostgreSQL at {safe_url(s.database_url)}: {exc}"
            ) from None
        cluster_ = self.batcher if isinstance(self.batcher, Cluster) else None
        router = Router(
            s.redis_url,
            self.batcher,
            s.node_id,
            owner=None if cluster_ is None else lambda ch: cluster_.owner(keys.slot(ch)),
            refresh=None if cluster_ is None else cluster_.refresh,
        )
        tokens = auth.Tokens(s.jwt_secret, s.token_ttl_s)
        self.passwords = auth.Passwords(s.bcrypt_rounds)
        self.gateway = Gateway(s, self.batcher, self.pool, router, tokens, metrics)
        router.listener = self.gateway
        if cluster_ is not None:
            # a primary's connection was lost: it may have failed over, and writes not
            # yet on its replica with it; every session reads its inbox again
            cluster_.on_lost = self.gateway.on_resync
        self._tasks = [
            asyncio.create_task(router.listen(), name="pubsub"),
            asyncio.create_task(
                self._every(self._redeliver_tick(), self.gateway.redeliver), name="redeliver"
            ),
            asyncio.create_task(
                self._every(s.route_ttl_s / 3, self.gateway.refresh_routes), name="routes"
            ),
            asyncio.create_task(self._every(SEEN_FLUSH_S, self._flush_seen), name="seen"),
            asyncio.create_task(
                self._every(
                    devices.sweep_period(s.device_idle_days) * random.uniform(0.9, 1.1),
                    self._remove_idle_devices,
                ),
                name="idle-devices",
            ),
            asyncio.create_task(
                self._every(EVICTION_CHECK_S, self._check_eviction), name="eviction"
            ),
        ]
        await self._subscribed(router)
        services = apibase.Services(
            s, self.batcher, self.pool, router, tokens, self.passwords, metrics, self.health
        )
        self._http = await self._serve_http(
            api.build(
                services,
                with_metrics=not s.metrics_port,
                web_dir=s.web_dir,
                ws_port=s.ws_port,
                web_sockets=s.web_socket_urls,
                web_apis=s.web_api_urls,
                cors_origins=s.cors_origin_list,
            ),
            s.http_port,
        )
        if s.metrics_port:
            self._metrics_http = await self._serve_http(api.metrics_app(services), s.metrics_port)
        self._ws_server = wsserver.Server(
            self.gateway,
            max_size=MAX_FRAME_BYTES,
            heartbeat_s=s.heartbeat_s,
            write_high=OUT_BUFFER_LOW,
            max_buffered=OUT_BUFFER_MAX,  # the gateway's own check, for any write
        )
        try:
            await self._ws_server.start(s.host, s.ws_port)
        except OSError as exc:
            raise StartupError(f"cannot listen on {s.host}:{s.ws_port}: {exc.strerror}") from None
        self.started = True
        log.info(
            "node_started",
            http_port=s.http_port,
            ws_port=s.ws_port,
            metrics_port=s.metrics_port or s.http_port,
            host=s.host,
        )

    async def _connect_redis(self, s: Settings, metrics: Metrics) -> tuple[redisio.Redis, Settings]:
        """A Batcher on a single Redis, a Cluster on a cluster node (found out from the
        URL's server), with CHATNODE_REPLICA_ACKS resolved: AUTO is 1 on a cluster whose
        every shard has a replica, else 0."""
        try:
            clustered = await slotmap.detect(s.redis_url)
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            raise StartupError(f"cannot ask Redis at {safe_url(s.redis_url)}: {reason}") from None
        if not clustered:
            acks = max(s.replica_acks, 0)
            single = redisio.Batcher(
                s.redis_url,
                on_pipeline=metrics.count_pipeline,
                replicas=acks,
                replica_wait_ms=s.replica_wait_ms,
            )
            return single, dataclasses.replace(s, replica_acks=acks)
        many = Cluster(s.redis_url, on_pipeline=metrics.count_pipeline)
        try:
            await many.start()
        except Exception as exc:
            await many.close()
            raise StartupError(
                f"cannot read the slot map of the Redis Cluster at {safe_url(s.redis_url)}: {exc}"
            ) from None
        acks = s.replica_acks
        if acks == REPLICA_ACKS_AUTO:
            acks = 1 if await fewest_replicas(many) > 0 else 0
        many.set_replicas(acks, s.replica_wait_ms)
        log.info("redis_cluster", primaries=len(many.primaries), replica_acks=acks)
        return many, dataclasses.replace(s, replica_acks=acks)

    async def _require_noeviction(self) -> None:
        """Refuse a Redis that may evict keys: revocations (tokens work again) and inboxes
        (messages lost) must never go. INFO works where CONFIG is disabled."""
        assert self.batcher is not None
        url = safe_url(self.settings.redis_url)
        try:
            policy = await eviction_policy(self.batcher)
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            raise StartupError(
                f"cannot read maxmemory-policy of Redis at {url}: {reason}"
            ) from None
        if policy != REQUIRED_EVICTION_POLICY:
            raise StartupError(
                f"Redis at {url} has maxmemory-policy {policy or 'unknown'}; chatnode needs "
                f"{REQUIRED_EVICTION_POLICY} (any other may evict revocations and inboxes): "
                f"set maxmemory-policy {REQUIRED_EVICTION_POLICY}"
            )
        self.health.eviction_policy = policy

    async def _check_eviction(self) -> None:
        """Keep /readyz honest if someone changes the policy while the node runs."""
        assert self.batcher is not None
        try:
            policy = await eviction_policy(self.batcher) or "unknown"
        except Exception:
            return  # Redis is away: /readyz's own ping says so
        if policy != self.health.eviction_policy:
            log.warning("redis_eviction_policy", policy=policy, ready=policy == "noeviction")
            self.health.eviction_policy = policy

    async def _subscribed(self, router: Router) -> None:
        """Wait for this node's channel; without it no push would reach this node."""
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):
                await router.connected.wait()
        except TimeoutError:
            raise StartupError(
                f"cannot subscribe to this node's channel on Redis at "
                f"{safe_url(self.settings.redis_url)} within {SUBSCRIBE_TIMEOUT_S:.0f} s"
            ) from None

    async def _serve_http(self, app: web.Application, port: int) -> web.AppRunner:
        """An aiohttp site with deadlines for headers, body and idle keep-alive."""
        app.middlewares.append(body_deadline)
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=HTTP_KEEPALIVE_S,
            lingering_time=HTTP_LINGER_S,
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.settings.host, port, shutdown_timeout=2).start()
        except OSError as exc:
            await runner.cleanup()
            raise StartupError(
                f"cannot listen on {self.settings.host}:{port}: {exc.strerror}"
            ) from None
        return runner

    def _redeliver_tick(self) -> float:
        return max(0.1, min(self.settings.redelivery_s / 4, 5.0))

    async def _every(self, period: float, sweep: Callable[[], Awaitable[None] | None]) -> None:
        """Run `sweep` (plain or async) every `period` seconds until cancelled. A failure
        is logged and the next round runs: with its traceback from plain code (no I/O, so
        a bug), as one warning line from an async sweep (Redis or PostgreSQL was away)."""
        name = getattr(sweep, "__name__", "?")
        while True:
            await asyncio.sleep(period)
            pending = None
            try:
                pending = sweep()
                if pending is not None:
                    await pending
            except Exception as exc:
                if pending is None:
                    log.exception("sweep_failed", sweep=name)
                else:
                    log.warning("sweep_failed", sweep=name, error=type(exc).__name__)

    async def _flush_seen(self) -> None:
        """Last seen of users and of devices, to PostgreSQL."""
        gateway = self.gateway
        assert gateway is not None
        pending, gateway.seen_to_store = gateway.seen_to_store, {}
        by_device, gateway.device_seen_to_store = gateway.device_seen_to_store, {}
        try:
            await accounts.store_last_seen(self.pool, pending.items())
            await accounts.store_device_seen(self.pool, by_device.items())
        except Exception:
            for mobile, ms in pending.items():  # keep them for the next flush
                gateway.seen_to_store.setdefault(mobile, ms)
            for device, ms in by_device.items():
                gateway.device_seen_to_store.setdefault(device, ms)
            raise

    async def _remove_idle_devices(self) -> None:
        """Devices unseen for CHATNODE_DEVICE_IDLE_DAYS go, like DELETE /devices/{id}. The
        devices with a socket open here are seen now first: every node does so each
        period, a small part of the idle time, so no connected device is ever idle."""
        assert self.gateway is not None and self.batcher is not None
        now = presence.now_ms()
        for s in list(self.gateway.sessions.values()):
            self.gateway.device_seen_to_store[s.core.device] = now
        await self._flush_seen()
        await devices.remove_idle(
            self.pool,
            self.batcher,
            self.gateway.router,
            self.settings.device_idle_days,
            self.settings.node_id,
        )

    async def stop(self) -> None:
        """Drain sockets with 1012, then close servers and pools in reverse order."""
        self.health.draining = True  # /readyz answers 503 from now: balancers move on
        await self._close_servers()
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
                    await self.batcher.each("PING")
            await self.batcher.close()
        if self.passwords is not None:
            self.passwords.close()
        if self.pool is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3):
                    await self.pool.close()
        if self.started:
            log.info("node_stopped")

    async def _close_servers(self) -> None:
        """Sockets first (drained with 1012), then the HTTP sites: /readyz answers until
        the sockets are gone."""
        if self._ws_server is not None:
            self._ws_server.stop_accepting()
        if self.gateway is not None:
            await self.gateway.drain()
        if self._ws_server is not None:
            await self._ws_server.close()
        for runner in (self._http, self._metrics_http):
            if runner is not None:
                await runner.cleanup()


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
