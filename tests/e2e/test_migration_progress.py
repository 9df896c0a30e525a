"""A migration's progress and its metrics, against a real ``keysteward server start`` process (no QEMU).

Hosts are played with their own certificates through the host agent's client: ``host-a`` runs the VM (a
``vm.start`` release gives it the live lease), ``host-b`` is ordered to take it, passes ``vm.migrate`` and
says it listens. What must hold:

- only the migration's source reports progress, and only while the migration is ready or switched: the
  destination, a third host and a caller without a certificate are refused;
- a report a host sends with oversized, negative or wrongly typed values (or fields it should not have)
  is refused (422) and leaves the stored progress as it was; a good one shows on the migrate order;
- ``/metrics`` counts the switched migration with its downtime, and a failed one by the state it failed in.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from keysteward.agent.client import AgentClient
from keysteward.crypto.x509migration import make_migration_csr
from keysteward.errors import Denied, KeystewardError
from keysteward.host.client import HostClient
from tests.e2e.test_host_release import _cert, _client, world  # noqa: F401 - fixture
from tests.fixtures.keysteward import ServerProcess
from tests.integration.test_release_api import World

pytestmark = pytest.mark.e2e
GOOD: dict[str, Any] = {"status": "active", "transferred_bytes": 100 << 20, "remaining_bytes": 156 << 20,
                        "total_bytes": 256 << 20}  # fmt: skip


def _no_evidence(binding: bytes) -> dict[str, Any]:
    return {}


def _host(world: World, tmp_path: Path, name: str) -> tuple[AgentClient, HostClient]:  # noqa: F811
    http = _client(world, _cert(world, tmp_path, "host", name))
    return http, HostClient(http, world.tenant)


def _metric(world: World, line: str) -> float:  # noqa: F811
    server: ServerProcess = world.m.server  # type: ignore[attr-defined]
    with httpx.Client(verify=str(server.settings.server.tls_ca)) as c:
        text = c.get(server.url + "/metrics").text
    found = re.search(r"^" + re.escape(line) + r" ([0-9.e+]+)$", text, re.MULTILINE)
    assert found, f"{line} not in /metrics"
    return float(found.group(1))


def test_only_the_source_reports_well_formed_progress_and_metrics_count_it(world: World, tmp_path: Path) -> None:  # noqa: F811
    r = world.call("POST", "/v1/vms", json={"name": "web", "key": "volumes", "memory_mb": 256})
    assert r.status_code == 201, r.text
    vm_id = r.json()["id"]
    a_http, host_a = _host(world, tmp_path, "host-a")
    b_http, host_b = _host(world, tmp_path, "host-b")
    c_http, host_c = _host(world, tmp_path, "host-c")
    keys = host_a.release(vm_id, {}, _no_evidence)
    order = world.call("POST", "/v1/vms/web/migrate", json={"host": "host-b"}).json()
    migration_id = order["id"]
    path = f"/v1/vms/{vm_id}/migrations/{migration_id}/progress"
    # before the destination listens there is no progress to report
    with pytest.raises(Denied) as early:
        host_a.migration_progress(vm_id, migration_id, GOOD)
    assert early.value.code == "migration_not_ready"
    key_pem, csr = make_migration_csr(migration_id, "destination")
    incoming, _ = host_b.migrate_release(vm_id, migration_id, {}, _no_evidence, csr)
    host_b.migration_ready(vm_id, migration_id, "127.0.0.1:4444")

    host_a.migration_progress(vm_id, migration_id, GOOD)
    assert world.call("GET", f"/v1/vm-orders/{migration_id}").json()["progress"] == GOOD
    # the destination and a third host are not the source; without a certificate nobody is
    for other in (host_b, host_c):
        with pytest.raises(Denied) as refused:
            other.migration_progress(vm_id, migration_id, {**GOOD, "remaining_bytes": 0})
        assert refused.value.code == "not_the_source"
    server: ServerProcess = world.m.server  # type: ignore[attr-defined]
    with httpx.Client(verify=str(server.settings.server.tls_ca)) as anonymous:
        nobody = anonymous.post(server.url + path, json=GOOD)
        assert nobody.status_code == 401 and nobody.json()["code"] == "no_credentials", nobody.text
    # bad values from the source itself: refused, the stored progress unchanged
    for change in ({"transferred_bytes": 1 << 51}, {"total_bytes": 10**30}, {"remaining_bytes": -1},
                   {"downtime_ms": -1, "status": "completed"}, {"transferred_bytes": "100"},
                   {"remaining_bytes": 1.5}, {"total_bytes": True}, {"status": ["active"]}, {"status": "failed"},
                   {"remaining_bytes": (256 << 20) + 1}, {"downtime_ms": 3}, {"note": "x" * 100}):  # fmt: skip
        with pytest.raises(KeystewardError) as bad:
            host_a.migration_progress(vm_id, migration_id, {**GOOD, **change})
        assert bad.value.status == 422, (change, bad.value)
    answer = a_http._https[a_http.urls[0]].post(path.removeprefix("/v1"), content=b"[1, 2]",
                                                headers={"content-type": "application/json"})  # fmt: skip
    assert answer.status_code == 422
    assert world.call("GET", f"/v1/vm-orders/{migration_id}").json()["progress"] == GOOD

    # switchover, then the final report with the downtime: on the order and in the histogram
    before = _metric(world, 'keysteward_vm_migrations_total{outcome="switched"}')
    host_a.switchover(vm_id, migration_id, keys.lease)
    final = {"status": "completed", "transferred_bytes": 260 << 20, "remaining_bytes": 0, "total_bytes": 256 << 20,
             "downtime_ms": 120}  # fmt: skip
    host_a.migration_progress(vm_id, migration_id, final)
    host_a.migration_progress(vm_id, migration_id, {**final, "downtime_ms": 900})  # the first downtime counts
    assert world.call("GET", f"/v1/vm-orders/{migration_id}").json()["progress"]["downtime_ms"] == 900
    assert _metric(world, 'keysteward_vm_migrations_total{outcome="switched"}') == before + 1
    assert _metric(world, 'keysteward_vm_migration_downtime_seconds_bucket{le="0.1"}') == 0
    assert _metric(world, 'keysteward_vm_migration_downtime_seconds_bucket{le="0.25"}') == 1
    assert _metric(world, "keysteward_vm_migration_downtime_seconds_count") == 1
    assert _metric(world, "keysteward_vm_migration_downtime_seconds_sum") == pytest.approx(0.12)
    assert _metric(world, "keysteward_vm_migrations_open") == 0

    # a migration that fails: host-c is ordered to take the VM (now on host-b) and reports it could not
    failed = world.call("POST", "/v1/vms/web/migrate", json={"host": "host-c"}).json()
    assert _metric(world, "keysteward_vm_migrations_open") == 1
    taken = host_c.orders()
    assert [o["id"] for o in taken] == [failed["id"]]
    host_c.report(failed["id"], False, {"code": "qemu_failed", "message": "no room"})
    assert world.call("GET", f"/v1/vm-orders/{failed['id']}").json()["state"] == "failed"
    assert _metric(world, 'keysteward_vm_migrations_total{outcome="failed"}') == 1
    assert _metric(world, 'keysteward_vm_migration_failures_total{stage="requested"}') == 1
    assert _metric(world, 'keysteward_vm_migration_failures_total{stage="ready"}') == 0
    assert _metric(world, "keysteward_vm_migrations_open") == 0
    with pytest.raises(Denied) as over:
        host_b.migration_progress(vm_id, failed["id"], GOOD)  # host-b is its source, but it failed
    assert over.value.code == "migration_not_ready"
    for http in (a_http, b_http, c_http):
        http.close()
    keys.wipe()
    incoming.wipe()
    del key_pem
