"""An unlocked LUKS2 or LUKS1 volume: open it with a passphrase, read and write its payload.

Opening reads the header (:mod:`keysteward.volume.header_io`), tries the keyslots with the
passphrase (the codec's ``unlock`` / ``unlock_luks1``, Argon2 memory capped to what the machine
affords), and moves the volume key into a locked, non-dumpable
:class:`~keysteward.crypto.secret.SecretBuffer`; :meth:`LuksVolume.close` wipes it and the ciphers'
key schedules. Payload offsets and lengths are bytes of the decrypted payload.
"""

from __future__ import annotations

import contextlib
from types import TracebackType

from keysteward.crypto.secret import SecretBuffer, wipe_bytearray
from keysteward.crypto.xts import XtsCipher
from keysteward.formats import luks
from keysteward.volume.cipher_pool import NativeTarget
from keysteward.volume.datapath import Progress, ReadInto, SectorIO, Sink
from keysteward.volume.device import Device
from keysteward.volume.header_io import Geometry, VolumeHeader, read_header
from keysteward.volume.sizes import argon2_limit_kib

Passphrase = bytes | bytearray
AREA_SECTOR = 512


def device_reader(device: Device) -> luks.Reader:
    """``read(offset, length)`` for the codec's unlock, refusing spans beyond the end of the device."""

    def read(offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > device.size:
            raise luks.LuksFormatError(
                f"keyslot material [{offset}, {offset + length}) lies beyond the end of the device "
                f"({device.size} bytes)"
            )
        return device.pread(offset, length)

    return read


def area_cipher(encryption: str, key: bytes | bytearray, data: bytes, decrypt: bool) -> bytes:
    """The codec's keyslot-area cipher (``aes-xts-plain64``, 512-byte sectors, IV 0 at the area start) on
    keysteward's native XTS: one call for the whole area instead of one pyca ``Cipher`` per sector."""
    luks.check_area_encryption(encryption, len(key))
    if len(data) % AREA_SECTOR:
        raise luks.LuksFormatError(f"keyslot area of {len(data)} bytes is not a whole number of sectors")
    try:
        cipher = XtsCipher(key, AREA_SECTOR)
    except ValueError as exc:  # e.g. an XTS key whose two halves are equal
        raise luks.LuksFormatError(f"keyslot area cipher refused the key: {exc}") from exc
    with cipher:
        out = bytearray(len(data))
        (cipher.decrypt if decrypt else cipher.encrypt)(data, 0, out=out)
        return out  # type: ignore[return-value]  # a bytearray, so that the codec's copy is not the only one it could wipe


def unlock_header(
    device: Device,
    header: VolumeHeader,
    passphrase: Passphrase,
    *,
    max_memory_kib: int | None = None,
    keyslot: int | None = None,
    exclude: int | None = None,
) -> luks.Unlocked:
    """The volume key from the first keyslot that ``passphrase`` opens (the caller wipes it).

    ``exclude`` skips one keyslot (to prove a passphrase opens another one than the slot being
    removed). Raises :class:`~keysteward.formats.luks.LuksWrongPassphrase`, or ``luks_argon2_memory``
    if only keyslots needing more Argon2 memory than allowed could have opened.
    """
    limit = argon2_limit_kib(max_memory_kib)
    read = device_reader(device)
    if exclude is None:
        if header.luks1 is not None:
            return luks.unlock_luks1(header.luks1, read, passphrase, keyslot=keyslot, cipher=area_cipher)
        return luks.unlock(
            header.v2.metadata, read, passphrase, keyslot=keyslot, max_memory_kib=limit, cipher=area_cipher
        )
    memory_error: luks.LuksFormatError | None = None
    for slot in header.keyslot_ids():
        if slot == exclude:
            continue
        try:
            return unlock_header(device, header, passphrase, max_memory_kib=max_memory_kib, keyslot=slot)
        except luks.LuksWrongPassphrase:
            continue
        except luks.LuksFormatError as exc:
            if exc.code != "luks_argon2_memory":
                raise
            memory_error = exc
    if memory_error is not None:
        raise memory_error
    raise luks.LuksWrongPassphrase(f"no keyslot other than {exclude} opens with this passphrase")


def check_passphrase(path: str, passphrase: Passphrase, *, max_memory_kib: int | None = None) -> int:
    """The keyslot that ``passphrase`` opens (the key is wiped at once); raises like :meth:`LuksVolume.open`.

    Unlike opening, this works on volumes whose data path keysteward cannot serve (another cipher).
    """
    with Device.open(path) as device:
        unlocked = unlock_header(device, read_header(device), passphrase, max_memory_kib=max_memory_kib)
        wipe_bytearray(unlocked.volume_key)
    return unlocked.keyslot


class LuksVolume:
    """An open, unlocked volume. Use :meth:`open`; close it (or use ``with``) to wipe the key."""

    def __init__(self, device: Device, header: VolumeHeader, keyslot: int, key: SecretBuffer) -> None:
        self.device = device
        self.header = header
        self.keyslot = keyslot
        """The keyslot that the passphrase opened."""
        self._key: SecretBuffer | None = key
        self._io: SectorIO | None = None
        try:
            self._io = SectorIO(device, header.geometry(), key)
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(
        cls,
        path: str,
        passphrase: Passphrase,
        *,
        writable: bool = False,
        max_memory_kib: int | None = None,
        keyslot: int | None = None,
        shared: bool = False,
    ) -> LuksVolume:
        """Open ``path`` and unlock it with ``passphrase`` (bytes, as read from a key file).

        ``writable`` locks the device exclusively for this process, unless ``shared`` (a migration's
        destination opens a disk its source still serves). ``max_memory_kib`` overrides the
        Argon2 memory limit (default: half the available memory, at most 4 GiB).
        """
        device = Device.open(path, writable=writable, shared=shared)
        try:
            header = read_header(device)
            header.geometry()  # refuse what the data path cannot serve before running any KDF
            unlocked = unlock_header(device, header, passphrase, max_memory_kib=max_memory_kib, keyslot=keyslot)
            key = SecretBuffer.from_bytes(unlocked.volume_key)  # wipes the bytearray
            return cls(device, header, unlocked.keyslot, key)
        except BaseException:
            device.close()
            raise

    # -- properties --------------------------------------------------------------------------------

    @property
    def geometry(self) -> Geometry:
        return self._sectors.geometry

    @property
    def payload_size(self) -> int:
        return self._sectors.payload_size

    @property
    def key(self) -> SecretBuffer:
        """The volume key, in its locked buffer (for keyslot changes); wiped by :meth:`close`."""
        if self._key is None:
            raise ValueError("the volume is closed")
        return self._key

    @property
    def _sectors(self) -> SectorIO:
        if self._io is None:
            raise ValueError("the volume is closed")
        return self._io

    def export_volume_key(self) -> bytes:
        """A copy of the volume key, for tests that compare it with ``cryptsetup luksDump
        --dump-volume-key`` and for a hand-off to dm-crypt. The CLI never calls this."""
        return self.key.bytes()

    # -- payload I/O -------------------------------------------------------------------------------

    def check_range(self, offset: int, length: int) -> None:
        self._sectors.check_range(offset, length)

    def read(self, offset: int, length: int) -> bytes:
        return self._sectors.read(offset, length)

    def read_to(self, offset: int, length: int, sink: Sink, progress: Progress | None = None) -> None:
        self._sectors.read_to(offset, length, sink, progress)

    def aligned(self, offset: int, length: int) -> bool:
        return self._sectors.aligned(offset, length)

    def read_into(self, offset: int, view: memoryview, *, cached_only: bool = False) -> bool:
        """Whole sectors (:meth:`aligned`) decrypted into ``view``, with no buffer in between; with
        ``cached_only``, False (and nothing read) unless the page cache holds them all."""
        return self._sectors.read_into(offset, view, cached_only=cached_only)

    def write_in_place(self, offset: int, view: memoryview) -> None:
        """Whole sectors (:meth:`aligned`) encrypted in ``view`` itself (ciphertext afterwards), then written."""
        self._require_writable()
        self._sectors.write_in_place(offset, view)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._require_writable()
        self._sectors.write(offset, data)

    def write_from(
        self, offset: int, read_into: ReadInto, *, length: int | None = None, progress: Progress | None = None
    ) -> int:
        self._require_writable()
        return self._sectors.write_from(offset, read_into, length=length, progress=progress)

    def lend_native(self) -> contextlib.AbstractContextManager[NativeTarget | None]:
        """See :meth:`keysteward.volume.datapath.SectorIO.lend_native`."""
        return self._sectors.lend_native()

    def flush(self) -> None:
        """fsync the device: what was written survives a power cut."""
        self.device.fsync()

    def _require_writable(self) -> None:
        if not self.device.writable:
            raise ValueError("the volume was opened read-only")

    # -- closing -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Wipe the key and the ciphers, close the device; closing twice is harmless."""
        io, self._io = self._io, None
        key, self._key = self._key, None
        try:
            if io is not None:
                io.close()
        finally:
            if key is not None:
                key.wipe()
            self.device.close()

    def __enter__(self) -> LuksVolume:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._io is None else f"keyslot {self.keyslot}"
        return f"<LuksVolume {self.device.path!r} LUKS{self.header.version} {state}>"
