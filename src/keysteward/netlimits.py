"""Limits for a listener that anyone can reach: connections, TLS handshakes, HTTP request heads and bodies.

An unauthenticated client must not be able to hold the server's memory or its connections. Two layers,
usable by any asyncio listener (the REST API now; the KMIP and XKS listeners when they exist):

- :class:`Listener` wraps a protocol factory. Each accepted TCP connection is counted against a cap for the
  whole listener and a cap per source (an IPv4 address, an IPv6 /64) *before* any TLS work: one over the
  cap is reset at once. With a TLS context the handshake runs here (the loop's SSL protocol) under
  ``header_timeout``, so a client that never finishes its handshake also holds a counted slot for a
  bounded time only. The wrapped protocol sees the TLS transport, as if the server had done the TLS.
- :func:`http_limits` makes a subclass of uvicorn's httptools protocol that bounds a request head
  (``max_header_bytes`` in all, ``max_headers`` fields; over either: ``431`` and close) and times the
  client, not the application: the head must arrive within ``header_timeout`` of its first byte (or of
  the connection), the body within ``body_timeout`` of the head. A late client is reset (``408`` first
  if it sent part of a head). uvicorn's own ``timeout_keep_alive`` closes idle connections between
  requests; its ``limit_concurrency`` and httptools bound none of this (measured: four clients sending
  an endless header grew the server by 280 MB, 150 half-sent requests stayed open for minutes).

What a connection can make the server hold is then bounded by ``max_header_bytes`` plus one read
(at most 256 KiB) for the head, ``server.max_body_bytes`` for the body (the app refuses more), for at most
``header_timeout + body_timeout`` seconds, times ``max_connections``.

Refusals are counted (:attr:`Listener.refused`) and logged at most once per :data:`LOG_INTERVAL` as one
aggregated line: a flood of refused connections cannot flood the log.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import functools
import ipaddress
import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from keysteward.errors import BadRequest
from keysteward.http_head_hold import HeadHold

__all__ = ["LOG_INTERVAL", "Limits", "Listener", "http_limits", "source_of"]

log = logging.getLogger("keysteward.limits")
LOG_INTERVAL = 10.0
CLOSE_GRACE = 2.0
"""Seconds a refused or late connection gets to take its last response before it is reset."""


@dataclass(frozen=True)
class Limits:
    """The bounds of one listener (see the module doc); every value must be positive."""

    max_connections: int = 1024
    max_connections_per_source: int = 128
    max_header_bytes: int = 16384
    max_headers: int = 100
    header_timeout: float = 10.0
    body_timeout: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_connections_per_source", "max_header_bytes", "max_headers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BadRequest(f"setting server.{name} must be a whole number of at least 1", code="bad_setting")
        for name in ("header_timeout", "body_timeout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= 3600:
                raise BadRequest(f"setting server.{name} must be seconds from 0 to 3600", code="bad_setting")


def source_of(peer: Any) -> str:
    """The key a peer's connections are counted under: its IPv4 address, its IPv6 /64, or ``local``."""
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return "local"  # a Unix socket
    return _source_of_host(peer[0])


@functools.lru_cache(maxsize=4096)
def _source_of_host(host: str) -> str:
    """:func:`source_of` for an address text (remembered: parsing one cost a connection more than counting it)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class Listener:
    """Connection caps and the TLS handshake for one listening socket; :meth:`factory` is what the loop's
    ``create_server`` gets, ``inner`` the protocol factory of the service behind it."""

    def __init__(
        self, inner: Callable[[], asyncio.Protocol], limits: Limits, *, tls: ssl.SSLContext | None = None
    ) -> None:
        self.inner = inner
        self.limits = limits
        self.tls = tls
        self.open: Counter[str] = Counter()
        self.total = 0
        self.refused: Counter[str] = Counter()
        """Refusals since start, by reason: ``listener_full``, ``source_full``, ``handshake``."""
        self._unlogged: Counter[str] = Counter()
        self._logged_at = 0.0

    def factory(self) -> asyncio.Protocol:
        return _Guard(self)

    def admit(self, source: str) -> str | None:
        """Take a slot for ``source``; the reason it cannot, or None."""
        if self.total >= self.limits.max_connections:
            return "listener_full"
        if self.open[source] >= self.limits.max_connections_per_source:
            return "source_full"
        self.open[source] += 1
        self.total += 1
        return None

    def leave(self, source: str) -> None:
        self.total -= 1
        self.open[source] -= 1
        if self.open[source] <= 0:
            del self.open[source]

    def count_refusal(self, reason: str) -> None:
        self.refused[reason] += 1
        self._unlogged[reason] += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_INTERVAL:
            self._logged_at = now
            counts = " ".join(f"{k}={v}" for k, v in sorted(self._unlogged.items()))
            self._unlogged.clear()
            log.warning("connections refused %s open=%d sources=%d", counts, self.total, len(self.open))


def _ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Any:
    """The loop's own SSL protocol: uvloop's (C, faster) under uvloop, asyncio's otherwise."""
    try:
        import uvloop
        from uvloop.loop import SSLProtocol as UvSSLProtocol  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.sslproto.SSLProtocol
    return UvSSLProtocol if isinstance(loop, uvloop.Loop) else asyncio.sslproto.SSLProtocol


class _Guard(asyncio.Protocol):
    """One accepted connection: its slot, its TLS handshake, then every event passed to the wrapped protocol.

    The TLS layer is put under this protocol inside ``connection_made`` (as the loop does for an
    ``ssl=`` server, but with our handshake timeout): the loop starts reading only after
    ``connection_made`` returns, so no byte of the handshake can reach anything else.
    """

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.source: str | None = None
        self.raw: asyncio.Transport | None = None
        self.inner: asyncio.Protocol | None = None
        self.connected = False
        self.on_lost: Callable[[], None] | None = None
        """Called once the connection is gone (keysteward.server.accept_balance counts connections so)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.raw is not None:  # the TLS transport, once the handshake is done
            self._start(cast(asyncio.Transport, transport))
            return
        raw = self.raw = cast(asyncio.Transport, transport)
        source = source_of(raw.get_extra_info("peername"))
        refused = self.listener.admit(source)
        if refused is not None:
            self.listener.count_refusal(refused)
            raw.abort()
            return
        self.source = source
        ctx = self.listener.tls
        if ctx is None:
            self._start(raw)
            return
        loop = asyncio.get_running_loop()
        handshake: asyncio.Future[None] = loop.create_future()
        handshake.add_done_callback(self._handshake_done)
        ssl_protocol = _ssl_protocol_class(loop)(
            loop, self, ctx, handshake, server_side=True, call_connection_made=True,
            ssl_handshake_timeout=self.listener.limits.header_timeout,
        )  # fmt: skip
        raw.set_protocol(ssl_protocol)
        ssl_protocol.connection_made(raw)

    def _handshake_done(self, handshake: asyncio.Future[None]) -> None:
        failed = handshake.cancelled() or handshake.exception() is not None
        if failed or not self.connected:  # the handshake failed, timed out or the client left during it
            self.listener.count_refusal("handshake")
            self._leave()

    def _start(self, transport: asyncio.Transport) -> None:
        self.connected = True
        self.inner = self.listener.inner()
        self.inner.connection_made(transport)

    def _leave(self) -> None:
        if self.source is not None:
            self.listener.leave(self.source)
            self.source = None

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is not None:
            self.inner.connection_lost(exc)
            self.inner = None
        self._leave()
        if self.on_lost is not None:
            self.on_lost()

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


# -- HTTP ---------------------------------------------------------------------------------------------


class _HeadTooLarge(Exception):
    """Raised in a parser callback to stop parsing a head over the limits."""


_RESPONSES = {
    408: b"HTTP/1.1 408 Request Timeout\r\n",
    431: b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
}


class _LimitedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with the head, count and timing limits of :class:`Limits`."""

    limits: Limits = Limits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._ks_head_bytes = 0  # raw bytes received while the head is incomplete (what the parser may hold)
        self._ks_head_size = 0  # the head as parsed: target, names, values
        self._ks_headers = 0
        self._ks_in_head = False
        self._ks_too_large = False
        self._ks_refused = False
        self._ks_timer: asyncio.TimerHandle | None = None
        self._ks_timer_kind = ""
        super().connection_made(cast(asyncio.Transport, HeadHold(transport, self.loop)))  # one send per answer
        self._ks_arm("head")  # a connection that sends nothing is late with its head as well

    # -- timers ----------------------------------------------------------------------------------------

    def _ks_arm(self, kind: str) -> None:
        self._ks_disarm()
        seconds = self.limits.header_timeout if kind == "head" else self.limits.body_timeout
        self._ks_timer = self.loop.call_later(seconds, self._ks_late)
        self._ks_timer_kind = kind

    def _ks_disarm(self) -> None:
        if self._ks_timer is not None:
            self._ks_timer.cancel()
        self._ks_timer, self._ks_timer_kind = None, ""

    def _ks_late(self) -> None:
        kind, self._ks_timer, self._ks_timer_kind = self._ks_timer_kind, None, ""
        if self.transport.is_closing():
            return
        if kind == "head" and not self._ks_in_head and self.cycle is not None and not self.cycle.response_complete:
            return  # stray bytes while the app works on a request: the keep-alive timeout follows its response
        self.logger.debug("request %s not received within its timeout: connection closed", kind)
        if kind == "head" and self._ks_in_head:
            self._ks_refuse(408)
        else:
            self.transport.abort()

    def _ks_refuse(self, status: int) -> None:
        """Answer ``status`` (408, 431) and close; a peer that does not take it is reset after a grace."""
        self._ks_refused = True
        self._ks_disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        self.transport.write(_RESPONSES[status] + b"content-length: 0\r\nconnection: close\r\n\r\n")
        self.transport.close()
        # a TLS close waits for the peer's close_notify, which an attacker never sends
        self.loop.call_later(CLOSE_GRACE, self.transport.abort)

    # -- bytes in --------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._ks_refused:
            return
        if self._ks_timer is None:  # bytes of a next request (or stray ones): its head is timed from here
            self._ks_arm("head")
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if self._ks_too_large:
                self._ks_refuse(431)
                return
            self.logger.warning("Invalid HTTP request received.")
            self._ks_refused = True
            self._ks_disarm()
            self.send_400_response("Invalid HTTP request received.")
            return
        if self._ks_in_head:
            # still no end of the head: everything that came counts (bounded to the limit plus one read)
            self._ks_head_bytes += len(data)
            if self._ks_head_bytes > self.limits.max_header_bytes:
                self._ks_refuse(431)

    # -- parser callbacks ------------------------------------------------------------------------------

    def _ks_grow(self, nbytes: int) -> None:
        self._ks_head_size += nbytes
        if self._ks_head_size > self.limits.max_header_bytes or self._ks_headers > self.limits.max_headers:
            self._ks_too_large = True
            raise _HeadTooLarge

    def on_message_begin(self) -> None:
        self._ks_in_head = True
        self._ks_head_bytes = self._ks_head_size = self._ks_headers = 0
        if self._ks_timer_kind != "head":
            self._ks_arm("head")
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._ks_grow(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._ks_headers += 1
        self._ks_grow(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._ks_in_head = False
        self._ks_arm("body")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._ks_disarm()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._ks_disarm()
        super().connection_lost(exc)


def http_limits(base: type[HttpToolsProtocol], limits: Limits) -> type[HttpToolsProtocol]:
    """A subclass of ``base`` (uvicorn's httptools protocol or a subclass of it) bounded by ``limits``."""
    made = type(f"Limited{base.__name__}", (_LimitedHttp, base), {"limits": limits})
    return cast(type[HttpToolsProtocol], made)


def uvicorn_protocol(
    base: type[HttpToolsProtocol], limits: Limits, *, tls: ssl.SSLContext | None = None
) -> Callable[..., asyncio.Protocol]:
    """What ``uvicorn.Config(http=...)`` gets: ``base`` bounded by :func:`http_limits` behind a
    :class:`Listener` that counts connections and does the TLS handshake (so uvicorn itself gets no
    ``ssl``). The listener is made at the first connection, when uvicorn passes its server state."""
    bounded = http_limits(base, limits)
    listeners: list[Listener] = []

    def protocol(**kw: Any) -> asyncio.Protocol:
        if not listeners:
            listeners.append(Listener(lambda: bounded(**kw), limits, tls=tls))
        return listeners[0].factory()

    return protocol
