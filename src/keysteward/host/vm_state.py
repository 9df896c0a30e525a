"""A VM's state (memory and devices) saved and restored only encrypted (docs/hosts.md).

Saving: QEMU writes its migration stream into a pipe (``migrate fd:``); a thread of this process reads the
pipe and seals it as it streams (:func:`~keysteward.crypto.vm_snapshot.seal_snapshot`: a fresh snapshot key
wrapped under the VM key, AES-GCM-HKDF streaming, associated data binding tenant, VM and snapshot id) into
``PATH.part`` (sent to disk as it is written: :mod:`keysteward.host.state_file`), renamed to ``PATH`` once
complete and synced. The plaintext exists only in the pipe (widened to 1 MiB, so QEMU stalls less).

Restoring: the whole file is authenticated first under the VM key (a truncated, reordered, tampered or other
VM's snapshot is refused before QEMU sees a byte), then decrypted again into the pipe QEMU loads from
(``migrate-incoming fd:``), each segment written only after its own tag checks.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from keysteward.crypto.vm_snapshot import decrypt_snapshot, seal_snapshot, verify_snapshot
from keysteward.errors import KeystewardError
from keysteward.host.running import RunningVm
from keysteward.host.state_file import ThreadedSink, WriteBehindFile, sync_directory, widen_pipe


@dataclass(frozen=True)
class Saved:
    snapshot_id: str
    path: str
    size: int
    state_bytes: int
    seconds: float
    downtime_ms: int
    qemu_seconds: float = 0.0  # QEMU's part: from the stop to its stream written
    sync_seconds: float = 0.0  # the tail of the file made durable after the stream ended


class _Pump(threading.Thread):
    """Runs ``work`` in a thread and keeps its result or error for :meth:`outcome`."""

    def __init__(self, name: str, work: Any) -> None:
        super().__init__(name=name, daemon=True)
        self._work = work
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._work()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, raised there
            self.error = exc

    def outcome(self, timeout: float) -> Any:
        self.join(timeout)
        if self.is_alive():
            raise KeystewardError("the VM state stream did not finish in time", code="vm_state_timeout")
        if self.error is not None:
            raise self.error
        return self.result


def save(vm: RunningVm, tenant: str, snapshot_id: str, path: str, *, timeout: float = 600.0) -> Saved:
    """Save ``vm``'s state encrypted at ``path``; the guest is left paused (the caller resumes or stops it)."""
    began = time.monotonic()
    part = f"{path}.part"
    read_fd, write_fd = os.pipe()
    os.set_inheritable(write_fd, False)
    widen_pipe(write_fd)
    reader = os.fdopen(read_fd, "rb", buffering=0)
    out = WriteBehindFile(part)
    pump = _Pump(
        "ks-state-seal",
        lambda: seal_snapshot(vm.keys.key.view(), tenant=tenant, vm_id=vm.vm_id, snapshot_id=snapshot_id,
                              src=reader, dst=out),
    )  # fmt: skip
    pump.start()
    try:
        try:
            stats = vm.qemu.save_state_to_fd(write_fd, timeout=timeout)
        finally:
            os.close(write_fd)  # QEMU closed its copy when done: the reader sees the end
        info = pump.outcome(timeout)
        streamed = time.monotonic()
        out.sync()  # most of it is on disk already: WriteBehindFile started the writeback as it went
        synced = time.monotonic() - streamed
    except BaseException:
        out.close()
        reader.close()
        pump.join(5)
        os.unlink(part)
        raise
    out.close()
    reader.close()
    os.replace(part, path)
    sync_directory(os.path.dirname(os.path.abspath(path)))
    return Saved(snapshot_id, path, info.file_bytes, info.plaintext_bytes, time.monotonic() - began,
                 stats.downtime_ms, stats.seconds, synced)  # fmt: skip


def check(vm_key: memoryview, path: str, tenant: str, vm_id: str, snapshot_id: str) -> None:
    """Authenticate the whole file before anything of it is used (raises a clear error)."""
    try:
        with open(path, "rb") as src:
            verify_snapshot(vm_key, src, tenant=tenant, vm_id=vm_id, snapshot_id=snapshot_id)
    except FileNotFoundError:
        raise KeystewardError(f"snapshot file {path} is not on this host", code="snapshot_missing") from None


def restore(vm: RunningVm, tenant: str, snapshot_id: str, path: str, *, timeout: float = 600.0) -> float:
    """Load the (already checked) snapshot into ``vm``, launched with an incoming state, and run it."""
    read_fd, write_fd = os.pipe()
    os.set_inheritable(read_fd, False)
    widen_pipe(write_fd)
    writer = os.fdopen(write_fd, "wb", buffering=0)
    src = open(path, "rb")

    def feed() -> int:
        sink = ThreadedSink(writer)  # the next segment is decrypted while the last one goes to QEMU
        try:
            try:
                plain = decrypt_snapshot(vm.keys.key.view(), src, sink, tenant=tenant, vm_id=vm.vm_id,
                                         snapshot_id=snapshot_id, verify_first=False)  # fmt: skip
            except BaseException:
                with contextlib.suppress(BaseException):  # the first error is the one to report
                    sink.close()
                raise
            sink.close()
            return plain
        finally:
            writer.close()

    pump = _Pump("ks-state-open", feed)
    pump.start()
    try:
        try:
            seconds = vm.qemu.load_state_from_fd(read_fd, timeout=timeout)
        finally:
            os.close(read_fd)
        pump.outcome(timeout)
    finally:
        src.close()
        pump.join(5)
    return float(seconds)
