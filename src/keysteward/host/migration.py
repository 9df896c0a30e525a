"""Live migration on a host (docs/hosts.md, Migration): the destination takes the VM, the source lets go.

Destination (order ``migrate``): a CSR for this end (``ks-migration-<id>-destination``), ``vm.migrate`` with
fresh evidence; on a permit the VM's keys come under an ``incoming`` lease with this end's certificate. The
disks are opened (shared: the source still serves them) and served on this host's own NBD socket, QEMU is
launched with ``-incoming defer``, given ``tls-creds-x509`` (server end) and an ``authz-simple`` accepting
only the source's migration certificate's DN, and listens (``migrate-incoming tcp:``). Then it tells the
key manager it is ready (which orders the source to send) and waits for the state; once it runs, its first
renewal must answer ``continue`` (the leases moved). Any failure stops QEMU and wipes the keys; the report
of the failed order cancels the incoming lease.

Source (order ``migrate-out``): a CSR for its end, its certificate by its live lease's token, QEMU given
``tls-creds-x509`` (client end, the destination's name expected), ``pause-before-switchover`` on, postcopy
never; at ``pre-switchover`` it asks ``vm.switchover`` (retried while the key manager is unreachable, for
the lease's grace), then ``migrate-continue``. Refused or failed before switchover: the migration is
cancelled and the guest runs on here. After completion the VM is ended here: QEMU stops, the keys are wiped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from keysteward.agent.daemon import effective_grace
from keysteward.agent.process import logline
from keysteward.crypto.ffdhe import ffdhe2048_pem
from keysteward.crypto.secret import wipe_bytearray
from keysteward.crypto.x509migration import make_migration_csr
from keysteward.errors import Denied, KeystewardError, Unavailable
from keysteward.host.migration_progress import ProgressReporter
from keysteward.host.qemu import MAX_BANDWIDTH, QemuError, QemuVm
from keysteward.host.qmp import QmpClient, QmpError
from keysteward.host.running import launch

if TYPE_CHECKING:
    from keysteward.host.agent import HostAgent

TLS_ID: Final = "ks-migration-tls"
AUTHZ_ID: Final = "ks-migration-authz"
MIGRATION_TIMEOUT: Final = 300.0
#: the source's migration capabilities: the guest waits at pre-switchover for the lease move, never postcopy,
#: QEMU tells its status changes (bench/migration.py sets the same ones, pause-before-switchover off)
CAPABILITIES: Final = {"pause-before-switchover": True, "postcopy-ram": False, "events": True}
#: the longest a wait for the migration's status goes without asking QEMU (a MIGRATION event ends it sooner)
POLL_SECONDS: Final = 0.25


def write_tls_dir(run_dir: Path, end: str, ca_pem: str, cert_pem: str, key_pem: bytearray) -> Path:
    """QEMU's credentials directory for this end (0700; the key 0600); ``key_pem`` is wiped. The server
    end gets RFC 7919's ffdhe2048 as ``dh-params.pem``: without it QEMU has GnuTLS generate parameters
    (0.4-1 s) before it listens (:mod:`keysteward.crypto.ffdhe`)."""
    prefix = "server" if end == "destination" else "client"
    tls_dir = run_dir / "migration-tls"
    try:
        shutil.rmtree(tls_dir, ignore_errors=True)
        tls_dir.mkdir(mode=0o700)
        (tls_dir / "ca-cert.pem").write_text(ca_pem)
        (tls_dir / f"{prefix}-cert.pem").write_text(cert_pem)
        if prefix == "server":
            (tls_dir / "dh-params.pem").write_bytes(ffdhe2048_pem())
        fd = os.open(tls_dir / f"{prefix}-key.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
    finally:
        wipe_bytearray(key_pem)
    return tls_dir


def remove_tls_dir(tls_dir: Path) -> None:
    for key in tls_dir.glob("*-key.pem"):
        with contextlib.suppress(OSError), open(key, "r+b") as f:
            f.write(b"\0" * os.fstat(f.fileno()).st_size)
    shutil.rmtree(tls_dir, ignore_errors=True)


def listen(vm: QemuVm, tls_dir: Path, source_dn: str, address: str, *, tag: str = "") -> None:
    """The destination's QEMU (launched ``-incoming defer``) listens at ``address``, TLS only, one DN.
    ``tag`` (the migration's id) makes the QEMU objects' ids this migration's own."""
    qmp = vm.monitor()
    tls_id, authz_id = _ids(tag)
    qmp.execute("object-add", {"qom-type": "tls-creds-x509", "id": tls_id, "dir": str(tls_dir),
                               "endpoint": "server", "verify-peer": True})  # fmt: skip
    qmp.execute("object-add", {"qom-type": "authz-simple", "id": authz_id, "identity": source_dn})
    qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    qmp.execute("migrate-set-parameters", {"tls-creds": tls_id, "tls-authz": authz_id})
    qmp.execute("migrate-incoming", {"uri": f"tcp:{address}"})


def send(vm: QemuVm, tls_dir: Path, hostname: str, address: str, *, tag: str = "") -> None:
    """The source's QEMU sends to ``address`` over TLS, expecting ``hostname``; it pauses before switchover.
    ``tag`` as for :func:`listen`: a VM that came in by a migration holds that one's credentials object."""
    qmp = vm.monitor()
    tls_id, _ = _ids(tag)
    qmp.execute("object-add", {"qom-type": "tls-creds-x509", "id": tls_id, "dir": str(tls_dir),
                               "endpoint": "client", "verify-peer": True})  # fmt: skip
    capabilities = [{"capability": name, "state": state} for name, state in CAPABILITIES.items()]
    qmp.execute("migrate-set-capabilities", {"capabilities": capabilities})
    qmp.execute("migrate-set-parameters", {"tls-creds": tls_id, "tls-hostname": hostname,
                                           "max-bandwidth": MAX_BANDWIDTH})  # fmt: skip
    qmp.execute("migrate", {"uri": f"tcp:{address}"})


WATCH_SECONDS: Final = 1.0
"""How often a destination waiting for the state asks whether the migration failed elsewhere."""


def _ids(tag: str) -> tuple[str, str]:
    return (f"{TLS_ID}-{tag}", f"{AUTHZ_ID}-{tag}") if tag else (TLS_ID, AUTHZ_ID)


def wait_for(vm: QemuVm, wanted: str, deadline: float, watch: Any = None) -> dict[str, Any]:
    """``query-migrate`` until its status is ``wanted``; a failed or cancelled migration raises. Between
    two asks it waits for QEMU's next ``MIGRATION`` event (the ``events`` capability), at most
    :data:`POLL_SECONDS`: a status change is seen when QEMU makes it, not a poll interval later (the
    source's guest is paused at ``pre-switchover`` until it is seen). ``watch`` gets each answer."""
    qmp = vm.monitor()
    settle_by: float | None = None
    while True:
        info = qmp.execute("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == wanted:
            settle_by = settle_by or time.monotonic() + 1.0
            if not _unsettled(info) or time.monotonic() > settle_by:
                return dict(info)
            time.sleep(0.001)  # the figures follow the status by a moment: ask again at once
            continue
        if status in ("failed", "cancelled"):
            raise QemuError(f"migration {status}: {str(info.get('error-desc', ''))[:200]}")
        if vm.process is not None and vm.process.poll() is not None:
            raise QemuError(f"QEMU exited during the migration: {vm.stderr_tail()[-200:]}")
        if time.monotonic() > deadline:
            raise QemuError(f"migration not {wanted} in time (status {status})")
        if watch is not None:
            watch(info)
        _next_event(qmp, min(POLL_SECONDS, max(0.001, deadline - time.monotonic())))


def _unsettled(info: dict[str, Any]) -> bool:
    """A source's ``completed`` whose times are not in yet: QEMU sets the status, then (in the migration
    thread, a moment later) ``total-time`` and ``downtime``; asked in between they read 0. A destination's
    answer has no times at all."""
    return info.get("status") == "completed" and "total-time" in info and not info.get("total-time")


def _next_event(qmp: QmpClient, timeout: float) -> None:
    """Until QEMU's next ``MIGRATION`` event (earlier ones kept are dropped) or ``timeout``."""
    while any(e.get("event") == "MIGRATION" for e in qmp.events):
        qmp.wait_event("MIGRATION", 0.001)  # kept from before: the status was asked since
    with contextlib.suppress(QmpError):  # nothing in time; a broken monitor fails the next ask
        qmp.wait_event("MIGRATION", timeout)


def free_address(host: str = "127.0.0.1") -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return f"{host}:{s.getsockname()[1]}"


def incoming(agent: HostAgent, order: dict[str, Any]) -> dict[str, Any]:
    """Order ``migrate``: take the VM from its source (module docstring)."""
    vm_id, migration_id = str(order.get("vm_id")), str(order.get("id"))
    if vm_id in agent.vms:
        raise KeystewardError("the VM runs on this host already", code="vm_running")
    began = time.monotonic()
    key_pem, csr = make_migration_csr(migration_id, "destination")
    try:
        keys, answer = agent.client.migrate_release(vm_id, migration_id, agent.hardware,
                                                    agent.options.platform_evidence(), csr)  # fmt: skip
    except BaseException:
        wipe_bytearray(key_pem)
        raise
    permitted = time.monotonic()
    try:
        vm = launch(keys, agent.loop, agent.config.state_dir, accel=agent.accel(keys), qemu=agent.config.qemu,
                    incoming=True, shared=True)  # fmt: skip
    except BaseException:
        wipe_bytearray(key_pem)
        keys.wipe()
        raise
    launched = time.monotonic()
    tls_dir = write_tls_dir(vm.run_dir, "destination", str(answer.get("ca_pem")),
                            str(answer.get("certificate_pem")), key_pem)  # fmt: skip
    try:
        address = free_address()
        listen(vm.qemu, tls_dir, str(answer.get("source_dn")), address, tag=migration_id)
        agent.client.migration_ready(vm_id, migration_id, address)
        listening = time.monotonic()
        wait_for(vm.qemu, "completed", time.monotonic() + MIGRATION_TIMEOUT,
                 watch=_FailedElsewhere(agent, vm_id, migration_id))  # fmt: skip
        if vm.qemu.status() != "running":
            vm.qemu.resume()
        running_at, running = time.time(), time.monotonic()
        renewal = agent.http.renew(keys.lease)
        if renewal.action != "continue" or renewal.expires_at is None:
            raise Denied(f"the state arrived but the lease did not move here ({renewal.action})",
                         code="switchover_missing")  # fmt: skip
        keys.lease.expires_at = renewal.expires_at
    except BaseException:
        vm.stop(agent.loop, "migration_failed")
        keys.lease.wipe()
        raise
    finally:
        remove_tls_dir(tls_dir)
    agent._leased(vm, time.monotonic())
    agent.vms[vm_id] = vm
    agent.log.info(logline("vm_migrated_in", vm=vm.name, source=answer.get("source"), migration=migration_id))
    return {"vm": vm.name, "host": agent.name, "source": answer.get("source"), "accel": vm.accel,
            "serial_log": str(vm.run_dir / "serial.log"), "lease": keys.lease.id,
            "seconds": round(time.monotonic() - began, 3), "running_at": round(running_at, 3),
            # where the time went (bench/migration.py prints them): from the order's start to the permit,
            # to QEMU launched, to QEMU listening and the source told, to the guest running here
            "steps": {"permit": round(permitted - began, 3), "launch": round(launched - permitted, 3),
                      "listen": round(listening - launched, 3), "transfer": round(running - listening, 3)}}  # fmt: skip


class _FailedElsewhere:
    """The destination's watch while it waits for the state: every :data:`WATCH_SECONDS` it asks the key
    manager for the migration's state; failed (the source's order failed, or an operator cancelled it) ends
    the wait, and with it QEMU and the keys, instead of waiting out the migration's timeout. An unreachable
    key manager changes nothing: the wait goes on to its deadline. A host agent told to stop (SIGTERM) ends
    the wait too: the source's migration fails and the guest runs on there."""

    def __init__(self, agent: HostAgent, vm_id: str, migration_id: str) -> None:
        self.agent, self.vm_id, self.migration_id = agent, vm_id, migration_id
        self.next_at = time.monotonic() + WATCH_SECONDS

    def __call__(self, info: dict[str, Any]) -> None:
        if self.agent.stopping():  # SIGTERM: the VM stays at its source, this host lets go now
            raise KeystewardError("the host agent is stopping", code="host_stopping")
        if time.monotonic() < self.next_at or info.get("status") not in (None, "none", "setup"):
            return  # the state is moving: the source decides from here (its switchover is refused if failed)
        self.next_at = time.monotonic() + WATCH_SECONDS
        try:
            state = self.agent.client.migration_state(self.vm_id, self.migration_id)
        except Unavailable:
            return
        if state == "failed":
            raise KeystewardError("the migration failed at its source or was cancelled", code="migration_failed")


def outgoing(agent: HostAgent, order: dict[str, Any]) -> dict[str, Any]:
    """Order ``migrate-out``: send the VM to the destination, switch the leases over, let go (docstring)."""
    vm = agent._running(str(order.get("vm_id")))
    migration_id = str(order.get("migration_id"))
    began = time.monotonic()
    key_pem, csr = make_migration_csr(migration_id, "source")
    try:
        creds = agent.client.migration_source(vm.vm_id, migration_id, vm.keys.lease, csr)
    except BaseException:
        wipe_bytearray(key_pem)
        raise
    tls_dir = write_tls_dir(vm.run_dir, "source", str(creds.get("ca_pem")), str(creds.get("certificate_pem")),
                            key_pem)  # fmt: skip
    deadline = time.monotonic() + MIGRATION_TIMEOUT
    switched = False
    progress = ProgressReporter(agent.client, vm.vm_id, migration_id)
    info: dict[str, Any] | None = None
    steps: dict[str, float] = {"certificate": time.monotonic() - began}
    try:
        send(vm.qemu, tls_dir, str(creds.get("hostname")), str(creds.get("address")), tag=migration_id)
        sent = time.monotonic()
        wait_for(vm.qemu, "pre-switchover", deadline, progress.update)
        paused = time.monotonic()
        progress.halt()  # no report in flight beside the switchover's round trip
        _switch_over(agent, vm.vm_id, migration_id, vm.keys.lease)
        switched = True
        steps.update(precopy=paused - sent, switchover=time.monotonic() - paused)
        vm.qemu.monitor().execute("migrate-continue", {"state": "pre-switchover"})
        info = wait_for(vm.qemu, "completed", deadline)
    except BaseException:
        if not switched:
            _cancel(vm.qemu)
            raise
        agent._end(vm, "migration_failed_after_switchover", end_lease=False)
        raise
    finally:
        progress.close(info)
        remove_tls_dir(tls_dir)
    agent._end(vm, "migrated", end_lease=False)
    assert info is not None
    ram = info.get("ram") if isinstance(info.get("ram"), dict) else {}
    return {"vm": vm.name, "migrated_to": creds.get("destination"), "downtime_ms": int(info.get("downtime", 0)),
            "total_time_ms": int(info.get("total-time", 0)),
            "transferred_bytes": int((ram or {}).get("transferred", 0)),
            "steps": {name: round(value, 3) for name, value in steps.items()}}  # fmt: skip


def _switch_over(agent: HostAgent, vm_id: str, migration_id: str, lease: Any) -> None:
    """``vm.switchover``, asked again while the key manager cannot be reached, for the lease's grace."""
    grace = effective_grace(lease.grace_seconds, agent.config.kms.grace_seconds)
    give_up = time.monotonic() + max(1.0, grace or 5.0)
    while True:
        try:
            agent.client.switchover(vm_id, migration_id, lease)
            return
        except Unavailable:
            if time.monotonic() > give_up:
                raise
            time.sleep(0.5)


def _cancel(vm: QemuVm) -> None:
    """Before switchover: cancel the migration; the guest runs on here."""
    try:
        qmp = vm.monitor()
        qmp.execute("migrate_cancel")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if qmp.execute("query-migrate").get("status") not in ("active", "pre-switchover", "cancelling", "device"):
                break
            time.sleep(0.05)
        if vm.status() != "running":
            vm.resume()
    except (QmpError, KeystewardError):
        pass  # QEMU gone: the renewal loop notices
