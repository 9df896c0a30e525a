"""A TEST SEV-SNP chain (ARK -> ASK -> VCEK) and a report signer: TEST ROOTS, NEVER TRUSTED BY DEFAULT.

The certificates here look like AMD's (RSA-PSS SHA-384 salt 48 for ARK and ASK, an ECDSA P-384 VCEK with
the AMD TCB and hwID extensions) so the verifier's every check runs against them, but they are made in the
tests and their names say "TEST": only an ``SnpTrust`` built with ``roots=(chain.ark,)`` accepts them.

Reports are written with their offsets spelled out here, independently of keysteward.formats.snp, so the
parser is checked against a second reading of the layout.
"""

from __future__ import annotations

import base64
import functools
import struct
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from keysteward.agent.snp import CERT_FILES, TEMPLATE_FILE, VCEK_KEY_FILE
from keysteward.attest.snp import SnpTrust

PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
AMD_OID = "1.3.6.1.4.1.3704.1"
SPL_OIDS = {"bootloader": "3.1", "tee": "3.2", "snp": "3.3", "microcode": "3.8"}
DEFAULT_TCB = {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 0x73}
DEFAULT_CHIP = bytes(range(0x40, 0x80))
POLICY_DEBUG = 1 << 19
BASE_POLICY = 0x30000  # reserved bit 16 (must be one) and SMT allowed


def tcb_u64(tcb: dict[str, int]) -> int:
    """Milan TCB_VERSION: bootloader byte 0, tee byte 1, snp byte 6, microcode byte 7."""
    return tcb["bootloader"] | tcb["tee"] << 8 | tcb["snp"] << 48 | tcb["microcode"] << 56


def _name(common: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keysteward TEST - not AMD"),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


def _ca(subject: str, issuer: str, key: rsa.RSAPrivateKey, public: rsa.RSAPublicKey, now: datetime) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA384(), rsa_padding=PSS)
    )


@dataclass(frozen=True)
class TestChain:
    """A TEST ARK, ASK and VCEK (with the private keys) for one chip at one TCB."""

    __test__ = False  # not a pytest class

    ark_key: rsa.RSAPrivateKey
    ark: x509.Certificate
    ask_key: rsa.RSAPrivateKey
    ask: x509.Certificate
    vcek_key: ec.EllipticCurvePrivateKey
    vcek: x509.Certificate
    chip_id: bytes
    tcb: dict[str, int]

    def trust(self, cache_dir: Path | None = None) -> SnpTrust:
        """A trust whose only root is this TEST ARK (and no built-in ASK)."""
        return SnpTrust(roots=(self.ark,), cache_dir=cache_dir)

    def issue_vcek(
        self,
        *,
        chip_id: bytes | None = None,
        tcb: dict[str, int] | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        signer: rsa.RSAPrivateKey | None = None,
        hwid_der: bool = False,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """Another VCEK signed by this ASK (or ``signer``), for chips, TCBs and times the tests choose."""
        now = datetime.now(UTC)
        key = ec.generate_private_key(ec.SECP384R1())
        hwid = chip_id if chip_id is not None else self.chip_id
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name("SEV-VCEK TEST"))
            .issuer_name(self.ask.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - timedelta(days=1))
            .not_valid_after(not_after or now + timedelta(days=365))
        )
        for name, level in (tcb or self.tcb).items():
            oid = x509.ObjectIdentifier(f"{AMD_OID}.{SPL_OIDS[name]}")
            value = bytes([0x02, 0x01, level]) if level < 0x80 else bytes([0x02, 0x02, 0x00, level])
            builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
        hwid_value = b"\x04\x40" + hwid if hwid_der else hwid  # AMD writes the 64 raw bytes
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(f"{AMD_OID}.4"), hwid_value), critical=False
        )
        return key, builder.sign(signer or self.ask_key, hashes.SHA384(), rsa_padding=PSS)

    def with_vcek(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> TestChain:
        return replace(self, vcek_key=key, vcek=cert)

    def report(self, report_data: bytes = bytes(64), **fields: Any) -> bytes:
        """A report for this chip and TCB, signed with this chain's VCEK key."""
        fields.setdefault("chip_id", self.chip_id)
        fields.setdefault("tcb", self.tcb)
        return sign_report(signed_part(report_data=report_data, **fields), self.vcek_key)

    def evidence(self, report: bytes, *, parts: tuple[str, ...] = ("vcek", "ask", "ark")) -> dict[str, str]:
        out = {"type": "sev-snp", "report": base64.b64encode(report).decode()}
        for name in parts:
            cert: x509.Certificate = getattr(self, name)
            out[name] = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        return out


def make_chain(label: str = "Test", *, chip_id: bytes = DEFAULT_CHIP, tcb: dict[str, int] | None = None) -> TestChain:
    """A fresh TEST chain; ``label`` ends up in the names (``ARK-<label>``, ``SEV-<label>``)."""
    now = datetime.now(UTC)
    ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ark = _ca(f"ARK-{label}", f"ARK-{label}", ark_key, ark_key.public_key(), now)
    ask = _ca(f"SEV-{label}", f"ARK-{label}", ark_key, ask_key.public_key(), now)
    placeholder = ec.generate_private_key(ec.SECP384R1())
    chain = TestChain(ark_key, ark, ask_key, ask, placeholder, ark, chip_id, dict(tcb or DEFAULT_TCB))
    return chain.with_vcek(*chain.issue_vcek())


@functools.cache
def shared_chain() -> TestChain:
    """One TEST chain per test session (RSA key generation is the slow part)."""
    return make_chain()


def signed_part(
    *,
    report_data: bytes = bytes(64),
    chip_id: bytes = DEFAULT_CHIP,
    tcb: dict[str, int] | None = None,
    version: int = 2,
    guest_svn: int = 1,
    policy: int = BASE_POLICY,
    vmpl: int = 0,
    signature_algo: int = 1,
    signing_key: int = 0,
    mask_chip_key: bool = False,
    measurement: bytes = bytes(range(48)),
    host_data: bytes = b"\x11" * 32,
    image_id: bytes = b"\x22" * 16,
    family_id: bytes = b"\x33" * 16,
    cpuid: tuple[int, int, int] = (0x19, 0x01, 0x01),
) -> bytes:
    """Bytes 0x000-0x29F of a report, written field by field at the ABI offsets."""
    tcb_value = tcb_u64(tcb or DEFAULT_TCB)
    out = bytearray(0x2A0)
    struct.pack_into("<IIQ", out, 0x000, version, guest_svn, policy)
    out[0x010:0x020] = family_id
    out[0x020:0x030] = image_id
    struct.pack_into("<IIQQI", out, 0x030, vmpl, signature_algo, tcb_value, 1, signing_key << 2 | mask_chip_key << 1)
    out[0x050:0x090] = report_data
    out[0x090:0x0C0] = measurement
    out[0x0C0:0x0E0] = host_data
    out[0x140:0x160] = b"\x44" * 32  # report_id
    out[0x160:0x180] = b"\xff" * 32  # report_id_ma
    struct.pack_into("<Q", out, 0x180, tcb_value)
    if version >= 3:
        out[0x188:0x18B] = bytes(cpuid)
    out[0x1A0:0x1E0] = chip_id
    struct.pack_into("<Q", out, 0x1E0, tcb_value)
    out[0x1E8:0x1F0] = bytes([4, 52, 1, 0, 4, 52, 1, 0])  # current and committed firmware 1.52.4
    struct.pack_into("<Q", out, 0x1F0, tcb_value)
    return bytes(out)


def sign_report(signed: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """The whole 1184-byte report: ``signed`` then r and s (72 bytes each, little-endian), then zeros."""
    assert len(signed) == 0x2A0
    r, s = decode_dss_signature(key.sign(signed, ec.ECDSA(hashes.SHA384())))
    return signed + r.to_bytes(72, "little") + s.to_bytes(72, "little") + bytes(368)


def write_file_source(directory: Path, chain: TestChain, template: bytes | None = None) -> Path:
    """A directory for ``keysteward.agent.snp.FileSource``: the TEST VCEK key, the chain, a template report."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / TEMPLATE_FILE).write_bytes(template if template is not None else chain.report())
    key_pem = chain.vcek_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (directory / VCEK_KEY_FILE).write_bytes(key_pem)
    for name, file in CERT_FILES.items():
        cert: x509.Certificate = getattr(chain, name)
        (directory / file).write_bytes(cert.public_bytes(serialization.Encoding.DER))
    return directory


MILAN_DIR = Path(__file__).resolve().parents[1] / "vectors" / "sev-snp"
"""A copy of ../shared/testdata/sev-snp (public data from virtee/sev, Apache-2.0; see SOURCE.md there)."""
MILAN_NOW = datetime(2026, 6, 1, tzinfo=UTC)
"""A time inside the Milan VCEK's validity (2023-04-03 to 2030-04-03), so the known answer never expires."""


@dataclass(frozen=True)
class MilanVector:
    """AMD's real Milan report with its VCEK (DER), ASK and ARK (PEM), from ../shared/testdata/sev-snp/."""

    report: bytes
    vcek_der: bytes
    ask_pem: bytes
    ark_pem: bytes

    def evidence(self, *, parts: tuple[str, ...] = ("vcek", "ask", "ark")) -> dict[str, str]:
        ders = {
            "vcek": self.vcek_der,
            "ask": x509.load_pem_x509_certificate(self.ask_pem).public_bytes(serialization.Encoding.DER),
            "ark": x509.load_pem_x509_certificate(self.ark_pem).public_bytes(serialization.Encoding.DER),
        }
        out = {"type": "sev-snp", "report": base64.b64encode(self.report).decode()}
        out.update({name: base64.b64encode(ders[name]).decode() for name in parts})
        return out


@functools.cache
def milan() -> MilanVector:
    return MilanVector(
        report=bytes.fromhex((MILAN_DIR / "report_milan.hex").read_text().strip()),
        vcek_der=(MILAN_DIR / "vcek_milan.der").read_bytes(),
        ask_pem=(MILAN_DIR / "ask.pem").read_bytes(),
        ark_pem=(MILAN_DIR / "ark.pem").read_bytes(),
    )
