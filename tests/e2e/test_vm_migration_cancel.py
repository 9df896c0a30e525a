"""An operator cancels a live migration before its switchover (``vm migrate NAME --cancel``).

Real key manager, two host agents, QEMU (TCG): the source's agent is frozen (SIGSTOP) so the migration waits
at ``ready`` with the destination's QEMU listening and the VM's keys in the destination's agent. The cancel
must reach the destination while it waits (a host of another tenant named as the destination is refused
the migration meanwhile): within seconds its QEMU is gone and the key is out of its memory
(scanned), its incoming lease cancelled; the source, thawed, never sends (its order was failed), and the
guest ticks on at its source under the lease it had. A second cancel finds nothing to cancel. And a
destination whose host agent is told to stop (SIGTERM) while it waits ends at once, its QEMU with it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from keysteward.crypto import x509csr
from keysteward.crypto.x509migration import make_migration_csr
from keysteward.host.running import run_name
from tests.e2e.test_vm_hosts import HostProcess, Site, _tenant, hosts, site, ticks  # noqa: F401
from tests.e2e.test_vm_migration import _leases, _qemu_of, web_on_host_a
from tests.support.daemons import memory_holds

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def _other_tenants_host(site: Site, name: str) -> Iterator[httpx.Client]:  # noqa: F811
    """An HTTPS client with a host certificate of another tenant, named ``name``."""
    evil_admin = _tenant(site, "evil")
    with site.server.http(evil_admin) as c:
        assert c.post("/ca/init").status_code == 201
        key_pem, csr = x509csr.make_csr("evil", "host", name)
        issued = c.post("/ca/issue", json={"name": name, "role": "host", "csr_pem": csr.decode()}).json()
    cert, key = site.tmp / "evil-host.pem", site.tmp / "evil-host.key"
    cert.write_text(issued["cert_pem"])
    key.write_bytes(bytes(key_pem))
    with site.server.http(cert=(cert, key)) as client:
        yield client


def test_a_cancelled_migration_ends_at_the_destination_and_the_vm_runs_on(
    site: Site,  # noqa: F811
    hosts: list[HostProcess],  # noqa: F811
) -> None:
    key, host_a, host_b, vm_id = web_on_host_a(site, hosts)
    before = ticks(site, "host-a", vm_id, after=1)
    nothing = site.cli("vm", "migrate", "web", "--cancel", check=False)
    assert nothing.returncode == 1 and "no_migration" in nothing.stderr, nothing.stderr
    both = site.cli("vm", "migrate", "web", "--cancel", "--to", "host-b", check=False)
    assert both.returncode == 2 and "Traceback" not in both.stderr, both.stderr

    os.kill(host_a.proc.pid, signal.SIGSTOP)  # the source takes no order: the migration waits at "ready"
    try:
        order = site.call("POST", "/vms/web/migrate", {"host": "host-b"})
        dest_run = site.tmp / "host-b-run" / run_name(vm_id)
        deadline = time.monotonic() + 90
        while _qemu_of(dest_run) is None or "volume key" not in memory_holds(host_b.proc.pid, {"volume key": key}):
            assert time.monotonic() < deadline, "host-b never got ready"
            time.sleep(0.2)
        time.sleep(1.0)  # listening, ready told
        # a host of another tenant, named as the destination, asks for this migration: refused, nothing moves
        with _other_tenants_host(site, "host-b") as evil:
            _, csr = make_migration_csr(order["id"], "destination")
            body = {"tenant": "acme", "nonce": "x" * 43, "public_key": base64.b64encode(bytes(32)).decode(),
                    "evidence": {"identity": {}}, "hardware": {}, "csr_pem": csr.decode()}  # fmt: skip
            asked = evil.post(f"/vms/{vm_id}/migrations/{order['id']}/release", json=body)
            assert asked.status_code == 403 and asked.json()["code"] == "tenant_mismatch", asked.text
            asked = evil.post(f"/vms/{vm_id}/migrations/{order['id']}/release", json={**body, "tenant": "evil"})
            assert asked.status_code == 403, asked.text  # its own tenant has no such VM or migration
            assert evil.get(f"/vms/{vm_id}/migrations/{order['id']}").status_code == 403
        assert site.call("GET", f"/vm-orders/{order['id']}")["state"] == "taken"
        cancelled = json.loads(site.cli("vm", "migrate", "web", "--cancel", "--json").stdout)
        assert cancelled["migration"] == order["id"] and cancelled["was"] in ("incoming", "ready"), cancelled
        # the destination lets go within its watch interval, not at the migration's timeout
        began = time.monotonic()
        while (answer := site.call("GET", f"/vm-orders/{order['id']}"))["state"] in ("pending", "taken"):
            assert time.monotonic() - began < 20, answer
            time.sleep(0.2)
        assert answer["state"] == "failed" and answer["result"]["code"] == "migration_failed", answer
        host_b.wait(lambda s: s.get("vms") == {}, timeout=15)
        assert _qemu_of(dest_run) is None
        assert memory_holds(host_b.proc.pid, {"volume key": key}) == set()
    finally:
        os.kill(host_a.proc.pid, signal.SIGCONT)
    # the source never sends: its migrate-out order failed at the cancel; the guest goes on at host-a
    later = ticks(site, "host-a", vm_id, after=len(before) + 2)
    assert later[-1][0] > before[-1][0] and host_a.status()["vms"]["web"]["vm_id"] == vm_id
    leases = _leases(site, vm_id)
    assert leases["host:host-a"][0] == "active" and leases["host:host-b"] == ["cancelled"], leases
    records = [r for r in site.audit() if r["action"] == "vm.migration_cancelled"]
    assert len(records) == 1 and records[0]["details"]["migration"] == order["id"]
    again = site.cli("vm", "migrate", "web", "--cancel", check=False)
    assert again.returncode == 1 and "no_migration" in again.stderr
    assert json.loads(site.cli("vm", "show", "web", "--json").stdout)["host"] == "host-a"


def test_a_destination_told_to_stop_while_it_waits_lets_go_at_once(
    site: Site,  # noqa: F811
    hosts: list[HostProcess],  # noqa: F811
) -> None:
    _, host_a, host_b, vm_id = web_on_host_a(site, hosts)
    before = ticks(site, "host-a", vm_id, after=1)
    os.kill(host_a.proc.pid, signal.SIGSTOP)
    try:
        order = site.call("POST", "/vms/web/migrate", {"host": "host-b"})
        dest_run = site.tmp / "host-b-run" / run_name(vm_id)
        deadline = time.monotonic() + 90
        while _qemu_of(dest_run) is None:
            assert time.monotonic() < deadline, "host-b never launched QEMU"
            time.sleep(0.2)
        time.sleep(1.0)
        began = time.monotonic()
        host_b.proc.send_signal(signal.SIGTERM)
        host_b.proc.wait(timeout=20)
        assert time.monotonic() - began < 10, "the agent waited for the state instead of stopping"
        assert _qemu_of(dest_run) is None, "the destination's QEMU was left running"
    finally:
        os.kill(host_a.proc.pid, signal.SIGCONT)
    assert site.call("GET", f"/vm-orders/{order['id']}")["state"] == "failed"
    later = ticks(site, "host-a", vm_id, after=len(before) + 2)
    assert later[-1][0] > before[-1][0] and host_a.status()["vms"]["web"]["vm_id"] == vm_id
    assert _leases(site, vm_id)["host:host-a"][0] == "active"
