"""The KMIP listener: TTLV messages over mutual TLS, one request at a time per connection, bounded and timed.

Connections are counted and their TLS handshake timed by :class:`keysteward.netlimits.Listener` (the REST
listener's layer). Then each message is framed from its first 8 bytes: one whose header announces more than
``max_message_bytes`` (or is no structure) closes the connection before its body is read. A connection that
sends nothing for ``idle_timeout`` seconds, or takes longer than ``read_timeout`` for one message once its
first byte is in, is closed (by a sweep of the listener's connections, :class:`Deadlines`). While a request
is being answered, what the client sends ahead is kept up to one more message's size, then reading pauses
until the answer is out: a connection holds at most two messages and one read (a client that waits for each
answer, as KMIP clients do, costs no pause and resume per message). A framing error closes that connection
only.

The client certificate is authenticated for every message (a revoked certificate is refused within a second,
by the check the REST listener uses) and must be of role ``hypervisor``; anything else answers Permission
Denied for each batch item, counted in the tenant the certificate can be traced to (kmip/trust.py).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio.to_thread

from keysteward.errors import KeystewardError
from keysteward.formats import kmip_ttlv as t
from keysteward.formats.kmip_tags import TAG_NAMES
from keysteward.identity.principal import Principal
from keysteward.kmip import messages
from keysteward.kmip.errors import KmipError
from keysteward.kmip.metrics import KmipMetrics
from keysteward.kmip.operations import Operations, Session
from keysteward.netlimits import Limits, Listener, source_of

log = logging.getLogger("keysteward.kmip")
ROLE = "hypervisor"


@dataclass(frozen=True)
class KmipLimits:
    max_message_bytes: int = 262144
    idle_timeout: float = 60.0
    read_timeout: float = 10.0


class KmipServer:
    """What every connection shares: the operations, the authentication of client certificates, the bounds."""

    def __init__(
        self,
        operations: Operations,
        authenticate: Callable[[bytes, str], Principal],
        seen: Callable[[bytes], Principal | None],
        limits: KmipLimits,
    ) -> None:
        self.operations = operations
        self.authenticate = authenticate
        self.seen = seen
        self.limits = limits
        self.bounds = t.Bounds(max_bytes=limits.max_message_bytes)
        self.metrics = KmipMetrics()

    async def principal(self, der: bytes | None, source: str = "") -> Principal:
        if not der:
            raise KmipError("PermissionDenied", "no client certificate")
        who = self.seen(der)
        if who is None:
            try:
                who = await anyio.to_thread.run_sync(self.authenticate, der, source)
            except KeystewardError as exc:
                raise KmipError("PermissionDenied", "the client certificate is not accepted", exc.code or "") from None
        if who.role != ROLE:
            raise KmipError("PermissionDenied", f"KMIP clients need a certificate of role {ROLE}", "role_forbidden")
        return who

    async def handle(self, der: bytes | None, source: str, data: bytes) -> tuple[bytes, bool]:
        """The encoded response to one message, and whether to close the connection after it."""
        try:
            message = t.decode(data, self.bounds)
        except t.TtlvError as exc:
            self.metrics.refused(exc.code)
            return t.encode(messages.failure(messages.SUPPORTED[0], KmipError("InvalidMessage", "not TTLV"))), True
        version = messages.version_of(message)
        try:
            if any(item.tag not in TAG_NAMES and item.tag < 0x540000 for item in message.walk()):
                raise KmipError("InvalidMessage", "the message holds a tag KMIP does not define")
            request = messages.parse(message)
        except KmipError as exc:
            self.metrics.refused(exc.reason)
            answer = version if version in messages.SUPPORTED else messages.SUPPORTED[0]
            return t.encode(messages.failure(answer, exc)), False
        try:
            who: Principal | None = await self.principal(der, source)
            denied = None
        except KmipError as exc:
            who, denied = None, exc
        out = []
        session = Session(who, source, request.version) if who is not None else None
        for item in request.items:
            started = time.perf_counter()
            try:
                if session is None:
                    assert denied is not None
                    raise denied
                session.batch_id = item.batch_id.hex() if item.batch_id else ""
                payload = await self.operations.run(session, item.operation, item.payload)
                out.append(messages.response_item(item.operation, item.batch_id, payload))
                self.metrics.done(item.operation, time.perf_counter() - started, None)
            except KmipError as exc:
                out.append(messages.response_item(item.operation, item.batch_id, None, exc))
                self.metrics.done(item.operation, time.perf_counter() - started, exc.reason)
                if request.stop_on_error:
                    break
            except Exception:
                log.exception("KMIP operation failed")
                failed = KmipError("GeneralFailure", "the operation failed")
                out.append(messages.response_item(item.operation, item.batch_id, None, failed))
                self.metrics.done(item.operation, time.perf_counter() - started, failed.reason)
                if request.stop_on_error:
                    break
        return t.encode(messages.response(request.version, out)), False


class Deadlines:
    """The open connections of one listener's loop, and the sweep that closes those past their deadline.

    One sweep every :attr:`tick` seconds (a quarter of the shorter timeout, at most a second) instead of a
    timer per connection: vCenter opens a connection for almost every operation, and making and cancelling
    each one's timer was 3% of the listener's interpreter time. A connection is closed at most a tick after
    its deadline."""

    def __init__(self, limits: KmipLimits, metrics: KmipMetrics) -> None:
        self.open: set[KmipConnection] = set()
        self.metrics = metrics
        self.tick = max(0.05, min(1.0, limits.read_timeout / 4, limits.idle_timeout / 4))

    async def sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.tick)
            now = loop.time()
            late = [c for c in self.open if c.deadline is not None and c.deadline <= now]
            for connection in late:
                try:
                    self.metrics.refused("timeout")
                    connection._close()
                except Exception:  # one connection's failure never ends the sweep: the others' deadlines stay
                    log.exception("a late KMIP connection could not be closed")
                    self.open.discard(connection)


class KmipConnection(asyncio.Protocol):
    def __init__(self, server: KmipServer, deadlines: Deadlines) -> None:
        self.server = server
        self.deadlines = deadlines
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.need = 0
        self.busy = False
        self.paused = False
        self.deadline: float | None = None
        """When the connection times out (None while a request is answered): see :class:`Deadlines`."""
        self.der: bytes | None = None
        self.source = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        ssl_object = transport.get_extra_info("ssl_object")
        self.der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        peer = transport.get_extra_info("peername")
        self.source = str(peer[0]) if isinstance(peer, tuple) and peer else source_of(peer)
        self.deadlines.open.add(self)
        self._arm(self.server.limits.idle_timeout)

    def _arm(self, seconds: float) -> None:
        """Time out ``seconds`` from now."""
        self.deadline = asyncio.get_running_loop().time() + seconds

    def _close(self) -> None:
        self.deadlines.open.discard(self)
        if self.transport is not None:
            self.transport.abort()
            self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        if not self.buffer and not self.busy:
            self._arm(self.server.limits.read_timeout)  # a message started: it must all arrive in time
        self.buffer += data
        if self.busy and not self.paused and len(self.buffer) > self.server.limits.max_message_bytes:
            self.transport.pause_reading()  # a client sending ahead while answered: hold at most one message
            self.paused = True
        self._advance()

    def _advance(self) -> None:
        if self.busy or self.transport is None:
            return
        if not self.need and len(self.buffer) >= t.HEADER:
            try:
                self.need = t.frame_length(bytes(self.buffer[: t.HEADER]), self.server.bounds)
            except t.TtlvError as exc:
                self.server.metrics.refused(exc.code)
                self._close()  # a framing error: nothing more can be read from this stream
                return
        if not self.need or len(self.buffer) < self.need:
            return
        message = bytes(self.buffer[: self.need])
        del self.buffer[: self.need]
        self.need = 0
        self.busy = True
        self.deadline = None  # no timeout while it is answered
        asyncio.get_running_loop().create_task(self._answer(message))

    async def _answer(self, message: bytes) -> None:
        try:
            response, close = await self.server.handle(self.der, self.source, message)
        except Exception:
            log.exception("KMIP message failed")
            response, close = b"", True
        if self.transport is None:
            return
        if response:
            self.transport.write(response)
        if close:
            self.transport.close()
            self.transport = None
            self.deadlines.open.discard(self)
            return
        self.busy = False
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        self._arm(self.server.limits.read_timeout if self.buffer else self.server.limits.idle_timeout)
        self._advance()

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadlines.open.discard(self)
        self.transport = None


class KmipListener:
    """The listener on its own thread and event loop, beside the REST server's."""

    def __init__(
        self,
        server: KmipServer,
        host: str,
        port: int,
        tls: ssl.SSLContext,
        limits: Limits,
        sock: socket.socket | None = None,
    ) -> None:
        """``sock``: the listening socket a server's workers share (``server/supervisor.py``); a single
        process binds its own."""
        self.server = server
        self.tls = tls
        self.limits = limits
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = sock if sock is not None else socket.create_server((host, port), family=family, backlog=512)
        self.port = self.sock.getsockname()[1]
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopped: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name="kmip-listener", daemon=True)
        self.ready = threading.Event()

    def start(self) -> None:
        self.thread.start()
        self.ready.wait(10)

    def _run(self) -> None:
        try:
            import uvloop

            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover - uvloop is a dependency
            loop = asyncio.new_event_loop()
        self.loop = loop
        loop.run_until_complete(self._serve())
        loop.close()

    async def _serve(self) -> None:
        deadlines = Deadlines(self.server.limits, self.server.metrics)
        listener = Listener(lambda: KmipConnection(self.server, deadlines), self.limits, tls=self.tls)
        self.stopped = asyncio.Event()
        sweep = asyncio.get_running_loop().create_task(deadlines.sweep())
        server = await asyncio.get_running_loop().create_server(listener.factory, sock=self.sock)
        log.info("KMIP listener on port %d", self.port)
        self.ready.set()
        await self.stopped.wait()
        server.close()
        sweep.cancel()

    def stop(self) -> None:
        loop, stopped = self.loop, self.stopped
        if loop is not None and stopped is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stopped.set)
        self.thread.join(5)
