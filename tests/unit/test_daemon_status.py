"""Reading a daemon's status file back for ``agent status`` / ``proxy status``: bad files are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keysteward.daemon_status import MAX_STATUS_BYTES, read_status, status_lines
from keysteward.errors import KeystewardError

GOOD = {
    "agent": {"pid": 42, "started_at": "2026-12-04T10:00:00+00:00", "updated_at": "2026-12-04T10:01:00+00:00"},
    "volumes": {
        "data1": {"state": "open", "reason": "released", "lease_expires_at": "2026-12-04T10:01:30+00:00",
                  "last_action": "renew", "last_error": None},
        "logs": {"state": "locked", "reason": "revoked", "lease_expires_at": None, "last_action": "revoked"},
    },
}  # fmt: skip


def test_a_status_file_is_shown_a_line_per_volume(tmp_path: Path) -> None:
    path = tmp_path / "agent.json"
    path.write_text(json.dumps(GOOD))
    text = status_lines(read_status(str(path), "agent"), "agent", "volumes")
    assert text.splitlines() == [
        "agent pid 42 since 2026-12-04T10:00:00+00:00, updated 2026-12-04T10:01:00+00:00",
        "  data1: state=open reason=released lease_expires_at=2026-12-04T10:01:30+00:00 last_action=renew",
        "  logs: state=locked reason=revoked last_action=revoked",
    ]


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (None, "status_unavailable"),  # no file: the daemon is not running with this status file
        (b"", "status_unreadable"),
        (b'{"agent": ', "status_unreadable"),  # truncated
        (b"[1, 2]", "status_unreadable"),
        (json.dumps({"proxy": {}, "exports": {}}).encode(), "status_unreadable"),  # the other daemon's file
        (b" " * (MAX_STATUS_BYTES + 10), "status_unreadable"),  # oversized
        (b"\xff\xfe{", "status_unreadable"),
    ],
)
def test_bad_status_files_are_clear_errors(tmp_path: Path, content: bytes | None, code: str) -> None:
    path = tmp_path / "agent.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(KeystewardError) as info:
        read_status(str(path), "agent")
    assert info.value.code == code


def test_odd_entries_do_not_break_the_listing() -> None:
    text = status_lines(
        {"proxy": {"pid": 1}, "exports": {"a": "not a dict", "b": {"state": "open"}}}, "proxy", "exports"
    )
    assert "  b: state=open" in text and " a:" not in text
    assert "(no exports)" in status_lines({"proxy": {}, "exports": []}, "proxy", "exports")
