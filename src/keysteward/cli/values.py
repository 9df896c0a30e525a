"""The option values every group parses the same way: ``K=V`` labels, durations (``90m``, ``12h``, ``30d``)
and points in time (an ISO time, or a duration ago).

Standard library only: the ``volume`` group imports this before anything else is loaded. Mistakes raise
:class:`ValueProblem` (a ValueError) whose text names the option and the offending item, cut to a
readable length; each group turns it into its own usage error.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

MAX_LABELS = 64
MAX_LABEL_KEY = 128
MAX_LABEL_VALUE = 256
MAX_DURATION_SECONDS = 100 * 366 * 86400
"""A century: past that a duration is a typo (and a datetime would overflow)."""
SHOWN = 64
"""How much of a bad item an error quotes."""

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(?:\d{1,12}[smhdw])+")
_PART = re.compile(r"(\d+)([smhdw])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ValueProblem(ValueError):
    """An option value that does not parse; the message names the option."""


def _shown(text: str) -> str:
    return repr(text if len(text) <= SHOWN else text[:SHOWN] + "…")


def parse_labels(items: Sequence[str], option: str = "--label") -> dict[str, str]:
    """``["env=prod", "tier=web"]`` as a dict; each item ``KEY=VALUE`` (the value may be empty or hold ``=``),
    each key once."""
    if len(items) > MAX_LABELS:
        raise ValueProblem(f"{option} is given {len(items)} times; at most {MAX_LABELS} labels")
    labels: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueProblem(f"{option} takes KEY=VALUE, not {_shown(item)} (no '=')")
        if not key.strip() or key != key.strip():
            raise ValueProblem(f"{option} {_shown(item)}: the key is empty or has blanks around it")
        if len(key) > MAX_LABEL_KEY or len(value) > MAX_LABEL_VALUE:
            raise ValueProblem(
                f"{option} {_shown(item)}: keys are at most {MAX_LABEL_KEY} characters, values {MAX_LABEL_VALUE}"
            )
        if _CONTROL.search(item):
            raise ValueProblem(f"{option} {_shown(item)}: control characters are not allowed")
        if key in labels:
            raise ValueProblem(f"{option}: the key {_shown(key)} is given twice")
        labels[key] = value
    return labels


def parse_duration(text: str, option: str) -> int:
    """Seconds of a duration such as ``90m``, ``12h``, ``30d``, ``1h30m`` (units s, m, h, d, w; a unit is
    required, so a bare ``30`` is not taken for seconds or days)."""
    value = text.strip().lower()
    if not _DURATION.fullmatch(value):
        raise ValueProblem(f"{option} takes a duration such as 90m, 12h or 30d, not {_shown(text)}")
    seconds = sum(int(n) * _UNITS[unit] for n, unit in _PART.findall(value))
    if seconds <= 0 or seconds > MAX_DURATION_SECONDS:
        raise ValueProblem(f"{option} {_shown(text)}: a duration from 1s to 100 years")
    return seconds


def parse_since(text: str, option: str, now: datetime | None = None) -> datetime:
    """A point in time, with its zone: an ISO 8601 time (``2026-12-04T10:00:00Z``; one without a zone is UTC,
    as the server keeps it) or a duration ago (``1h``)."""
    value = text.strip()
    if _DURATION.fullmatch(value.lower()):
        return (now or datetime.now(UTC)) - timedelta(seconds=parse_duration(value, option))
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueProblem(
            f"{option} takes an ISO time (2026-12-04T10:00:00Z) or a duration ago (1h, 7d), not {_shown(text)}"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
