"""A migration's progress report: read from QEMU on the source, checked by the key manager, drawn by the CLI;
and the ffdhe2048 parameters the destination's QEMU gets (RFC 7919's group, not one it must generate)."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_parameters
from pydantic import ValidationError

from keysteward.cli.migrate_progress import MigrationBar, read_progress
from keysteward.crypto.ffdhe import ffdhe2048_pem, ffdhe2048_prime
from keysteward.host.migration_progress import progress_of
from keysteward.server.migration_schemas import ProgressIn

GOOD: dict[str, Any] = {"status": "active", "transferred_bytes": 300 << 20, "remaining_bytes": 200 << 20,
                        "total_bytes": 512 << 20}  # fmt: skip


def test_the_ffdhe2048_prime_is_rfc_7919s() -> None:
    p = ffdhe2048_prime()
    text = format(p, "X")
    assert p.bit_length() == 2048
    assert text.startswith("FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1")  # RFC 7919, A.1
    assert text.endswith("886B423861285C97FFFFFFFFFFFFFFFF")
    assert pow(2, p - 1, p) == 1 and pow(3, (p - 1) // 2 - 1, (p - 1) // 2) == 1  # a safe prime (Fermat)
    params = load_pem_parameters(ffdhe2048_pem())
    numbers = params.parameter_numbers()  # type: ignore[union-attr]
    assert (numbers.p, numbers.g) == (p, 2)
    assert ffdhe2048_pem().startswith(b"-----BEGIN DH PARAMETERS-----\n")


def test_the_source_reads_query_migrate() -> None:
    info = {"status": "active", "ram": {"transferred": 5, "remaining": 7, "total": 12, "other": 1}, "downtime": 9}
    assert progress_of(info) == {"status": "active", "transferred_bytes": 5, "remaining_bytes": 7, "total_bytes": 12}
    done = {**info, "status": "completed"}
    assert progress_of(done) == {"status": "completed", "transferred_bytes": 5, "remaining_bytes": 7,
                                 "total_bytes": 12, "downtime_ms": 9}  # fmt: skip
    # what QEMU never sends, or a status with nothing to show: no report
    for bad in (
        {},
        {"status": "failed", "ram": info["ram"]},
        {"status": "active"},
        {"status": "active", "ram": []},
        {"status": "active", "ram": {**info["ram"], "remaining": -1}},
        {"status": "active", "ram": {**info["ram"], "total": "12"}},
        {"status": "active", "ram": {**info["ram"], "transferred": True}},
        {"status": "active", "ram": {**info["ram"], "transferred": 1.5}},
    ):
        assert progress_of(bad) is None, bad
    assert "downtime_ms" not in (progress_of({**done, "downtime": -3}) or {})


def test_the_key_manager_takes_a_well_formed_report() -> None:
    assert ProgressIn(**GOOD).remaining_bytes == 200 << 20
    final = ProgressIn(**{**GOOD, "status": "completed", "remaining_bytes": 0, "downtime_ms": 120})
    assert final.downtime_ms == 120
    assert ProgressIn(**{**GOOD, "total_bytes": 1 << 50, "transferred_bytes": 1 << 50}).total_bytes == 1 << 50


@pytest.mark.parametrize(
    "change",
    [
        {"transferred_bytes": (1 << 50) + 1},  # oversized
        {"total_bytes": 1 << 63},
        {"downtime_ms": 3_600_001, "status": "completed"},
        {"remaining_bytes": -1},  # negative
        {"transferred_bytes": -(1 << 20)},
        {"downtime_ms": -5, "status": "completed"},
        {"transferred_bytes": "300"},  # wrong types
        {"remaining_bytes": 1.0},
        {"total_bytes": True},
        {"total_bytes": None},
        {"downtime_ms": "12", "status": "completed"},
        {"status": 1},
        {"status": "failed"},  # not a status a report carries
        {"status": "ACTIVE"},
        {"remaining_bytes": (512 << 20) + 1},  # more remaining than there is
        {"downtime_ms": 10},  # downtime before completion
        {"guest_ram": "AAAA"},  # a field it does not know
    ],
)
def test_the_key_manager_refuses_a_bad_report(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ProgressIn(**{**GOOD, **change})


def test_the_cli_draws_only_what_it_can_read() -> None:
    progress = read_progress({"progress": {**GOOD, "downtime_ms": 40}})
    assert progress is not None and progress.done == 312 << 20 and progress.downtime_ms == 40
    assert read_progress({"progress": GOOD}).downtime_ms is None  # type: ignore[union-attr]
    for bad in (
        None,
        [],
        {},
        {"progress": None},
        {"progress": "50%"},
        {"progress": {**GOOD, "status": None}},
        {"progress": {**GOOD, "total_bytes": -1}},
        {"progress": {**GOOD, "remaining_bytes": 1 << 51}},
        {"progress": {**GOOD, "transferred_bytes": False}},
        {"progress": {**GOOD, "remaining_bytes": GOOD["total_bytes"] + 1}},
    ):
        assert read_progress(bad) is None, bad
    odd = read_progress({"progress": {**GOOD, "downtime_ms": -1}})
    assert odd is not None and odd.downtime_ms is None  # a bad downtime is not shown


def test_no_bar_when_stdout_is_not_a_terminal() -> None:
    with MigrationBar(True) as bar:  # pytest captures stdout: not a terminal
        assert not bar.enabled
        bar.update({"progress": GOOD})
    assert bar._bar is None


def test_a_completed_status_waits_for_its_figures() -> None:
    from keysteward.host.migration import _unsettled

    assert _unsettled({"status": "completed", "total-time": 0, "downtime": 0})  # QEMU's moment in between
    assert not _unsettled({"status": "completed", "total-time": 2100, "downtime": 60})
    assert not _unsettled({"status": "completed"})  # a destination's answer carries no times
    assert not _unsettled({"status": "active", "total-time": 0})
