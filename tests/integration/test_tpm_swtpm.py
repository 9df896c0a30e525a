"""TPM2 attestation against real TPMs: swtpm driven by tpm2-tools through the agent's TpmDevice.

Two TPMs per module: A is manufactured like a real one (EK certificate from a test CA), B is a bare one
that plays "another machine". Every attack the verifier must stop is made with genuine TPM output.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from keysteward.agent.tpm import TpmCommandFailed, TpmDevice
from keysteward.attest.binding import binding
from keysteward.attest.errors import BINDING_MISMATCH, EvidenceRejected
from keysteward.attest.tpm import ak_name, check_ak, make_credential, verify_ek_certificate, verify_quote
from keysteward.formats import tpm2
from tests.support.swtpm import LocalCa, Swtpm, running_swtpm
from tests.support.tools import tool

pytestmark = pytest.mark.integration

PCRS = {"sha256": [0, 1, 7]}


@dataclass
class Tpm:
    swtpm: Swtpm
    device: TpmDevice
    ek: bytes
    ak: bytes
    ca: LocalCa | None


@pytest.fixture(scope="module")
def tpm_a(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tpm]:
    root = tmp_path_factory.mktemp("tpm-a")
    with running_swtpm(root / "state", root / "ca") as (swtpm, ca):
        device = TpmDevice(swtpm.tcti, workdir=root / "work")
        ek, ak = device.ensure_keys()
        yield Tpm(swtpm, device, ek, ak, ca)


@pytest.fixture(scope="module")
def tpm_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tpm]:
    root = tmp_path_factory.mktemp("tpm-b")
    with running_swtpm(root / "state") as (swtpm, _):
        device = TpmDevice(swtpm.tcti, workdir=root / "work")
        ek, ak = device.ensure_keys()
        yield Tpm(swtpm, device, ek, ak, None)


def fresh_binding() -> bytes:
    return binding(os.urandom(32), os.urandom(32))


def tpm2_tool(tpm: Tpm, *argv: str) -> bytes:
    env = {**os.environ, "TPM2TOOLS_TCTI": tpm.swtpm.tcti}
    done = subprocess.run([tool(argv[0], "tpm2-tools"), *argv[1:]], env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


# --- enrollment ------------------------------------------------------------------------------------


def test_ensure_keys_is_idempotent_and_makes_an_attestation_key(tpm_a: Tpm, tmp_path: Path) -> None:
    assert tpm_a.device.ensure_keys() == (tpm_a.ek, tpm_a.ak)
    check_ak(tpm_a.ak)
    tpm2_tool(tpm_a, "tpm2_readpublic", "-c", "0x81010002", "-n", str(tmp_path / "name"))
    assert ak_name(tpm_a.ak) == (tmp_path / "name").read_bytes()
    with pytest.raises(EvidenceRejected, match="lacks sign"):
        check_ak(tpm_a.ek)  # the EK decrypts; it must never pass as an AK


def test_make_credential_is_activated_by_the_tpm_holding_ek_and_ak(tpm_a: Tpm) -> None:
    secret = os.urandom(32)
    assert tpm_a.device.activate(make_credential(tpm_a.ek, ak_name(tpm_a.ak), secret)) == secret


def test_credential_for_another_tpms_ak_or_ek_is_not_activated(tpm_a: Tpm, tpm_b: Tpm) -> None:
    secret = os.urandom(32)
    with pytest.raises(TpmCommandFailed, match="activate the credential"):
        tpm_a.device.activate(make_credential(tpm_a.ek, ak_name(tpm_b.ak), secret))
    with pytest.raises(TpmCommandFailed, match="activate the credential"):
        tpm_a.device.activate(make_credential(tpm_b.ek, ak_name(tpm_a.ak), secret))


def test_credential_file_has_tpm2_makecredentials_layout(tpm_a: Tpm, tmp_path: Path) -> None:
    secret = os.urandom(32)
    (tmp_path / "ek.pub").write_bytes(tpm_a.ek)
    (tmp_path / "secret").write_bytes(secret)
    name = ak_name(tpm_a.ak).hex()
    files = ["-u", str(tmp_path / "ek.pub"), "-s", str(tmp_path / "secret"), "-o", str(tmp_path / "cred")]
    tpm2_tool(tpm_a, "tpm2_makecredential", "-T", "none", "-n", name, *files)
    theirs = (tmp_path / "cred").read_bytes()
    ours = make_credential(tpm_a.ek, ak_name(tpm_a.ak), secret)
    assert ours[:8] == theirs[:8] == bytes.fromhex("badcc0de00000001")
    a, b = tpm2.parse_credential_file(ours), tpm2.parse_credential_file(theirs)
    assert (len(a.integrity_hmac), len(a.enc_identity), len(a.encrypted_secret)) == (32, 34, 256)
    assert (len(b.integrity_hmac), len(b.enc_identity), len(b.encrypted_secret)) == (32, 34, 256)
    assert len(ours) == len(theirs) and ours != theirs  # same layout, fresh random seed
    assert tpm_a.device.activate(theirs) == secret


def test_ecc_ek_and_ecdsa_ak(tpm_b: Tpm) -> None:
    device = TpmDevice(tpm_b.swtpm.tcti, 0x81010011, 0x81010012, ek_algorithm="ecc", ak_algorithm="ecc")
    ek, ak = device.ensure_keys()
    assert tpm2.parse_public(ek).type == tpm2.ALG_ECC and tpm2.parse_public(ak).scheme[0] == tpm2.ALG_ECDSA
    secret = os.urandom(20)
    assert device.activate(make_credential(ek, ak_name(ak), secret)) == secret
    bind = fresh_binding()
    claims = verify_quote(device.quote(bind, {"sha256": [0, 7]}), ak, binding=bind)
    assert sorted(claims.pcrs["sha256"]) == [0, 7]


def test_ek_certificate_chains_to_the_manufacturer_root(tpm_a: Tpm, tpm_b: Tpm) -> None:
    assert tpm_a.ca is not None
    cert = tpm_a.device.ek_certificate()
    assert cert is not None and tpm_b.device.ek_certificate() is None
    now = datetime.now(UTC)
    roots, intermediates = [tpm_a.ca.root], [tpm_a.ca.issuer]
    verify_ek_certificate(cert, tpm_a.ek, roots, now, intermediates=intermediates)
    with pytest.raises(EvidenceRejected, match="another key"):
        verify_ek_certificate(cert, tpm_b.ek, roots, now, intermediates=intermediates)
    with pytest.raises(EvidenceRejected, match="does not chain"):
        verify_ek_certificate(cert, tpm_a.ek, roots, now)  # the intermediate is missing
    with pytest.raises(EvidenceRejected, match="does not chain"):
        verify_ek_certificate(cert, tpm_a.ek, [self_made_root(tpm_a.ca.root)], now, intermediates=intermediates)
    with pytest.raises(EvidenceRejected, match="not valid"):
        verify_ek_certificate(cert, tpm_a.ek, roots, now - timedelta(days=2), intermediates=intermediates)


def self_made_root(like: x509.Certificate) -> x509.Certificate:
    """A root with the same subject as the real one, signed by another key (test root, never trusted)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(like.subject)
        .issuer_name(like.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


# --- quotes ------------------------------------------------------------------------------------------


def test_fresh_quote_verifies_and_reports_the_tpms_pcrs(tpm_a: Tpm) -> None:
    bind = fresh_binding()
    evidence = tpm_a.device.quote(bind, PCRS)
    claims = verify_quote(evidence, tpm_a.ak, binding=bind)
    out = tpm2_tool(tpm_a, "tpm2_pcrread", "sha256:7").decode()
    assert claims.pcrs["sha256"][7] in out.lower()
    assert sorted(claims.pcrs["sha256"]) == [0, 1, 7]
    assert claims.claims()["tee"] == "tpm2" and claims.ak_name == ak_name(tpm_a.ak).hex()


def test_quote_for_another_binding_is_a_binding_mismatch(tpm_a: Tpm) -> None:
    evidence = tpm_a.device.quote(fresh_binding(), PCRS)
    with pytest.raises(EvidenceRejected) as err:
        verify_quote(evidence, tpm_a.ak, binding=fresh_binding())
    assert err.value.code == BINDING_MISMATCH


def test_altered_dropped_or_added_pcrs_are_rejected(tpm_a: Tpm) -> None:
    bind = fresh_binding()
    evidence = tpm_a.device.quote(bind, PCRS)
    altered = with_pcrs(evidence, {**evidence["pcrs"]["sha256"], "7": "ab" * 32})
    with pytest.raises(EvidenceRejected, match="do not hash to the pcrDigest") as err:
        verify_quote(altered, tpm_a.ak, binding=bind)
    assert err.value.code == "evidence_invalid"
    dropped = with_pcrs(evidence, {k: v for k, v in evidence["pcrs"]["sha256"].items() if k != "1"})
    with pytest.raises(EvidenceRejected, match="covers PCRs sha256:0,1,7 but the evidence reports sha256:0,7"):
        verify_quote(dropped, tpm_a.ak, binding=bind)
    added = with_pcrs(evidence, {**evidence["pcrs"]["sha256"], "8": "00" * 32})
    with pytest.raises(EvidenceRejected, match="covers PCRs"):
        verify_quote(added, tpm_a.ak, binding=bind)


def with_pcrs(evidence: dict[str, Any], values: dict[str, str]) -> dict[str, Any]:
    return {**evidence, "pcrs": {"sha256": values}}


def test_quote_by_another_tpms_ak_is_rejected(tpm_a: Tpm, tpm_b: Tpm) -> None:
    bind = fresh_binding()
    evidence = tpm_b.device.quote(bind, PCRS)
    verify_quote(evidence, tpm_b.ak, binding=bind)  # genuine for B...
    with pytest.raises(EvidenceRejected, match="does not verify with the enrolled AK"):
        verify_quote(evidence, tpm_a.ak, binding=bind)  # ...but not by A's enrolled AK


def test_ak_swapped_after_enrollment_is_rejected(tpm_b: Tpm) -> None:
    device = TpmDevice(tpm_b.swtpm.tcti, ak_handle=0x81010013)
    _, enrolled = device.ensure_keys()
    tpm2_tool(tpm_b, "tpm2_evictcontrol", "-c", "0x81010013")  # drop the enrolled AK...
    _, swapped = device.ensure_keys()  # ...and put a new one at the same handle
    assert swapped != enrolled
    bind = fresh_binding()
    evidence = device.quote(bind, PCRS)
    verify_quote(evidence, swapped, binding=bind)
    with pytest.raises(EvidenceRejected, match="does not verify with the enrolled AK"):
        verify_quote(evidence, enrolled, binding=bind)


def test_truncated_oversized_and_wrong_magic_quotes_are_rejected(tpm_a: Tpm) -> None:
    bind = fresh_binding()
    evidence = tpm_a.device.quote(bind, PCRS)
    quote = base64.b64decode(evidence["quote"])
    cases = {
        "truncated": quote[:-5],
        "trailing": quote + b"\0",
        "oversized": quote + bytes(2100),
        "magic": b"\xfe" + quote[1:],
    }
    for what, damaged in cases.items():
        bad = {**evidence, "quote": base64.b64encode(damaged).decode()}
        with pytest.raises(EvidenceRejected) as err:
            verify_quote(bad, tpm_a.ak, binding=bind)
        assert err.value.code == "evidence_invalid", what
    bad = {**evidence, "quote": base64.b64encode(b"\xfe" + quote[1:]).decode()}
    with pytest.raises(EvidenceRejected, match="magic"):
        verify_quote(bad, tpm_a.ak, binding=bind)
    short_sig = {**evidence, "signature": base64.b64encode(base64.b64decode(evidence["signature"])[:-1]).decode()}
    with pytest.raises(EvidenceRejected, match="truncated"):
        verify_quote(short_sig, tpm_a.ak, binding=bind)


def test_certify_attestation_signed_by_the_ak_is_not_a_quote(tpm_a: Tpm, tmp_path: Path) -> None:
    attest, sig = tmp_path / "attest", tmp_path / "sig"
    tpm2_tool(tpm_a, "tpm2_certify", "-c", "0x81010002", "-C", "0x81010002", "-g", "sha256",
              "-o", str(attest), "-s", str(sig), "-f", "tss")  # fmt: skip
    tpm2_tool(tpm_a, "tpm2_flushcontext", "-t")
    evidence = {
        "type": "tpm2-quote",
        "quote": base64.b64encode(attest.read_bytes()).decode(),
        "signature": base64.b64encode(sig.read_bytes()).decode(),
        "pcrs": {"sha256": {"7": "00" * 32}},
    }
    assert tpm2.parse_attest(attest.read_bytes()).type == tpm2.ST_ATTEST_CERTIFY
    with pytest.raises(EvidenceRejected, match="not a quote"):
        verify_quote(evidence, tpm_a.ak, binding=fresh_binding())


def test_pcr_extend_changes_the_quoted_value(tpm_a: Tpm) -> None:
    bind = fresh_binding()
    before = verify_quote(tpm_a.device.quote(bind, {"sha256": [7]}), tpm_a.ak, binding=bind).pcrs["sha256"][7]
    measurement = hashlib.sha256(b"another secure boot policy").digest()
    tpm_a.device.extend(7, measurement.hex())
    bind = fresh_binding()
    after = verify_quote(tpm_a.device.quote(bind, {"sha256": [7]}), tpm_a.ak, binding=bind)
    expected = hashlib.sha256(bytes.fromhex(before) + measurement).hexdigest()
    assert after.pcrs["sha256"][7] == expected != before
    assert after.claims()["pcrs"]["sha256:7"] == expected
