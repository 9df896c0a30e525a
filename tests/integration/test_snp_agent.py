"""The agent's SEV-SNP evidence, from a FileSource directory (the test stand-in for the firmware) through
collect_snp to the verifier: what the agent sends is what the key manager accepts, and only for its binding."""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from keysteward.agent.evidence import EvidenceUnavailable
from keysteward.agent.snp import CERT_FILES, VCEK_KEY_FILE, FileSource, SnpEvidenceParts, collect_snp
from keysteward.attest.errors import EvidenceRejected
from keysteward.attest.snp import SnpTrust, verify_snp
from keysteward.errors import BadRequest
from tests.support.snp_chain import POLICY_DEBUG, shared_chain, write_file_source

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)


@pytest.fixture
def source(tmp_path: Path) -> FileSource:
    return FileSource(write_file_source(tmp_path / "snp", shared_chain()))


def test_collected_evidence_verifies_for_its_binding_only(source: FileSource) -> None:
    binding = os.urandom(32)
    evidence = collect_snp(source, binding)
    assert set(evidence) == {"type", "report", "vcek", "ask", "ark"} and evidence["type"] == "sev-snp"
    report = base64.b64decode(evidence["report"])
    assert report[0x50:0x90] == binding + bytes(32)
    claims = verify_snp(evidence, shared_chain().trust(), binding=binding, now=NOW)
    assert claims.report_data == (binding + bytes(32)).hex()
    with pytest.raises(EvidenceRejected) as caught:
        verify_snp(evidence, shared_chain().trust(), binding=os.urandom(32), now=NOW)
    assert caught.value.code == "binding_mismatch"
    with pytest.raises(EvidenceRejected, match="self-made chain"):
        verify_snp(evidence, SnpTrust.default(), binding=binding, now=NOW)


def test_each_report_is_fresh(source: FileSource) -> None:
    first, second = (base64.b64decode(collect_snp(source, bytes([n]) * 32)["report"]) for n in (1, 2))
    assert first[0x50:0x70] != second[0x50:0x70] and first[0x2A0:0x330] != second[0x2A0:0x330]


def test_template_fields_come_through(tmp_path: Path) -> None:
    chain = shared_chain()
    directory = write_file_source(tmp_path / "snp", chain, chain.report(policy=0x30000 | POLICY_DEBUG, vmpl=1))
    binding = os.urandom(32)
    claims = verify_snp(collect_snp(FileSource(directory), binding), chain.trust(), binding=binding, now=NOW)
    assert claims.debug_allowed and claims.vmpl == 1


def test_certificates_the_source_lacks_are_left_out(tmp_path: Path) -> None:
    directory = write_file_source(tmp_path / "snp", shared_chain())
    (directory / CERT_FILES["ark"]).unlink()
    (directory / CERT_FILES["vcek"]).unlink()
    assert set(collect_snp(FileSource(directory), bytes(32))) == {"type", "report", "ask"}


def test_incomplete_source_is_evidence_unavailable(tmp_path: Path) -> None:
    directory = write_file_source(tmp_path / "snp", shared_chain())
    (directory / VCEK_KEY_FILE).unlink()
    with pytest.raises(EvidenceUnavailable, match="incomplete"):
        collect_snp(FileSource(directory), bytes(32))


class ReplayingSource:
    """A source that answers a report made for someone else (what a replaying host would give)."""

    def __init__(self, report: bytes) -> None:
        self.saved = report

    def report(self, report_data: bytes) -> SnpEvidenceParts:
        return SnpEvidenceParts(self.saved)


def test_agent_refuses_a_report_for_other_report_data(source: FileSource) -> None:
    stale = source.report(os.urandom(64)).report
    with pytest.raises(EvidenceUnavailable, match="other report_data"):
        collect_snp(ReplayingSource(stale), bytes(32))
    with pytest.raises(EvidenceUnavailable, match="not a 1184-byte report"):
        collect_snp(ReplayingSource(stale[:-1]), bytes(32))
    with pytest.raises(BadRequest):
        collect_snp(source, bytes(31))
