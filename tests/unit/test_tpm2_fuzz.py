"""Bounded fuzzing of the TPM2 codec and the quote verifier.

Each parser either parses or raises Tpm2FormatError, never anything else, whatever the bytes; and damaged
evidence made from a real swtpm quote is rejected with EvidenceRejected, while whatever still verifies
proves exactly the PCR values the TPM signed.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keysteward.attest.errors import EvidenceRejected
from keysteward.attest.tpm import make_credential, verify_quote
from keysteward.formats import tpm2
from keysteward.formats.tpm2 import Tpm2FormatError
from tests.support.fuzz import edits as fuzz_edits
from tests.support.fuzz import mutate
from tests.unit.test_tpm2_codec import (
    AK_NAME,
    AK_PUB,
    AKEC_PUB,
    BINDING,
    CERT_ATTEST,
    EK_PUB,
    EKEC_PUB,
    Q_EC_MSG,
    Q_EC_SIG,
    Q_RSA_MSG,
    Q_RSA_SIG,
    evidence,
)

pytestmark = pytest.mark.unit

FUZZ = settings(max_examples=200, deadline=None)
SEEDS: dict[str, tuple[Callable[[bytes], object], list[bytes]]] = {
    "attest": (tpm2.parse_attest, [Q_RSA_MSG, Q_EC_MSG, CERT_ATTEST]),
    "signature": (tpm2.parse_signature, [Q_RSA_SIG, Q_EC_SIG]),
    "public": (tpm2.parse_public, [AK_PUB, AKEC_PUB, EK_PUB, EKEC_PUB]),
    "tpmt_public": (tpm2.parse_tpmt_public, [AK_PUB[2:], EKEC_PUB[2:]]),
    "pcr_selection": (tpm2.parse_pcr_selection, [tpm2.encode_pcr_selection([tpm2.PcrSelection(0xB, (0, 1, 7))])]),
    "digest_list": (tpm2.parse_digest_list, [tpm2.encode_digest_list([bytes(32), bytes(48)])]),
    "credential": (tpm2.parse_credential_file, [make_credential(EK_PUB, AK_NAME, bytes(32))]),
}

edits = fuzz_edits(4096)


def parses_or_refuses(parse: Callable[[bytes], object], data: bytes) -> None:
    try:
        parse(data)
    except Tpm2FormatError:
        pass


@pytest.mark.parametrize("name", SEEDS)
@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes(name: str, data: bytes) -> None:
    parses_or_refuses(SEEDS[name][0], data)


@pytest.mark.parametrize("name", SEEDS)
@FUZZ
@given(which=st.integers(0, 3), changes=edits)
def test_mutated_real_structures(name: str, which: int, changes: list[tuple[int, int, int]]) -> None:
    parse, seeds = SEEDS[name]
    parses_or_refuses(parse, mutate(seeds[which % len(seeds)], changes))


GOOD = verify_quote(evidence("rsassa"), AK_PUB, binding=BINDING)


@FUZZ
@given(field=st.sampled_from(["quote", "signature"]), changes=edits)
def test_mutated_quote_or_signature_never_verifies(field: str, changes: list[tuple[int, int, int]]) -> None:
    good = evidence("rsassa")
    damaged = mutate(base64.b64decode(good[field]), changes)
    bad = {**good, field: base64.b64encode(damaged).decode()}
    try:
        claims = verify_quote(bad, AK_PUB, binding=BINDING)
    except EvidenceRejected:
        return
    assert damaged == base64.b64decode(good[field]) and claims == GOOD


pcr_values = st.dictionaries(
    st.one_of(st.sampled_from(["0", "1", "7", "8", "23", "24", "07", "-1", "x"]), st.text(max_size=3)),
    st.one_of(st.sampled_from(["00" * 32, "11" * 32, "00" * 20]), st.text(max_size=70)),
    max_size=5,
)


@FUZZ
@given(
    pcrs=st.one_of(
        st.dictionaries(st.sampled_from(["sha256", "sha1", "sha384", "md5", ""]), pcr_values, max_size=3),
        st.none(),
        st.lists(st.integers(), max_size=2),
    )
)
def test_fuzzed_pcr_reports_are_rejected_unless_they_are_the_quoted_ones(pcrs: Any) -> None:
    bad = {**evidence("rsassa"), "pcrs": pcrs}
    try:
        claims = verify_quote(bad, AK_PUB, binding=BINDING)
    except EvidenceRejected:
        return
    assert claims == GOOD


@FUZZ
@given(
    doc=st.dictionaries(
        st.sampled_from(["type", "quote", "signature", "pcrs", "other"]),
        st.one_of(st.text(max_size=40), st.binary(max_size=40), st.integers(), st.none()),
        max_size=5,
    )
)
def test_fuzzed_evidence_objects_are_rejected(doc: dict[str, Any]) -> None:
    with pytest.raises(EvidenceRejected):
        verify_quote(doc, AK_PUB, binding=BINDING)
