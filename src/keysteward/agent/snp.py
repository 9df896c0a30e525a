"""SEV-SNP evidence collection on the instance: a report bound to the release, and its certificates.

:func:`collect_snp` asks an :class:`SnpSource` for a report whose report_data is the release binding
followed by 32 zero bytes and returns the ``evidence.snp`` object of keysteward-release/1. Two sources:

- :class:`SevGuestDevice`, the real one: the guest's ``/dev/sev-guest`` through the Linux uapi
  (``include/uapi/linux/sev-guest.h``): ``SNP_GET_EXT_REPORT`` for the report and the certificates the host
  provides, ``SNP_GET_REPORT`` when the host provides none. It needs an SEV-SNP guest, so only its structure
  packing is tested here.
- :class:`FileSource`, a TEST STAND-IN FOR THE FIRMWARE that signs reports with a test VCEK private key
  from a directory (see the class).
"""

from __future__ import annotations

import base64
import ctypes
import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from keysteward.agent.evidence import EvidenceUnavailable
from keysteward.errors import BadRequest
from keysteward.formats.snp import REPORT_SIZE, SIGNED_SIZE, SnpFormatError, parse_cert_table, with_signature

REPORT_DATA_SIZE: Final = 64
REPORT_DATA_OFFSET: Final = 0x50
DEVICE: Final = "/dev/sev-guest"

# include/uapi/linux/sev-guest.h, x86-64 alignment.
REPORT_REQ: Final = struct.Struct("<64sI28x")  # struct snp_report_req: user_data, vmpl, rsvd
EXT_REPORT_REQ: Final = struct.Struct("<64sI28xQI4x")  # + certs_address, certs_len, tail padding
GUEST_REQUEST: Final = struct.Struct("<B7xQQQ")  # snp_guest_request_ioctl: msg_version, req, resp, exitinfo2
REPORT_RESP_SIZE: Final = 4000  # struct snp_report_resp
REPORT_RSP_HEAD: Final = struct.Struct("<II24x")  # MSG_REPORT_RSP: status, report_size, reserved; report at 0x20
MSG_VERSION: Final = 1
PAGE: Final = 4096
CERTS_START: Final = 4 * PAGE
CERTS_MAX: Final = 16 * PAGE
VMM_ERR_INVALID_LEN: Final = 1


def _iowr(number: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord("S") << 8) | number


SNP_GET_REPORT: Final = _iowr(0x0, GUEST_REQUEST.size)
SNP_GET_EXT_REPORT: Final = _iowr(0x2, GUEST_REQUEST.size)

# The files of a FileSource directory (tests/support/snp_chain.py writes them).
TEMPLATE_FILE: Final = "report-template.bin"
VCEK_KEY_FILE: Final = "TEST-vcek-key.pem"
CERT_FILES: Final = {"vcek": "vcek.der", "ask": "ask.der", "ark": "ark.der"}


@dataclass(frozen=True)
class SnpEvidenceParts:
    """A report and the DER certificates that came with it (None where the source has none)."""

    report: bytes
    vcek: bytes | None = None
    ask: bytes | None = None
    ark: bytes | None = None


class SnpSource(Protocol):
    def report(self, report_data: bytes) -> SnpEvidenceParts: ...


def collect_snp(source: SnpSource, binding: bytes) -> dict[str, str]:
    """The ``evidence.snp`` object for a release whose binding is ``binding`` (32 bytes)."""
    if len(binding) != 32:
        raise BadRequest("the binding must be 32 bytes (sha256 of nonce and public key)")
    report_data = binding + bytes(REPORT_DATA_SIZE - len(binding))
    parts = source.report(report_data)
    if len(parts.report) != REPORT_SIZE:
        raise EvidenceUnavailable(
            f"the SEV-SNP source answered {len(parts.report)} bytes, not a {REPORT_SIZE}-byte report"
        )
    if parts.report[REPORT_DATA_OFFSET : REPORT_DATA_OFFSET + REPORT_DATA_SIZE] != report_data:
        raise EvidenceUnavailable("the SEV-SNP source answered a report for other report_data")
    evidence = {"type": "sev-snp", "report": base64.b64encode(parts.report).decode("ascii")}
    for name in ("vcek", "ask", "ark"):
        der = getattr(parts, name)
        if der is not None:
            evidence[name] = base64.b64encode(der).decode("ascii")
    return evidence


def pack_report_request(report_data: bytes, vmpl: int = 0) -> bytes:
    if len(report_data) != REPORT_DATA_SIZE or not 0 <= vmpl <= 3:
        raise ValueError("report_data is 64 bytes and vmpl 0..3")
    return REPORT_REQ.pack(report_data, vmpl)


def pack_ext_report_request(report_data: bytes, vmpl: int, certs_address: int, certs_length: int) -> bytes:
    if len(report_data) != REPORT_DATA_SIZE or not 0 <= vmpl <= 3 or certs_length % PAGE:
        raise ValueError("report_data is 64 bytes, vmpl 0..3 and the certificate buffer whole pages")
    return EXT_REPORT_REQ.pack(report_data, vmpl, certs_address, certs_length)


def pack_guest_request(request_address: int, response_address: int) -> bytearray:
    return bytearray(GUEST_REQUEST.pack(MSG_VERSION, request_address, response_address, 0))


def guest_request_errors(request: bytes | bytearray) -> tuple[int, int]:
    """(firmware error, VMM error) from a guest request after the ioctl: the exitinfo2 halves."""
    exitinfo2 = GUEST_REQUEST.unpack(bytes(request))[3]
    return exitinfo2 & 0xFFFFFFFF, exitinfo2 >> 32


def unpack_report_response(response: bytes) -> bytes:
    """The report inside an ``snp_report_resp`` (MSG_REPORT_RSP); a firmware error raises."""
    if len(response) < REPORT_RSP_HEAD.size + REPORT_SIZE:
        raise EvidenceUnavailable("the SEV-SNP report response is shorter than a report")
    status, size = REPORT_RSP_HEAD.unpack_from(response)
    if status != 0:
        raise EvidenceUnavailable(f"the SEV-SNP firmware refused the report request (status {status:#x})")
    if size != REPORT_SIZE:
        raise EvidenceUnavailable(f"the SEV-SNP firmware answered a {size}-byte report (expected {REPORT_SIZE})")
    return bytes(response[REPORT_RSP_HEAD.size : REPORT_RSP_HEAD.size + REPORT_SIZE])


class SevGuestDevice:
    """Reports from the SEV-SNP firmware through the guest's ``/dev/sev-guest``."""

    def __init__(self, path: str = DEVICE, *, vmpl: int = 0, extended: bool = True) -> None:
        self.path = path
        self.vmpl = vmpl
        self.extended = extended

    def report(self, report_data: bytes) -> SnpEvidenceParts:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise EvidenceUnavailable(f"cannot open {self.path} ({exc.strerror}): is this an SEV-SNP guest?") from exc
        try:
            if self.extended:
                parts = self._extended(fd, report_data)
                if parts is not None:
                    return parts
            return SnpEvidenceParts(report=self._plain(fd, report_data))
        finally:
            os.close(fd)

    def _ioctl(self, fd: int, number: int, request: ctypes.Array[ctypes.c_char]) -> ctypes.Array[ctypes.c_char]:
        response = ctypes.create_string_buffer(REPORT_RESP_SIZE)
        guest = pack_guest_request(ctypes.addressof(request), ctypes.addressof(response))
        try:
            fcntl.ioctl(fd, number, guest, True)
        except OSError as exc:
            firmware, vmm = guest_request_errors(guest)
            raise _DeviceError(exc.errno or 0, firmware, vmm) from exc
        return response

    def _plain(self, fd: int, report_data: bytes) -> bytes:
        request = ctypes.create_string_buffer(pack_report_request(report_data, self.vmpl), REPORT_REQ.size)
        try:
            response = self._ioctl(fd, SNP_GET_REPORT, request)
        except _DeviceError as exc:
            raise EvidenceUnavailable(f"SNP_GET_REPORT on {self.path} failed: {exc}") from exc
        return unpack_report_response(response.raw)

    def _extended(self, fd: int, report_data: bytes) -> SnpEvidenceParts | None:
        """The report with the host's certificates, or None where the kernel or host offers none."""
        length = CERTS_START
        while length <= CERTS_MAX:
            certs = ctypes.create_string_buffer(length)
            packed = pack_ext_report_request(report_data, self.vmpl, ctypes.addressof(certs), length)
            request = ctypes.create_string_buffer(packed, EXT_REPORT_REQ.size)
            try:
                response = self._ioctl(fd, SNP_GET_EXT_REPORT, request)
            except _DeviceError as exc:
                if exc.vmm == VMM_ERR_INVALID_LEN:
                    needed = EXT_REPORT_REQ.unpack(request.raw)[3]
                    length = max(length * 2, -(-needed // PAGE) * PAGE)
                    continue
                if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                    return None
                raise EvidenceUnavailable(f"SNP_GET_EXT_REPORT on {self.path} failed: {exc}") from exc
            report = unpack_report_response(response.raw)
            try:
                table = parse_cert_table(certs.raw)
            except SnpFormatError as exc:
                raise EvidenceUnavailable(f"the host's SEV-SNP certificates are malformed: {exc.message}") from exc
            return SnpEvidenceParts(report, table.get("vcek"), table.get("ask"), table.get("ark"))
        raise EvidenceUnavailable(f"the host's SEV-SNP certificates need more than {CERTS_MAX} bytes")


class _DeviceError(Exception):
    def __init__(self, errno_: int, firmware: int, vmm: int) -> None:
        super().__init__(f"{os.strerror(errno_) if errno_ else 'error'} (firmware {firmware:#x}, vmm {vmm:#x})")
        self.errno = errno_
        self.firmware = firmware
        self.vmm = vmm


class FileSource:
    """TEST STAND-IN FOR THE SEV-SNP FIRMWARE. Never use it to attest anything real.

    It signs reports itself, with the TEST VCEK private key in ``directory`` (``TEST-vcek-key.pem``),
    from a template report (``report-template.bin``) whose report_data it replaces; ``vcek.der``, ``ask.der``
    and ``ark.der`` (each optional) come along as the host's certificates would. Such a directory comes from
    ``tests/support/snp_chain.py`` with a test chain that no default trust accepts: a real firmware keeps its
    VCEK key inside the chip, and whoever holds this file can make any report.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def report(self, report_data: bytes) -> SnpEvidenceParts:
        if len(report_data) != REPORT_DATA_SIZE:
            raise ValueError("report_data is 64 bytes")
        try:
            template = (self.directory / TEMPLATE_FILE).read_bytes()
            key = serialization.load_pem_private_key((self.directory / VCEK_KEY_FILE).read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise EvidenceUnavailable(f"the test SEV-SNP source {self.directory} is incomplete") from exc
        if len(template) != REPORT_SIZE or not isinstance(key, ec.EllipticCurvePrivateKey):
            raise EvidenceUnavailable(f"the test SEV-SNP source {self.directory} holds no report template or P-384 key")
        signed = bytearray(template[:SIGNED_SIZE])
        signed[REPORT_DATA_OFFSET : REPORT_DATA_OFFSET + REPORT_DATA_SIZE] = report_data
        r, s = decode_dss_signature(key.sign(bytes(signed), ec.ECDSA(hashes.SHA384())))
        certs: dict[str, bytes | None] = {}
        for name, file in CERT_FILES.items():
            path = self.directory / file
            certs[name] = path.read_bytes() if path.exists() else None
        return SnpEvidenceParts(with_signature(bytes(signed), r, s), certs["vcek"], certs["ask"], certs["ark"])


def snp_source(spec: str) -> SnpSource:
    """The source an agent option names: a guest device path, or ``file:DIR`` (the TEST stand-in)."""
    if spec.startswith("file:"):
        return FileSource(Path(spec.removeprefix("file:")))
    return SevGuestDevice(spec)
