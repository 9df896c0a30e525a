"""AMD SEV-SNP evidence: an attestation report signed by the chip's VCEK, chained to AMD's root.

keysteward-release/1 carries it as ``evidence.snp``::

    {"type": "sev-snp", "report": <base64, 1184 bytes>,
     "vcek": <base64 DER, optional if cached>, "ask": <base64 DER, optional>, "ark": <base64 DER, optional>}

:func:`verify_snp` returns the verified :class:`SnpClaims` or raises
:class:`~keysteward.attest.errors.EvidenceRejected` (``evidence_invalid``, or ``binding_mismatch`` for a
genuine report made for another request). What it checks, in order:

1. the report parses (version 2 or 3), is signed with ECDSA P-384/SHA-384 (signature_algo 1) by a VCEK
   (not a VLEK), has a VMPL of 0-3 and an all-zero unsigned tail;
2. the VCEK is signed by an ASK and the ASK by a *trusted* ARK, both with RSA-PSS (SHA-384, MGF1-SHA-384,
   salt 48); the trusted ARK is self-signed; an ARK the evidence carries must be one of the trusted roots,
   so a self-made chain fails however well it is formed; every certificate is valid at ``now``;
3. the report's signature verifies with the VCEK (r and s are stored little-endian);
4. the VCEK's AMD extensions (blSPL, teeSPL, snpSPL, ucodeSPL, hwID) equal the report's reported_tcb and
   chip_id, so a VCEK of another chip or TCB cannot vouch for the report;
5. report_data is ``binding || 32 zero bytes``.

The debug policy bit is a claim, not a check: policy decides (``debug`` in :meth:`SnpClaims.claims`).

Certificates the evidence leaves out come from ``SnpTrust.cache_dir``, which the operator fills (for
example from AMD KDS); nothing is ever fetched. Layout::

    <cache_dir>/<product>/ask.pem     the product's ASK (KDS cert_chain, ASK then ARK, is fine too)
    <cache_dir>/<product>/vcek/<chip_id, 128 hex digits>-<reported_tcb, 16 hex digits>.der

``<product>`` is AMD's name (``Milan``, ``Genoa``...); the tcb is the report's reported_tcb u64 in hex
(``7308000000000003`` for bootloader 3, tee 0, snp 8, microcode 0x73). An ASK missing from evidence and
cache is taken from the built-in ones (AMD's Milan ASK).
"""

from __future__ import annotations

import hmac
import itertools
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from keysteward.attest._common import b64_field
from keysteward.attest.binding import BINDING_SIZE
from keysteward.attest.errors import BINDING_MISMATCH, EvidenceRejected
from keysteward.attest.providers import certificate_valid_at, describe_certificate
from keysteward.formats.snp import (
    REPORT_SIZE,
    SIGNING_KEY_VCEK,
    SnpFormatError,
    SnpReport,
    TcbVersion,
    parse_report,
)

__all__ = ["SnpClaims", "SnpTrust", "verify_report", "verify_snp"]

TEE: Final = "sev-snp"
EVIDENCE_FIELDS: Final = frozenset({"type", "report", "vcek", "ask", "ark"})
MAX_CERT_BYTES: Final = 16 * 1024
MAX_CACHE_PRODUCTS: Final = 16
ECDSA_P384_SHA384: Final = 1
MAX_VMPL: Final = 3
TURIN_FAMILY: Final = 0x1A
_PSS: Final = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_PRODUCT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
_AMD: Final = "1.3.6.1.4.1.3704.1"
_SPL_OIDS: Final = {  # blSPL, teeSPL, snpSPL, ucodeSPL
    name: x509.ObjectIdentifier(f"{_AMD}.3.{arc}")
    for name, arc in (("bootloader", 1), ("tee", 2), ("snp", 3), ("microcode", 8))
}
_HWID_OID: Final = x509.ObjectIdentifier(f"{_AMD}.4")


def load_certificate(der: bytes, what: str) -> x509.Certificate:
    """A DER certificate; AMD's VCEKs have a serial that newer ``cryptography`` warns about: load them anyway."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise EvidenceRejected(f"the {what} is not a DER X.509 certificate") from exc


def _describe(cert: x509.Certificate) -> str:
    """Subject and serial, read without the warning AMD's non-positive VCEK serials raise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return describe_certificate(cert)


def _builtin(name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(resources.files("keysteward.attest.amd").joinpath(name).read_bytes())


@dataclass(frozen=True)
class SnpTrust:
    """What a verifier trusts: the ARKs (roots), built-in ASKs, and the operator's certificate cache."""

    roots: tuple[x509.Certificate, ...]
    cache_dir: Path | None = None
    asks: tuple[x509.Certificate, ...] = ()

    @classmethod
    def default(cls, cache_dir: Path | None = None) -> SnpTrust:
        """AMD's Milan ARK as the only root, its ASK built in, and ``cache_dir`` for VCEKs."""
        return cls(roots=(_builtin("ark-milan.pem"),), cache_dir=cache_dir, asks=(_builtin("ask-milan.pem"),))


@dataclass(frozen=True)
class SnpClaims:
    """What a verified report proves; byte fields as lowercase hex."""

    product: str
    version: int
    measurement: str
    debug_allowed: bool
    policy: int
    vmpl: int
    guest_svn: int
    reported_tcb: dict[str, int]
    committed_tcb: dict[str, int]
    current_tcb: dict[str, int]
    chip_id: str
    host_data: str
    report_data: str
    family_id: str
    image_id: str
    id_key_digest: str
    smt_allowed: bool

    def claims(self) -> dict[str, Any]:
        """The platform record for the Cedar context and audit records: ``tee`` ("sev-snp"), ``debug``,
        ``smt``, ``tcb`` (the reported TCB: bootloader, tee, snp, microcode) and the other fields by name."""
        fields = asdict(self)
        renamed = {
            "debug": fields.pop("debug_allowed"),
            "smt": fields.pop("smt_allowed"),
            "tcb": fields.pop("reported_tcb"),
        }
        return {"tee": TEE, **renamed, **fields}


def verify_snp(evidence: Mapping[str, Any], trust: SnpTrust, *, binding: bytes, now: datetime) -> SnpClaims:
    """Verify ``evidence.snp`` against ``trust`` and the release's 32-byte ``binding`` at ``now`` (aware)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if len(binding) != BINDING_SIZE:
        raise ValueError("binding must be 32 bytes")
    if not isinstance(evidence, Mapping):
        raise EvidenceRejected("the sev-snp evidence must be an object")
    if evidence.get("type") != TEE:
        raise EvidenceRejected(f"unknown platform evidence type (expected {TEE!r})")
    extra = set(evidence) - EVIDENCE_FIELDS
    if extra or "report" not in evidence:
        raise EvidenceRejected(
            f"sev-snp evidence has the fields 'report' and optionally 'vcek', 'ask', 'ark' ({len(extra)} unknown)"
        )
    raw = b64_field(evidence["report"], "report", REPORT_SIZE)
    report = _parse(raw)
    certs = {
        name: load_certificate(b64_field(evidence[name], name, MAX_CERT_BYTES), f"{name} certificate")
        for name in ("vcek", "ask", "ark")
        if evidence.get(name) is not None
    }
    vcek = certs.get("vcek") or _cached_vcek(trust, report)
    chain = [certs[name] for name in ("ask", "ark") if name in certs]
    claims = verify_report(raw, vcek, chain, trust, now=now)
    expected = binding + bytes(64 - BINDING_SIZE)
    if not hmac.compare_digest(report.report_data, expected):
        raise EvidenceRejected(
            f"the SEV-SNP report of chip {claims.chip_id[:16]}... was made for another nonce or public key "
            "(report_data is not the request's binding followed by 32 zero bytes): ask for a new challenge",
            code=BINDING_MISMATCH,
        )
    return claims


def verify_report(
    report: bytes, vcek: x509.Certificate, chain: Sequence[x509.Certificate], trust: SnpTrust, *, now: datetime
) -> SnpClaims:
    """Verify a report, its VCEK and the chain to a trusted ARK (no binding check).

    ``chain`` holds the ASK and optionally the ARK, in any order; an ASK it lacks is looked up in the cache
    and the built-in ASKs.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    parsed = _parse(report)
    _check_report_fields(parsed)
    for cert in chain:
        if cert.subject == cert.issuer and not _is_trusted_root(cert, trust):
            raise EvidenceRejected(
                f"the evidence carries the root {_describe(cert)}, which is not a trusted AMD root "
                "(a self-made chain): only the configured ARKs anchor SEV-SNP evidence"
            )
    ask = _signing_ask(vcek, [c for c in chain if c.subject != c.issuer], trust)
    ark = _trusted_ark_of(ask, trust)
    for what, cert in (("VCEK", vcek), ("ASK", ask), ("ARK", ark)):
        if not certificate_valid_at(cert, now):
            raise EvidenceRejected(
                f"the {what} {_describe(cert)} is not valid at {now.isoformat()} (valid "
                f"{cert.not_valid_before_utc.isoformat()} to {cert.not_valid_after_utc.isoformat()})"
            )
    _check_report_signature(parsed, vcek)
    _check_vcek_matches(parsed, vcek)
    return _claims(parsed, _product(ark))


def _parse(raw: bytes) -> SnpReport:
    try:
        return parse_report(raw)
    except SnpFormatError as exc:
        raise EvidenceRejected(f"the SEV-SNP report does not parse: {exc.message}") from exc


def _check_report_fields(report: SnpReport) -> None:
    if report.signature_algo != ECDSA_P384_SHA384:
        raise EvidenceRejected(
            f"the SEV-SNP report uses signature algorithm {report.signature_algo} (only 1, ECDSA P-384 "
            "with SHA-384, is accepted)"
        )
    if report.signing_key != SIGNING_KEY_VCEK:
        raise EvidenceRejected(
            f"the SEV-SNP report is signed by key kind {report.signing_key} (only 0, the chip's VCEK, is accepted)"
        )
    if report.mask_chip_key:
        raise EvidenceRejected(
            "the SEV-SNP report is unsigned (MASK_CHIP_KEY is set on this host): nothing vouches for it"
        )
    if report.vmpl > MAX_VMPL:
        raise EvidenceRejected(f"the SEV-SNP report names VMPL {report.vmpl} (0 to {MAX_VMPL} exist)")
    if report.cpuid_family == TURIN_FAMILY:
        raise EvidenceRejected("SEV-SNP reports of AMD Turin (CPU family 0x1A) are not supported yet")
    if any(report.unsigned_tail):
        raise EvidenceRejected("the SEV-SNP report's reserved bytes after the signature are not zero")


def _check_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    """Raise InvalidSignature unless the CA ``issuer`` signed ``cert`` as AMD does: RSA-PSS, SHA-384, salt 48."""
    key = issuer.public_key()
    try:
        is_ca = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (x509.ExtensionNotFound, ValueError) as exc:
        raise InvalidSignature("the issuer is not a CA") from exc
    if not is_ca or cert.issuer != issuer.subject or not isinstance(key, rsa.RSAPublicKey):
        raise InvalidSignature("the issuer is not an RSA CA of that name")
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS:
        raise InvalidSignature("not signed with RSA-PSS")
    key.verify(cert.signature, cert.tbs_certificate_bytes, _PSS, hashes.SHA384())


def _is_trusted_root(cert: x509.Certificate, trust: SnpTrust) -> bool:
    fingerprint = cert.fingerprint(hashes.SHA384())
    return any(hmac.compare_digest(fingerprint, root.fingerprint(hashes.SHA384())) for root in trust.roots)


def _signing_ask(vcek: x509.Certificate, given: Sequence[x509.Certificate], trust: SnpTrust) -> x509.Certificate:
    for ask in itertools.chain(given, _cached_asks(trust, vcek.issuer), trust.asks):  # the cache only if needed
        try:
            _check_signed_by(vcek, ask)
        except InvalidSignature:
            continue
        return ask
    raise EvidenceRejected(
        f"the VCEK {_describe(vcek)} is not signed (RSA-PSS SHA-384) by any ASK given, cached or "
        f"built in (issuer '{vcek.issuer.rfc4514_string()}'): supply the ASK of its product"
    )


def _trusted_ark_of(ask: x509.Certificate, trust: SnpTrust) -> x509.Certificate:
    for root in trust.roots:
        try:
            _check_signed_by(ask, root)
            _check_signed_by(root, root)
        except InvalidSignature:
            continue
        return root
    raise EvidenceRejected(
        f"the ASK {_describe(ask)} is not signed by a trusted AMD root (ARK): a chain that does not "
        "end at a configured root is rejected"
    )


def _check_report_signature(report: SnpReport, vcek: x509.Certificate) -> None:
    key = vcek.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise EvidenceRejected(f"the VCEK {_describe(vcek)} does not hold an ECDSA P-384 key")
    signature = encode_dss_signature(report.signature_r, report.signature_s)
    try:
        key.verify(signature, report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature as exc:
        raise EvidenceRejected(
            "the SEV-SNP report's signature does not verify with the VCEK given: the report was altered or "
            "was signed by another chip or at another TCB"
        ) from exc


def _der_small_int(value: bytes) -> int | None:
    """A DER INTEGER of 0..255 (``02 01 xx`` or ``02 02 00 xx``), else None."""
    if len(value) in (3, 4) and value[0] == 0x02 and value[1] == len(value) - 2:
        number = int.from_bytes(value[2:], "big", signed=True)
        if 0 <= number <= 0xFF:
            return number
    return None


def _extension_bytes(vcek: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        extension = vcek.extensions.get_extension_for_oid(oid)
    except (x509.ExtensionNotFound, ValueError):
        return None
    return extension.value.value if isinstance(extension.value, x509.UnrecognizedExtension) else None


def _check_vcek_matches(report: SnpReport, vcek: x509.Certificate) -> None:
    tcb = report.reported_tcb.as_dict()
    for name, oid in _SPL_OIDS.items():
        raw = _extension_bytes(vcek, oid)
        level = None if raw is None else _der_small_int(raw)
        if level is None:
            raise EvidenceRejected(
                f"the VCEK has no readable {name} security patch level extension ({oid.dotted_string})"
            )
        if level != tcb[name]:
            raise EvidenceRejected(
                f"the VCEK was issued for {name} SPL {level} but the report's reported_tcb has {tcb[name]}: "
                "use the VCEK of the chip's current TCB"
            )
    if not any(report.chip_id):
        raise EvidenceRejected("the SEV-SNP report's chip_id is masked (MASK_CHIP_ID): its VCEK cannot be matched")
    hwid = _extension_bytes(vcek, _HWID_OID)
    if hwid is not None and len(hwid) == 66 and hwid[:2] == b"\x04\x40":
        hwid = hwid[2:]
    if hwid is None or not hmac.compare_digest(hwid, report.chip_id):
        raise EvidenceRejected(
            f"the VCEK's hwID does not equal the report's chip_id {report.chip_id.hex()[:16]}...: the VCEK is "
            "another chip's"
        )


def _product(ark: x509.Certificate) -> str:
    names = ark.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common = str(names[0].value) if names else ""
    product = common.removeprefix("ARK-")
    return product if _PRODUCT.fullmatch(product) else "unknown"


def _claims(report: SnpReport, product: str) -> SnpClaims:
    return SnpClaims(
        product=product,
        version=report.version,
        measurement=report.measurement.hex(),
        debug_allowed=report.debug_allowed,
        smt_allowed=report.smt_allowed,
        policy=report.policy,
        vmpl=report.vmpl,
        guest_svn=report.guest_svn,
        reported_tcb=report.reported_tcb.as_dict(),
        committed_tcb=report.committed_tcb.as_dict(),
        current_tcb=report.current_tcb.as_dict(),
        chip_id=report.chip_id.hex(),
        host_data=report.host_data.hex(),
        report_data=report.report_data.hex(),
        family_id=report.family_id.hex(),
        image_id=report.image_id.hex(),
        id_key_digest=report.id_key_digest.hex(),
    )


def cache_name(chip_id: bytes, tcb: TcbVersion) -> str:
    """The cache file name of a VCEK: ``<chip_id hex>-<tcb u64 hex>.der``."""
    return f"{chip_id.hex()}-{tcb.raw:016x}.der"


def _product_dirs(trust: SnpTrust) -> Iterator[Path]:
    if trust.cache_dir is None:
        return
    try:
        entries = sorted(p for p in trust.cache_dir.iterdir() if _PRODUCT.fullmatch(p.name) and p.is_dir())
    except OSError:
        return
    yield from entries[:MAX_CACHE_PRODUCTS]


def _read_small(path: Path) -> bytes | None:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CERT_BYTES * 4 + 1)
    except OSError:
        return None
    if len(data) > MAX_CERT_BYTES * 4:
        raise EvidenceRejected(f"the cached certificate file {path} is larger than {MAX_CERT_BYTES * 4} bytes")
    return data


def _cached_vcek(trust: SnpTrust, report: SnpReport) -> x509.Certificate:
    name = cache_name(report.chip_id, report.reported_tcb)
    for product in _product_dirs(trust):
        data = _read_small(product / "vcek" / name)
        if data is not None:
            return load_certificate(data, f"cached VCEK {product / 'vcek' / name}")
    where = "no cache directory is configured" if trust.cache_dir is None else f"none cached as */vcek/{name}"
    raise EvidenceRejected(f"the sev-snp evidence carries no VCEK and {where}: supply the chip's VCEK")


def _cached_asks(trust: SnpTrust, issuer: x509.Name) -> Iterator[x509.Certificate]:
    for product in _product_dirs(trust):
        data = _read_small(product / "ask.pem")
        if data is None:
            continue
        try:
            certificates = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise EvidenceRejected(f"the cached ASK file {product / 'ask.pem'} is not PEM X.509") from exc
        yield from (c for c in certificates if c.subject == issuer)
