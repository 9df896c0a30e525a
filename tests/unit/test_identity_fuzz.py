"""Bounded fuzzing of the identity verifiers: damaged evidence is rejected with EvidenceRejected, never
anything else, and whatever still verifies proves exactly the identity the provider signed."""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keysteward.attest.binding import binding
from keysteward.attest.errors import EvidenceRejected
from keysteward.attest.identity import InstanceIdentity, ProviderTrust, verify_identity
from keysteward.devcloud.provider import DevCloud
from tests.support.fuzz import edits as fuzz_edits
from tests.support.fuzz import mutate
from tests.support.identity import aws_evidence

pytestmark = pytest.mark.unit

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
AUD = "https://kms.example"
NOW = datetime.now(UTC)
BIND = binding(os.urandom(41), os.urandom(32))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cloud = DevCloud.init(tmp_path_factory.mktemp("fuzzcloud") / "state")
    instance = cloud.create()
    document, signature = cloud.aws_document(instance, BIND.hex())
    trusts = [
        ProviderTrust.from_pem("dc", "aws-iid", cloud.certificate_pem(), None),
        ProviderTrust.from_pem("dc", "gcp-jwt", cloud.certificate_pem(), AUD),
    ]
    token = cloud.gcp_token(instance, AUD, BIND.hex(), NOW)
    aws = verify_identity(aws_evidence(document, signature), trusts, binding=BIND, now=NOW, audience=AUD)
    gcp = verify_identity({"type": "gcp-jwt", "token": token}, trusts, binding=BIND, now=NOW, audience=AUD)
    return {"document": document, "signature": signature, "token": token, "trusts": trusts, "aws": aws, "gcp": gcp}


EDITS = fuzz_edits(max_size=4)


def check(evidence: Any, setup: dict[str, Any], expected: InstanceIdentity) -> None:
    try:
        identity = verify_identity(evidence, setup["trusts"], binding=BIND, now=NOW, audience=AUD)
    except EvidenceRejected as exc:
        assert exc.code in {"evidence_invalid", "binding_mismatch"}
        return
    assert identity == expected  # only unsigned bytes changed (DER framing that re-parses the same)


@FUZZ
@given(edits=EDITS)
def test_fuzz_aws_signature(setup: dict[str, Any], edits: list[tuple[int, int, int]]) -> None:
    check(aws_evidence(setup["document"], mutate(setup["signature"], edits)), setup, setup["aws"])


@FUZZ
@given(edits=EDITS)
def test_fuzz_aws_document(setup: dict[str, Any], edits: list[tuple[int, int, int]]) -> None:
    damaged = mutate(setup["document"], edits)
    if damaged == setup["document"]:
        return
    with pytest.raises(EvidenceRejected):
        verify_identity(aws_evidence(damaged, setup["signature"]), setup["trusts"], binding=BIND, now=NOW, audience=AUD)


@FUZZ
@given(edits=EDITS)
def test_fuzz_gcp_token(setup: dict[str, Any], edits: list[tuple[int, int, int]]) -> None:
    token = mutate(setup["token"].encode(), edits).decode("latin-1")
    check({"type": "gcp-jwt", "token": token}, setup, setup["gcp"])


@FUZZ
@given(
    kind=st.sampled_from(["aws-iid", "gcp-jwt", "x"]),
    blob=st.binary(max_size=3000),
    text=st.text(max_size=300),
)
def test_fuzz_garbage(setup: dict[str, Any], kind: str, blob: bytes, text: str) -> None:
    b64 = base64.b64encode(blob).decode()
    for evidence in (
        {"type": kind, "document": b64, "signature": b64},
        {"type": kind, "document": text, "signature": b64},
        {"type": kind, "token": text},
        {"type": kind, "token": b64},
    ):
        with pytest.raises(EvidenceRejected):
            verify_identity(evidence, setup["trusts"], binding=BIND, now=NOW, audience=AUD)
