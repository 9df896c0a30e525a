"""The NBD server of the proxy: an asyncio server that serves :class:`~keysteward.proxy.export.Export` s.

One connection goes through the fixed newstyle handshake (options decoded by
:mod:`keysteward.formats.nbd`), then the transmission phase, served by
:class:`~keysteward.proxy.transmission.Transmission` (requests as tasks, within a budget per connection;
module :mod:`keysteward.proxy.transmission`). Bytes come in and go out through
:class:`~keysteward.proxy.wire.Wire`, the connection's transport.

With ``tls`` set TLS is mandatory: before STARTTLS every option but STARTTLS and ABORT is refused with
NBD_REP_ERR_TLS_REQD. The context must require a client certificate (``CERT_REQUIRED``), and ``clients`` says,
per export, which certificate names may see and open it (:func:`keysteward.proxy.peers.peer_names`: the
subject common name, DNS and URI subject alternative names). ``NBD_OPT_LIST`` lists only those exports;
``NBD_OPT_INFO`` and ``NBD_OPT_GO`` for any other answer NBD_REP_ERR_UNKNOWN exactly as for a name that does
not exist (so a client cannot learn other exports' names), ``NBD_OPT_EXPORT_NAME`` drops the connection; each
refusal is logged (peer address, certificate names, export) and passed to ``on_refused``. Without TLS
(plaintext, allowed on loopback only by the config) there is no identity and every export is open to every
client.

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

from keysteward.errors import BadRequest
from keysteward.formats import nbd
from keysteward.proxy.export import Export, info_payloads, transmission_flags
from keysteward.proxy.peers import peer_names
from keysteward.proxy.plane import BatchHook, Planes
from keysteward.proxy.revocations import Revocations, cert_ref
from keysteward.proxy.transmission import Connection, Transmission
from keysteward.proxy.wire import Closed, Wire

log = logging.getLogger("keysteward.proxy")

HANDSHAKE_TIMEOUT = 30.0
MAX_OPTIONS = 128
"""Options one handshake may send before the server gives up on the client."""
WORKER_THREADS = 8

RequestHook = Callable[[str, str, int, float], None]
ClientPolicy = Callable[[str], Collection[str]]
"""Export name -> the client certificate names that may list and open it."""
RefusalHook = Callable[[str, str], None]
"""(export name, or "" for a name that is not served; reason) of a refused open."""
NAME_LOG_MAX = 80


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
        self.native = True
        """Serve connections on the native data plane (:mod:`keysteward.proxy.plane`) when it is built."""
        self.on_refused: RefusalHook | None = None
        self._servers: list[asyncio.Server] = []
        self._connections: set[Connection] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._pool = ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="ks-nbd")
        self._data = Transmission(self._pool, self._observe)
        self._planes = Planes(self._observe)
        self._stopped = False
        self._revocations = Revocations()

    @property
    def exports(self) -> Mapping[str, Export]:
        return dict(self._exports)

    @property
    def on_requests(self) -> BatchHook | None:
        """Told of the requests the native data plane served, in batches (``on_request`` of each other one)."""
        return self._planes.on_requests

    @on_requests.setter
    def on_requests(self, hook: BatchHook | None) -> None:
        self._planes.on_requests = hook

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
        conn = Connection(wire, str(peer[0] if isinstance(peer, tuple) else peer or "unix"))
        self._connections.add(conn)
        conn.main = asyncio.get_running_loop().create_task(self._serve(conn))

    # -- one connection ----------------------------------------------------------------------------

    async def _serve(self, conn: Connection) -> None:
        try:
            if await asyncio.wait_for(self._handshake(conn), HANDSHAKE_TIMEOUT):
                if not (self.native and await self._planes.serve(conn)):
                    await self._data.serve(conn)
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

    async def _reply_option(self, conn: Connection, option: int, reply: int, data: bytes = b"") -> None:
        conn.wire.write(nbd.encode_option_reply(option, reply, data))
        await conn.wire.drain()

    def _lookup(self, name: str) -> Export | None:
        export = self._exports.get(name or self.default_export or "")  # "": the default export, if any
        return None if export is None or getattr(export, "closed", False) else export

    def _allowed(self, conn: Connection, name: str) -> bool:
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

    def _open(self, conn: Connection, name: str) -> Export | None:
        """The export ``name`` if it is served and this client may open it; a refusal is logged and counted."""
        export = self._lookup(name)
        if export is None:
            self._refused(conn, "", name, "unknown_export")
            return None
        if not self._allowed(conn, export.name):
            self._refused(conn, export.name, export.name, "not_allowed")
            return None
        return export

    def _refused(self, conn: Connection, export: str, asked: str, reason: str) -> None:
        client = ",".join(sorted(conn.names))[:NAME_LOG_MAX] or "-"
        log.warning("nbd open refused peer=%s client=%r export=%r reason=%s", conn.peer, client,
                    asked[:NAME_LOG_MAX], reason)  # fmt: skip
        if self.on_refused is not None:
            try:
                self.on_refused(export, reason)
            except Exception:
                log.exception("nbd on_refused hook failed")

    async def _handshake(self, conn: Connection) -> bool:
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
                flags = transmission_flags(export)
                wire.write(nbd.encode_export_name_reply(export.size, flags, no_zeroes=conn.no_zeroes))
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

    def _chosen(self, conn: Connection, export: Export) -> bool:
        conn.export = export
        log.info("nbd client connected peer=%s export=%s tls=%s", conn.peer, export.name, conn.tls)
        return True

    async def _starttls(self, conn: Connection, data: bytes) -> None:
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

    async def _info(self, conn: Connection, opt: int, data: bytes) -> Export | None:
        try:
            request = nbd.decode_info_request(data)
        except nbd.NbdProtocolError as exc:
            await self._reply_option(conn, opt, nbd.REP_ERR_INVALID, exc.message.encode())
            return None
        export = self._open(conn, request.name)
        if export is None:  # not served, or not to this client: the same answer
            await self._reply_option(conn, opt, nbd.REP_ERR_UNKNOWN, b"no such export")
            return None
        for info in info_payloads(export, request.info_types):
            await self._reply_option(conn, opt, nbd.REP_INFO, info)
        await self._reply_option(conn, opt, nbd.REP_ACK)
        return export

    # -- transmission ----------------------------------------------------------------------------------

    def _observe(self, export: Export, request: nbd.Request, error: int, started: float) -> None:
        if self.on_request is None:
            return
        nbytes = 0 if error or request.command == nbd.CMD_FLUSH else request.length
        try:
            self.on_request(export.name, request.name if not error else "error", nbytes, time.perf_counter() - started)
        except Exception:
            log.exception("nbd on_request hook failed")

    # -- reload, revocation, shutdown ------------------------------------------------------------------

    def _spawn(self, coro: object) -> None:
        assert asyncio.iscoroutine(coro)
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    def _drop(conn: Connection, *, abort: bool) -> None:
        """Graceful: stop reading requests (in-flight ones finish), then close. Abort: close now."""
        conn.draining = True
        if conn.plane is not None:
            conn.plane.stop(abort=abort)
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
            for conn in [c for c in self._connections if c.export is not None and c.export.name == name]:
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
