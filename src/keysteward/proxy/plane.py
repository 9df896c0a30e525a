"""The native data plane: an NBD connection's transmission phase served by C, one thread each.

Connections to an export over a LUKS volume, plaintext (a Unix socket or loopback TCP: how QEMU on the same
host reaches the proxy) or TLS, are handed, once the handshake chose the export, to the loop in
``src/keysteward/proxy/nbd_plane.c`` (compiled into :mod:`keysteward.crypto._xts_native`). It receives a
request, reads or writes the device with ``pread``/``pwrite``, runs XTS on the volume's own cipher context
in the one buffer the payload lives in, and replies, with no interpreter and no GIL between, so a write
costs about what it costs ``nbdkit file`` plus the cipher. Everything that is not the data path stays
here, in Python, unchanged:

- the handshake, the TLS handshake and the client certificate's check, which connections may open which
  export; a TLS connection's session is lent to the loop (:mod:`keysteward.proxy.tls_lend`, ``nbd_tls.c``),
  which encrypts and decrypts its records with OpenSSL as the Python path would, and given back when the
  loop ends (only then may the TLS transport close it); where it cannot be lent, the Python path serves;
- every request the loop does not serve itself (trim, write zeroes, partial sectors, bad ranges, unknown
  commands or flags, bad magic) comes back here undecided and is answered by the same code as the Python
  path (:func:`~keysteward.proxy.transmission.call_export`, :func:`~keysteward.proxy.transmission.reply_parts`);
- revocation and reload: :meth:`Plane.stop` shuts the socket down (abort: both ways, which ends the loop at
  its next ``recv`` or ``send``); graceful, it lets the loop answer the request it serves and those already
  received, then end;
  the export counts the connection as a request in flight (:meth:`~keysteward.proxy.export.LuksExport.lend_native`),
  so ``close`` wipes the key only after the loop has let go of it;
- metrics: the loop counts requests, bytes and a latency histogram per command; :meth:`Planes.collect`
  hands them to the ``on_requests`` hook every second and when a connection ends.

The key stays where it was: the volume's native cipher context, which the loop borrows (it copies nothing).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from keysteward.crypto.xts import native_available, native_module
from keysteward.formats import nbd
from keysteward.proxy import tls_lend
from keysteward.proxy.export import Export, ExportClosed
from keysteward.proxy.metrics import LATENCY_BUCKETS
from keysteward.proxy.transmission import Connection, Observer, admit, call_export, reply_parts
from keysteward.volume.cipher_pool import NativeTarget

log = logging.getLogger("keysteward.proxy")

MAX_PLANES = 256
"""Connections served natively at once (a thread each); more are served by the Python path."""
COLLECT_EVERY = 1.0
"""Seconds between two hand-overs of the native counters to the metrics."""
COMMANDS = ("read", "write", "flush", "error")
"""The loop's counters, in its order (``error``: a request it answered with NBD_EIO)."""
BatchHook = Callable[[str, str, int, int, float, list[int]], None]
"""(export, command, requests, bytes, seconds in all, requests per latency bucket of
:data:`~keysteward.proxy.metrics.LATENCY_BUCKETS` and one more for +Inf)."""


def _native() -> Any:
    """The extension the loop is compiled into (callers checked :meth:`Planes.available` first)."""
    module = native_module()
    assert module is not None, "the native extension is not built"
    return module


class Plane:
    """One connection on the native loop: its socket, the loop's state, the thread that runs it."""

    def __init__(
        self,
        conn: Connection,
        export: Export,
        handed: tuple[socket.socket, bytes],
        lock: threading.Lock,
        session: int | None,
    ) -> None:
        self.conn = conn
        self.export = export
        self.sock, self.staged = handed
        self.lock = lock
        self.session = session
        """The TLS session's ``SSL *`` (:mod:`keysteward.proxy.tls_lend`), or None: plaintext."""
        self.ssl_object = conn.wire.ssl_object
        """Held so that the session outlives the loop whatever the transport does."""
        self.handle: Any = None
        """The loop's state (cffi ``ks_nbd_plane *``) while it runs; guarded by ``lock``."""
        self.stopping = False

    def stop(self, *, abort: bool) -> None:
        """End the loop: abort at once (the socket is shut down), or (graceful) once the request it serves now
        and those whose bytes have already arrived are answered (the loop is woken if it waits for one)."""
        with self.lock:
            self.stopping = True
            if self.handle is not None:
                _native().lib.ks_plane_stop(self.handle)
        if not abort:
            return
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # closed already


class Planes:
    """The native planes of one NBD server (see the module doc)."""

    def __init__(self, observe: Observer) -> None:
        self._observe = observe
        self.on_requests: BatchHook | None = None
        self.lock = threading.Lock()
        self._live: set[Plane] = set()
        self._collector: asyncio.TimerHandle | None = None

    @staticmethod
    def available() -> bool:
        return native_available()

    async def serve(self, conn: Connection) -> bool:
        """Serve ``conn``'s transmission phase natively; False (nothing done) when it cannot be: an export not
        over a native cipher, a TLS session that cannot be lent, a reply still queued."""
        export = conn.export
        lend = getattr(export, "lend_native", None)
        if export is None or lend is None or not self.available() or len(self._live) >= MAX_PLANES:
            return False
        session = None
        ssl_object = conn.wire.ssl_object
        if ssl_object is not None and (session := tls_lend.session(ssl_object)) is None:
            return False
        handed = conn.wire.hand_off()
        if handed is None:
            return False
        log.debug("nbd native data plane peer=%s export=%s tls=%s", conn.peer, export.name, session is not None)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        plane = Plane(conn, export, handed, self.lock, session)
        conn.plane = plane
        thread = threading.Thread(target=self._thread, args=(plane, loop, done), name="ks-nbd-plane", daemon=True)
        thread.start()
        self._schedule(loop)
        cancelled = False
        while not done.done():  # the session is the loop's until its thread has ended, cancelled or not
            try:
                await asyncio.shield(done)
            except asyncio.CancelledError:
                cancelled = True
                plane.stop(abort=True)
        conn.wire.take_back()
        if cancelled:
            raise asyncio.CancelledError
        return True

    def _thread(self, plane: Plane, loop: asyncio.AbstractEventLoop, done: asyncio.Future[None]) -> None:
        try:
            self._run(plane)
        except nbd.NbdProtocolError as exc:
            log.warning("nbd protocol error, connection dropped peer=%s code=%s: %s", plane.conn.peer, exc.code, exc)
        except ExportClosed:
            log.info("nbd client left peer=%s reason=export_closed", plane.conn.peer)
        except (OSError, ConnectionError) as exc:
            log.info("nbd client left peer=%s reason=%s", plane.conn.peer, type(exc).__name__)
        except Exception:
            log.exception("nbd native connection failed peer=%s", plane.conn.peer)
        finally:
            plane.sock.close()
            loop.call_soon_threadsafe(_resolve, done)

    def _run(self, plane: Plane) -> None:
        export = plane.export
        with export.lend_native() as target:  # type: ignore[attr-defined]
            if target is None:
                raise RuntimeError("the native XTS extension lent no cipher")
            module = _native()
            ffi, lib = module.ffi, module.lib
            handle = self._start(plane, target, ffi, lib)
            header = ffi.new("unsigned char[]", nbd.REQUEST_SIZE)
            try:
                while True:
                    rc = lib.ks_plane_serve(handle, header)
                    if rc != lib.KS_PLANE_HANDOFF:
                        break
                    if not self._handoff(plane, handle, bytes(ffi.buffer(header))):
                        break  # stopping: the loop's next wait ends it once nothing the client sent is left
                if rc == lib.KS_PLANE_NOMEM:
                    log.error("nbd native plane out of memory peer=%s export=%s", plane.conn.peer, export.name)
            finally:
                with self.lock:
                    self._collect(plane)
                    self._live.discard(plane)
                    plane.handle = None
                lib.ks_plane_free(handle)

    def _start(self, plane: Plane, target: NativeTarget, ffi: Any, lib: Any) -> Any:
        export = plane.export
        bounds = ffi.new("double[]", list(LATENCY_BUCKETS))
        slot = ffi.new("ks_nbd_plane **")
        code = lib.ks_plane_new(
            plane.sock.fileno(), target.fd, target.data_offset, target.payload_size, target.iv_tweak,
            target.sector_size, export.max_block, int(export.read_only), int(plane.conn.structured),
            target.cipher, ffi.NULL if plane.session is None else ffi.cast("void *", plane.session),
            plane.staged, len(plane.staged), bounds, len(LATENCY_BUCKETS), slot,
        )  # fmt: skip
        if code != 0:
            raise RuntimeError(f"the native NBD plane did not start (code {code})")
        with self.lock:
            plane.handle = slot[0]
            self._live.add(plane)
            if plane.stopping:  # stopped before the loop existed
                lib.ks_plane_stop(plane.handle)
        return slot[0]

    def _handoff(self, plane: Plane, handle: Any, header: bytes) -> bool:
        """Answer one request the loop did not serve, as the Python path would, through the loop's own reads
        and writes (TLS or not); False ends the connection."""
        conn, export = plane.conn, plane.export
        module = _native()
        request = nbd.decode_request(header)  # bad magic: NbdProtocolError, the connection is dropped
        started = time.perf_counter()
        command = request.command
        carries, error = admit(conn, export, request)
        buf = bytearray(request.length) if carries else None
        if command == nbd.CMD_WRITE:
            assert buf is not None
            if module.lib.ks_plane_recv_all(handle, module.ffi.from_buffer(buf), len(buf)) != 1:
                raise ConnectionError("the client went away inside a write's payload")
        if not error:
            error = call_export(export, request, buf)
        data = memoryview(buf) if buf is not None and command == nbd.CMD_READ and not error else None
        reply = b"".join(reply_parts(conn.structured, request, error, data))
        if module.lib.ks_plane_send(handle, reply, len(reply)) != 0:
            raise ConnectionError("the reply could not be sent")
        self._observe(export, request, error, started)
        return True

    # -- metrics ---------------------------------------------------------------------------------------

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._collector is None:
            self._collector = loop.call_later(COLLECT_EVERY, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._collector = None
        with self.lock:
            for plane in list(self._live):
                self._collect(plane)
            if self._live:
                self._schedule(loop)

    def _collect(self, plane: Plane) -> None:
        """Hand the loop's counters since the last time to ``on_requests`` (with :attr:`lock` held)."""
        if plane.handle is None:
            return
        module = _native()
        words, n = module.lib.KS_PLANE_STAT_WORDS, module.lib.KS_PLANE_STATS
        out = module.ffi.new("uint64_t[]", words * n)
        module.lib.ks_plane_take(plane.handle, out)
        hook = self.on_requests
        for i, command in enumerate(COMMANDS):
            row = out[i * words : (i + 1) * words]
            if not row[0]:
                continue
            if command == "error":
                log.warning("nbd requests failed export=%s count=%d", plane.export.name, row[0])
            if hook is not None:
                buckets = list(row[4 : 4 + len(LATENCY_BUCKETS) + 1])
                try:
                    hook(plane.export.name, command, row[0], row[1], row[2] / 1e9, buckets)
                except Exception:
                    log.exception("nbd on_requests hook failed")


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)
