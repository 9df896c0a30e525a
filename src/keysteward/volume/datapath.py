"""The userspace data path: payload bytes at any offset and length, through whole encrypted sectors.

Requests are cut into chunks of :data:`CHUNK` bytes aligned to sectors. Each chunk is one ``pread``
or ``pwrite`` and one call into :class:`~keysteward.crypto.xts.XtsCipher` (native, GIL released), so
large requests run on several cores: worker threads (each chunk on a cipher of its own) read and
decrypt, or encrypt and write, while the calling thread moves bytes from or to the caller, in order.

A write that does not start or end on a sector boundary reads, decrypts and patches the sector it
starts or ends in (read-modify-write). Writes touch payload sectors only, never the header; a write
killed at any point leaves every sector either old or new: the page cache takes whole pages, and a
sector straddles two pages only if the data offset is not 4 KiB aligned (cryptsetup and keysteward
align it to 1 MiB).
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from keysteward.crypto.secret import SecretBuffer
from keysteward.volume.cipher_pool import CipherPool, NativeTarget
from keysteward.volume.device import Device
from keysteward.volume.errors import VolumeRequestError
from keysteward.volume.header_io import Geometry

CHUNK = 4 * 1024 * 1024
IV_UNIT = 512
MAX_WORKERS = 2

if TYPE_CHECKING:
    from concurrent.futures import Future


Sink = Callable[[memoryview], None]
"""Receives decrypted payload bytes, in order; the view is only valid during the call."""
ReadInto = Callable[[memoryview], int | None]
"""Fills a view from the input (like ``RawIOBase.readinto``); 0 at the end of the input."""
Progress = Callable[[int], None]
"""Told how many payload bytes are done, after each chunk."""
Span = tuple[int, int]
"""``[start, stop)`` in payload bytes, sector-aligned."""


def _align_down(value: int, unit: int) -> int:
    return value - value % unit


def _align_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _fill(read_into: ReadInto, view: memoryview) -> int:
    """Read until ``view`` is full or the input ends; returns the bytes read."""
    got = 0
    while got < view.nbytes:
        n = read_into(view[got:])
        if not n:
            break
        got += n
    return got


class SectorIO:
    """Reads and writes the payload of one unlocked volume (see the module doc).

    ``key`` stays owned by the caller; the ciphers made from it are pooled (:class:`CipherPool`).
    """

    def __init__(self, device: Device, geometry: Geometry, key: SecretBuffer, *, workers: int | None = None) -> None:
        self.device = device
        self.geometry = geometry
        self._ciphers = CipherPool(key, geometry)
        self._workers = max(1, workers if workers is not None else MAX_WORKERS)

    @property
    def payload_size(self) -> int:
        return self.geometry.payload_size

    def lend_native(self) -> contextlib.AbstractContextManager[NativeTarget | None]:
        """See :meth:`CipherPool.lend_native` (this volume's device)."""
        return self._ciphers.lend_native(self.device.fd)

    def close(self) -> None:
        """Close every cipher (the native key schedules are wiped)."""
        self._ciphers.close()

    # -- checks ----------------------------------------------------------------------------------

    def check_range(self, offset: int, length: int) -> None:
        size = self.payload_size
        if offset < 0 or length < 0:
            raise VolumeRequestError(f"offset {offset} and length {length} must not be negative")
        if offset > size or length > size - offset:
            raise VolumeRequestError(f"bytes [{offset}, {offset + length}) are outside the payload of {size} bytes")

    # -- sector work (any thread) ------------------------------------------------------------------

    def _decrypt_at(self, pos: int, view: memoryview) -> None:
        """Read and decrypt whole sectors at payload offset ``pos`` (aligned) into ``view``."""
        self.device.preadinto(self.geometry.data_offset + pos, view)
        self._decrypt_view(view, pos, view)

    def _decrypt_view(self, data: memoryview, pos: int, out: memoryview) -> None:
        """Decrypt ``data`` (whole sectors of the payload at offset ``pos``, aligned) into ``out``."""
        with self._ciphers.cipher() as cipher:
            cipher.decrypt(data, pos // IV_UNIT, out=out, iv_shift=self.geometry.iv_tweak)

    def _encrypt_to(self, pos: int, view: memoryview) -> None:
        """Encrypt ``view`` (whole sectors, in place) and write it at payload offset ``pos`` (aligned)."""
        with self._ciphers.cipher() as cipher:
            cipher.encrypt(view, pos // IV_UNIT, out=view, iv_shift=self.geometry.iv_tweak)
        self.device.pwrite(self.geometry.data_offset + pos, view)

    # -- reading -----------------------------------------------------------------------------------

    def read_to(self, offset: int, length: int, sink: Sink, progress: Progress | None = None) -> None:
        """Decrypt payload bytes ``[offset, offset + length)`` and hand them to ``sink`` in order.

        A request of more than one chunk decrypts straight from a read-only mapping of the device (the
        page cache, without a copy into a buffer first); a small one, or a device that cannot be
        mapped, reads with ``pread``.
        """
        self.check_range(offset, length)
        if length == 0:
            return
        sector = self.geometry.sector_size
        start, end = _align_down(offset, sector), _align_up(offset + length, sector)
        spans = [(pos, min(pos + CHUNK, end)) for pos in range(start, end, CHUNK)]
        done = 0
        if end - start > 2 * CHUNK:
            self.device.advise_sequential(self.geometry.data_offset + start, end - start)
        mapped = self.device.map_range(self.geometry.data_offset + start, end - start) if end - start > CHUNK else None

        def job(span: Span, buf: bytearray) -> None:
            out = memoryview(buf)[: span[1] - span[0]]
            if mapped is None:
                self._decrypt_at(span[0], out)
                return
            with mapped[1][span[0] - start : span[1] - start] as data:
                self._decrypt_view(data, span[0], out)

        def deliver(span: Span, buf: bytearray) -> None:
            nonlocal done
            lo, hi = max(offset, span[0]) - span[0], min(offset + length, span[1]) - span[0]
            sink(memoryview(buf)[lo:hi])
            done += hi - lo
            if progress is not None:
                progress(done)

        try:
            self._in_turn(spans, job, deliver, min(CHUNK, end - start))
        finally:
            if mapped is not None:
                mapped[1].release()
                mapped[0].close()

    def aligned(self, offset: int, length: int) -> bool:
        """Whole sectors, at most a chunk: what :meth:`read_into` and :meth:`write_in_place` take."""
        sector = self.geometry.sector_size
        return offset % sector == 0 and length % sector == 0 and 0 < length <= CHUNK

    def read_into(self, offset: int, view: memoryview, *, cached_only: bool = False) -> bool:
        """Decrypt whole sectors at payload ``offset`` into ``view`` (:meth:`aligned`): one ``pread`` into
        ``view``, decrypted in place, no other buffer. ``cached_only``: only if the page cache holds them
        all (False otherwise: nothing read, the caller reads again where waiting does no harm)."""
        self._check_aligned(offset, view.nbytes)
        if cached_only:
            if not self.device.preadinto_cached(self.geometry.data_offset + offset, view):
                return False
            self._decrypt_view(view, offset, view)
            return True
        self._decrypt_at(offset, view)
        return True

    def write_in_place(self, offset: int, view: memoryview) -> None:
        """Encrypt ``view`` (whole sectors, :meth:`aligned`) **in place**, so it holds ciphertext afterwards,
        and write it at payload ``offset``: no copy into another buffer."""
        self._check_aligned(offset, view.nbytes)
        self._encrypt_to(offset, view)

    def _check_aligned(self, offset: int, length: int) -> None:
        self.check_range(offset, length)
        if not self.aligned(offset, length):
            raise VolumeRequestError(f"bytes [{offset}, {offset + length}) are not whole sectors of at most {CHUNK}")

    def read(self, offset: int, length: int) -> bytes:
        """Payload bytes ``[offset, offset + length)`` as one ``bytes`` (for small reads)."""
        parts: list[bytes] = []
        self.read_to(offset, length, lambda view: parts.append(bytes(view)))
        return b"".join(parts)

    # -- writing -----------------------------------------------------------------------------------

    def write_from(
        self, offset: int, read_into: ReadInto, *, length: int | None = None, progress: Progress | None = None
    ) -> int:
        """Encrypt the input (until its end) and write it at payload ``offset``; returns the bytes written.

        ``length``, when the input's size is known, is checked against the payload before anything is
        written. An input of unknown size (a pipe) that runs past the end of the payload is refused
        when that is discovered; the chunks before it are written by then.
        """
        self.check_range(offset, 0 if length is None else length)
        sector, payload = self.geometry.sector_size, self.payload_size
        pos, written = offset, 0
        # The plaintext of the previous window's partly filled last sector. The next window starts in that
        # sector, and must take it from here: the previous window may still be on its way to the disk.
        carried: tuple[int, bytes] | None = None

        def produce(buf: bytearray) -> Span | None:
            """Fill ``buf`` with the next window: input bytes, and old plaintext around them."""
            nonlocal pos, written, carried
            start = _align_down(pos, sector)
            head = pos - start
            capacity = min(len(buf), payload - start)
            if capacity <= head:  # at the end of the payload: any more input is too much
                if _fill(read_into, memoryview(bytearray(1))):
                    raise VolumeRequestError(
                        f"the input runs past the end of the payload ({payload} bytes); "
                        f"{written} bytes from offset {offset} were written"
                    )
                return None
            view = memoryview(buf)
            if head and carried is not None and carried[0] == start:
                view[:sector] = carried[1]
            elif head:
                self._decrypt_at(start, view[:sector])
            got = _fill(read_into, view[head:capacity])
            if got == 0:
                return None
            stop = pos + got
            tail = _align_down(stop, sector)
            if stop != tail and not (head and tail == start):
                old = bytearray(sector)
                self._decrypt_at(tail, memoryview(old))
                view[stop - start : tail - start + sector] = old[stop - tail :]
            pos, written = stop, written + got
            end = _align_up(stop, sector)
            carried = (end - sector, bytes(view[end - sector - start : end - start])) if stop != end else None
            return start, end

        def job(span: Span, buf: bytearray) -> None:
            self._encrypt_to(span[0], memoryview(buf)[: span[1] - span[0]])

        first = _align_down(offset, sector)
        size = CHUNK if length is None else max(sector, min(CHUNK, _align_up(offset + length, sector) - first))
        for _span, _buf in self._pipeline(produce, job, size):
            if progress is not None:
                progress(written)
        return written

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at payload ``offset`` (for small writes)."""
        source = memoryview(data).cast("B")
        at = 0

        def read_into(view: memoryview) -> int:
            nonlocal at
            n = min(view.nbytes, source.nbytes - at)
            view[:n] = source[at : at + n]
            at += n
            return n

        self.write_from(offset, read_into, length=source.nbytes)

    # -- the pipelines -----------------------------------------------------------------------------

    def _in_turn(
        self,
        spans: list[Span],
        job: Callable[[Span, bytearray], None],
        deliver: Callable[[Span, bytearray], None],
        buffer_size: int,
    ) -> None:
        """``job(span, buf)`` for every span, and ``deliver(span, buf)`` after it, in the order of ``spans``.

        Worker ``i`` of ``n`` (the calling thread is worker 0) takes spans ``i``, ``i + n``, ... into a
        buffer of its own, runs the job (native code, the GIL released), waits for its turn, delivers,
        and passes the turn on: no hand-off to another thread between a job and its delivery. The first
        failure stops every worker; it is raised here once they have all stopped.
        """
        workers = min(self._workers, len(spans)) if buffer_size >= CHUNK else 1
        if workers == 1:
            buf = bytearray(buffer_size)
            for span in spans:
                job(span, buf)
                deliver(span, buf)
            return
        turn = threading.Condition()
        state: dict[str, Any] = {"next": 0, "error": None}

        def work(first: int) -> None:
            buf = bytearray(buffer_size)
            try:
                for k in range(first, len(spans), workers):
                    job(spans[k], buf)
                    with turn:
                        while state["next"] != k and state["error"] is None:
                            turn.wait()
                        if state["error"] is not None:
                            return
                    deliver(spans[k], buf)
                    with turn:
                        state["next"] = k + 1
                        turn.notify_all()
            except BaseException as exc:  # noqa: BLE001 - raised again in the calling thread, below
                with turn:
                    if state["error"] is None:
                        state["error"] = exc
                    turn.notify_all()

        threads = [threading.Thread(target=work, args=(i,), name=f"ks-volume-{i}") for i in range(1, workers)]
        for thread in threads:
            thread.start()
        try:
            work(0)
        finally:
            for thread in threads:
                thread.join()
        if state["error"] is not None:
            raise state["error"]

    def _pipeline(
        self, produce: Callable[[bytearray], Span | None], job: Callable[[Span, bytearray], None], buffer_size: int
    ) -> Iterator[tuple[Span, bytearray]]:
        """Yield ``(span, buffer)`` in order, after ``job(span, buffer)`` ran on a worker thread.

        ``produce(buffer)`` runs on the calling thread, in order: it returns the next span (filling the
        free ``buffer`` if it needs to) or None at the end. A yielded buffer is reused once the caller
        asks for the next item. With one worker, or a request of one chunk, no thread is started.
        """
        workers = self._workers if buffer_size >= CHUNK else 1
        free = [bytearray(buffer_size) for _ in range(workers + 1 if workers > 1 else 1)]
        if workers == 1:
            buf = free[0]
            while (span := produce(buf)) is not None:
                job(span, buf)
                yield span, buf
            return
        from concurrent.futures import ThreadPoolExecutor  # only for large requests: it costs start-up time

        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ks-volume")
        pending: deque[tuple[Span, bytearray, Future[None]]] = deque()
        exhausted = False
        try:
            while True:
                while free and not exhausted:
                    buf = free.pop()
                    span = produce(buf)
                    if span is None:
                        free.append(buf)
                        exhausted = True
                    else:
                        pending.append((span, buf, pool.submit(job, span, buf)))
                if not pending:
                    return
                span, buf, future = pending.popleft()
                future.result()
                yield span, buf
                free.append(buf)
        finally:
            # no cancelling: a window handed to a worker is part of what was reported written (an input
            # that runs past the payload fails only after the windows before it are on the disk)
            pool.shutdown(wait=True)
