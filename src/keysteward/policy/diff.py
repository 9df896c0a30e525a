"""A unified diff from one policy set to another, file by file: the audit record of a policy change."""

from __future__ import annotations

import difflib
from collections.abc import Mapping


def diff(old: Mapping[str, str], new: Mapping[str, str]) -> str:
    """A unified diff from one policy set to another, file by file, for the audit record of a change."""
    out: list[str] = []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        out.extend(
            difflib.unified_diff(
                _lines(before),
                _lines(after),
                fromfile=f"a/{name}" if before is not None else "/dev/null",
                tofile=f"b/{name}" if after is not None else "/dev/null",
            )
        )
    return "".join(out)


def _lines(text: str | None) -> list[str]:
    lines = (text or "").splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n\\ No newline at end of file\n"
    return lines
