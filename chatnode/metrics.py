"""Prometheus metrics of one node, on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.accepted = Counter(
            "chatnode_messages_accepted", "Messages stored in an inbox and accepted", registry=r
        )
        self.delivered = Counter(
            "chatnode_messages_delivered", "Inbox entries written to a recipient socket", registry=r
        )
        self.acked = Counter(
            "chatnode_messages_acked", "Inbox entries acked and removed", registry=r
        )
        self.refused = Counter(
            "chatnode_frames_refused", "Client frames answered with an error", ["code"], registry=r
        )
        self.sockets = Gauge("chatnode_sockets_open", "Open WebSocket connections", registry=r)
        self.send_latency = Histogram(
            "chatnode_send_seconds",
            "Send path: frame parsed to accepted queued for the client",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        self.redis_pipelines = Counter(
            "chatnode_redis_pipelines", "Pipelines sent to Redis by the batcher", registry=r
        )
        self.redis_commands = Counter(
            "chatnode_redis_commands", "Commands sent to Redis inside those pipelines", registry=r
        )

    def count_pipeline(self, commands: int) -> None:
        self.redis_pipelines.inc()
        self.redis_commands.inc(commands)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
