"""Two server processes on one PostgreSQL: what one server's warm release path must never outrun.

A release decided from what a server has cached (the volume, the tenant's providers, the warm key) is
re-checked in the transaction that spends the nonce and writes the audit record. These attacks warm
server A with releases, then change the state on server B, and ask A at once (no wait for any cache to
expire): a volume revoked on B, an instance revoked on B, a lease granted on B (a clone asking A).
"""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from keysteward.devcloud.provider import DevCloud
from tests.e2e.test_release_attacks import ProcessManager
from tests.fixtures.keysteward import SecretRegistry, ServerProcess, free_port, init_manager
from tests.integration.test_release_api import World, denied

pytestmark = pytest.mark.e2e
ACCOUNT = "111122223333"


def two_servers(
    tmp_path: Path, pg_url: str, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> tuple[World, World]:
    """The same tenant seen through server A and through server B (its own port, the same database)."""
    out = init_manager(tmp_path / "a", secret_registry, db_url=pg_url)
    a = server_factory(tmp_path / "a")
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    text = (tmp_path / "a" / "keysteward.toml").read_text()
    port_a = str(a.settings.server.listen_port)
    (b_dir / "keysteward.toml").write_text(text.replace(f"listen_port = {port_a}", f"listen_port = {free_port()}"))
    b = server_factory(b_dir)
    on_a = World(ProcessManager(a, out.root_token.secret, secret_registry), DevCloud.init(tmp_path / "devcloud"))  # type: ignore[arg-type]
    on_b = copy.copy(on_a)
    on_b.m = ProcessManager(b, out.root_token.secret, secret_registry)  # type: ignore[assignment]
    return on_a, on_b


def test_a_warm_server_never_outruns_another_servers_revocation(
    tmp_path: Path, pg_url: str, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    on_a, on_b = two_servers(tmp_path, pg_url, server_factory, secret_registry)
    cloud = on_a.cloud
    vm1, vm2, vm3 = (cloud.create(account=ACCOUNT, image_id="img-1") for _ in range(3))
    vol1, secret1 = on_a.volume("v1", {"provider": "devcloud", "account": ACCOUNT})
    vol2, _ = on_a.volume("v2", {"provider": "devcloud", "account": ACCOUNT})
    vol3, _ = on_a.volume("v3", {"provider": "devcloud", "account": ACCOUNT})
    for _ in range(3):  # A now has the volumes, the providers and the key cached: its releases are warm
        got, lease1, token1 = on_a.released(vm1, vol1)
        assert got == secret1
        on_a.released(vm2, vol2)
        on_a.released(vm3, vol3)

    # a volume revoked on B: A's next release of it, at once, is denied and audited
    assert on_b.call("POST", f"/v1/volumes/{vol1}/revoke", json={"shred": False, "reason": "t"}).status_code == 200
    r, _ = on_a.release(vm1, vol1)
    denied(r, "volume_revoked")
    assert on_a.renew(lease1, token1).json()["action"] == "revoked"

    # an instance revoked on B: A denies it at once
    revoke = {"provider": "devcloud", "account": ACCOUNT, "instance_id": vm2.id, "reason": "t"}
    assert on_b.call("POST", "/v1/instances/revoke", json=revoke).status_code in (200, 204)
    r, _ = on_a.release(vm2, vol2)
    denied(r, "instance_revoked")

    # a lease granted on B is seen by A at once: a clone of vm3 asking A is a suspected clone
    on_b.released(vm3, vol3)
    r, _ = on_a.release(cloud.clone(vm3.id), vol3)
    denied(r, "suspected_clone")

    reasons = [(rec.get("outcome"), rec.get("reason")) for rec in on_b.audit() if rec["action"] == "volume.release"]
    for reason in ("volume_revoked", "instance_revoked", "suspected_clone"):
        assert ("denied", reason) in reasons


def test_the_one_statement_release_grants_only_what_every_check_allows(
    tmp_path: Path, pg_url: str, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    """On PostgreSQL a permitted release spends its nonce, checks and grants its lease in one statement
    (release/admission.py): a nonce replayed on the other server, a clone, a revoked instance and a revoked
    volume are each refused with no lease granted, and a holder asking again keeps one live lease."""
    on_a, on_b = two_servers(tmp_path, pg_url, server_factory, secret_registry)
    cloud = on_a.cloud
    vm, other = (cloud.create(account=ACCOUNT, image_id="img-1") for _ in range(2))
    vol, secret = on_a.volume("v1", {"provider": "devcloud", "account": ACCOUNT})
    vol2, _ = on_a.volume("v2", {"provider": "devcloud", "account": ACCOUNT})

    def live(volume_id: str) -> list[dict[str, object]]:
        return [row for row in on_b.leases() if row["volume_id"] == volume_id and row["state"] == "active"]

    got, first, _ = on_a.released(vm, vol)
    assert got == secret
    got, second, _ = on_b.released(vm, vol)  # the same holder again, on the other server: its first lease ends
    assert got == secret and second != first
    assert [row["id"] for row in live(vol)] == [second]

    # a nonce spent on A, replayed (with fresh evidence over it) on B: refused, nothing granted
    nonce = on_a.challenge()
    r, _ = on_a.release(vm, vol, nonce=nonce)
    assert r.status_code == 200, r.text
    third = r.json()["lease"]["id"]
    r, _ = on_b.release(vm, vol, nonce=nonce)
    denied(r, "nonce_replayed")
    assert [row["id"] for row in live(vol)] == [third]

    # a clone asking while the holder's lease is live: refused, and the holder's lease is untouched
    r, _ = on_b.release(cloud.clone(vm.id), vol)
    denied(r, "suspected_clone")
    assert [row["id"] for row in live(vol)] == [third]

    # a revoked instance is refused on either server, and its live lease is not superseded by the refusal
    on_a.released(other, vol2)
    before = live(vol2)
    revoke = {"provider": "devcloud", "account": ACCOUNT, "instance_id": other.id, "reason": "t"}
    assert on_a.call("POST", "/v1/instances/revoke", json=revoke).status_code in (200, 204)
    r, _ = on_b.release(other, vol2)
    denied(r, "instance_revoked")
    assert live(vol2) == before

    # a revoked volume: refused, nothing granted
    assert on_a.call("POST", f"/v1/volumes/{vol}/revoke", json={"shred": False, "reason": "t"}).status_code == 200
    r, _ = on_b.release(vm, vol)
    denied(r, "volume_revoked")
    granted = [rec for rec in on_a.audit() if rec["action"] == "volume.release" and rec.get("outcome") != "denied"]
    assert len(granted) == 4  # first, second, third and the other instance's: no refusal granted anything


def test_concurrent_releases_batched_together_each_get_their_own_answer(
    tmp_path: Path, pg_url: str, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    """Releases that arrive together are decided in one batch, on PostgreSQL without a savepoint each: each
    instance opens its own volume's secret, while a clone and a replayed nonce arriving in the same moment are
    refused, and each volume keeps one live lease."""
    on_a, _ = two_servers(tmp_path, pg_url, server_factory, secret_registry)
    cloud = on_a.cloud
    vms = [cloud.create(account=ACCOUNT, image_id="img-1") for _ in range(10)]
    volumes = [on_a.volume(f"c{i}", {"provider": "devcloud", "account": ACCOUNT}) for i in range(10)]
    for vm, (vol, _) in zip(vms, volumes, strict=True):
        on_a.released(vm, vol)  # each holds a lease: the clone below is one
    spent = on_a.challenge()
    r, _ = on_a.release(vms[1], volumes[1][0], nonce=spent)
    assert r.status_code == 200, r.text
    results: dict[str, Any] = {}
    start = threading.Barrier(12)

    def ask(name: str, call: Callable[[], Any]) -> None:
        start.wait(10)
        try:
            results[name] = call()
        except Exception as exc:
            results[name] = exc

    calls: dict[str, Callable[[], Any]] = {
        f"vm{i}": functools.partial(on_a.released, vm, vol)
        for i, (vm, (vol, _)) in enumerate(zip(vms, volumes, strict=True))
    }
    calls["clone"] = lambda: on_a.release(cloud.clone(vms[0].id), volumes[0][0])[0]
    calls["replay"] = lambda: on_a.release(vms[2], volumes[2][0], nonce=spent)[0]
    threads = [threading.Thread(target=ask, args=item) for item in calls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, (_, secret) in enumerate(volumes):
        got = results[f"vm{i}"]
        assert not isinstance(got, Exception), got
        assert got[0] == secret
    denied(results["clone"], "suspected_clone")
    denied(results["replay"], "nonce_replayed")
    active = [row for row in on_a.leases() if row["state"] == "active"]
    assert sorted(row["volume_id"] for row in active) == sorted(vol for vol, _ in volumes)
    assert {row["id"] for row in active} == {results[f"vm{i}"][1] for i in range(10)}
