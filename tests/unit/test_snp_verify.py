"""SEV-SNP verification: AMD's real Milan report verifies with AMD's chain, and every forgery fails.

Protocol cases use a TEST chain (tests/support/snp_chain.py) that only ``chain.trust()`` accepts.
"""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from keysteward.attest.errors import EvidenceRejected
from keysteward.attest.snp import SnpTrust, cache_name, load_certificate, verify_report, verify_snp
from keysteward.formats.snp import TcbVersion
from tests.support.snp_chain import (
    MILAN_NOW,
    POLICY_DEBUG,
    TestChain,
    make_chain,
    milan,
    shared_chain,
    sign_report,
    signed_part,
    tcb_u64,
)

pytestmark = pytest.mark.unit

NOW = datetime.now(UTC)
BIND = os.urandom(32)
REPORT_DATA = BIND + bytes(32)


def rejected(
    evidence: Any, trust: SnpTrust, *, code: str = "evidence_invalid", match: str | None = None, **kw: Any
) -> str:
    with pytest.raises(EvidenceRejected, match=match) as caught:
        verify_snp(evidence, trust, binding=kw.get("binding", BIND), now=kw.get("now", NOW))
    assert caught.value.code == code
    assert caught.value.status == 403
    return caught.value.message


@pytest.fixture(scope="module")
def chain() -> TestChain:
    return shared_chain()


@pytest.fixture(scope="module")
def good(chain: TestChain) -> dict[str, str]:
    return chain.evidence(chain.report(REPORT_DATA))


# --- the known answer: AMD's real Milan report ---------------------------------------------------------


def milan_certs() -> tuple[bytes, x509.Certificate, x509.Certificate, x509.Certificate]:
    vector = milan()
    vcek = load_certificate(vector.vcek_der, "VCEK")
    return (
        vector.report,
        vcek,
        x509.load_pem_x509_certificate(vector.ask_pem),
        x509.load_pem_x509_certificate(vector.ark_pem),
    )


def test_milan_report_verifies_with_amds_chain() -> None:
    report, vcek, ask, ark = milan_certs()
    claims = verify_report(report, vcek, [ask, ark], SnpTrust.default(), now=MILAN_NOW)
    assert claims.product == "Milan"
    assert claims.version == 2 and claims.vmpl == 0 and claims.guest_svn == 0
    assert claims.measurement == report[0x90:0xC0].hex()
    assert claims.measurement.startswith("7a1e5c266c0108dbc9bb94fa92695132")
    assert claims.chip_id == report[0x1A0:0x1E0].hex() and claims.chip_id.startswith("d49554ec717f4e5b")
    assert claims.reported_tcb == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 0x73}
    assert claims.committed_tcb == claims.reported_tcb
    assert claims.debug_allowed is False and claims.policy == 0x30000
    context = claims.claims()
    assert context["tee"] == "sev-snp" and context["debug"] is False
    assert context["tcb"] == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 0x73}
    assert context["measurement"] == claims.measurement and context["chip_id"] == claims.chip_id


def test_milan_report_verifies_with_built_in_ask_and_ark_only() -> None:
    report, vcek, _, _ = milan_certs()
    assert verify_report(report, vcek, [], SnpTrust.default(), now=MILAN_NOW).product == "Milan"


def test_milan_through_evidence_is_genuine_but_bound_to_another_request() -> None:
    """Its report_data is not ours: a genuine report replayed for our request is a binding mismatch."""
    vector = milan()
    rejected(vector.evidence(), SnpTrust.default(), code="binding_mismatch", now=MILAN_NOW)
    bound = vector.report[0x50:0x70]
    rejected(vector.evidence(), SnpTrust.default(), code="binding_mismatch", now=MILAN_NOW, binding=bound)


@pytest.mark.parametrize("offset", [0x00, 0x08, 0x30, 0x38, 0x50, 0x90, 0xC0, 0x180, 0x1A0, 0x1E8, 0x29F])
def test_milan_report_with_a_flipped_bit_fails(offset: int) -> None:
    report, vcek, ask, ark = milan_certs()
    damaged = bytearray(report)
    damaged[offset] ^= 0x04
    with pytest.raises(EvidenceRejected) as caught:
        verify_report(bytes(damaged), vcek, [ask, ark], SnpTrust.default(), now=MILAN_NOW)
    assert caught.value.code == "evidence_invalid"


def test_milan_vcek_outside_its_validity_fails() -> None:
    report, vcek, ask, ark = milan_certs()
    with pytest.raises(EvidenceRejected, match=r"VCEK .* is not valid at"):
        verify_report(report, vcek, [ask, ark], SnpTrust.default(), now=datetime(2031, 1, 1, tzinfo=UTC))


def test_milan_report_does_not_verify_under_a_test_root(chain: TestChain) -> None:
    report, vcek, ask, ark = milan_certs()
    with pytest.raises(EvidenceRejected, match="not a trusted AMD root"):
        verify_report(report, vcek, [ask, ark], chain.trust(), now=MILAN_NOW)


# --- protocol: the test chain --------------------------------------------------------------------------


def test_good_evidence_verifies_and_exposes_claims(chain: TestChain, good: dict[str, str]) -> None:
    claims = verify_snp(good, chain.trust(), binding=BIND, now=NOW)
    assert claims.report_data == REPORT_DATA.hex()
    assert claims.chip_id == chain.chip_id.hex() and claims.reported_tcb == chain.tcb
    assert claims.measurement == bytes(range(48)).hex() and claims.product == "Test"


def test_test_chain_is_never_trusted_by_default(good: dict[str, str]) -> None:
    rejected(good, SnpTrust.default(), match="self-made chain")
    rejected({k: v for k, v in good.items() if k != "ark"}, SnpTrust.default(), match="not signed by")


def test_debug_bit_is_parsed_and_left_to_policy(chain: TestChain) -> None:
    evidence = chain.evidence(chain.report(REPORT_DATA, policy=0x30000 | POLICY_DEBUG))
    claims = verify_snp(evidence, chain.trust(), binding=BIND, now=NOW)
    assert claims.debug_allowed is True and claims.claims()["debug"] is True


@pytest.mark.parametrize(
    "offset", [0x00, 0x04, 0x08, 0x10, 0x34, 0x38, 0x48, 0x50, 0x8F, 0x90, 0xC0, 0x180, 0x1A0, 0x29F]
)
@pytest.mark.parametrize("bit", [0, 7])
def test_flipped_bit_in_the_signed_part_fails(chain: TestChain, offset: int, bit: int) -> None:
    report = bytearray(chain.report(REPORT_DATA))
    report[offset] ^= 1 << bit
    rejected(chain.evidence(bytes(report)), chain.trust())


@pytest.mark.parametrize("offset", [0x2A0, 0x2E7, 0x2E8, 0x32F, 0x330, 0x49F])
def test_altered_signature_or_unsigned_tail_fails(chain: TestChain, offset: int) -> None:
    report = bytearray(chain.report(REPORT_DATA))
    report[offset] ^= 0x01
    rejected(chain.evidence(bytes(report)), chain.trust())


def test_report_signed_by_another_vcek_fails(chain: TestChain) -> None:
    other_key, other_cert = chain.issue_vcek()  # same chip, same TCB, same ASK: only the key differs
    report = sign_report(signed_part(report_data=REPORT_DATA, chip_id=chain.chip_id), other_key)
    rejected(chain.evidence(report), chain.trust(), match="signature does not verify")
    # ...and the other VCEK's genuine report does verify with its own certificate.
    verify_snp(chain.with_vcek(other_key, other_cert).evidence(report), chain.trust(), binding=BIND, now=NOW)


def test_self_made_chain_fails(chain: TestChain) -> None:
    evil = make_chain("Milan")  # names copied from AMD's, keys of its own
    evidence = evil.evidence(evil.report(REPORT_DATA))
    rejected(evidence, chain.trust(), match="self-made chain")
    rejected({k: v for k, v in evidence.items() if k != "ark"}, chain.trust(), match="not signed by")


def test_vcek_signed_by_an_untrusted_ask_with_the_right_name_fails(chain: TestChain) -> None:
    evil = make_chain("Test")  # its ASK is called 'SEV-Test' like ours
    key, cert = chain.issue_vcek(signer=evil.ask_key)
    forged = chain.with_vcek(key, cert)
    rejected(forged.evidence(forged.report(REPORT_DATA), parts=("vcek",)), chain.trust(), match="not signed")
    rejected(forged.evidence(forged.report(REPORT_DATA), parts=("vcek", "ask")), chain.trust(), match="not signed")


def test_vcek_signed_with_pkcs1_instead_of_pss_fails(chain: TestChain) -> None:
    key, cert = chain.issue_vcek()
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(key.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    pkcs1 = builder.sign(chain.ask_key, hashes.SHA384(), rsa_padding=padding.PKCS1v15())
    forged = chain.with_vcek(key, pkcs1)
    rejected(forged.evidence(forged.report(REPORT_DATA)), chain.trust(), match="not signed")


@pytest.mark.parametrize(
    "change",
    [
        {"tcb": {"bootloader": 2, "tee": 0, "snp": 8, "microcode": 0x73}},
        {"tcb": {"bootloader": 3, "tee": 1, "snp": 8, "microcode": 0x73}},
        {"tcb": {"bootloader": 3, "tee": 0, "snp": 7, "microcode": 0x73}},
        {"tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 0xD1}},
        {"chip_id": bytes(64)},
        {"chip_id": b"\x40" + bytes(range(0x41, 0x80))[:62] + b"\x00"},
    ],
    ids=["bootloader", "tee", "snp", "microcode", "zero-chip", "other-chip"],
)
def test_vcek_for_another_tcb_or_chip_fails(chain: TestChain, change: dict[str, Any]) -> None:
    key, cert = chain.issue_vcek(**change)
    # The report is genuinely signed by that VCEK's key, but for the chip and TCB of ``chain``.
    report = sign_report(signed_part(report_data=REPORT_DATA, chip_id=chain.chip_id, tcb=chain.tcb), key)
    message = rejected(chain.with_vcek(key, cert).evidence(report), chain.trust())
    assert ("hwID" in message) if "chip_id" in change else ("SPL" in message)


def test_hwid_as_der_octet_string_is_accepted(chain: TestChain) -> None:
    forged = chain.with_vcek(*chain.issue_vcek(hwid_der=True))
    verify_snp(forged.evidence(forged.report(REPORT_DATA)), chain.trust(), binding=BIND, now=NOW)


def test_report_data_for_another_request_is_a_binding_mismatch(chain: TestChain) -> None:
    other = chain.evidence(chain.report(os.urandom(32) + bytes(32)))
    message = rejected(other, chain.trust(), code="binding_mismatch", match="another nonce")
    assert BIND.hex() not in message
    tail = chain.evidence(chain.report(BIND + b"\x01" + bytes(31)))
    rejected(tail, chain.trust(), code="binding_mismatch")


@pytest.mark.parametrize(
    ("window", "what"),
    [((-30, -1), "expired"), ((1, 30), "not yet valid")],
)
def test_vcek_outside_its_validity_fails(chain: TestChain, window: tuple[int, int], what: str) -> None:
    start, end = (NOW + timedelta(days=d) for d in window)
    forged = chain.with_vcek(*chain.issue_vcek(not_before=start, not_after=end))
    rejected(forged.evidence(forged.report(REPORT_DATA)), chain.trust(), match=r"VCEK .* is not valid at")


def test_chain_outside_its_validity_fails(chain: TestChain, good: dict[str, str]) -> None:
    rejected(good, chain.trust(), now=NOW + timedelta(days=20 * 365), match="is not valid at")


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"signature_algo": 2}, "signature algorithm 2"),
        ({"vmpl": 4}, "VMPL 4"),
        ({"signing_key": 1}, "key kind 1"),
        ({"version": 3, "cpuid": (0x1A, 0x02, 0x00)}, "Turin"),
        ({"mask_chip_key": True}, "MASK_CHIP_KEY"),
        ({"chip_id": bytes(64)}, "MASK_CHIP_ID"),
    ],
)
def test_signed_reports_with_unacceptable_fields_fail(chain: TestChain, fields: dict[str, Any], match: str) -> None:
    rejected(chain.evidence(chain.report(REPORT_DATA, **fields)), chain.trust(), match=match)


def test_version_3_report_of_milan_verifies(chain: TestChain) -> None:
    evidence = chain.evidence(chain.report(REPORT_DATA, version=3, cpuid=(0x19, 0x01, 0x01)))
    assert verify_snp(evidence, chain.trust(), binding=BIND, now=NOW).version == 3


# --- malformed evidence ---------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"report": b64(bytes(1183))}, "does not parse"),
        ({"report": b64(bytes(1185))}, "larger than 1184"),
        ({"report": b64(bytes(100_000))}, "larger than 1184"),
        ({"report": "not base64!"}, "not valid base64"),
        ({"report": ""}, "non-empty base64"),
        ({"report": 1184}, "non-empty base64"),
        ({"report": None}, "non-empty base64"),
        ({"vcek": b64(b"\x30\x03\x02\x01\x00")}, "not a DER X.509"),
        ({"vcek": b64(bytes(20_000))}, "larger than"),
        ({"ask": "@@@@"}, "not valid base64"),
        ({"type": "sev"}, "unknown platform evidence type"),
        ({"type": None}, "unknown platform evidence type"),
        ({"extra": "x"}, "1 unknown"),
    ],
)
def test_malformed_evidence_is_rejected(
    chain: TestChain, good: dict[str, str], change: dict[str, Any], match: str
) -> None:
    rejected({**good, **change}, chain.trust(), match=match)


def test_missing_report_or_not_an_object(chain: TestChain, good: dict[str, str]) -> None:
    rejected({k: v for k, v in good.items() if k != "report"}, chain.trust(), match="'report'")
    rejected(["sev-snp"], chain.trust(), match="must be an object")
    rejected({}, chain.trust(), match="unknown platform evidence type")


def test_wrong_magic_version_is_rejected(chain: TestChain) -> None:
    report = chain.report(REPORT_DATA, version=7)
    rejected(chain.evidence(report), chain.trust(), match="version 7 is not supported")


def test_messages_carry_no_evidence_bytes(chain: TestChain, good: dict[str, str]) -> None:
    report = bytearray(base64.b64decode(good["report"]))
    report[0x90] ^= 1
    message = rejected({**good, "report": b64(bytes(report))}, chain.trust())
    for secretish in (bytes(report[0x90:0xC0]).hex(), bytes(report[0x2A0:0x2C0]).hex(), good["report"][:40]):
        assert secretish not in message


def test_caller_errors_are_programming_errors(chain: TestChain, good: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        verify_snp(good, chain.trust(), binding=BIND[:31], now=NOW)
    with pytest.raises(ValueError):
        verify_snp(good, chain.trust(), binding=BIND, now=datetime.now())


# --- the operator's certificate cache -------------------------------------------------------------------


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_vcek_and_ask_from_the_cache(chain: TestChain, good: dict[str, str], tmp_path: Path) -> None:
    product = tmp_path / "Test"
    (product / "vcek").mkdir(parents=True)
    name = cache_name(chain.chip_id, TcbVersion.from_u64(tcb_u64(chain.tcb)))
    assert name == f"{chain.chip_id.hex()}-7308000000000003.der"
    (product / "vcek" / name).write_bytes(der(chain.vcek))
    bundle = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (chain.ask, chain.ark))  # KDS cert_chain
    (product / "ask.pem").write_bytes(bundle)
    only_report = {"type": "sev-snp", "report": good["report"]}
    claims = verify_snp(only_report, chain.trust(cache_dir=tmp_path), binding=BIND, now=NOW)
    assert claims.chip_id == chain.chip_id.hex()
    # Without the cached ASK the VCEK has no issuer to check against; a damaged cache file is named.
    (product / "ask.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    rejected(only_report, chain.trust(cache_dir=tmp_path), match="ask.pem is not PEM")
    (product / "ask.pem").unlink()
    rejected(only_report, chain.trust(cache_dir=tmp_path), match="not signed")
    # An ASK the evidence carries is used before the cache is read.
    (product / "ask.pem").write_text("damaged")
    with_ask = {**only_report, "ask": b64(der(chain.ask))}
    verify_snp(with_ask, chain.trust(cache_dir=tmp_path), binding=BIND, now=NOW)


def test_built_in_trust_is_amds_milan_chain() -> None:
    trust = SnpTrust.default()
    vector = milan()
    assert [c.fingerprint(hashes.SHA256()) for c in trust.roots] == [
        x509.load_pem_x509_certificate(vector.ark_pem).fingerprint(hashes.SHA256())
    ]
    assert [c.fingerprint(hashes.SHA256()) for c in trust.asks] == [
        x509.load_pem_x509_certificate(vector.ask_pem).fingerprint(hashes.SHA256())
    ]
    assert trust.cache_dir is None and SnpTrust.default(Path("/x")).cache_dir == Path("/x")


def test_missing_vcek_names_where_it_was_looked_for(chain: TestChain, good: dict[str, str], tmp_path: Path) -> None:
    only_report = {"type": "sev-snp", "report": good["report"]}
    rejected(only_report, chain.trust(), match="no cache directory is configured")
    (tmp_path / "Test" / "vcek").mkdir(parents=True)
    message = rejected(only_report, chain.trust(cache_dir=tmp_path), match="carries no VCEK")
    assert "7308000000000003.der" in message


def test_cached_vcek_of_another_chip_under_this_chips_name_fails(chain: TestChain, tmp_path: Path) -> None:
    other = make_chain("Test", chip_id=b"\x07" * 64)
    (tmp_path / "Test" / "vcek").mkdir(parents=True)
    name = cache_name(chain.chip_id, TcbVersion.from_u64(tcb_u64(chain.tcb)))
    (tmp_path / "Test" / "vcek" / name).write_bytes(der(other.vcek))
    evidence = {"type": "sev-snp", "report": b64(chain.report(REPORT_DATA)), "ask": b64(der(chain.ask))}
    rejected(evidence, chain.trust(cache_dir=tmp_path))
