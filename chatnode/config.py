"""Settings: one frozen object built once from the environment and the command line."""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from chatnode import netaddr

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "postgresql://127.0.0.1:5432/chatnode"
DEFAULT_HTTP_PORT = 8080
DEFAULT_WS_PORT = 8765
DEFAULT_HEARTBEAT_S = 30.0
DEFAULT_BCRYPT_ROUNDS = 12
DEFAULT_TOKEN_TTL_S = 86400
DEFAULT_REDELIVERY_S = 30.0
DEFAULT_INBOX_LIMIT = 10000
DEFAULT_ROUTE_TTL_S = 60
DEFAULT_HOST = "127.0.0.1"
# Rate limits (docs/PROTOCOL.md, "Limits"); failed logins and connections are counted in Redis.
DEFAULT_LOGIN_FAILS_PER_NUMBER = 10
DEFAULT_LOGIN_FAILS_PER_ADDRESS = 200
DEFAULT_LOGIN_FAIL_WINDOW_S = 900
DEFAULT_CONNECTS_PER_ADDRESS = 20000
DEFAULT_CONNECTS_PER_USER = 30
DEFAULT_CONNECT_FAILS_PER_ADDRESS = 100
DEFAULT_CONNECT_WINDOW_S = 10
DEFAULT_SEND_RATE = 100.0
DEFAULT_SEND_BURST = 200
DEFAULT_FRAME_RATE = 1000.0
DEFAULT_FRAME_BURST = 2000
DEFAULT_REFUSALS_BEFORE_CLOSE = 100
DEFAULT_SIGNUPS_PER_ADDRESS = 100
DEFAULT_SIGNUP_WINDOW_S = 60
DEFAULT_LOOKUPS_PER_USER = 300
DEFAULT_LOOKUPS_PER_ADDRESS = 1000
DEFAULT_LOOKUP_WINDOW_S = 60
DEFAULT_UNACKED_MAX_ENTRIES = 256
DEFAULT_UNACKED_MAX_BYTES = 1024 * 1024
# How long a send's client id is remembered once its message is acked (docs/PROTOCOL.md,
# guarantee 2): what Redis keeps per message after the ack is this much traffic at most.
DEFAULT_DEDUPE_WINDOW_S = 600
# Devices a user may have at once (POST /auth/login with a new `device` name past it: 409),
# and the days a device may go unseen before it is removed with its tokens.
DEFAULT_MAX_DEVICES = 5
MAX_MAX_DEVICES = 20
DEFAULT_DEVICE_IDLE_DAYS = 30
MAX_DEDUPE_WINDOW_S = 600
# Replicas that must hold a write before it counts (docs/ARCHITECTURE.md, "Writes that
# wait for a replica"): AUTO is 1 on a cluster whose shards all have a replica, 0 on a
# single Redis; a WAIT that times out answers unavailable.
REPLICA_ACKS_AUTO = -1
DEFAULT_REPLICA_WAIT_MS = 1000
# Two pipelines may be in flight, each ending in a WAIT: both must answer within the
# connection's reply timeout (redisio.COMMAND_TIMEOUT_S, 5 s) or the link is dropped.
MAX_REPLICA_WAIT_MS = 2000
MIN_JWT_SECRET_BYTES = 32
# Secrets seen in examples and earlier compose files: never accepted by `serve`.
KNOWN_PLACEHOLDER_SECRETS = frozenset(
    {"change-me", "changeme", "secret", "your-secret", "jwt-secret", "dev-secret"}
)
SECRET_FIELDS = frozenset({"jwt_secret", "database_url", "redis_url"})


class ConfigError(ValueError):
    """A setting is missing or malformed."""


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str = DEFAULT_REDIS_URL
    database_url: str = DEFAULT_DATABASE_URL
    jwt_secret: str = ""
    node_id: str = field(default_factory=default_node_id)
    host: str = DEFAULT_HOST
    http_port: int = DEFAULT_HTTP_PORT
    ws_port: int = DEFAULT_WS_PORT
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    bcrypt_rounds: int = DEFAULT_BCRYPT_ROUNDS
    token_ttl_s: int = DEFAULT_TOKEN_TTL_S
    redelivery_s: float = DEFAULT_REDELIVERY_S
    inbox_limit: int = DEFAULT_INBOX_LIMIT
    route_ttl_s: int = DEFAULT_ROUTE_TTL_S
    log_format: str = "json"
    login_fails_per_number: int = DEFAULT_LOGIN_FAILS_PER_NUMBER
    login_fails_per_address: int = DEFAULT_LOGIN_FAILS_PER_ADDRESS
    login_fail_window_s: int = DEFAULT_LOGIN_FAIL_WINDOW_S
    connects_per_address: int = DEFAULT_CONNECTS_PER_ADDRESS
    connects_per_user: int = DEFAULT_CONNECTS_PER_USER
    connect_fails_per_address: int = DEFAULT_CONNECT_FAILS_PER_ADDRESS
    connect_window_s: int = DEFAULT_CONNECT_WINDOW_S
    send_rate: float = DEFAULT_SEND_RATE
    send_burst: int = DEFAULT_SEND_BURST
    frame_rate: float = DEFAULT_FRAME_RATE
    frame_burst: int = DEFAULT_FRAME_BURST
    refusals_before_close: int = DEFAULT_REFUSALS_BEFORE_CLOSE
    # comma-separated IPs or CIDRs of proxies whose X-Forwarded-For is believed
    trusted_proxies: str = ""
    signups_per_address: int = DEFAULT_SIGNUPS_PER_ADDRESS
    signup_window_s: int = DEFAULT_SIGNUP_WINDOW_S
    lookups_per_user: int = DEFAULT_LOOKUPS_PER_USER
    lookups_per_address: int = DEFAULT_LOOKUPS_PER_ADDRESS
    lookup_window_s: int = DEFAULT_LOOKUP_WINDOW_S
    unacked_max_entries: int = DEFAULT_UNACKED_MAX_ENTRIES
    unacked_max_bytes: int = DEFAULT_UNACKED_MAX_BYTES
    dedupe_window_s: int = DEFAULT_DEDUPE_WINDOW_S
    max_devices: int = DEFAULT_MAX_DEVICES
    device_idle_days: float = DEFAULT_DEVICE_IDLE_DAYS
    replica_acks: int = REPLICA_ACKS_AUTO
    replica_wait_ms: int = DEFAULT_REPLICA_WAIT_MS
    # 0: /metrics on the HTTP port; else only on this port (keep it off the proxy)
    metrics_port: int = 0
    # a folder served at `/` on the HTTP port (the web app: `chatnode/web`); "": none
    web_dir: str = ""
    # comma-separated ws:// or wss:// URLs the web app also tries (the other nodes)
    web_sockets: str = ""
    # comma-separated http(s):// API bases the web app's REST also tries (the other nodes)
    web_apis: str = ""
    # comma-separated origins (scheme://host[:port]) whose pages may call this API (CORS)
    cors_origins: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from CHATNODE_* variables, then apply non-None overrides."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"CHATNODE_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(f.name, raw, f.type)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    @property
    def web_socket_urls(self) -> list[str]:
        return _listed(self.web_sockets)

    @property
    def web_api_urls(self) -> list[str]:
        return _origins(self.web_apis)

    @property
    def cors_origin_list(self) -> list[str]:
        return _origins(self.cors_origins)

    def validate(self) -> None:
        if self.web_dir and not (Path(self.web_dir) / "index.html").is_file():
            raise ConfigError("CHATNODE_WEB_DIR must be a folder with an index.html")
        if any(not u.startswith(("ws://", "wss://")) for u in self.web_socket_urls):
            raise ConfigError("CHATNODE_WEB_SOCKETS must be ws:// or wss:// URLs, comma-separated")
        for name, origins in (
            ("WEB_APIS", self.web_api_urls),
            ("CORS_ORIGINS", self.cors_origin_list),
        ):
            if any(not _is_origin(u) for u in origins):
                raise ConfigError(
                    f"CHATNODE_{name} must be origins as browsers write them (http(s)://"
                    "host[:port], lower case, no default port, no path), comma-separated"
                )
        self._validate_numbers()

    def _validate_numbers(self) -> None:
        if not (0 < self.heartbeat_s < math.inf and 0 < self.redelivery_s < math.inf):
            raise ConfigError("CHATNODE_HEARTBEAT_S and CHATNODE_REDELIVERY_S must be > 0")
        if not 4 <= self.bcrypt_rounds <= 31:
            raise ConfigError("CHATNODE_BCRYPT_ROUNDS must be between 4 and 31")
        if self.token_ttl_s <= 0 or self.inbox_limit <= 0 or self.route_ttl_s <= 0:
            raise ConfigError("token TTL, inbox limit and route TTL must be > 0")
        limits = (
            self.login_fails_per_number,
            self.login_fails_per_address,
            self.login_fail_window_s,
            self.connects_per_address,
            self.connects_per_user,
            self.connect_fails_per_address,
            self.connect_window_s,
            self.send_burst,
            self.frame_burst,
            self.refusals_before_close,
            self.signups_per_address,
            self.signup_window_s,
            self.lookups_per_user,
            self.lookups_per_address,
            self.lookup_window_s,
            self.unacked_max_entries,
            self.unacked_max_bytes,
        )
        if min(limits) <= 0 or not (
            0 < self.send_rate < math.inf and 0 < self.frame_rate < math.inf
        ):
            raise ConfigError("rate limits must be positive numbers")
        if not 0 < self.dedupe_window_s <= MAX_DEDUPE_WINDOW_S:
            raise ConfigError(
                f"CHATNODE_DEDUPE_WINDOW_S must be between 1 and {MAX_DEDUPE_WINDOW_S} seconds"
            )
        if not 1 <= self.max_devices <= MAX_MAX_DEVICES:
            raise ConfigError(f"CHATNODE_MAX_DEVICES must be between 1 and {MAX_MAX_DEVICES}")
        if not 0 < self.device_idle_days < math.inf:
            raise ConfigError("CHATNODE_DEVICE_IDLE_DAYS must be a positive number of days")
        if (
            self.replica_acks < REPLICA_ACKS_AUTO
            or not 0 < self.replica_wait_ms <= MAX_REPLICA_WAIT_MS
        ):
            raise ConfigError(
                "CHATNODE_REPLICA_ACKS must be -1 (auto) or a count of replicas, and "
                f"CHATNODE_REPLICA_WAIT_MS between 1 and {MAX_REPLICA_WAIT_MS}"
            )
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError("CHATNODE_METRICS_PORT must be a port number (0: the HTTP port)")
        try:
            netaddr.parse_networks(self.trusted_proxies)
        except ValueError as exc:
            raise ConfigError(f"CHATNODE_TRUSTED_PROXIES: {exc}") from None
        if not self.node_id or "|" in self.node_id:
            raise ConfigError("CHATNODE_NODE_ID must be non-empty and must not contain '|'")

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={'***' if f.name in SECRET_FIELDS else getattr(self, f.name)!r}"
            for f in fields(self)
        )
        return f"Settings({shown})"

    __str__ = __repr__


def _convert(name: str, raw: str, kind: Any) -> Any:
    kind = str(kind)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"CHATNODE_{name.upper()} must be a number, got {raw!r}") from None
    return raw


ORIGIN = re.compile(
    r"(?P<scheme>https?)://(?:[a-z0-9](?:[a-z0-9.\-]{0,251}[a-z0-9])?|\[[0-9a-f:.]{2,45}\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
)


def _listed(raw: str) -> list[str]:
    """A comma-separated setting's entries, blanks dropped."""
    return [u.strip() for u in raw.split(",") if u.strip()]


def _origins(raw: str) -> list[str]:
    """A comma-separated setting of origins, a trailing slash dropped from each."""
    return [u.rstrip("/") for u in _listed(raw)]


def _is_origin(url: str) -> bool:
    """scheme://host[:port] exactly as a browser writes an Origin header: lower case, a
    host name or address with nothing else in it, no default port, no path."""
    m = ORIGIN.fullmatch(url)
    if m is None:
        return False
    port = m["port"]
    default = {"http": "80", "https": "443"}[m["scheme"]]
    return port is None or (port != default and 0 < int(port) < 65536)
