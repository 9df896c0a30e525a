"""Prometheus metrics of the KMIP listener, per operation: count, errors by Result Reason, latency.

They live in their own registry (:attr:`KmipMetrics.registry`), which the REST server's ``/metrics`` appends
to its own when the listener runs in the process.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from keysteward.kmip.messages import OPERATION_NAMES


class KmipMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.operations = Counter(
            "keysteward_kmip_operations_total", "KMIP batch items answered", ["operation", "result"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "keysteward_kmip_operation_seconds",
            "KMIP batch item latency",
            ["operation"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.refusals = Counter(
            "keysteward_kmip_refused_total", "KMIP messages or connections refused", ["reason"], registry=self.registry
        )

        self._children: dict[tuple[int | None, str | None], tuple[Any, Any]] = {}
        """(operation, error) -> its counter and histogram children: ``labels()`` looks them up under a lock."""

    def done(self, operation: int | None, seconds: float, error: str | None) -> None:
        children = self._children.get((operation, error))
        if children is None:
            name = OPERATION_NAMES.get(operation, "Unknown") if operation is not None else "Unknown"
            children = self.operations.labels(name, error or "Success"), self.latency.labels(name)
            if len(self._children) < 4096:  # bounded: operations and reasons are finite, unknown codes are not
                self._children[(operation, error)] = children
        children[0].inc()
        children[1].observe(seconds)

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason[:32]).inc()
