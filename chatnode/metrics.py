"""Prometheus metrics of one node: plain ints on the hot path, rendered at scrape time.

prometheus-client's Counter and Histogram take a lock per update (~1 us each, several per
message); here the hot path adds to ints and a collector turns them into metric
families only when /metrics is read.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
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


class Histogram:
    """Counts per bucket, their sum and count; `observe` is a bisect and three adds."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


class Metrics:
    def __init__(self) -> None:
        self.accepted = 0
        self.delivered = 0
        self.acked = 0
        self.sockets = 0
        self.redis_pipelines = 0
        self.redis_commands = 0
        self.refused: dict[str, int] = {}
        self.send_latency = Histogram(LATENCY_BUCKETS)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    def count_pipeline(self, commands: int) -> None:
        self.redis_pipelines += 1
        self.redis_commands += commands

    def refuse(self, code: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


class _Collector:
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        for name, doc, value in (
            ("chatnode_messages_accepted", "Messages stored in an inbox and accepted", m.accepted),
            ("chatnode_messages_delivered", "Inbox entries written to a socket", m.delivered),
            ("chatnode_messages_acked", "Inbox entries acked and removed", m.acked),
            ("chatnode_redis_pipelines", "Pipelines written to Redis", m.redis_pipelines),
            ("chatnode_redis_commands", "Commands in those pipelines", m.redis_commands),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        refused = CounterMetricFamily(
            "chatnode_frames_refused", "Client frames answered with an error", labels=["code"]
        )
        for code, count in sorted(m.refused.items()):
            refused.add_metric([code], count)
        yield refused
        yield GaugeMetricFamily("chatnode_sockets_open", "Open WebSocket sessions", m.sockets)
        hist = m.send_latency
        yield HistogramMetricFamily(
            "chatnode_send_seconds",
            "Send path: frame parsed to accepted queued for the client",
            buckets=hist.cumulative(),
            sum_value=hist.sum,
        )
