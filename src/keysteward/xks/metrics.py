"""Prometheus metrics of the XKS listener: latency per operation and outcome (the REST /metrics serves them)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.1, 0.25, 1.0)
"""35 ms is the round trip AWS asks for, 250 ms its timeout."""


class XksMetrics:
    def __init__(self) -> None:
        self.latency = Histogram(
            "keysteward_xks_request_seconds",
            "XKS proxy request latency, by operation (metadata, encrypt, decrypt, health) and outcome",
            ["operation", "outcome"],
            registry=None,
            buckets=BUCKETS,
        )

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(self.latency)

    def observe(self, operation: str, outcome: str, seconds: float) -> None:
        self.latency.labels(operation, outcome).observe(seconds)
