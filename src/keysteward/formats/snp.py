"""The AMD SEV-SNP attestation report (ATTESTATION_REPORT, SEV-SNP ABI spec table 22), versions 2 and 3.

The report is a fixed 1184-byte little-endian structure that the AMD secure processor signs with the
chip's VCEK. This module only decodes it: no signature check (that is :mod:`keysteward.attest.snp`), no
clock, no I/O. Layout (offsets in hex, integers little-endian)::

    000 version u32 (2 or 3)       004 guest_svn u32            008 policy u64
    010 family_id 16               020 image_id 16              030 vmpl u32
    034 signature_algo u32         038 current_tcb u64          040 platform_info u64
    048 flags u32: bit 0 author_key_en, bit 1 mask_chip_key, bits 2-4 signing_key (0 VCEK, 1 VLEK, 7 none)
    04C reserved 4                 050 report_data 64           090 measurement 48
    0C0 host_data 32               0E0 id_key_digest 48         110 author_key_digest 48
    140 report_id 32               160 report_id_ma 32          180 reported_tcb u64
    188 cpuid family, model, stepping u8 each (version 3; reserved in version 2), reserved to 1A0
    1A0 chip_id 64                 1E0 committed_tcb u64
    1E8 current build, minor, major u8 + reserved    1EC committed build, minor, major u8 + reserved
    1F0 launch_tcb u64             1F8 reserved to 2A0
    2A0 signature: r 72, s 72 (little-endian), reserved 368 - up to 4A0

The signed part is 000-29F. A TCB version (u64) is, on Milan and Genoa, bootloader (byte 0), TEE (byte 1),
SNP (byte 6) and microcode (byte 7) security patch levels.

The extended report's certificate table (GHCB spec: entries of GUID 16, offset u32, length u32, ended by an
all-zero entry) is decoded by :func:`parse_cert_table`.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field
from typing import Final

from keysteward.errors import BadRequest

REPORT_SIZE: Final = 1184
SIGNED_SIZE: Final = 0x2A0
SIGNATURE_COMPONENT_SIZE: Final = 72
VERSIONS: Final = frozenset({2, 3})
POLICY_DEBUG_BIT: Final = 19
POLICY_SMT_BIT: Final = 17
POLICY_SINGLE_SOCKET_BIT: Final = 20
SIGNING_KEY_VCEK: Final = 0
SIGNING_KEY_VLEK: Final = 1
SIGNING_KEY_NONE: Final = 7

SNP_REPORT_INVALID: Final = "snp_report_invalid"

_HEAD = struct.Struct("<IIQ16s16sIIQQII64s48s32s48s48s32s32sQBBB21s64sQBBBxBBBxQ")
"""000-1F8: every field up to launch_tcb, in order."""
_SIGNATURE = struct.Struct(f"<{SIGNATURE_COMPONENT_SIZE}s{SIGNATURE_COMPONENT_SIZE}s")

CERT_GUIDS: Final[dict[uuid.UUID, str]] = {
    uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"): "vcek",
    uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"): "ask",
    uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"): "ark",
    uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1"): "vlek",
}
_CERT_ENTRY = struct.Struct("<16sII")
MAX_CERT_ENTRIES: Final = 16
MAX_CERT_SIZE: Final = 16 * 1024
MAX_CERT_TABLE: Final = 64 * 1024


class SnpFormatError(BadRequest):
    """Bytes that are not an SEV-SNP attestation report (or certificate table) keysteward can read."""

    code = SNP_REPORT_INVALID
    title = "Invalid SEV-SNP report"


@dataclass(frozen=True)
class TcbVersion:
    """A TCB version: the security patch level of each firmware component (Milan/Genoa layout)."""

    bootloader: int
    tee: int
    snp: int
    microcode: int
    raw: int

    @classmethod
    def from_u64(cls, value: int) -> TcbVersion:
        return cls(
            bootloader=value & 0xFF,
            tee=(value >> 8) & 0xFF,
            snp=(value >> 48) & 0xFF,
            microcode=(value >> 56) & 0xFF,
            raw=value,
        )

    def as_dict(self) -> dict[str, int]:
        return {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp, "microcode": self.microcode}


@dataclass(frozen=True)
class FirmwareVersion:
    major: int
    minor: int
    build: int


@dataclass(frozen=True)
class SnpReport:
    """Every field of a decoded report; nothing here is verified yet."""

    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: int
    author_key_en: bool
    mask_chip_key: bool
    signing_key: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    cpuid_family: int | None
    cpuid_model: int | None
    cpuid_stepping: int | None
    chip_id: bytes
    committed_tcb: TcbVersion
    current: FirmwareVersion
    committed: FirmwareVersion
    launch_tcb: TcbVersion
    signature_r: int
    signature_s: int
    signed_bytes: bytes = field(repr=False)
    unsigned_tail: bytes = field(repr=False)

    @property
    def debug_allowed(self) -> bool:
        """Policy bit 19: the hypervisor may debug the guest (read and write its memory) if set."""
        return bool(self.policy >> POLICY_DEBUG_BIT & 1)

    @property
    def smt_allowed(self) -> bool:
        return bool(self.policy >> POLICY_SMT_BIT & 1)

    @property
    def single_socket(self) -> bool:
        return bool(self.policy >> POLICY_SINGLE_SOCKET_BIT & 1)

    @property
    def abi(self) -> tuple[int, int]:
        """The minimum firmware ABI (major, minor) the guest policy demands (policy bits 15-8 and 7-0)."""
        return (self.policy >> 8 & 0xFF, self.policy & 0xFF)


def parse_report(data: bytes) -> SnpReport:
    """Decode a report; raises :class:`SnpFormatError` for anything but 1184 bytes of version 2 or 3."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SnpFormatError("an SEV-SNP report must be bytes")
    data = bytes(data)
    if len(data) != REPORT_SIZE:
        raise SnpFormatError(f"an SEV-SNP report is {REPORT_SIZE} bytes, got {len(data)}")
    (
        version,
        guest_svn,
        policy,
        family_id,
        image_id,
        vmpl,
        signature_algo,
        current_tcb,
        platform_info,
        flags,
        _reserved0,
        report_data,
        measurement,
        host_data,
        id_key_digest,
        author_key_digest,
        report_id,
        report_id_ma,
        reported_tcb,
        cpuid_family,
        cpuid_model,
        cpuid_stepping,
        _reserved1,
        chip_id,
        committed_tcb,
        current_build,
        current_minor,
        current_major,
        committed_build,
        committed_minor,
        committed_major,
        launch_tcb,
    ) = _HEAD.unpack_from(data, 0)
    if version not in VERSIONS:
        raise SnpFormatError(f"SEV-SNP report version {version} is not supported (expected one of {sorted(VERSIONS)})")
    r_le, s_le = _SIGNATURE.unpack_from(data, SIGNED_SIZE)
    has_cpuid = version >= 3
    return SnpReport(
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=family_id,
        image_id=image_id,
        vmpl=vmpl,
        signature_algo=signature_algo,
        current_tcb=TcbVersion.from_u64(current_tcb),
        platform_info=platform_info,
        author_key_en=bool(flags & 1),
        mask_chip_key=bool(flags >> 1 & 1),
        signing_key=flags >> 2 & 0b111,
        report_data=report_data,
        measurement=measurement,
        host_data=host_data,
        id_key_digest=id_key_digest,
        author_key_digest=author_key_digest,
        report_id=report_id,
        report_id_ma=report_id_ma,
        reported_tcb=TcbVersion.from_u64(reported_tcb),
        cpuid_family=cpuid_family if has_cpuid else None,
        cpuid_model=cpuid_model if has_cpuid else None,
        cpuid_stepping=cpuid_stepping if has_cpuid else None,
        chip_id=chip_id,
        committed_tcb=TcbVersion.from_u64(committed_tcb),
        current=FirmwareVersion(current_major, current_minor, current_build),
        committed=FirmwareVersion(committed_major, committed_minor, committed_build),
        launch_tcb=TcbVersion.from_u64(launch_tcb),
        signature_r=int.from_bytes(r_le, "little"),
        signature_s=int.from_bytes(s_le, "little"),
        signed_bytes=data[:SIGNED_SIZE],
        unsigned_tail=data[SIGNED_SIZE + _SIGNATURE.size :],
    )


def with_signature(signed_bytes: bytes, r: int, s: int) -> bytes:
    """A whole report from its signed part and an (r, s) signature: what the firmware writes."""
    if len(signed_bytes) != SIGNED_SIZE:
        raise ValueError(f"the signed part of a report is {SIGNED_SIZE} bytes")
    limit = 1 << (8 * SIGNATURE_COMPONENT_SIZE)
    if not (0 <= r < limit and 0 <= s < limit):
        raise ValueError("signature component out of range")
    tail = bytes(REPORT_SIZE - SIGNED_SIZE - _SIGNATURE.size)
    return bytes(signed_bytes) + _SIGNATURE.pack(r.to_bytes(72, "little"), s.to_bytes(72, "little")) + tail


def parse_cert_table(data: bytes) -> dict[str, bytes]:
    """Decode the certificate table of an extended report: ``{"vcek"|"ask"|"ark"|"vlek": DER bytes}``.

    Entries with unknown GUIDs are skipped; a GUID given twice, an offset or length outside ``data``, a
    certificate over 16 KiB or a table without its all-zero terminator raise :class:`SnpFormatError`.
    GUIDs are matched in RFC 4122 byte order and in the mixed-endian order some hosts write.
    """
    data = bytes(data)
    if len(data) > MAX_CERT_TABLE:
        raise SnpFormatError(f"an SEV-SNP certificate table is at most {MAX_CERT_TABLE} bytes")
    known = {g.bytes: name for g, name in CERT_GUIDS.items()} | {g.bytes_le: name for g, name in CERT_GUIDS.items()}
    found: dict[str, bytes] = {}
    for index in range(MAX_CERT_ENTRIES + 1):
        position = index * _CERT_ENTRY.size
        if position + _CERT_ENTRY.size > len(data):
            raise SnpFormatError("the SEV-SNP certificate table has no terminating all-zero entry")
        guid, offset, length = _CERT_ENTRY.unpack_from(data, position)
        if guid == bytes(16) and offset == 0 and length == 0:
            return found
        if index == MAX_CERT_ENTRIES:
            break
        if not 0 < length <= MAX_CERT_SIZE or offset > len(data) or length > len(data) - offset:
            raise SnpFormatError(f"SEV-SNP certificate table entry {index} points outside the table")
        name = known.get(guid)
        if name is None:
            continue
        if name in found:
            raise SnpFormatError(f"the SEV-SNP certificate table holds the {name} certificate twice")
        found[name] = data[offset : offset + length]
    raise SnpFormatError(f"the SEV-SNP certificate table has more than {MAX_CERT_ENTRIES} entries")
