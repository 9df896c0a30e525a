"""Prometheus metrics of one proxy: per export bytes, operations and latency, and whether it is open.

Each :class:`ProxyMetrics` has its own :class:`~prometheus_client.CollectorRegistry` (never the process-wide
default one), so two proxies in one process (the tests) or a reload never mix their counters, and the
metrics endpoint shows nothing else. :meth:`ProxyMetrics.observe` has the signature of the NBD server's
``on_request`` hook; it runs on the event loop for every request, so it only increments.

Series (``export`` is the export's name, ``command`` the NBD command in lower case)::

    keysteward_proxy_read_bytes_total{export}
    keysteward_proxy_written_bytes_total{export}            write and write_zeroes
    keysteward_proxy_requests_total{export,command}
    keysteward_proxy_request_seconds{export,command}         histogram
    keysteward_proxy_export_open{export}                     1 while served, 0 when locked (revoked, lease lost)
    keysteward_proxy_export_closes_total{export,reason}      revoked, shred, lease_expired, removed, ...
    keysteward_proxy_refused_opens_total{export,reason}      not_allowed (a client the export does not name),
                                                             unknown_export (export="": a name not served)
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
READS = frozenset({"read"})
WRITES = frozenset({"write", "write_zeroes"})
_Children = tuple[Any, Any, Any]
"""(requests counter, latency histogram, bytes counter or None) of one (export, command)."""


def command_name(command: Any) -> str:
    """``NBD_CMD_READ``, an enum member ``READ`` or ``"read"`` -> ``read``."""
    name = getattr(command, "name", command)
    text = str(name).lower()
    return text.removeprefix("nbd_cmd_")


class ProxyMetrics:
    """The counters of one proxy, and (optionally) the HTTP endpoint that serves them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.read_bytes = Counter(
            "keysteward_proxy_read_bytes", "Bytes read by NBD clients.", ["export"], registry=self.registry
        )
        self.written_bytes = Counter(
            "keysteward_proxy_written_bytes", "Bytes written (or zeroed) by NBD clients.", ["export"],
            registry=self.registry,
        )  # fmt: skip
        self.requests = Counter(
            "keysteward_proxy_requests", "NBD requests served.", ["export", "command"], registry=self.registry
        )
        self.latency = Histogram(
            "keysteward_proxy_request_seconds", "Time to serve an NBD request.", ["export", "command"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.export_open = Gauge(
            "keysteward_proxy_export_open", "1 while the export is served, 0 while locked.", ["export"],
            registry=self.registry,
        )  # fmt: skip
        self.closes = Counter(
            "keysteward_proxy_export_closes", "Exports closed, by reason.", ["export", "reason"], registry=self.registry
        )
        self.refused_opens = Counter(
            "keysteward_proxy_refused_opens", "NBD opens and lookups refused, by export and reason.",
            ["export", "reason"], registry=self.registry,
        )  # fmt: skip
        self._children: dict[tuple[str, Any], _Children] = {}
        self._commands: dict[str, set[str]] = {}
        self._reasons: dict[str, set[str]] = {}
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe(self, export: str, command: Any, nbytes: int, seconds: float) -> None:
        """The NBD server's ``on_request`` hook: one request of ``command`` on ``export``.

        The labelled children are looked up once per (export, command) and kept: this runs per request."""
        requests, latency, moved = self._children.get((export, command)) or self._children_of(export, command)
        requests.inc()
        latency.observe(seconds if seconds > 0 else 0.0)
        if moved is not None and nbytes > 0:
            moved.inc(nbytes)

    def observe_many(
        self, export: str, command: str, count: int, nbytes: int, seconds: float, buckets: list[int]
    ) -> None:
        """The NBD server's ``on_requests`` hook: ``count`` requests served by the native data plane since the
        last call, ``buckets`` their count per bucket of :data:`LATENCY_BUCKETS` (and +Inf), as ``observe``
        would have counted them one by one."""
        requests, latency, moved = self._children.get((export, command)) or self._children_of(export, command)
        requests.inc(count)
        latency._sum.inc(seconds)  # prometheus_client has no bulk observe: its per-bucket counters, as observe does
        for bucket, n in zip(latency._buckets, buckets, strict=True):
            if n:
                bucket.inc(n)
        if moved is not None and nbytes > 0:
            moved.inc(nbytes)

    def _children_of(self, export: str, command: Any) -> _Children:
        name = command_name(command)
        moved = (
            self.read_bytes.labels(export) if name in READS
            else self.written_bytes.labels(export) if name in WRITES else None
        )  # fmt: skip
        children = (self.requests.labels(export, name), self.latency.labels(export, name), moved)
        self._children[(export, command)] = children
        self._commands.setdefault(export, set()).add(name)
        return children

    def opened(self, export: str) -> None:
        self.export_open.labels(export).set(1)
        self.read_bytes.labels(export)  # the series exist (at 0) from the moment the export is served
        self.written_bytes.labels(export)

    def closed(self, export: str, reason: str) -> None:
        self.export_open.labels(export).set(0)
        self.closes.labels(export, reason).inc()
        self._reasons.setdefault(export, set()).add(reason)

    def refused(self, export: str, reason: str) -> None:
        """The NBD server's ``on_refused`` hook. ``export`` is a served export's name or "" (never a name a
        client made up), so the series stay as few as the exports."""
        self.refused_opens.labels(export, reason).inc()

    def forget(self, export: str) -> None:
        """An export removed from the config: its series leave the endpoint."""
        for key in [key for key in self._children if key[0] == export]:
            del self._children[key]
        for metric in (self.read_bytes, self.written_bytes, self.export_open):
            with contextlib.suppress(KeyError):
                metric.remove(export)
        for name in self._commands.pop(export, set()):
            for per_command in (self.requests, self.latency):
                with contextlib.suppress(KeyError):
                    per_command.remove(export, name)
        for reason in self._reasons.pop(export, set()):
            with contextlib.suppress(KeyError):
                self.closes.remove(export, reason)

    def render(self) -> bytes:
        """The Prometheus text exposition of this proxy's metrics."""
        return generate_latest(self.registry)

    def serve(self, address: str, port: int) -> int:
        """Serve ``/metrics`` on ``address:port`` (0: a free port) in a daemon thread; the bound port."""
        server, thread = start_http_server(port, addr=address, registry=self.registry)
        self._server, self._thread = server, thread
        return int(server.server_address[1])

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
