"""What people read in tables: no Python reprs, no None/False, every time with its zone, no markup injection."""

from __future__ import annotations

import pytest

from keysteward.cli.output import cell, console, table


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, "-"),
        ("", "-"),
        (False, "no"),
        (True, "yes"),
        ({"job": "j-1", "state": "running"}, "job=j-1, state=running"),
        (["a", None, 3], "a, -, 3"),
        ("2026-12-04T18:15:35.241358", "2026-12-04T18:15:35.241358Z"),  # SQLite's naive UTC
        ("2026-12-04T18:15:35+00:00", "2026-12-04T18:15:35+00:00"),
        ("2026-12-04T18:15:35Z", "2026-12-04T18:15:35Z"),
        (7, "7"),
    ],
)
def test_cells(value: object, shown: str) -> None:
    assert cell(value) == shown


def test_a_table_prints_markup_as_text() -> None:
    with console.capture() as captured:
        table([{"name": "[red]boom[/red]", "ok": None}], ["name", "ok"])
    text = captured.get()
    assert "[red]boom[/red]" in text and "None" not in text
