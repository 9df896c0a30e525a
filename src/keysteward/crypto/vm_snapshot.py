"""Encrypted VM state files: a fresh snapshot key, wrapped under the VM key, encrypting QEMU's migration stream.

A file is a :mod:`keysteward.formats.vm_state` header, then a Tink AES-GCM-HKDF stream
(:mod:`keysteward.crypto.streaming_aead`) under the snapshot key with the header's bytes as associated
data. Reading checks, before any plaintext leaves: the header parses, it names the expected tenant, VM
(and snapshot when given), and the snapshot key unwraps under the VM key with the header's fields as
associated data (so a header edited to name another VM does not unwrap). :func:`decrypt_snapshot` also
authenticates the whole stream before writing its first byte (``verify_first``, on by default, needs a
seekable source): a truncated, reordered or tampered snapshot never reaches QEMU.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, replace
from typing import BinaryIO

from keysteward.crypto import aead, streaming_aead
from keysteward.crypto.secret import wipe_bytearray
from keysteward.errors import InvalidCiphertext
from keysteward.formats import vm_state
from keysteward.formats.vm_state import SnapshotFormatError, SnapshotHeader

Buffer = bytes | bytearray | memoryview


class SnapshotAuthFailed(InvalidCiphertext):
    """The snapshot's key or stream does not authenticate under this VM key (wrong key, tampered, truncated)."""

    code = "snapshot_auth_failed"
    title = "Snapshot authentication failed"


class SnapshotMismatch(InvalidCiphertext):
    """The snapshot belongs to another tenant, VM or snapshot id than the caller asked for."""

    code = "snapshot_wrong_vm"
    title = "Snapshot of another VM"


@dataclass(frozen=True)
class SnapshotInfo:
    header: SnapshotHeader
    header_bytes: int
    plaintext_bytes: int
    file_bytes: int  # header + stream


def seal_snapshot(
    vm_key: Buffer,
    *,
    tenant: str,
    vm_id: str,
    snapshot_id: str,
    src: BinaryIO,
    dst: streaming_aead.Sink,
    segment_size: int = streaming_aead.SEGMENT_SIZE,
    created_at: int | None = None,
) -> SnapshotInfo:
    """Encrypt ``src`` (QEMU's migration stream) to end of stream into ``dst`` under a fresh snapshot key."""
    snapshot_key = aead.random_key(streaming_aead.KEY_SIZE)
    try:
        unwrapped = SnapshotHeader(
            tenant=tenant,
            vm_id=vm_id,
            snapshot_id=snapshot_id,
            created_at=int(time.time()) if created_at is None else created_at,
            segment_size=segment_size,
            wrapped_key=bytes(vm_state.WRAPPED_KEY_SIZE),
        )
        header = replace(unwrapped, wrapped_key=aead.seal(vm_key, snapshot_key, unwrapped.wrap_aad()))
        encoded = header.encode()
        streaming_aead.write_all(dst, memoryview(encoded))
        plain = streaming_aead.encrypt_stream(snapshot_key, encoded, src, dst, segment_size=segment_size)
    finally:
        wipe_bytearray(snapshot_key)
    return SnapshotInfo(
        header=header,
        header_bytes=len(encoded),
        plaintext_bytes=plain,
        file_bytes=len(encoded) + stream_size(plain, segment_size),
    )


def stream_size(plaintext_bytes: int, segment_size: int) -> int:
    """Bytes of the stream (header and segments) that holds ``plaintext_bytes``."""
    header, tag = streaming_aead.HEADER_SIZE, streaming_aead.TAG_SIZE
    first = segment_size - tag - header
    if plaintext_bytes <= first:
        return header + plaintext_bytes + tag
    rest = plaintext_bytes - first
    per = segment_size - tag
    return segment_size + rest + tag * -(-rest // per)


def read_snapshot_header(src: BinaryIO) -> SnapshotHeader:
    """Read and strictly decode the header at ``src``'s position, leaving ``src`` at the stream's start."""
    preamble = bytearray(vm_state.PREAMBLE_SIZE)
    got = streaming_aead.read_full(src, memoryview(preamble))
    length = vm_state.header_length(bytes(preamble[:got]))
    rest = bytearray(length - vm_state.PREAMBLE_SIZE)
    if streaming_aead.read_full(src, memoryview(rest)) < len(rest):
        raise SnapshotFormatError("snapshot header is truncated")
    return vm_state.decode(bytes(preamble + rest))


def _open_header(
    vm_key: Buffer, src: BinaryIO, tenant: str, vm_id: str, snapshot_id: str | None
) -> tuple[SnapshotHeader, bytearray]:
    header = read_snapshot_header(src)
    if header.tenant != tenant:
        raise SnapshotMismatch("the snapshot belongs to another tenant", code="snapshot_wrong_tenant")
    if header.vm_id != vm_id:
        raise SnapshotMismatch("the snapshot belongs to another VM")
    if snapshot_id is not None and header.snapshot_id != snapshot_id:
        raise SnapshotMismatch("the file holds another snapshot than the one asked for", code="snapshot_wrong_id")
    try:
        key = aead.open_(vm_key, header.wrapped_key, header.wrap_aad())
    except aead.AuthenticationFailed:
        raise SnapshotAuthFailed(
            "the snapshot key does not unwrap under this VM key (wrong VM key or an edited header)"
        ) from None
    return header, key


def _stream(key: bytearray, header: SnapshotHeader, src: BinaryIO, dst: streaming_aead.Sink | None) -> int:
    try:
        if dst is None:
            fd = _file_descriptor(src)
            if fd is not None:  # a file: its segments checked by two threads at once
                start, end = src.tell(), os.fstat(fd).st_size
                return streaming_aead.verify_file(key, header.stream_aad(), fd, start, end,
                                                  segment_size=header.segment_size)  # fmt: skip
            return streaming_aead.verify_stream(key, header.stream_aad(), src, segment_size=header.segment_size)
        return streaming_aead.decrypt_stream(key, header.stream_aad(), src, dst, segment_size=header.segment_size)
    except streaming_aead.StreamAuthFailed as exc:
        raise SnapshotAuthFailed(f"the snapshot's state does not authenticate: {exc.message}") from None


def _file_descriptor(src: BinaryIO) -> int | None:
    """``src``'s descriptor when it is a regular file (not a pipe, not an in-memory file), else None."""
    try:
        fd = src.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None


def verify_snapshot(
    vm_key: Buffer, src: BinaryIO, *, tenant: str, vm_id: str, snapshot_id: str | None = None
) -> SnapshotHeader:
    """Authenticate the whole file (header, key, every segment) and write nothing."""
    header, key = _open_header(vm_key, src, tenant, vm_id, snapshot_id)
    try:
        _stream(key, header, src, None)
    finally:
        wipe_bytearray(key)
    return header


def decrypt_snapshot(
    vm_key: Buffer,
    src: BinaryIO,
    dst: streaming_aead.Sink,
    *,
    tenant: str,
    vm_id: str,
    snapshot_id: str | None = None,
    verify_first: bool = True,
) -> int:
    """Write the snapshot's plaintext (QEMU's migration stream) to ``dst``; returns its size in bytes.

    Header, tenant, VM, snapshot id and key are checked before anything is written. With
    ``verify_first`` (needs a seekable ``src``) the whole stream is authenticated in a first pass, so
    a damaged file writes nothing; without it each segment is written once its own tag checked."""
    if verify_first and not src.seekable():
        raise ValueError("verify_first needs a seekable source (a file); for a pipe pass verify_first=False")
    start = src.tell() if verify_first else 0
    header, key = _open_header(vm_key, src, tenant, vm_id, snapshot_id)
    try:
        if verify_first:
            _stream(key, header, src, None)
            src.seek(start)
            if read_snapshot_header(src) != header:
                raise SnapshotAuthFailed("the snapshot file changed while it was read")
        return _stream(key, header, src, dst)
    finally:
        wipe_bytearray(key)
