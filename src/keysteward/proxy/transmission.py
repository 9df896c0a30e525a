"""The transmission phase of one NBD connection: requests in, replies out (the handshake before it is
:class:`keysteward.proxy.server.NbdServer`'s).

Each request runs as a task of its own: the export's blocking call in a worker thread, then its reply
(replies carry the client's handle, so they may leave in any order). Reading the next request goes on
meanwhile, within a budget of requests and payload bytes per connection, so a client cannot make the
server buffer without bound. A read of at most :data:`INLINE_READ` bytes that the page cache holds is
served on the event loop itself, at once (no hand-off to a thread and back, and never a wait for the
disk). Payloads live in the connection's reused buffers (:mod:`keysteward.proxy.buffers`): a read is
decrypted into the buffer its reply is sent from, a write is encrypted in the buffer it was received into.
docs/proxy.md ("The data path and its speed") has the measurements behind these choices.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from keysteward.errors import KeystewardError
from keysteward.formats import nbd
from keysteward.proxy.buffers import Buffers
from keysteward.proxy.export import Export, ExportClosed
from keysteward.proxy.revocations import CertRef
from keysteward.proxy.wire import Closed, Wire

log = logging.getLogger("keysteward.proxy")

MAX_REQUESTS_IN_FLIGHT = 32
MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024
"""Per connection: payload bytes of the requests being served (reads and writes) before reading pauses."""
INLINE_READ = 1024 * 1024
"""Reads up to this size that the page cache holds run on the event loop (see ``_read_inline``)."""
ALLOWED_FLAGS = nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_DF

Observer = Callable[[Export, nbd.Request, int, float], None]
"""Told of every request served: (export, request, error or 0, ``time.perf_counter()`` when it started)."""


class Connection:
    """One client: its wire, the export it chose, and the requests it has in flight."""

    def __init__(self, wire: Wire, peer: str) -> None:
        self.wire = wire
        self.peer = peer
        self.tls = False
        self.names: frozenset[str] = frozenset()
        """The client certificate's names (after STARTTLS)."""
        self.cert: CertRef | None = None
        """Its serial and issuer: what a revocation names."""
        self.structured = False
        self.no_zeroes = False
        self.export: Export | None = None
        self.main: asyncio.Task[None] | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.idle = False
        """True while waiting for the next request header: a graceful drop may cancel that wait."""
        self.draining = False
        self.bytes_in_flight = 0
        self.requests_in_flight = 0
        self.budget = asyncio.Condition()
        self.waiting = 0
        """Requests waiting for the budget (a release wakes them only if there are any)."""
        self.buffers = Buffers(wire.sent)
        self.plane: Any = None
        """The connection's :class:`keysteward.proxy.plane.Plane` when the native data plane serves it."""


def _room(conn: Connection, nbytes: int) -> bool:
    """Does the connection's budget take one more request of ``nbytes`` payload bytes?"""
    return conn.requests_in_flight < MAX_REQUESTS_IN_FLIGHT and (
        not conn.bytes_in_flight or conn.bytes_in_flight + nbytes <= MAX_BYTES_IN_FLIGHT
    )


class Transmission:
    """Serves the requests of connections whose handshake chose an export; blocking calls go to ``pool``."""

    def __init__(self, pool: ThreadPoolExecutor, observe: Observer) -> None:
        self._pool = pool
        self._observe = observe

    async def serve(self, conn: Connection) -> None:
        """Requests until NBD_CMD_DISC, a drop or a protocol error (raised); replies as they are done."""
        export, wire = conn.export, conn.wire
        assert export is not None
        while True:
            header = wire.staged(nbd.REQUEST_SIZE)  # a burst of requests is decoded without awaiting each
            if header is None:
                if conn.draining:  # a graceful drop: the requests already received were served, end here
                    return
                conn.idle = True
                try:
                    header = await wire.read_exactly(nbd.REQUEST_SIZE)
                finally:
                    conn.idle = False
            request = nbd.decode_request(header)
            started = time.perf_counter()
            command = request.command
            if command == nbd.CMD_DISC:
                return
            carries, error = admit(conn, export, request)
            reserved = request.length if carries else 0
            if command == nbd.CMD_READ and not error and request.length <= INLINE_READ and _room(conn, reserved):
                if self._read_inline(conn, export, request, started):  # done before anything else ran: no budget
                    if wire.pushing_back:
                        await wire.drain()
                    continue
            await self._reserve(conn, reserved)
            buf = conn.buffers.take(request.length) if carries else None
            if command == nbd.CMD_WRITE:
                assert buf is not None
                await wire.read_into(memoryview(buf))
            job = self._run(conn, export, request, buf, error, started, reserved)
            task = asyncio.get_running_loop().create_task(job)
            conn.tasks.add(task)
            task.add_done_callback(conn.tasks.discard)

    async def _reserve(self, conn: Connection, nbytes: int) -> None:
        if not _room(conn, nbytes):
            conn.waiting += 1
            try:
                async with conn.budget:
                    while not _room(conn, nbytes):
                        await conn.budget.wait()
            finally:
                conn.waiting -= 1
        conn.bytes_in_flight += nbytes
        conn.requests_in_flight += 1

    async def _release(self, conn: Connection, nbytes: int) -> None:
        conn.bytes_in_flight -= nbytes
        conn.requests_in_flight -= 1
        if conn.waiting:
            async with conn.budget:
                conn.budget.notify_all()

    @staticmethod
    def _check(conn: Connection, export: Export, request: nbd.Request) -> int:
        """The protocol's error for a request that cannot be served as sent, or 0."""
        cmd, length = request.command, request.length
        if cmd not in (nbd.CMD_READ, nbd.CMD_WRITE, nbd.CMD_FLUSH, nbd.CMD_TRIM, nbd.CMD_WRITE_ZEROES):
            return nbd.EINVAL
        if request.flags & ~ALLOWED_FLAGS:
            return nbd.EINVAL
        if cmd == nbd.CMD_FLUSH:
            return 0
        if cmd != nbd.CMD_READ and export.read_only:
            return nbd.EPERM
        if cmd in (nbd.CMD_READ, nbd.CMD_WRITE):
            if length == 0:
                return nbd.EINVAL
            if length > export.max_block:
                return nbd.EOVERFLOW if conn.structured else nbd.EINVAL
        if request.offset + length > export.size:
            return nbd.EINVAL if cmd == nbd.CMD_READ else nbd.ENOSPC
        return 0

    def _read_inline(self, conn: Connection, export: Export, request: nbd.Request, started: float) -> bool:
        """A read on the event loop itself, if the page cache holds it (False: nothing done, a worker thread
        reads it). From the cache, reading and decrypting take less time than a hand-off to a worker thread
        and back; a read that would wait for the disk never blocks the loop."""
        error, buf = 0, conn.buffers.take(request.length)
        try:
            if not export.pread_into(request.offset, memoryview(buf), cached_only=True):
                conn.buffers.give(buf)
                return False
        except ExportClosed:
            error = nbd.ESHUTDOWN
        except KeystewardError as exc:
            log.warning("nbd request failed export=%s command=read code=%s", export.name, exc.code)
            error = nbd.EIO
        self._reply(conn, request, error, buf)
        self._observe(export, request, error, started)
        return True

    async def _run(
        self,
        conn: Connection,
        export: Export,
        request: nbd.Request,
        buf: bytearray | None,
        error: int,
        started: float,
        reserved: int,
    ) -> None:
        try:
            if not error:
                error = await asyncio.get_running_loop().run_in_executor(self._pool, call_export, export, request, buf)
            if request.command == nbd.CMD_WRITE and buf is not None:
                conn.buffers.give(buf)
                buf = None
            self._reply(conn, request, error, buf)
            await conn.wire.drain()
        except (Closed, ConnectionError):
            return
        finally:
            await self._release(conn, reserved)
        self._observe(export, request, error, started)

    @staticmethod
    def _reply(conn: Connection, request: nbd.Request, error: int, buf: bytearray | None) -> None:
        """Send the reply; a read's ``buf`` goes out as its data (lent to the wire until sent)."""
        if buf is not None and (error or request.command != nbd.CMD_READ):
            conn.buffers.give(buf)
            buf = None
        Transmission._send_reply(conn, request, error, None if buf is None else memoryview(buf))
        if buf is not None:
            conn.buffers.lend(buf)

    @staticmethod
    def _send_reply(conn: Connection, request: nbd.Request, error: int, data: memoryview | None) -> None:
        conn.wire.write(*reply_parts(conn.structured, request, error, data))


def admit(conn: Connection, export: Export, request: nbd.Request) -> tuple[bool, int]:
    """Whether a payload buffer goes with ``request`` (a read's answer, a write's data), and the protocol's
    error for it (0: serve it). A write longer than the export's maximum raises NbdProtocolError: its payload
    cannot be skipped at no cost, so the connection is dropped."""
    carries = request.command in (nbd.CMD_READ, nbd.CMD_WRITE) and request.length <= export.max_block
    if request.command == nbd.CMD_WRITE and not carries:
        raise nbd.NbdProtocolError(f"write of {request.length} bytes", code=nbd.TOO_LONG)
    return carries, Transmission._check(conn, export, request)


def call_export(export: Export, request: nbd.Request, buf: bytearray | None) -> int:
    """The export's blocking call for ``request`` (in a worker thread); its NBD error, or 0. A read decrypts
    into ``buf``, a write encrypts ``buf`` (its payload) in place and writes it."""
    cmd, offset, length, fua = request.command, request.offset, request.length, bool(request.flags & 1)
    try:
        if cmd == nbd.CMD_READ:
            assert buf is not None
            export.pread_into(offset, memoryview(buf))
        elif cmd == nbd.CMD_WRITE:
            assert buf is not None
            export.pwrite_in_place(offset, memoryview(buf), fua)
        elif cmd == nbd.CMD_FLUSH:
            export.flush()
        elif cmd == nbd.CMD_TRIM:
            export.trim(offset, length)
            if fua:
                export.flush()
        elif cmd == nbd.CMD_WRITE_ZEROES:
            export.write_zeroes(offset, length, fua)
    except ExportClosed:
        return nbd.ESHUTDOWN
    except KeystewardError as exc:
        log.warning("nbd request failed export=%s command=%s code=%s", export.name, request.name, exc.code)
        return nbd.EIO
    except Exception:
        log.exception("nbd request failed export=%s command=%s", export.name, request.name)
        return nbd.EIO
    return 0


def reply_parts(
    structured: bool, request: nbd.Request, error: int, data: memoryview | None
) -> tuple[bytes | memoryview, ...]:
    """The reply to ``request`` as header and data (a successful read's ``data``), for one ``writev``."""
    handle = request.handle
    if request.command == nbd.CMD_READ and structured:
        if error:
            return (nbd.encode_structured_error(handle, error, f"{request.name} failed"),)
        assert data is not None
        return nbd.encode_offset_data_header(handle, request.offset, len(data)), data
    if error or data is None:
        return (nbd.encode_simple_reply(handle, error),)
    return nbd.encode_simple_reply(handle), data
