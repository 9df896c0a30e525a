"""A migration's progress as the source host sees it, reported to the key manager (``vm migrate`` shows it).

:func:`progress_of` turns QEMU's ``query-migrate`` answer into the report the key manager accepts
(``status``, ``transferred_bytes``, ``remaining_bytes``, ``total_bytes``, then ``downtime_ms`` once
completed). :class:`ProgressReporter` posts the latest one every :data:`REPORT_SECONDS` from a thread of
its own: the thread that watches QEMU never waits on the network, so a report in flight can never delay
the switchover (the guest is paused from ``pre-switchover`` until ``migrate-continue``). A report that
fails is dropped: progress is for the operator's eyes, nothing decides on it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Final

from keysteward.errors import KeystewardError

if TYPE_CHECKING:
    from keysteward.host.client import HostClient

REPORT_SECONDS: Final = 0.5
STATUSES: Final = ("setup", "active", "device", "pre-switchover", "completed")


def progress_of(info: dict[str, Any]) -> dict[str, Any] | None:
    """The report for a ``query-migrate`` answer, or None when QEMU's answer has nothing to report."""
    status = info.get("status")
    ram = info.get("ram")
    if status not in STATUSES or not isinstance(ram, dict):
        return None
    report: dict[str, Any] = {"status": status}
    for ours, theirs in (("transferred_bytes", "transferred"), ("remaining_bytes", "remaining"),
                         ("total_bytes", "total")):  # fmt: skip
        value = ram.get(theirs)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return None
        report[ours] = value
    downtime = info.get("downtime")
    if status == "completed" and isinstance(downtime, int) and not isinstance(downtime, bool) and downtime >= 0:
        report["downtime_ms"] = downtime
    return report


class ProgressReporter:
    """Posts the latest progress of one migration every :data:`REPORT_SECONDS` until :meth:`close`."""

    def __init__(self, client: HostClient, vm_id: str, migration_id: str) -> None:
        self.client, self.vm_id, self.migration_id = client, vm_id, migration_id
        self._latest: dict[str, Any] | None = None
        self._sent: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="migration-progress", daemon=True)
        self._thread.start()

    def update(self, info: dict[str, Any]) -> None:
        report = progress_of(info)
        if report is not None:
            self._latest = report

    def _post(self, report: dict[str, Any]) -> None:
        try:
            self.client.migration_progress(self.vm_id, self.migration_id, report)
            self._sent = report
        except KeystewardError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(REPORT_SECONDS):
            latest = self._latest
            if latest is not None and latest != self._sent:
                self._post(latest)

    def halt(self) -> None:
        """No further reports from the thread (one in flight finishes); does not wait for it."""
        self._stop.set()

    def close(self, final: dict[str, Any] | None = None) -> None:
        """Stop reporting; ``final`` (QEMU's answer once completed) is posted last, from the caller's thread."""
        self._stop.set()
        self._thread.join(timeout=5)
        report = progress_of(final) if final is not None else None
        if report is not None:
            self._post(report)
