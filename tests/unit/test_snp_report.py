"""The SEV-SNP report codec, the extended report's certificate table, and the /dev/sev-guest structures.

The known answer is AMD Milan's real report, read a second time here with the ABI offsets written out.
"""

from __future__ import annotations

import ctypes
import struct
import uuid
from pathlib import Path

import pytest

from keysteward.agent import snp as agent
from keysteward.agent.evidence import EvidenceUnavailable
from keysteward.errors import KeystewardError
from keysteward.formats.snp import (
    REPORT_SIZE,
    SnpFormatError,
    TcbVersion,
    parse_cert_table,
    parse_report,
    with_signature,
)
from tests.support.snp_chain import BASE_POLICY, MILAN_DIR, POLICY_DEBUG, signed_part, tcb_u64

pytestmark = pytest.mark.unit

VECTOR = MILAN_DIR / "report_milan.hex"


@pytest.fixture(scope="module")
def milan() -> bytes:
    return bytes.fromhex(VECTOR.read_text().strip())


def test_milan_report_fields_match_an_independent_reading(milan: bytes) -> None:
    report = parse_report(milan)
    # Offsets from the SEV-SNP ABI specification, table 22, read straight from the bytes.
    assert report.version == struct.unpack_from("<I", milan, 0x000)[0] == 2
    assert report.guest_svn == struct.unpack_from("<I", milan, 0x004)[0] == 0
    assert report.policy == struct.unpack_from("<Q", milan, 0x008)[0] == 0x30000
    assert report.vmpl == struct.unpack_from("<I", milan, 0x030)[0] == 0
    assert report.signature_algo == struct.unpack_from("<I", milan, 0x034)[0] == 1
    assert report.platform_info == 1
    assert report.report_data == milan[0x50:0x90]
    assert report.report_data.hex().startswith("d447b55d197491bf")
    assert report.measurement.hex() == (
        "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f"
    )
    assert report.measurement == milan[0x90:0xC0]
    assert report.host_data == milan[0xC0:0xE0] == bytes(32)
    assert report.report_id == milan[0x140:0x160]
    assert report.report_id_ma == b"\xff" * 32
    assert report.chip_id == milan[0x1A0:0x1E0]
    assert report.chip_id.hex().startswith("d49554ec717f4e5b")
    # TCB 0x7308000000000003: bootloader 3 (byte 0), tee 0 (byte 1), snp 8 (byte 6), microcode 0x73 (byte 7).
    for tcb in (report.current_tcb, report.reported_tcb, report.committed_tcb, report.launch_tcb):
        assert (tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode) == (3, 0, 8, 0x73)
    assert report.reported_tcb.raw == struct.unpack_from("<Q", milan, 0x180)[0] == 0x7308000000000003
    assert (report.current.major, report.current.minor, report.current.build) == (1, 52, 4)
    assert report.committed == report.current
    assert report.signing_key == 0 and not report.author_key_en and not report.mask_chip_key
    assert report.cpuid_family is None  # version 2 has no CPUID fields
    assert report.signature_r == int.from_bytes(milan[0x2A0:0x2E8], "little")
    assert report.signature_s == int.from_bytes(milan[0x2E8:0x330], "little")
    assert report.signed_bytes == milan[:0x2A0]
    assert not report.debug_allowed and report.smt_allowed and not report.single_socket


def test_debug_bit_is_exposed_not_judged() -> None:
    report = parse_report(with_signature(signed_part(policy=BASE_POLICY | POLICY_DEBUG), 1, 1))
    assert report.debug_allowed
    assert not parse_report(with_signature(signed_part(), 1, 1)).debug_allowed


def test_version_3_carries_cpuid_and_flags() -> None:
    signed = signed_part(version=3, cpuid=(0x19, 0x11, 0x01), signing_key=1, vmpl=2)
    report = parse_report(with_signature(signed, 7, 9))
    assert (report.cpuid_family, report.cpuid_model, report.cpuid_stepping) == (0x19, 0x11, 0x01)
    assert report.signing_key == 1 and report.vmpl == 2 and not report.mask_chip_key
    assert parse_report(with_signature(signed_part(mask_chip_key=True), 1, 1)).mask_chip_key
    assert (report.signature_r, report.signature_s) == (7, 9)


@pytest.mark.parametrize("size", [0, 1, 0x2A0, REPORT_SIZE - 1, REPORT_SIZE + 1, 4000])
def test_wrong_sizes_are_rejected(milan: bytes, size: int) -> None:
    data = (milan * 4)[:size]
    with pytest.raises(SnpFormatError) as caught:
        parse_report(data)
    assert caught.value.code == "snp_report_invalid"
    assert isinstance(caught.value, KeystewardError)


@pytest.mark.parametrize("version", [0, 1, 4, 5, 0xFFFFFFFF])
def test_unknown_versions_are_rejected(milan: bytes, version: int) -> None:
    data = struct.pack("<I", version) + milan[4:]
    with pytest.raises(SnpFormatError, match=f"version {version} "):
        parse_report(data)


def test_tcb_version_layout() -> None:
    tcb = TcbVersion.from_u64(tcb_u64({"bootloader": 0xAB, "tee": 0xCD, "snp": 0xEF, "microcode": 0x12}))
    assert tcb.as_dict() == {"bootloader": 0xAB, "tee": 0xCD, "snp": 0xEF, "microcode": 0x12}


def test_with_signature_round_trips_and_bounds() -> None:
    signed = signed_part()
    report = parse_report(with_signature(signed, (1 << 575) + 5, 3))
    assert report.signature_r == (1 << 575) + 5 and report.signed_bytes == signed
    with pytest.raises(ValueError):
        with_signature(signed, 1 << 576, 1)
    with pytest.raises(ValueError):
        with_signature(signed[:-1], 1, 1)


# --- the extended report's certificate table ---------------------------------------------------------

VCEK_GUID = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
ASK_GUID = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")


def table(entries: list[tuple[bytes, int, int]], blobs: bytes, *, terminate: bool = True) -> bytes:
    head = b"".join(struct.pack("<16sII", g, o, n) for g, o, n in entries) + (bytes(24) if terminate else b"")
    return head + blobs


def test_cert_table_finds_certificates_by_guid() -> None:
    start = 24 * 4
    data = table(
        [(VCEK_GUID.bytes, start, 3), (b"\x99" * 16, start + 3, 2), (ASK_GUID.bytes_le, start + 5, 4)],
        b"VCKxxASK!",
    )
    assert parse_cert_table(data + bytes(100)) == {"vcek": b"VCK", "ask": b"ASK!"}
    assert parse_cert_table(bytes(4096)) == {}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes(23),
        table([(VCEK_GUID.bytes, 48, 3)], b"abc", terminate=False),
        table([(VCEK_GUID.bytes, 48, 300)], b"abc"),
        table([(VCEK_GUID.bytes, 1 << 31, 3)], b"abc"),
        table([(VCEK_GUID.bytes, 48, 0)], b"abc"),
        table([(VCEK_GUID.bytes, 72, 3), (VCEK_GUID.bytes, 72, 3)], b"abc"),
        table([(b"\x01" * 16, 0, 1)] * 17, b""),
        bytes(70 * 1024),
    ],
    ids=["empty", "short", "no-terminator", "past-end", "huge-offset", "zero-length", "twice", "too-many", "huge"],
)
def test_bad_cert_tables_are_rejected(data: bytes) -> None:
    with pytest.raises(SnpFormatError):
        parse_cert_table(data)


# --- /dev/sev-guest structures (include/uapi/linux/sev-guest.h) ------------------------------------


def test_uapi_sizes_and_ioctl_numbers() -> None:
    assert agent.REPORT_REQ.size == 96  # user_data[64], vmpl, rsvd[28]
    assert agent.EXT_REPORT_REQ.size == 112  # + u64 certs_address, u32 certs_len, padded to 8
    assert agent.GUEST_REQUEST.size == 32  # u8 msg_version (padded), u64 req, u64 resp, u64 exitinfo2
    # _IOWR('S', nr, struct snp_guest_request_ioctl)
    assert agent.SNP_GET_REPORT == 0xC0205300
    assert agent.SNP_GET_EXT_REPORT == 0xC0205302


def test_uapi_packing_puts_fields_at_their_offsets() -> None:
    data = bytes(range(64))
    req = agent.pack_report_request(data, 2)
    assert req[:64] == data and req[64:68] == b"\x02\x00\x00\x00" and req[68:] == bytes(28)
    ext = agent.pack_ext_report_request(data, 1, 0x1122334455667788, 0x4000)
    assert ext[:64] == data and ext[64:68] == b"\x01\x00\x00\x00"
    assert ext[96:104] == (0x1122334455667788).to_bytes(8, "little") and ext[104:108] == b"\x00\x40\x00\x00"
    guest = agent.pack_guest_request(0xAAAA, 0xBBBB)
    assert guest[0] == 1 and guest[1:8] == bytes(7)
    assert guest[8:16] == (0xAAAA).to_bytes(8, "little") and guest[16:24] == (0xBBBB).to_bytes(8, "little")
    guest[24:32] = struct.pack("<II", 0x16, 1)  # what the kernel writes back: fw_error, vmm_error
    assert agent.guest_request_errors(guest) == (0x16, 1)
    with pytest.raises(ValueError):
        agent.pack_report_request(data[:63])
    with pytest.raises(ValueError):
        agent.pack_report_request(data, 4)
    with pytest.raises(ValueError):
        agent.pack_ext_report_request(data, 0, 0, 100)  # not whole pages


def test_report_response_unpacking() -> None:
    report = with_signature(signed_part(), 1, 2)
    good = struct.pack("<II", 0, REPORT_SIZE) + bytes(24) + report
    good += bytes(agent.REPORT_RESP_SIZE - len(good))
    assert agent.unpack_report_response(good) == report
    for response in (
        struct.pack("<II", 0x16, REPORT_SIZE) + bytes(24) + report,  # firmware: invalid parameters
        struct.pack("<II", 0, 1000) + bytes(24) + report,
        good[:500],
    ):
        with pytest.raises(EvidenceUnavailable):
            agent.unpack_report_response(response)


def test_buffers_the_ioctl_sees_hold_the_packed_bytes() -> None:
    """The addresses handed to the kernel point at buffers that really hold the request."""
    data = bytes(range(64))
    request = ctypes.create_string_buffer(agent.pack_report_request(data), agent.REPORT_REQ.size)
    guest = agent.pack_guest_request(ctypes.addressof(request), 0)
    address = struct.unpack_from("<Q", guest, 8)[0]
    assert ctypes.string_at(address, 96) == agent.pack_report_request(data)


def test_missing_device_is_evidence_unavailable(tmp_path: Path) -> None:
    with pytest.raises(EvidenceUnavailable, match="SEV-SNP guest"):
        agent.SevGuestDevice(str(tmp_path / "sev-guest")).report(bytes(64))
