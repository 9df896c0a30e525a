"""Bounded fuzzing of the SEV-SNP codec and verifier: any input parses or raises the codec's error
(SnpFormatError) or EvidenceRejected, never anything else, and whatever still verifies proves exactly what
the chip signed."""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keysteward.attest.errors import EvidenceRejected
from keysteward.attest.snp import SnpClaims, verify_snp
from keysteward.formats.snp import REPORT_SIZE, SnpFormatError, parse_cert_table, parse_report
from tests.support.fuzz import edits as fuzz_edits
from tests.support.fuzz import mutate
from tests.support.snp_chain import shared_chain

pytestmark = pytest.mark.unit

FUZZ = settings(max_examples=200, deadline=None)
NOW = datetime.now(UTC)
BIND = os.urandom(32)
CHAIN = shared_chain()
REPORT = CHAIN.report(BIND + bytes(32))
GOOD = CHAIN.evidence(REPORT)
TRUST = CHAIN.trust()
EXPECTED = verify_snp(GOOD, TRUST, binding=BIND, now=NOW)

edits = fuzz_edits()


@FUZZ
@given(st.binary(max_size=3 * REPORT_SIZE))
def test_parse_report_any_bytes(data: bytes) -> None:
    try:
        report = parse_report(data)
    except SnpFormatError:
        return
    assert len(data) == REPORT_SIZE and report.version in (2, 3) and report.signed_bytes == data[:0x2A0]


@FUZZ
@given(edits)
def test_parse_report_mutations(changes: list[tuple[int, int, int]]) -> None:
    data = mutate(REPORT, changes)
    try:
        report = parse_report(data)
    except SnpFormatError:
        assert len(data) != REPORT_SIZE or data[:4] not in (b"\x02\0\0\0", b"\x03\0\0\0")
        return
    assert report.report_data == data[0x50:0x90] and report.chip_id == data[0x1A0:0x1E0]


@FUZZ
@given(st.binary(max_size=4096))
def test_parse_cert_table_any_bytes(data: bytes) -> None:
    try:
        found = parse_cert_table(data)
    except SnpFormatError:
        return
    assert set(found) <= {"vcek", "ask", "ark", "vlek"}
    assert all(0 < len(der) <= 16 * 1024 and der in data for der in found.values())


@FUZZ
@given(edits)
def test_verify_snp_damaged_reports(changes: list[tuple[int, int, int]]) -> None:
    damaged = mutate(REPORT, changes)
    evidence = {**GOOD, "report": base64.b64encode(damaged).decode()}
    try:
        claims = verify_snp(evidence, TRUST, binding=BIND, now=NOW)
    except EvidenceRejected as exc:
        assert exc.code in ("evidence_invalid", "binding_mismatch")
        return
    # Only a report whose signed part and tail are untouched may verify (ECDSA signatures are not unique,
    # but nobody here holds the key to make another one).
    assert damaged[:0x2A0] == REPORT[:0x2A0] and damaged[0x330:] == REPORT[0x330:]
    assert claims == EXPECTED


evidence_values = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=40),
    st.binary(max_size=1300).map(lambda b: base64.b64encode(b).decode()),
    st.lists(st.integers(), max_size=3),
)


@FUZZ
@given(
    st.dictionaries(st.sampled_from(["type", "report", "vcek", "ask", "ark", "x"]), evidence_values, max_size=6),
    st.booleans(),
)
def test_verify_snp_any_evidence_object(fields: dict[str, Any], keep_good: bool) -> None:
    evidence = {**GOOD, **fields} if keep_good else fields
    try:
        claims = verify_snp(evidence, TRUST, binding=BIND, now=NOW)
    except EvidenceRejected as exc:
        assert exc.code in ("evidence_invalid", "binding_mismatch")
        return
    assert isinstance(claims, SnpClaims) and claims == EXPECTED
