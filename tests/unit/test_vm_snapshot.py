"""Encrypted VM state files (keysteward.formats.vm_state + keysteward.crypto.vm_snapshot): strict header
codec, and seal/verify/decrypt refusing every damaged, foreign or wrong-key snapshot before any plaintext."""

from __future__ import annotations

import io
import os
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keysteward.crypto import vm_snapshot as vs
from keysteward.crypto.streaming_aead import HEADER_SIZE as STREAM_HEADER
from keysteward.crypto.streaming_aead import TAG_SIZE
from keysteward.errors import InvalidCiphertext
from keysteward.formats import vm_state
from keysteward.formats.vm_state import SnapshotFormatError, SnapshotHeader

pytestmark = pytest.mark.unit

BOUNDED = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VM_KEY = bytes(range(32))
SEG = 4096
STATE = os.urandom(5 * SEG + 123)  # QEMU's migration stream stand-in: several segments


def seal(
    data: bytes = STATE, *, key: bytes = VM_KEY, tenant: str = "t1", vm: str = "vm1", snap: str = "s1"
) -> tuple[bytes, vs.SnapshotInfo]:
    out = io.BytesIO()
    info = vs.seal_snapshot(
        key, tenant=tenant, vm_id=vm, snapshot_id=snap, src=io.BytesIO(data), dst=out, segment_size=SEG
    )
    return out.getvalue(), info


FILE, INFO = seal()
HLEN = INFO.header_bytes


def open_file(
    blob: bytes, *, key: bytes = VM_KEY, tenant: str = "t1", vm: str = "vm1", snap: str | None = None
) -> bytes:
    out = io.BytesIO()
    n = vs.decrypt_snapshot(key, io.BytesIO(blob), out, tenant=tenant, vm_id=vm, snapshot_id=snap)
    assert n == len(out.getvalue())
    return out.getvalue()


def refused(blob: bytes, code: str, **kw: str | bytes) -> None:
    """Refused with ``code`` by verify and by decrypt, and decrypt wrote nothing."""
    args = {"key": VM_KEY, "tenant": "t1", "vm": "vm1", "snap": None, **kw}
    out = io.BytesIO()
    with pytest.raises(InvalidCiphertext) as info:
        vs.decrypt_snapshot(
            args["key"], io.BytesIO(blob), out, tenant=args["tenant"], vm_id=args["vm"], snapshot_id=args["snap"]
        )
    assert info.value.code == code, info.value.message
    assert out.getvalue() == b""
    with pytest.raises(InvalidCiphertext) as info:
        vs.verify_snapshot(
            args["key"], io.BytesIO(blob), tenant=args["tenant"], vm_id=args["vm"], snapshot_id=args["snap"]
        )
    assert info.value.code == code


def test_round_trip_and_sizes() -> None:
    assert open_file(FILE, snap="s1") == STATE
    assert INFO.plaintext_bytes == len(STATE) and INFO.file_bytes == len(FILE)
    header = vs.verify_snapshot(VM_KEY, io.BytesIO(FILE), tenant="t1", vm_id="vm1", snapshot_id="s1")
    assert header == INFO.header == vs.read_snapshot_header(io.BytesIO(FILE))
    assert (header.tenant, header.vm_id, header.snapshot_id, header.segment_size) == ("t1", "vm1", "s1", SEG)
    assert FILE.startswith(vm_state.MAGIC)


@pytest.mark.parametrize("size", [0, 1, SEG - STREAM_HEADER - TAG_SIZE, SEG - STREAM_HEADER - TAG_SIZE + 1, 3 * SEG])
def test_round_trip_sizes(size: int) -> None:
    data = os.urandom(size)
    blob, info = seal(data)
    assert info.file_bytes == len(blob) and open_file(blob) == data


def test_no_plaintext_and_no_key_in_the_file() -> None:
    marker = b"KEYSTEWARD-RAM-MARKER-" * 200
    blob, _ = seal(marker + STATE)
    assert b"KEYSTEWARD-RAM-MARKER" not in blob and VM_KEY not in blob


def test_without_verify_first_on_a_pipe() -> None:
    out = io.BytesIO()
    src = io.BufferedReader(io.BytesIO(FILE))  # type: ignore[arg-type]
    assert vs.decrypt_snapshot(VM_KEY, src, out, tenant="t1", vm_id="vm1", verify_first=False) == len(STATE)
    assert out.getvalue() == STATE


def test_seal_from_a_real_pipe_with_short_writes() -> None:
    read_end, write_end = os.pipe()

    def feed() -> None:
        with os.fdopen(write_end, "wb", buffering=0) as w:
            for i in range(0, len(STATE), 1000):
                w.write(STATE[i : i + 1000])

    writer = threading.Thread(target=feed)
    writer.start()
    out = io.BytesIO()
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        info = vs.seal_snapshot(VM_KEY, tenant="t1", vm_id="vm1", snapshot_id="p1", src=pipe, dst=out, segment_size=SEG)
    writer.join()
    assert info.plaintext_bytes == len(STATE) and open_file(out.getvalue(), snap="p1") == STATE


def test_verify_first_needs_a_seekable_source() -> None:
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb") as pipe, os.fdopen(write_end, "wb"):
        with pytest.raises(ValueError, match="seekable"):
            vs.decrypt_snapshot(VM_KEY, pipe, io.BytesIO(), tenant="t1", vm_id="vm1")


def test_other_vm_tenant_or_snapshot_is_refused() -> None:
    refused(FILE, "snapshot_wrong_vm", vm="vm2")
    refused(FILE, "snapshot_wrong_tenant", tenant="t2")
    refused(FILE, "snapshot_wrong_id", snap="s2")


def test_wrong_vm_key_is_refused() -> None:
    refused(FILE, "snapshot_auth_failed", key=bytes(32))


def test_other_vms_header_swapped_in_is_refused() -> None:
    other, _ = seal(vm="vm2")
    other_header = other[: len(vs.read_snapshot_header(io.BytesIO(other)).encode())]
    refused(other_header + FILE[HLEN:], "snapshot_wrong_vm")  # names vm2: refused as such
    # the same other header, asked for as vm2 with vm2's key (one key for both here): the stream is bound
    refused(other_header + FILE[HLEN:], "snapshot_auth_failed", vm="vm2")


def test_header_edited_to_name_the_expected_vm_is_refused() -> None:
    other, info = seal(vm="vm2")
    forged = SnapshotHeader("t1", "vm1", info.header.snapshot_id, info.header.created_at, SEG, info.header.wrapped_key)
    refused(forged.encode() + other[info.header_bytes :], "snapshot_auth_failed")


def test_other_tenants_snapshot_relabelled_is_refused() -> None:
    other, info = seal(tenant="t2")
    forged = SnapshotHeader("t1", "vm1", "s1", info.header.created_at, SEG, info.header.wrapped_key)
    refused(forged.encode() + other[info.header_bytes :], "snapshot_auth_failed")


def test_reordered_and_truncated_streams_are_refused() -> None:
    body = FILE[HLEN + STREAM_HEADER :]
    first = SEG - STREAM_HEADER
    segs = [body[:first]] + [body[i : i + SEG] for i in range(first, len(body), SEG)]
    head = FILE[: HLEN + STREAM_HEADER]
    refused(head + b"".join([segs[0], segs[2], segs[1], *segs[3:]]), "snapshot_auth_failed")
    for count in range(1, len(segs)):
        refused(head + b"".join(segs[:count]), "snapshot_auth_failed")  # cut at a segment boundary
    refused(FILE[:-1], "snapshot_auth_failed")
    refused(FILE + b"\x00", "snapshot_auth_failed")
    refused(FILE[: HLEN + 5], "snapshot_auth_failed")


@BOUNDED
@given(position=st.integers(0, len(FILE) - 1), bit=st.integers(0, 7))
def test_any_flipped_bit_is_refused_before_output(position: int, bit: int) -> None:
    damaged = bytearray(FILE)
    damaged[position] ^= 1 << bit
    out = io.BytesIO()
    with pytest.raises(InvalidCiphertext):
        vs.decrypt_snapshot(VM_KEY, io.BytesIO(bytes(damaged)), out, tenant="t1", vm_id="vm1", snapshot_id="s1")
    assert out.getvalue() == b""


# -- the header codec ---------------------------------------------------------------------


HEADER = INFO.header
RAW = HEADER.encode()


def test_codec_round_trip_and_canonical_bytes() -> None:
    assert vm_state.decode(RAW) == HEADER
    assert HEADER.stream_aad() == RAW
    assert HEADER.wrap_aad() != RAW and HEADER.wrapped_key not in HEADER.wrap_aad()


@pytest.mark.parametrize(
    ("blob", "code", "text"),
    [
        (b"", "snapshot_malformed", "truncated"),
        (RAW[:5], "snapshot_malformed", "truncated"),
        (b"QEMU\x00\x00\x00\x03" + RAW[8:], "snapshot_not_recognised", "magic"),
        (RAW[:10] + b"\x02" + RAW[11:], "snapshot_unsupported_version", "version 2"),
        (RAW[:11] + struct.pack(">H", 5000) + RAW[13:], "snapshot_malformed", "out of range"),
        (RAW[:11] + struct.pack(">H", 13) + RAW[13:], "snapshot_malformed", "out of range"),
        (RAW[:-1], "snapshot_malformed", "truncated"),
        (RAW + b"\x00", "snapshot_malformed", "after the snapshot header"),
        (RAW[:11] + struct.pack(">H", len(RAW) + 1) + RAW[13:] + b"\x00", "snapshot_malformed", "trailing"),
        (RAW[:11] + struct.pack(">H", len(RAW) - 1) + RAW[13:-1], "snapshot_malformed", "truncated in wrapped key"),
        (RAW[:13] + b"\x00" + RAW[14:], "snapshot_malformed", "tenant length 0"),
        (RAW[:13] + b"\xc8" + RAW[14:], "snapshot_malformed", "tenant length 200"),
        (RAW[:14] + b"/" + RAW[15:], "snapshot_bad_field", "tenant must be"),
    ],
)
def test_codec_bad_input(blob: bytes, code: str, text: str) -> None:
    with pytest.raises(SnapshotFormatError) as info:
        vm_state.decode(blob)
    assert info.value.code == code and text in info.value.message


def test_header_field_bounds() -> None:
    good = {
        "tenant": "t",
        "vm_id": "v",
        "snapshot_id": "s",
        "created_at": 1,
        "segment_size": SEG,
        "wrapped_key": bytes(60),
    }
    SnapshotHeader(**good)  # type: ignore[arg-type]
    for field, bad in [
        ("tenant", ""),
        ("tenant", "x" * 129),
        ("vm_id", "vm 1"),
        ("snapshot_id", "é"),
        ("created_at", -1),
        ("segment_size", 100),
        ("segment_size", 1 << 30),
        ("wrapped_key", bytes(59)),
    ]:
        with pytest.raises(SnapshotFormatError):
            SnapshotHeader(**{**good, field: bad})  # type: ignore[arg-type]


@BOUNDED
@given(st.binary(max_size=400))
def test_codec_fuzz_random_bytes(blob: bytes) -> None:
    try:
        header = vm_state.decode(blob)
    except SnapshotFormatError:
        return
    assert header.encode() == blob


@BOUNDED
@given(position=st.integers(0, len(RAW) - 1), value=st.integers(0, 255), cut=st.integers(0, 3))
def test_codec_fuzz_mutated_headers(position: int, value: int, cut: int) -> None:
    blob = bytearray(RAW)
    blob[position] = value
    blob = blob[: len(blob) - cut]
    try:
        header = vm_state.decode(bytes(blob))
    except SnapshotFormatError:
        return
    assert header.encode() == bytes(blob)


@BOUNDED
@given(st.binary(max_size=300))
def test_snapshot_file_fuzz(blob: bytes) -> None:
    out = io.BytesIO()
    with pytest.raises(InvalidCiphertext) as info:
        vs.decrypt_snapshot(VM_KEY, io.BytesIO(vm_state.MAGIC + b"\x01" + blob), out, tenant="t1", vm_id="vm1")
    assert info.value.code.startswith("snapshot_") and out.getvalue() == b""
