"""Printing: rich tables for people, ``--json`` for scripts; one-line errors."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def emit(data: Any, as_json: bool, human: Callable[[Any], None] | None = None) -> None:
    if as_json or human is None:
        sys.stdout.write(json.dumps(data, indent=None if as_json else 2, default=str) + "\n")
        return
    human(data)


_NAIVE_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?")


def cell(value: Any) -> str:
    """A value as people read it: no Python reprs, no ``None``/``False``, every time with its zone (the
    server keeps UTC; a time SQLite gave back without its zone is UTC)."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k}={cell(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ", ".join(cell(v) for v in value) or "-"
    text = str(value)
    return text + "Z" if _NAIVE_TIME.fullmatch(text) else text


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> None:
    t = Table(title=title)
    shown = [[escape(cell(r.get(c))) for c in columns] for r in rows]
    for i, c in enumerate(columns):
        if c == "id" or c.endswith("_id"):  # typed back: whole, on one line
            width = max([len(c), *(len(row[i]) for row in shown)])
            t.add_column(c, no_wrap=True, min_width=width)
        else:
            t.add_column(c, overflow="fold")  # wrapped, never cut with an ellipsis
    for row in shown:
        t.add_row(*row)
    console.print(t)


def fields(data: dict[str, Any], keys: Sequence[str] | None = None) -> None:
    """``key: value`` lines (all of ``data``'s keys when none are named), values as :func:`cell` shows them."""
    for k in keys if keys is not None else list(data):
        if k in data:
            console.print(f"[bold]{escape(k)}[/bold]: {escape(cell(data[k]))}", highlight=False)


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise SystemExit(code)
