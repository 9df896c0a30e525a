"""The proxy's transport: one NBD connection's bytes, as an ``asyncio.BufferedProtocol``.

Headers come in through a small staging buffer, a write's payload straight into the buffer it is
written from (no copy). Replies are gathered: :meth:`Wire.write` queues header and data (no copy) and
the whole queue leaves in one ``writelines`` (one ``writev``) at the end of the event loop's turn, or
at :meth:`Wire.flush`, so the replies to a burst of requests cost one system call, not one each. Reading
pauses while the NBD session has no room for more. STARTTLS swaps the transport under the same
protocol, after checking that the client sent nothing behind its STARTTLS (a plaintext injection
would otherwise be read as if it had come through TLS). The NBD session that drives it is
:class:`keysteward.proxy.server.NbdServer`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Callable
from typing import cast

from keysteward.formats import nbd

STAGE_SIZE = 256 * 1024
SOCKET_BUFFER = 4 * 1024 * 1024
FLUSH_BYTES = 1024 * 1024
"""Queued reply bytes that are handed to the transport at once rather than at the end of the turn."""


class Closed(ConnectionError):
    """The peer went away (or the server dropped it) while a read was waiting."""


class Wire(asyncio.BufferedProtocol):
    """One connection's bytes (see the module doc)."""

    def __init__(self, on_connect: Callable[[Wire], None]) -> None:
        self.transport: asyncio.Transport | None = None
        """uvloop's transports do not derive from asyncio's classes: typed by what they do, never isinstance."""
        self._on_connect = on_connect
        self._stage = bytearray(STAGE_SIZE)
        self._view = memoryview(self._stage)
        self._lo = self._hi = 0
        self._target: memoryview | None = None
        self._target_got = 0
        self._into_target = False
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._reading_paused = False
        self._writing_paused = False
        self._drainers: list[asyncio.Future[None]] = []
        self._queued: list[bytes | memoryview] = []
        """Replies written this turn of the event loop, not yet handed to the transport."""
        self._queued_bytes = 0
        self._flush_soon = False
        self._raw: asyncio.Transport | None = None
        """The plaintext transport under a TLS one (after STARTTLS)."""
        self._lent = False
        """The socket (and TLS session) is lent to the native data plane: nothing here may touch them."""
        self._close_when_back: bool | None = None
        """A close asked for while lent (abort or not), done by :meth:`take_back`."""

    # -- protocol callbacks ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first, self.transport = self.transport is None, cast(asyncio.Transport, transport)
        if first:
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            self._on_connect(self)

    def _target_open(self) -> bool:
        """A payload is being received and the staging buffer is empty: bytes may go straight into it."""
        return self._target is not None and self._lo == self._hi and self._target_got < self._target.nbytes

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target_open():
            assert self._target is not None
            self._into_target = True
            return self._target[self._target_got :]
        self._into_target = False
        if self._hi == len(self._stage):
            self._compact()
        if self._hi == len(self._stage):  # a transport that delivers while paused: grow, within a bound
            if len(self._stage) >= 4 * STAGE_SIZE:
                raise nbd.NbdProtocolError("the client sends faster than its requests are served")
            self._stage = self._stage + bytearray(len(self._stage))
            self._view = memoryview(self._stage)
        return self._view[self._hi :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._into_target:
            self._target_got += nbytes
        else:
            self._hi += nbytes
        if self._hi == len(self._stage) and not self._target_open():
            self._pause_reading()  # resumed once the reader consumes (see _resume_reading)
        self._wake()

    def eof_received(self) -> bool:
        self._ended = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended = True
        self._wake()
        for fut in self._drainers:
            if not fut.done():
                fut.set_result(None)
        self._drainers.clear()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        for fut in self._drainers:
            if not fut.done():
                fut.set_result(None)
        self._drainers.clear()

    # -- helpers ---------------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        if self._ended:
            raise Closed("the client closed the connection")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _compact(self) -> None:
        if self._lo:
            n = self._hi - self._lo
            self._stage[:n] = self._stage[self._lo : self._hi]
            self._lo, self._hi = 0, n

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        """Resume if there is room to receive into (at the end of the stage, after compaction, or a target)."""
        room = self._lo > 0 or self._hi < len(self._stage) or self._target_open()
        if room and self._reading_paused and self.transport is not None:
            self._reading_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    def _consumed(self, n: int) -> None:
        self._lo += n
        if self._lo == self._hi:
            self._lo = self._hi = 0
        self._resume_reading()

    # -- reading and writing -------------------------------------------------------------------------

    def staged(self, n: int) -> bytes | None:
        """``n`` bytes if they are staged already (no waiting, no coroutine), else None."""
        if self._hi - self._lo < n:
            return None
        data = bytes(self._view[self._lo : self._lo + n])
        self._consumed(n)
        return data

    async def read_exactly(self, n: int) -> bytes:
        """``n`` bytes (at most :data:`STAGE_SIZE`), through the staging buffer."""
        while self._hi - self._lo < n:
            if self._lo + n > len(self._stage):
                self._compact()
            self._resume_reading()
            await self._wait()
        data = bytes(self._view[self._lo : self._lo + n])
        self._consumed(n)
        return data

    async def read_into(self, view: memoryview) -> None:
        """Fill ``view``: what is staged is copied, the rest is received straight into it."""
        k = min(self._hi - self._lo, view.nbytes)
        view[:k] = self._view[self._lo : self._lo + k]
        self._consumed(k)
        if k == view.nbytes:
            return
        self._target, self._target_got = view, k
        try:
            self._resume_reading()
            while self._target_got < view.nbytes:
                await self._wait()
        finally:
            self._target, self._into_target = None, False

    def write(self, *parts: bytes | memoryview) -> None:
        """Queue ``parts`` (kept, not copied: do not change them until :meth:`sent`); they leave at the end
        of this turn of the event loop together with every other reply queued in it."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise Closed("the connection is closed")
        self._queued.extend(parts)
        self._queued_bytes += sum(len(part) for part in parts)
        if self._queued_bytes >= FLUSH_BYTES:  # a long burst: hand it over now, so the transport can push back
            self.flush()
        elif not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Hand what is queued to the transport now (one ``writelines``)."""
        self._flush_soon = False
        queued, self._queued, self._queued_bytes = self._queued, [], 0
        transport = self.transport
        if queued and transport is not None and not transport.is_closing():
            transport.writelines(queued)

    def sent(self) -> bool:
        """Everything written so far has left for the kernel: buffers given to :meth:`write` may be reused."""
        return not self._queued and (self.transport is None or self.transport.get_write_buffer_size() == 0)

    @property
    def pushing_back(self) -> bool:
        """The transport asked the writer to pause: :meth:`drain` would wait."""
        return self._writing_paused

    async def drain(self) -> None:
        """Wait while the transport pushes back (what is queued leaves at the end of the turn anyway)."""
        while self._writing_paused and not self._ended:
            fut = asyncio.get_running_loop().create_future()
            self._drainers.append(fut)
            await fut

    async def start_tls(self, context: ssl.SSLContext, handshake_timeout: float) -> None:
        self.flush()  # the STARTTLS reply goes out in plaintext, before the handshake
        if self._hi != self._lo:
            raise nbd.NbdProtocolError("bytes after STARTTLS, before the TLS handshake")
        if self.transport is None:
            raise Closed("the connection is closed")
        loop = asyncio.get_running_loop()
        self._raw = self.transport
        transport = await loop.start_tls(
            self.transport, self, context, server_side=True, ssl_handshake_timeout=handshake_timeout
        )
        if transport is None:
            raise Closed("the TLS handshake did not complete")
        self.transport = transport

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        return self.transport.get_extra_info("ssl_object") if self.transport is not None else None

    def hand_off(self) -> tuple[socket.socket, bytes] | None:
        """The connection's socket, duplicated and blocking, for a thread that serves it from now on (the
        native data plane, with the TLS session of :attr:`ssl_object` if there is one), and the bytes of
        requests already received (the client need not wait for the handshake's last reply to send its
        first requests): the thread reads those first. Reading stays paused until :meth:`take_back`. None,
        and nothing changed, when it cannot be handed over: a reply still queued, a payload being received
        into a target, or a transport without a socket.

        With TLS the transport under the session stops reading the socket too, and until :meth:`take_back`
        nothing here touches the session (its BIOs are the plane's): a :meth:`close` waits for it."""
        self.flush()
        transport, raw = self.transport, self._raw
        if transport is None or transport.is_closing() or self._queued or self._target is not None:
            return None
        tls = self.ssl_object is not None
        if transport.get_write_buffer_size() or (tls and (raw is None or raw.get_write_buffer_size())):
            return None
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        self._pause_reading()
        if tls:
            assert raw is not None
            raw.pause_reading()
            self._lent = True
        staged = bytes(self._view[self._lo : self._hi])
        self._lo = self._hi = 0
        handed = socket.socket(fileno=os.dup(sock.fileno()))
        handed.setblocking(True)
        return handed, staged

    def take_back(self) -> None:
        """The plane let go (its thread has ended): the TLS transport may read and close again."""
        if not self._lent:
            return
        self._lent = False
        if self._raw is not None and not self._raw.is_closing():
            self._raw.resume_reading()  # what the session's transport reads now ends in close or EOF
        if self._close_when_back is not None:
            self.close(abort=self._close_when_back)

    def peer_certificate(self) -> dict[str, object] | None:
        """The verified client certificate of the TLS connection (``getpeercert()``), or None."""
        ssl_object = self.ssl_object
        if ssl_object is None:
            return None
        cert = ssl_object.getpeercert()
        return dict(cert) if cert else None

    def peer_certificate_der(self) -> bytes | None:
        ssl_object = self.ssl_object
        return ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None

    def close(self, abort: bool = False) -> None:
        if self._lent:  # the TLS transport would write the session's BIOs under the plane's feet
            self._close_when_back = abort or bool(self._close_when_back)
            return
        if abort:
            self._queued, self._queued_bytes = [], 0
        else:
            self.flush()
        if self.transport is not None and not self.transport.is_closing():
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
