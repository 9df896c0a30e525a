"""The NBD server of the proxy: an asyncio server that serves :class:`~keysteward.proxy.export.Export` s.

One connection goes through the fixed newstyle handshake (options decoded by
:mod:`keysteward.formats.nbd`), then the transmission phase, where each request runs as a task of its
own: the export's blocking call in a worker thread, then its reply (replies carry the client's handle,
so they may leave in any order). Reading the next request goes on meanwhile, within a budget of
requests and payload bytes per connection, so a client cannot make the server buffer without bound.

Bytes come in and go out through :class:`~keysteward.proxy.wire.Wire`, the connection's transport
(module :mod:`keysteward.proxy.wire`).

With ``tls`` set TLS is mandatory: before STARTTLS every option but STARTTLS and ABORT is refused with
NBD_REP_ERR_TLS_REQD. The context must require a client certificate (``CERT_REQUIRED``), and ``clients``
says, per export, which certificate names may see and open it (:func:`peer_names`: the subject common name,
DNS and URI subject alternative names). ``NBD_OPT_LIST`` lists only those exports; ``NBD_OPT_INFO`` and
``NBD_OPT_GO`` for any other answer NBD_REP_ERR_UNKNOWN exactly as for a name that does not exist (so a
client cannot learn other exports' names), ``NBD_OPT_EXPORT_NAME`` drops the connection; each refusal is
logged (peer address, certificate names, export) and passed to ``on_refused``. Without TLS (plaintext,
allowed on loopback only by the config) there is no identity and every export is open to every client.

A client that breaks the protocol (bad magic, unknown flags, over-long option, a write longer than the
export's maximum, a handshake that stalls) loses its connection; every other client goes on. Bad
requests within the protocol get the protocol's error: EINVAL (bad range for a read, unknown command
or flag, length 0), ENOSPC (writes past the end), EPERM (writes to a read-only export), EOVERFLOW
(a read longer than the maximum block), ESHUTDOWN (the export closed meanwhile), EIO (the volume failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor

from keysteward.errors import BadRequest, KeystewardError
from keysteward.formats import nbd
from keysteward.proxy.buffers import Buffers
from keysteward.proxy.export import Export, ExportClosed
from keysteward.proxy.revocations import CertRef, Revocations, cert_ref
from keysteward.proxy.wire import Closed, Wire

log = logging.getLogger("keysteward.proxy")

HANDSHAKE_TIMEOUT = 30.0
MAX_OPTIONS = 128
"""Options one handshake may send before the server gives up on the client."""
MAX_REQUESTS_IN_FLIGHT = 32
MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024
"""Per connection: payload bytes of the requests being served (reads and writes) before reading pauses."""
WORKER_THREADS = 8
INLINE_READ = 1024 * 1024
"""Reads up to this size that the page cache holds run on the event loop (see ``_read_inline``)."""
ALLOWED_FLAGS = nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_DF

RequestHook = Callable[[str, str, int, float], None]
ClientPolicy = Callable[[str], Collection[str]]
"""Export name -> the client certificate names that may list and open it."""
RefusalHook = Callable[[str, str], None]
"""(export name, or "" for a name that is not served; reason) of a refused open."""
NAME_LOG_MAX = 80


def peer_names(cert: Mapping[str, object] | None) -> frozenset[str]:
    """The names a verified peer certificate (``SSLObject.getpeercert()``) carries: subject common names,
    DNS names and URIs of its subject alternative names. Empty for no certificate."""
    if not cert:
        return frozenset()
    names: set[str] = set()
    subject = cert.get("subject", ())
    for rdn in subject if isinstance(subject, tuple) else ():
        for attribute in rdn if isinstance(rdn, tuple) else ():
            if isinstance(attribute, tuple) and len(attribute) == 2 and attribute[0] == "commonName":
                names.add(str(attribute[1]))
    alt = cert.get("subjectAltName", ())
    for entry in alt if isinstance(alt, tuple) else ():
        if isinstance(entry, tuple) and len(entry) == 2 and entry[0] in ("DNS", "URI"):
            names.add(str(entry[1]))
    return frozenset(names)


class _Connection:
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


def _room(conn: _Connection, nbytes: int) -> bool:
    """Does the connection's budget take one more request of ``nbytes`` payload bytes?"""
    return conn.requests_in_flight < MAX_REQUESTS_IN_FLIGHT and (
        not conn.bytes_in_flight or conn.bytes_in_flight + nbytes <= MAX_BYTES_IN_FLIGHT
    )


def _flags(export: Export) -> int:
    flags = nbd.TF_HAS_FLAGS | nbd.TF_SEND_FLUSH | nbd.TF_CAN_MULTI_CONN
    if export.read_only:
        return flags | nbd.TF_READ_ONLY
    # Every connection writes through the same volume and one flush syncs the whole file: multi-conn is safe.
    return flags | nbd.TF_SEND_FUA | nbd.TF_SEND_TRIM | nbd.TF_SEND_WRITE_ZEROES


class NbdServer:
    """Serves ``exports`` (name -> export) over NBD; see the module doc. Run it on one event loop:
    every method (``set_exports`` too) is called from that loop's thread."""

    def __init__(
        self,
        exports: Mapping[str, Export],
        *,
        tls: ssl.SSLContext | None,
        allow_plaintext: bool = False,
        default_export: str | None = None,
        clients: ClientPolicy | None = None,
    ) -> None:
        if tls is None and not allow_plaintext:
            raise BadRequest("the NBD server needs a TLS context unless plaintext is allowed", code="nbd_tls_required")
        if tls is not None and (tls.verify_mode != ssl.CERT_REQUIRED or clients is None):
            raise BadRequest(
                "an NBD server with TLS requires client certificates and, per export, the clients that may open it",
                code="nbd_clients_required",
            )
        self._exports: dict[str, Export] = dict(exports)
        self._tls = tls
        self._clients = clients
        self.default_export = default_export
        self.on_request: RequestHook | None = None
        self.on_refused: RefusalHook | None = None
        self._servers: list[asyncio.Server] = []
        self._connections: set[_Connection] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._pool = ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="ks-nbd")
        self._stopped = False
        self._revocations = Revocations()

    @property
    def exports(self) -> Mapping[str, Export]:
        return dict(self._exports)

    @property
    def tls(self) -> ssl.SSLContext | None:
        return self._tls

    # -- listening -------------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); returns the bound port."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Wire(self._accept), host, port, reuse_address=True)
        self._servers.append(server)
        bound = int(server.sockets[0].getsockname()[1])
        log.info("nbd listening host=%s port=%d tls=%s", host, bound, self._tls is not None)
        return bound

    async def serve_unix(self, path: str) -> None:
        """Listen on a Unix socket at ``path`` as well."""
        loop = asyncio.get_running_loop()
        self._servers.append(await loop.create_unix_server(lambda: Wire(self._accept), path))
        log.info("nbd listening socket=%s tls=%s", path, self._tls is not None)

    def _accept(self, wire: Wire) -> None:
        if self._stopped:
            wire.close(abort=True)
            return
        assert wire.transport is not None
        peer = wire.transport.get_extra_info("peername")
        conn = _Connection(wire, str(peer[0] if isinstance(peer, tuple) else peer or "unix"))
        self._connections.add(conn)
        conn.main = asyncio.get_running_loop().create_task(self._serve(conn))

    # -- one connection ----------------------------------------------------------------------------

    async def _serve(self, conn: _Connection) -> None:
        try:
            if await asyncio.wait_for(self._handshake(conn), HANDSHAKE_TIMEOUT):
                await self._transmission(conn)
        except asyncio.CancelledError:
            pass  # dropped by set_exports / close_export / stop
        except (Closed, ConnectionError, ssl.SSLError) as exc:
            log.info("nbd client left peer=%s reason=%s", conn.peer, type(exc).__name__)
        except TimeoutError:
            log.warning("nbd handshake timed out peer=%s", conn.peer)
        except nbd.NbdProtocolError as exc:
            log.warning("nbd protocol error, connection dropped peer=%s code=%s: %s", conn.peer, exc.code, exc)
        except Exception:
            log.exception("nbd connection failed peer=%s", conn.peer)
        finally:
            if conn.tasks:
                await asyncio.gather(*conn.tasks, return_exceptions=True)
            conn.wire.close()
            self._connections.discard(conn)

    async def _reply_option(self, conn: _Connection, option: int, reply: int, data: bytes = b"") -> None:
        conn.wire.write(nbd.encode_option_reply(option, reply, data))
        await conn.wire.drain()

    def _lookup(self, name: str) -> Export | None:
        if name == "" and self.default_export is not None:
            name = self.default_export
        export = self._exports.get(name)
        return None if export is None or getattr(export, "closed", False) else export

    def _allowed(self, conn: _Connection, name: str) -> bool:
        """May this connection's client see and open export ``name``? (Always, without TLS.)"""
        if self._tls is None:
            return True
        if self._clients is None or not conn.names or self._revocations.refuses(conn.cert):
            return False
        try:
            allowed = self._clients(name)
        except Exception:
            log.exception("nbd client policy failed export=%s", name)
            return False
        return not conn.names.isdisjoint(allowed)

    def _open(self, conn: _Connection, name: str) -> Export | None:
        """The export ``name`` if it is served and this client may open it; a refusal is logged and counted."""
        export = self._lookup(name)
        if export is None:
            self._refused(conn, "", name, "unknown_export")
            return None
        if not self._allowed(conn, export.name):
            self._refused(conn, export.name, export.name, "not_allowed")
            return None
        return export

    def _refused(self, conn: _Connection, export: str, asked: str, reason: str) -> None:
        client = ",".join(sorted(conn.names))[:NAME_LOG_MAX] or "-"
        log.warning("nbd open refused peer=%s client=%r export=%r reason=%s", conn.peer, client,
                    asked[:NAME_LOG_MAX], reason)  # fmt: skip
        if self.on_refused is not None:
            try:
                self.on_refused(export, reason)
            except Exception:
                log.exception("nbd on_refused hook failed")

    async def _handshake(self, conn: _Connection) -> bool:
        """Options until GO / EXPORT_NAME (True) or ABORT (False); protocol errors raise."""
        wire = conn.wire
        wire.write(nbd.encode_greeting())
        await wire.drain()
        conn.no_zeroes = bool(
            nbd.decode_client_flags(await wire.read_exactly(nbd.CLIENT_FLAGS_SIZE)) & nbd.FLAG_NO_ZEROES
        )
        for _ in range(MAX_OPTIONS):
            header = nbd.decode_option_header(await wire.read_exactly(nbd.OPTION_HEADER_SIZE))
            opt = header.option
            if header.length > nbd.MAX_OPTION_LENGTH:
                with contextlib.suppress(Closed):
                    await self._reply_option(conn, opt, nbd.REP_ERR_TOO_BIG, b"option too long")
                raise nbd.NbdProtocolError(f"option {opt} of {header.length} bytes", code=nbd.TOO_LONG)
            data = await wire.read_exactly(header.length)
            if self._tls is not None and not conn.tls and opt not in (nbd.OPT_STARTTLS, nbd.OPT_ABORT):
                if opt == nbd.OPT_EXPORT_NAME:
                    raise nbd.NbdProtocolError("NBD_OPT_EXPORT_NAME before STARTTLS", code="nbd_tls_required")
                await self._reply_option(conn, opt, nbd.REP_ERR_TLS_REQD, b"TLS is required")
                continue
            if opt == nbd.OPT_ABORT:
                with contextlib.suppress(Closed, ConnectionError):
                    await self._reply_option(conn, opt, nbd.REP_ACK)
                return False
            if opt == nbd.OPT_EXPORT_NAME:
                export = self._open(conn, nbd.decode_export_name(data))
                if export is None:
                    raise nbd.NbdProtocolError("NBD_OPT_EXPORT_NAME names no export", code="nbd_unknown_export")
                wire.write(nbd.encode_export_name_reply(export.size, _flags(export), no_zeroes=conn.no_zeroes))
                await wire.drain()
                return self._chosen(conn, export)
            if opt in (nbd.OPT_INFO, nbd.OPT_GO):
                export = await self._info(conn, opt, data)
                if export is not None and opt == nbd.OPT_GO:
                    return self._chosen(conn, export)
            elif opt == nbd.OPT_STARTTLS:
                await self._starttls(conn, data)
            elif opt == nbd.OPT_LIST:
                if data:
                    await self._reply_option(conn, opt, nbd.REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
                    continue
                for name, listed in list(self._exports.items()):
                    if not self._allowed(conn, name):
                        continue
                    entry = nbd.encode_server_entry(name, listed.description)
                    await self._reply_option(conn, opt, nbd.REP_SERVER, entry)
                await self._reply_option(conn, opt, nbd.REP_ACK)
            elif opt == nbd.OPT_STRUCTURED_REPLY:
                if data or conn.structured:
                    await self._reply_option(conn, opt, nbd.REP_ERR_INVALID, b"no data; once only")
                    continue
                conn.structured = True
                await self._reply_option(conn, opt, nbd.REP_ACK)
            else:
                await self._reply_option(conn, opt, nbd.REP_ERR_UNSUP, b"option not supported")
        raise nbd.NbdProtocolError(f"more than {MAX_OPTIONS} options", code="nbd_too_many_options")

    def _chosen(self, conn: _Connection, export: Export) -> bool:
        conn.export = export
        log.info("nbd client connected peer=%s export=%s tls=%s", conn.peer, export.name, conn.tls)
        return True

    async def _starttls(self, conn: _Connection, data: bytes) -> None:
        opt = nbd.OPT_STARTTLS
        if self._tls is None:
            await self._reply_option(conn, opt, nbd.REP_ERR_UNSUP, b"TLS is not configured")
        elif data or conn.tls:
            await self._reply_option(conn, opt, nbd.REP_ERR_INVALID, b"STARTTLS takes no data; once only")
        else:
            await self._reply_option(conn, opt, nbd.REP_ACK)
            await conn.wire.start_tls(self._tls, HANDSHAKE_TIMEOUT)
            conn.tls, conn.structured = True, False  # forget what was negotiated in plaintext
            conn.names = peer_names(conn.wire.peer_certificate())
            conn.cert = cert_ref(conn.wire.peer_certificate_der())
            if self._revocations.refuses(conn.cert):
                self._refused(conn, "", "", "revoked")
                raise nbd.NbdProtocolError("the client certificate is revoked", code="cert_revoked")

    async def _info(self, conn: _Connection, opt: int, data: bytes) -> Export | None:
        try:
            request = nbd.decode_info_request(data)
        except nbd.NbdProtocolError as exc:
            await self._reply_option(conn, opt, nbd.REP_ERR_INVALID, exc.message.encode())
            return None
        export = self._open(conn, request.name)
        if export is None:  # not served, or not to this client: the same answer
            await self._reply_option(conn, opt, nbd.REP_ERR_UNKNOWN, b"no such export")
            return None
        infos = [nbd.encode_info_export(export.size, _flags(export))]
        if nbd.INFO_NAME in request.info_types:
            infos.append(nbd.encode_info_name(export.name))
        if nbd.INFO_DESCRIPTION in request.info_types and export.description:
            infos.append(nbd.encode_info_description(export.description))
        # An export that patches partial sectors itself accepts any alignment: advertising its sector size
        # instead would make libnbd refuse (EINVAL, client side) the 512-byte requests FUSE and mkfs send.
        minimum = 1 if getattr(export, "accepts_unaligned", False) else export.min_block
        infos.append(nbd.encode_info_block_size(minimum, export.preferred_block, export.max_block))
        for info in infos:
            await self._reply_option(conn, opt, nbd.REP_INFO, info)
        await self._reply_option(conn, opt, nbd.REP_ACK)
        return export

    # -- transmission ----------------------------------------------------------------------------------

    async def _transmission(self, conn: _Connection) -> None:
        export, wire = conn.export, conn.wire
        assert export is not None
        while not conn.draining:
            header = wire.staged(nbd.REQUEST_SIZE)  # a burst of requests is decoded without awaiting each
            if header is None:
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
            carries = command in (nbd.CMD_READ, nbd.CMD_WRITE) and request.length <= export.max_block
            reserved = request.length if carries else 0
            if command == nbd.CMD_WRITE and not carries:  # its payload cannot be skipped at no cost: drop
                raise nbd.NbdProtocolError(f"write of {request.length} bytes", code=nbd.TOO_LONG)
            error = self._check(conn, export, request)
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

    async def _reserve(self, conn: _Connection, nbytes: int) -> None:
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

    async def _release(self, conn: _Connection, nbytes: int) -> None:
        conn.bytes_in_flight -= nbytes
        conn.requests_in_flight -= 1
        if conn.waiting:
            async with conn.budget:
                conn.budget.notify_all()

    @staticmethod
    def _check(conn: _Connection, export: Export, request: nbd.Request) -> int:
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

    def _read_inline(self, conn: _Connection, export: Export, request: nbd.Request, started: float) -> bool:
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

    def _observe(self, export: Export, request: nbd.Request, error: int, started: float) -> None:
        if self.on_request is None:
            return
        nbytes = 0 if error or request.command == nbd.CMD_FLUSH else request.length
        try:
            self.on_request(export.name, request.name if not error else "error", nbytes, time.perf_counter() - started)
        except Exception:
            log.exception("nbd on_request hook failed")

    @staticmethod
    def _call(export: Export, request: nbd.Request, buf: bytearray | None) -> None:
        """The export's blocking call for ``request`` (in a worker thread): a read decrypts into ``buf``, a
        write encrypts ``buf`` (its payload) in place and writes it."""
        cmd, offset, length, fua = request.command, request.offset, request.length, bool(request.flags & 1)
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

    async def _run(
        self,
        conn: _Connection,
        export: Export,
        request: nbd.Request,
        buf: bytearray | None,
        error: int,
        started: float,
        reserved: int,
    ) -> None:
        try:
            if not error:
                try:
                    await asyncio.get_running_loop().run_in_executor(self._pool, self._call, export, request, buf)
                except ExportClosed:
                    error = nbd.ESHUTDOWN
                except KeystewardError as exc:
                    log.warning("nbd request failed export=%s command=%s code=%s", export.name, request.name, exc.code)
                    error = nbd.EIO
                except Exception:
                    log.exception("nbd request failed export=%s command=%s", export.name, request.name)
                    error = nbd.EIO
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
    def _reply(conn: _Connection, request: nbd.Request, error: int, buf: bytearray | None) -> None:
        """Send the reply; a read's ``buf`` goes out as its data (lent to the wire until sent)."""
        if buf is not None and (error or request.command != nbd.CMD_READ):
            conn.buffers.give(buf)
            buf = None
        NbdServer._send_reply(conn, request, error, None if buf is None else memoryview(buf))
        if buf is not None:
            conn.buffers.lend(buf)

    @staticmethod
    def _send_reply(conn: _Connection, request: nbd.Request, error: int, data: memoryview | None) -> None:
        handle = request.handle
        if request.command == nbd.CMD_READ and conn.structured:
            if error:
                conn.wire.write(nbd.encode_structured_error(handle, error, f"{request.name} failed"))
            else:
                assert data is not None
                conn.wire.write(nbd.encode_offset_data_header(handle, request.offset, len(data)), data)
        elif error or data is None:
            conn.wire.write(nbd.encode_simple_reply(handle, error))
        else:
            conn.wire.write(nbd.encode_simple_reply(handle), data)

    # -- reload, revocation, shutdown ------------------------------------------------------------------

    def _spawn(self, coro: object) -> None:
        assert asyncio.iscoroutine(coro)
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    def _drop(conn: _Connection, *, abort: bool) -> None:
        """Graceful: stop reading requests (in-flight ones finish), then close. Abort: close now."""
        conn.draining = True
        if abort:
            conn.wire.close(abort=True)
        if conn.main is not None and (abort or conn.idle or conn.export is None):
            conn.main.cancel()

    async def _retire(self, export: Export, reason: str, *, abort: bool, name: str | None = None) -> None:
        """Drop the connections that use ``export`` (or ``name``), wait for their requests, close it."""
        conns = [c for c in self._connections if c.export is export or (name is not None and c.export is not None
                                                                          and c.export.name == name)]  # fmt: skip
        for conn in conns:
            self._drop(conn, abort=abort)
        waits = [t for c in conns for t in (c.main, *c.tasks) if t is not None]
        if waits:
            await asyncio.gather(*waits, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(self._pool, export.close)
        log.info("nbd export closed export=%s connections=%d reason=%s", export.name, len(conns), reason)

    def set_exports(self, exports: Mapping[str, Export]) -> None:
        """Serve ``exports`` from now on. Exports no longer listed (or replaced by another object under
        their name) lose their connections once their in-flight requests are done, and are closed."""
        new = dict(exports)
        old, self._exports = self._exports, new
        kept = {id(e) for e in new.values()}
        for name, export in old.items():
            if new.get(name) is not export and id(export) not in kept:
                self._spawn(self._retire(export, "removed from the export list", abort=False))
        log.info("nbd export list now %s", ",".join(sorted(new)) or "(empty)")

    def set_revocations(self, revocations: Revocations) -> None:
        """Refuse these certificates from now on, and abort the connections of those connected now."""
        self._revocations = revocations
        for conn in [c for c in self._connections if revocations.refuses(c.cert)]:
            self._refused(conn, conn.export.name if conn.export else "", "", "revoked")
            self._drop(conn, abort=True)

    async def close_export(self, name: str, reason: str) -> None:
        """Revocation: drop every connection to ``name`` now, then close (wipe) the export."""
        export = self._exports.pop(name, None)
        if export is None:
            log.warning("nbd close_export: no export %s (reason=%s)", name, reason)
            conns = [c for c in self._connections if c.export is not None and c.export.name == name]
            for conn in conns:
                self._drop(conn, abort=True)
            return
        await self._retire(export, reason, abort=True, name=name)

    async def stop(self, grace: float = 30.0) -> None:
        """Stop listening, let in-flight requests finish (``grace`` seconds at most), flush and close every
        export."""
        self._stopped = True
        for server in self._servers:
            server.close()
        conns = list(self._connections)
        for conn in conns:
            self._drop(conn, abort=False)
        mains = [c.main for c in conns if c.main is not None]
        if mains:
            _done, pending = await asyncio.wait(mains, timeout=grace)
            for conn in conns:
                if conn.main in pending:
                    self._drop(conn, abort=True)
            await asyncio.gather(*mains, *(t for c in conns for t in c.tasks), return_exceptions=True)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        exports = {id(e): e for e in self._exports.values()}
        self._exports = {}
        loop = asyncio.get_running_loop()
        for export in exports.values():
            try:
                await loop.run_in_executor(self._pool, export.close)
            except Exception:
                log.exception("nbd export %s failed to close", export.name)
        for server in self._servers:
            await server.wait_closed()
        self._pool.shutdown(wait=False)
        log.info("nbd server stopped")
