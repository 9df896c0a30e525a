"""``keysteward host run``: the agent of a hypervisor host (docs/hosts.md).

It long-polls the key manager for this host's orders (an order arrives the moment it is made; each fetch
waits up to ``poll_seconds``) and carries each out:

- ``start`` / ``restore``: a VM release on the access path (``vm.start`` / ``vm.restore``) with this host's
  certificate, a fresh TPM quote and its hardware facts (:mod:`keysteward.host.hardware`), all bound to the
  nonce; on a permit the disks are served and QEMU launched (:mod:`keysteward.host.running`); a restore first
  authenticates the whole state file, then loads it (:mod:`keysteward.host.vm_state`). A refusal launches
  nothing and is reported with its reason code and message (the policies that denied it).
- ``snapshot`` / ``suspend``: ``vm.snapshot`` (the VM's lease token proves this host runs it), then the
  state saved encrypted; the guest runs on (snapshot) or is stopped and its lease ended (suspend).
- ``stop``: the guest paused and ended, its keys wiped, its lease ended.
- ``migrate`` / ``migrate-out``: a live migration's destination and source (:mod:`keysteward.host.migration`).

Between orders it renews each VM's lease every ``renew_seconds``: ``revoked``, ``shred`` and ``expired``
stop the VM at once (paused, QEMU ended, the disks' and VM's keys wiped); while the key manager cannot be
reached a VM runs for its grace, then is stopped the same way. Each outcome is reported on its order.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from keysteward.agent.client import AgentClient
from keysteward.agent.daemon import effective_grace, lock_deadline
from keysteward.agent.process import harden_process, logline, sd_notify, write_status
from keysteward.agent.unlock import UnlockOptions
from keysteward.crypto.x509identity import peek_identity, pem_to_der
from keysteward.errors import KeystewardError, NotFound, Unavailable
from keysteward.host import migration, vm_state
from keysteward.host.client import HostClient, VmKeys
from keysteward.host.config import HostConfig
from keysteward.host.hardware import read_hardware
from keysteward.host.qemu import probe_accel
from keysteward.host.running import LoopThread, RunningVm, launch

log = logging.getLogger("keysteward.host")


def host_identity(cert_file: str) -> tuple[str, str]:
    """(tenant, host name) from the host certificate's identity URI (the key manager verifies it)."""
    with open(cert_file, encoding="ascii", errors="replace") as f:
        identity = peek_identity(pem_to_der(f.read()))
    if identity.role != "host":
        raise KeystewardError(f"{cert_file} is a {identity.role} certificate, not a host's", code="host_config")
    return identity.tenant, identity.name


class HostAgent:
    log = log

    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.tenant, self.name = host_identity(config.kms.cert_file)
        self.options = UnlockOptions(
            identity="host", client_cert=(config.kms.cert_file, config.kms.key_file), ca_file=config.kms.ca_file,
            timeout=config.kms.timeout, tpm=config.tpm, tpm_pcrs=config.tpm_pcrs,
        )  # fmt: skip
        self.http = AgentClient(config.url, ca_file=config.kms.ca_file, timeout=config.kms.timeout,
                                client_cert=(config.kms.cert_file, config.kms.key_file))  # fmt: skip
        self.client = HostClient(self.http, self.tenant)
        self.loop = LoopThread()
        self.vms: dict[str, RunningVm] = {}
        self.hardware = read_hardware()
        self._accel: str | None = None
        self._stop = threading.Event()
        os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
        os.makedirs(config.snapshot_dir, mode=0o700, exist_ok=True)

    # -- the loop --------------------------------------------------------------------------------------
    def run(self) -> None:
        harden_process()
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        log.info(logline("host_started", host=self.name, tenant=self.tenant, hardware=self.hardware))
        sd_notify("READY=1")
        try:
            while not self._stop.is_set():
                if not self.step(wait=self._order_wait()):
                    self._stop.wait(self.config.poll_seconds)
        finally:
            self.shutdown()

    def stopping(self) -> bool:
        """Whether the agent was told to stop (long waits of an order check it)."""
        return self._stop.is_set()

    def _order_wait(self) -> float:
        """How long the next order fetch may wait: ``poll_seconds``, less when a lease renewal is due sooner."""
        due = min((vm.next_renewal for vm in self.vms.values()), default=float("inf"))
        return max(0.0, min(self.config.poll_seconds, due - time.monotonic()))

    def step(self, wait: float = 0.0) -> bool:
        """Fetch and carry out orders (the fetch waits up to ``wait`` s for one), renew, write the status;
        False when the fetch did not wait (failed, or nothing to wait for): the caller pauses then."""
        began = time.monotonic()
        try:
            orders = self.client.orders(wait)
        except KeystewardError as exc:
            log.warning(logline("orders_unavailable", code=exc.code))
            orders = []
        # the fetch held the time (a server that does not long-poll answers at once: pause then)
        waited = bool(orders) or (wait > 0 and time.monotonic() - began >= wait / 2)
        for order in orders:
            self._carry_out(order)
        self._renew_due()
        self._status()
        return waited

    def shutdown(self) -> None:
        for vm in list(self.vms.values()):
            self._end(vm, "host_stopping", end_lease=True)
        self.loop.close()
        self.http.close()
        self._status()

    # -- orders ----------------------------------------------------------------------------------------
    def _carry_out(self, order: dict[str, Any]) -> None:
        order_id, kind, vm_id = str(order.get("id")), str(order.get("kind")), str(order.get("vm_id"))
        log.info(logline("order", order=order_id, kind=kind, vm=order.get("vm")))
        began = time.monotonic()
        try:
            if kind in ("start", "restore"):
                result = self._start(vm_id, order.get("snapshot_id") if kind == "restore" else None)
            elif kind in ("snapshot", "suspend"):
                result = self._snapshot(vm_id, stop=kind == "suspend")
            elif kind == "migrate":
                result = migration.incoming(self, order)
            elif kind == "migrate-out":
                result = migration.outgoing(self, order)
            elif kind == "stop":
                vm = self._running(vm_id)
                self._end(vm, "stopped", end_lease=True)
                result = {"stopped": vm.name}
            else:
                raise KeystewardError(f"unknown order kind {kind[:20]!r}", code="bad_order")
        except KeystewardError as exc:
            log.warning(logline("order_failed", order=order_id, kind=kind, code=exc.code, reason=exc.message[:300]))
            self._report(order_id, False, {"code": exc.code, "message": exc.message[:1000]})
            return
        except Exception as exc:  # a bug must not take the host's other VMs down with it
            log.exception(logline("order_error", order=order_id, kind=kind, error=type(exc).__name__))
            self._report(
                order_id, False, {"code": "host_error", "message": f"the host agent failed: {type(exc).__name__}"}
            )
            return
        result["order_seconds"] = round(time.monotonic() - began, 3)  # the whole order: permit, keys, QEMU
        self._report(order_id, True, result)

    def _report(self, order_id: str, ok: bool, result: dict[str, Any]) -> None:
        try:
            self.client.report(order_id, ok, result)
        except KeystewardError as exc:
            log.warning(logline("report_failed", order=order_id, code=exc.code))

    def _running(self, vm_id: str) -> RunningVm:
        vm = self.vms.get(vm_id)
        if vm is None:
            raise NotFound("the VM is not running on this host", code="vm_not_running")
        return vm

    def accel(self, keys: VmKeys) -> str:
        if self.config.accel != "auto":
            return self.config.accel
        if self._accel is None:
            from pathlib import Path

            kernel, initrd = keys.launch.get("kernel"), keys.launch.get("initrd")
            if isinstance(kernel, str) and isinstance(initrd, str):
                self._accel = probe_accel(Path(kernel), Path(initrd), qemu=self.config.qemu)
        return self._accel or "tcg"

    def _start(self, vm_id: str, snapshot: Any) -> dict[str, Any]:
        if vm_id in self.vms:
            if snapshot is None:
                return {"already_running": self.vms[vm_id].name}
            raise KeystewardError("the VM runs here: stop it before restoring a snapshot", code="vm_running")
        keys = self.client.release(vm_id, self.hardware, self.options.platform_evidence(),
                                   snapshot=str(snapshot) if snapshot else None)  # fmt: skip
        began, checked = time.monotonic(), 0.0
        try:
            if snapshot:
                assert keys.snapshot_path is not None
                checked = time.monotonic()
                vm_state.check(keys.key.view(), keys.snapshot_path, self.tenant, vm_id, str(snapshot))
                checked = time.monotonic() - checked
            vm = launch(keys, self.loop, self.config.state_dir, accel=self.accel(keys), qemu=self.config.qemu,
                        incoming=bool(snapshot))  # fmt: skip
        except BaseException:
            self._give_back(keys)
            raise
        self._leased(vm, time.monotonic())
        self.vms[vm_id] = vm
        result: dict[str, Any] = {"vm": vm.name, "host": self.name, "accel": vm.accel,
                                  "serial_log": str(vm.run_dir / "serial.log"), "lease": keys.lease.id}  # fmt: skip
        if snapshot:
            try:
                assert keys.snapshot_path is not None
                result["load_seconds"] = round(vm_state.restore(vm, self.tenant, str(snapshot), keys.snapshot_path), 3)
                result["check_seconds"] = round(checked, 3)
            except BaseException:
                self._end(vm, "restore_failed", end_lease=True)
                raise
        result["seconds"] = round(time.monotonic() - began, 3)
        log.info(logline("vm_started", vm=vm.name, accel=vm.accel, restored=snapshot))
        return result

    def _give_back(self, keys: VmKeys) -> None:
        try:
            self.http.end(keys.lease)
        except KeystewardError:
            pass  # the lease runs out on its own
        keys.wipe()

    def _snapshot(self, vm_id: str, *, stop: bool) -> dict[str, Any]:
        vm = self._running(vm_id)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = os.path.join(self.config.snapshot_dir, f"{vm.vm_id}-{stamp}-{uuid.uuid4().hex[:8]}.ksvm")
        snapshot_id = self.client.snapshot_permit(vm_id, vm.keys.lease, path)
        try:
            saved = vm_state.save(vm, self.tenant, snapshot_id, path)
        finally:
            if not stop:
                try:
                    vm.qemu.resume()
                except KeystewardError as exc:
                    log.warning(logline("resume_failed", vm=vm.name, code=exc.code))
        if stop:
            self._end(vm, "suspended", end_lease=True)
        log.info(logline("vm_saved", vm=vm.name, snapshot=snapshot_id, bytes=saved.size))
        return {"snapshot": snapshot_id, "path": saved.path, "size": saved.size, "state_bytes": saved.state_bytes,
                "seconds": round(saved.seconds, 3), "downtime_ms": saved.downtime_ms, "stopped": stop,
                "qemu_seconds": round(saved.qemu_seconds, 3), "sync_seconds": round(saved.sync_seconds, 3)}  # fmt: skip

    # -- leases ----------------------------------------------------------------------------------------
    def _leased(self, vm: RunningVm, now: float) -> None:
        lease = vm.keys.lease
        left = (lease.expires_at - datetime.now(UTC)).total_seconds()
        vm.expires = now + max(0.0, left)
        vm.last_renewal, vm.failing_since = now, None
        vm.next_renewal = now + max(0.5, lease.renew_seconds)

    def _renew_due(self) -> None:
        now = time.monotonic()
        for vm in list(self.vms.values()):
            if now < vm.next_renewal:
                continue
            try:
                answer = self.http.renew(vm.keys.lease)
            except Unavailable:
                vm.failing_since = vm.failing_since or now
                grace = effective_grace(vm.keys.lease.grace_seconds, self.config.kms.grace_seconds)
                deadline = lock_deadline(expires=vm.expires, last_success=vm.last_renewal,
                                         failing_since=vm.failing_since, grace=grace)  # fmt: skip
                if now >= deadline:
                    self._end(vm, "kms_unreachable", end_lease=False)
                else:
                    vm.next_renewal = now + min(5.0, vm.keys.lease.renew_seconds)
                continue
            except KeystewardError as exc:  # lease_not_found and the like: the lease is gone
                self._end(vm, exc.code, end_lease=False)
                continue
            if answer.action == "continue" and answer.expires_at is not None:
                vm.keys.lease.expires_at = answer.expires_at
                self._leased(vm, now)
            else:
                self._end(vm, answer.action, end_lease=False)

    def _end(self, vm: RunningVm, reason: str, *, end_lease: bool) -> None:
        self.vms.pop(vm.vm_id, None)
        lease = vm.keys.lease
        try:
            vm.stop(self.loop, reason)
        finally:
            if end_lease:
                try:
                    self.http.end(lease)
                except KeystewardError as exc:
                    log.warning(logline("lease_end_failed", vm=vm.name, code=exc.code))
            lease.wipe()
        log.info(logline("vm_ended", vm=vm.name, reason=reason))

    def _status(self) -> None:
        if self.config.status_file is None:
            return
        write_status(self.config.status_file, self.status())

    def status(self) -> dict[str, Any]:
        vms = {
            vm.name: {"vm_id": vm.vm_id, "accel": vm.accel, "lease": vm.keys.lease.id,
                      "lease_expires_at": vm.keys.lease.expires_at.isoformat(), "pid": vm.qemu.process.pid
                      if vm.qemu.process else None}
            for vm in self.vms.values()
        }  # fmt: skip
        return {"host": self.name, "tenant": self.tenant, "hardware": self.hardware, "vms": vms,
                "updated_at": datetime.now(UTC).isoformat()}  # fmt: skip
