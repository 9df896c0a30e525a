"""``vm migrate``'s progress: the RAM transferred and remaining while the state moves, then the downtime.

The source host reports its progress into the migration (``progress`` on the order: ``status``,
``transferred_bytes``, ``remaining_bytes``, ``total_bytes``, and ``downtime_ms`` once completed). On a
terminal (and without ``--json``) :class:`MigrationBar` draws it as a progress bar on stderr; elsewhere
nothing is drawn. :func:`read_progress` takes only well-formed values: a report the CLI cannot read is
not drawn rather than raising.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Final

MIB: Final = 1 << 20
MAX_BYTES: Final = 1 << 50


@dataclass(frozen=True)
class Progress:
    status: str
    transferred: int
    remaining: int
    total: int
    downtime_ms: int | None

    @property
    def done(self) -> int:
        """RAM already sent once: the total less what remains (``transferred`` counts pages sent again)."""
        return max(0, self.total - self.remaining)


def _count(value: Any, limit: int = MAX_BYTES) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        return None
    return value


def read_progress(order: Any) -> Progress | None:
    """The order's ``progress``, or None when it has none or it is not well formed."""
    raw = order.get("progress") if isinstance(order, dict) else None
    if not isinstance(raw, dict) or not isinstance(raw.get("status"), str):
        return None
    counts = [_count(raw.get(k)) for k in ("transferred_bytes", "remaining_bytes", "total_bytes")]
    transferred, remaining, total = counts
    if transferred is None or remaining is None or total is None or remaining > total:
        return None
    downtime = _count(raw.get("downtime_ms"), 3_600_000) if "downtime_ms" in raw else None
    return Progress(raw["status"][:20], transferred, remaining, total, downtime)


def describe(progress: Progress) -> str:
    return (f"{progress.status}: {progress.transferred / MIB:,.0f} MiB transferred, "
            f"{progress.remaining / MIB:,.0f} MiB of {progress.total / MIB:,.0f} MiB remaining")  # fmt: skip


class MigrationBar:
    """A transient progress bar on stderr, drawn only when ``enabled`` and stdout and stderr are terminals."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stdout.isatty() and sys.stderr.isatty()
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> MigrationBar:
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn  # only on a terminal: rich costs start-up

            self._bar = Progress(TextColumn("[bold]migrating[/]"), BarColumn(), TextColumn("{task.description}"),
                                 transient=True)  # fmt: skip
            self._bar.__enter__()
            self._task = self._bar.add_task("waiting for the destination", total=None)
        return self

    def update(self, order: dict[str, Any]) -> None:
        progress = read_progress(order)
        if self._bar is None or progress is None:
            return
        self._bar.update(self._task, total=progress.total or None, completed=progress.done,
                         description=describe(progress))  # fmt: skip

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
