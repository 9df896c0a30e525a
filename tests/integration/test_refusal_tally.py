"""Counted refusals (keysteward.audit.refusals) on a real SQLite audit log: one record per tenant, action and
reason for any number of refusals, bounded sources, counts kept when the log cannot be written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keysteward.audit.log import AuditLog
from keysteward.audit.refusals import MAX_KEYS, MAX_SOURCES, RefusalTally
from keysteward.errors import BadRequest
from keysteward.store.db import Database

pytestmark = pytest.mark.integration
TENANT = "11111111-1111-4111-8111-111111111111"


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'audit.db'}")
    database.migrate()
    return database


def bodies(audit: AuditLog) -> list[dict[str, object]]:
    return [json.loads(link.body) for link in audit.links(TENANT)]


def test_a_thousand_refusals_make_one_record_per_reason(db: Database) -> None:
    audit = AuditLog(db)
    tally = RefusalTally(audit, 3600)
    for i in range(1000):
        tally.count(TENANT, "volume.release", "nonce_invalid", source=f"192.0.2.{i % 20}", target="volume:*",
                    sample=f"volume-{i}\x1b")  # fmt: skip
    tally.count(TENANT, "volume.release", "hpke_invalid", source="192.0.2.99", target="volume:*", sample="k")
    assert tally.pending() == 1001
    assert tally.flush() == 2 and tally.pending() == 0 and tally.flush() == 0
    first, second = bodies(audit)
    assert (first["actor"], first["action"], first["reason"], first["outcome"]) == (
        "anonymous", "volume.release", "nonce_invalid", "denied",
    )  # fmt: skip
    details = first["details"]
    assert isinstance(details, dict)
    assert details["count"] == 1000 and len(details["sources"]) == MAX_SOURCES
    assert details["more_sources"] == 1000 - 50 * MAX_SOURCES  # each source refused 50 times
    assert details["sample"] == "volume-0\\x1b"  # the first, escaped
    assert isinstance(second["details"], dict) and second["details"]["count"] == 1
    tally.stop()
    audit.close()


def test_counts_survive_a_log_that_cannot_be_written(db: Database) -> None:
    closed = AuditLog(db)
    closed.close()  # every record refused: audit_unavailable
    tally = RefusalTally(closed, 3600)
    for _ in range(3):
        tally.count(TENANT, "seal.unseal_share", "not_shamir", source="192.0.2.1", target="cluster", sample="")
    assert tally.flush() == 0 and tally.pending() == 3
    tally.count(TENANT, "seal.unseal_share", "not_shamir", source="192.0.2.2", target="cluster", sample="")
    tally.audit = AuditLog(db)
    assert tally.flush() == 1
    (record,) = bodies(tally.audit)
    assert isinstance(record["details"], dict)
    assert record["details"]["count"] == 4 and record["details"]["sources"] == ["192.0.2.1", "192.0.2.2"]
    tally.audit.close()


def test_pending_keys_are_bounded_and_the_interval_is_checked(db: Database) -> None:
    audit = AuditLog(db)
    tally = RefusalTally(audit, 3600)
    for i in range(MAX_KEYS + 5):
        tally.count(TENANT, "volume.release", f"reason_{i}", source="192.0.2.1", target="volume:*", sample="")
    assert tally.dropped == 5 and tally.pending() == MAX_KEYS
    for bad in (0.0, -1.0, 7200.0):
        with pytest.raises(BadRequest):
            RefusalTally(audit, bad)
    audit.close()
