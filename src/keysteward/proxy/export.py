"""What the NBD server serves: an :class:`Export`, and :class:`LuksExport`, one over an unlocked LUKS volume.

The server calls an export's blocking methods in worker threads, several at once (requests of one
connection run concurrently, and several connections may share an export). :class:`LuksExport` is
safe for that:

- reads and sector-aligned writes run in parallel (the data path uses ``pread``/``pwrite``);
- a write that starts or ends inside a sector patches that sector (read, decrypt, patch, encrypt,
  write), so two such writes to *different* bytes of one sector would lose one of them if they ran
  together; they take a lock, one at a time;
- :meth:`LuksExport.close` (revocation, reload, shutdown) waits for the requests in flight, flushes,
  then wipes the key; a request that comes after it gets :class:`ExportClosed`, never a closed cipher.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Collection, Iterator
from typing import Protocol

from keysteward.errors import Unavailable
from keysteward.formats import nbd
from keysteward.volume.cipher_pool import NativeTarget
from keysteward.volume.errors import VolumeRequestError
from keysteward.volume.luks_volume import LuksVolume, Passphrase

MIB = 1024 * 1024
PREFERRED_BLOCK = 4096
MAX_BLOCK = 32 * MIB
"""The largest read or write payload served in one request (clients split larger ones)."""
ZERO_CHUNK = 4 * MIB


class ExportClosed(Unavailable):
    """The export was closed (revoked, removed or shut down) while a client still used it."""

    code = "export_closed"
    title = "Export closed"


class Export(Protocol):
    """One export the NBD server serves; blocking methods, called in worker threads."""

    name: str
    description: str
    size: int
    read_only: bool
    min_block: int
    preferred_block: int
    max_block: int

    def pread(self, offset: int, length: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool) -> None: ...

    def pread_into(self, offset: int, view: memoryview, *, cached_only: bool = False) -> bool: ...

    def pwrite_in_place(self, offset: int, view: memoryview, fua: bool) -> None: ...

    def flush(self) -> None: ...

    def trim(self, offset: int, length: int) -> None: ...

    def write_zeroes(self, offset: int, length: int, fua: bool) -> None: ...

    def close(self) -> None: ...


class LuksExport:
    """An :class:`Export` over an open :class:`~keysteward.volume.luks_volume.LuksVolume`, which it owns:
    :meth:`close` closes the volume and so wipes its key."""

    def __init__(
        self,
        name: str,
        volume: LuksVolume,
        *,
        read_only: bool = False,
        description: str = "",
        max_block: int = MAX_BLOCK,
    ) -> None:
        self.name = name
        self.description = description
        self.volume = volume
        self.size = volume.payload_size
        self.read_only = read_only or not volume.device.writable
        self.min_block = volume.geometry.sector_size
        self.preferred_block = max(PREFERRED_BLOCK, self.min_block)
        self.max_block = max_block
        self.accepts_unaligned = True
        """Requests need not be sector-aligned (partial sectors are patched): the server advertises 1."""
        self._state = threading.Condition()
        self._active = 0
        self._closed = False
        self._patch_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        name: str,
        path: str,
        passphrase: Passphrase,
        *,
        read_only: bool = False,
        description: str = "",
    ) -> LuksExport:
        """Open and unlock the volume at ``path`` (the caller wipes ``passphrase``)."""
        volume = LuksVolume.open(path, passphrase, writable=not read_only)
        return cls(name, volume, read_only=read_only, description=description)

    # -- bookkeeping ---------------------------------------------------------------------------------

    def _enter(self) -> None:
        with self._state:
            if self._closed:
                raise ExportClosed(f"export {self.name!r} is closed")
            self._active += 1

    def _leave(self) -> None:
        with self._state:
            self._active -= 1
            if self._active == 0 and self._closed:  # only close() waits for the count to reach 0
                self._state.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_writable(self) -> None:
        if self.read_only:
            raise VolumeRequestError(f"export {self.name!r} is read-only", code="export_read_only")

    def _aligned(self, offset: int, length: int) -> bool:
        return offset % self.min_block == 0 and length % self.min_block == 0

    # -- the Export methods ----------------------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        self._enter()
        try:
            return self.volume.read(offset, length)
        finally:
            self._leave()

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        self._check_writable()
        self._enter()
        try:
            self._write(offset, data)
            if fua:
                self.volume.flush()
        finally:
            self._leave()

    def pread_into(self, offset: int, view: memoryview, *, cached_only: bool = False) -> bool:
        """Fill ``view`` with the payload at ``offset``: whole sectors are read into it and decrypted there;
        any other request is read and copied in. ``cached_only`` (the event loop's own reads): only whole
        sectors that the page cache holds, else False and nothing done (the caller uses a worker thread)."""
        self._enter()
        try:
            if self.volume.aligned(offset, view.nbytes):
                return self.volume.read_into(offset, view, cached_only=cached_only)
            if cached_only:
                return False
            at = 0

            def sink(part: memoryview) -> None:
                nonlocal at
                view[at : at + part.nbytes] = part
                at += part.nbytes

            self.volume.read_to(offset, view.nbytes, sink)
            return True
        finally:
            self._leave()

    def pwrite_in_place(self, offset: int, view: memoryview, fua: bool) -> None:
        """As :meth:`pwrite`, but ``view`` is the caller's scratch: whole sectors are encrypted in it (it holds
        ciphertext afterwards) and written from it; any other request is written through a copy."""
        self._check_writable()
        self._enter()
        try:
            if self.volume.aligned(offset, view.nbytes):
                self.volume.write_in_place(offset, view)
            else:
                self._write(offset, view)
            if fua:
                self.volume.flush()
        finally:
            self._leave()

    def _write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self._aligned(offset, len(data)):
            self.volume.write(offset, data)
            return
        with self._patch_lock:  # read-modify-write of a shared sector: one at a time
            self.volume.write(offset, data)

    def flush(self) -> None:
        self._enter()
        try:
            if not self.read_only:
                self.volume.flush()
        finally:
            self._leave()

    def trim(self, offset: int, length: int) -> None:
        """A hint the protocol lets a server ignore; the ciphertext stays (zeros would not read as zeros)."""
        self._check_writable()
        self._enter()
        try:
            self.volume.check_range(offset, length)
        finally:
            self._leave()

    def write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        """Encrypted zeros (a hole in the file would decrypt to noise), a chunk at a time."""
        self._check_writable()
        self._enter()
        try:
            self.volume.check_range(offset, length)
            zeros = bytes(min(length, ZERO_CHUNK))
            done = 0
            while done < length:
                n = min(length - done, len(zeros))
                self._write(offset + done, memoryview(zeros)[:n])
                done += n
            if fua:
                self.volume.flush()
        finally:
            self._leave()

    @contextlib.contextmanager
    def lend_native(self) -> Iterator[NativeTarget | None]:
        """The volume lent to the native data plane (:mod:`keysteward.proxy.plane`) for one connection: counted
        as a request in flight for the whole ``with`` block, so :meth:`close` waits for it before wiping the key
        (the server shuts the connection's socket down first, which ends the block). None without the native
        extension; :class:`ExportClosed` once closed."""
        self._enter()
        try:
            with self.volume.lend_native() as target:
                yield target
        finally:
            self._leave()

    def close(self) -> None:
        """Refuse new requests, wait for those in flight, flush, and close the volume (wiping its key)."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            while self._active:
                self._state.wait()
        try:
            if not self.read_only:
                self.volume.flush()
        finally:
            self.volume.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("ro" if self.read_only else "rw")
        return f"<LuksExport {self.name!r} {self.size} bytes {state}>"


def transmission_flags(export: Export) -> int:
    """The NBD transmission flags an export is announced with."""
    flags = nbd.TF_HAS_FLAGS | nbd.TF_SEND_FLUSH | nbd.TF_CAN_MULTI_CONN
    if export.read_only:
        return flags | nbd.TF_READ_ONLY
    # Every connection writes through the same volume and one flush syncs the whole file: multi-conn is safe.
    return flags | nbd.TF_SEND_FUA | nbd.TF_SEND_TRIM | nbd.TF_SEND_WRITE_ZEROES


def info_payloads(export: Export, info_types: Collection[int]) -> list[bytes]:
    """The NBD_REP_INFO payloads that describe ``export`` to a client that asked for ``info_types``."""
    infos = [nbd.encode_info_export(export.size, transmission_flags(export))]
    if nbd.INFO_NAME in info_types:
        infos.append(nbd.encode_info_name(export.name))
    if nbd.INFO_DESCRIPTION in info_types and export.description:
        infos.append(nbd.encode_info_description(export.description))
    # An export that patches partial sectors itself accepts any alignment: advertising its sector size
    # instead would make libnbd refuse (EINVAL, client side) the 512-byte requests FUSE and mkfs send.
    minimum = 1 if getattr(export, "accepts_unaligned", False) else export.min_block
    infos.append(nbd.encode_info_block_size(minimum, export.preferred_block, export.max_block))
    return infos
