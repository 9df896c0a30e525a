"""What the agent and the proxy write to their status files, read back for ``agent status`` and ``proxy status``.

Both daemons write one JSON object (never key bytes): a header (``agent`` or ``proxy``: pid, start, update
time) and one entry per volume or export. Reading it is all a status command does, so it works without the
daemon's privileges to the volumes and without reaching the key manager.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from keysteward.errors import KeystewardError

MAX_STATUS_BYTES = 4 * 1024 * 1024
COLUMNS = ("state", "reason", "lease_expires_at", "last_action", "last_error")


def read_status(path: str, kind: str) -> dict[str, Any]:
    """The status file at ``path`` of a daemon of ``kind`` (``agent`` or ``proxy``); a clear error otherwise."""
    try:
        raw = Path(path).read_bytes()[: MAX_STATUS_BYTES + 1]
    except OSError as exc:
        raise KeystewardError(
            f"no {kind} status at {path}: {exc.strerror} (is the {kind} running, with this status file?)",
            code="status_unavailable",
        ) from None
    try:
        data = json.loads(raw) if len(raw) <= MAX_STATUS_BYTES else None
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get(kind), dict):
        raise KeystewardError(f"{path} is not a {kind} status file", code="status_unreadable")
    return data


def status_lines(data: dict[str, Any], kind: str, items: str) -> str:
    """Human lines: the daemon's header, then one line per volume or export."""
    head = data[kind]
    lines = [f"{kind} pid {head.get('pid')} since {head.get('started_at')}, updated {head.get('updated_at')}"]
    entries = data.get(items)
    for name, entry in sorted(entries.items()) if isinstance(entries, dict) else []:
        if not isinstance(entry, dict):
            continue
        shown = [f"{column}={entry[column]}" for column in COLUMNS if entry.get(column) not in (None, "")]
        lines.append(f"  {name}: " + " ".join(shown))
    if len(lines) == 1:
        lines.append(f"  (no {items})")
    return "\n".join(lines) + "\n"
