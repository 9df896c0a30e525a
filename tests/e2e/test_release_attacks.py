"""The release attacks again, against a real ``keysteward server start`` process over TLS (SQLite).

The same World as tests/integration/test_release_api.py drives it, through an HTTPS client instead of
the in-process one: replayed, expired and foreign evidence, another tenant's volume, an unbound
instance, a clone while the original runs (alert sent to the configured webhook), a snapshot attached
elsewhere after termination, revocation and destruction, garbage bodies.
"""

from __future__ import annotations

import base64
import json
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from keysteward.devcloud.provider import DevCloud
from tests.fixtures.keysteward import SecretRegistry, ServerProcess, init_manager
from tests.integration.test_release_api import World, denied, wait_for, webhook

pytestmark = pytest.mark.e2e
NONCE_TTL = 3.0
REFUSAL_INTERVAL = 0.5


class ProcessManager:
    """What World needs from a key manager (client, call, tenant, registry), over HTTPS to a process."""

    def __init__(self, server: ServerProcess, root_token: str, registry: SecretRegistry) -> None:
        self.server = server
        self.root_token = root_token
        self.registry = registry
        self.client = httpx.Client(
            base_url=server.url, verify=ssl.create_default_context(cafile=server.settings.server.tls_ca), timeout=30
        )

    def call(self, token: str, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {token}", **kw.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kw)

    def tenant(self, name: str) -> str:
        r = self.call(self.root_token, "POST", "/v1/tenants", json={"name": name})
        assert r.status_code == 201, r.text
        return str(r.json()["admin_token"]["token"])


@pytest.fixture
def alerts() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    with webhook(received) as url:
        yield url, received


@pytest.fixture
def remote(
    tmp_path: Path,
    server_factory: Callable[..., ServerProcess],
    secret_registry: SecretRegistry,
    alerts: tuple[str, list[dict[str, Any]]],
) -> Iterator[World]:
    out = init_manager(tmp_path / "ks", secret_registry)
    env = {
        "KEYSTEWARD_RELEASE_ALERT_WEBHOOK_URL": alerts[0],
        "KEYSTEWARD_RELEASE_NONCE_TTL_SECONDS": str(NONCE_TTL),
        "KEYSTEWARD_AUDIT_REFUSAL_INTERVAL": str(REFUSAL_INTERVAL),
    }
    server = server_factory(tmp_path / "ks", env=env)
    manager = ProcessManager(server, out.root_token.secret, secret_registry)
    yield World(manager, DevCloud.init(tmp_path / "devcloud"))  # type: ignore[arg-type]
    manager.client.close()


def test_attacks_against_a_server_process(remote: World, alerts: tuple[str, list[dict[str, Any]]]) -> None:
    cloud, received = remote.cloud, alerts[1]
    vm = cloud.create(account="111122223333", image_id="img-base")
    fleet, secret = remote.volume("fleet", {"provider": "devcloud", "account": "111122223333", "image_id": "img-base"})
    pinned, _ = remote.volume("pinned", {"provider": "devcloud", "account": "111122223333", "instance_id": vm.id})

    # replayed evidence: the very same request twice
    nonce = remote.challenge()
    r1, otk = remote.release(vm, fleet, nonce=nonce)
    assert r1.status_code == 200, r1.text
    body = {
        "tenant": "acme",
        "volume_id": fleet,
        "nonce": nonce,
        "public_key": base64.b64encode(otk.public_bytes).decode(),
        "evidence": {"identity": remote.evidence(vm, nonce, otk.public_bytes)},
    }
    denied(remote.m.client.post("/v1/release", json=body), "nonce_replayed")
    # an expired nonce
    stale = remote.challenge()
    time.sleep(NONCE_TTL + 0.2)
    denied(remote.release(vm, fleet, nonce=stale)[0], "nonce_expired")
    # evidence made for another HPKE key (a network attacker swapping in his own key)
    nonce = remote.challenge()
    theirs = remote.evidence(vm, nonce, b"\x01" * 32)
    denied(remote.release(vm, fleet, nonce=nonce, evidence=theirs)[0], "binding_mismatch")
    # an altered field under the provider's signature
    nonce = remote.challenge()
    ev = remote.evidence(vm, nonce, b"\x02" * 32)
    doc = json.loads(base64.b64decode(ev["document"]))
    doc["imageId"] = "img-base-but-evil"
    forged = dict(ev, document=base64.b64encode(json.dumps(doc).encode()).decode())
    denied(remote.release(vm, fleet, nonce=nonce, evidence=forged)[0], "evidence_invalid")
    # another tenant's volume id
    other = World(remote.m, cloud, tenant="globex")
    theirs_id, _ = other.volume("theirs", {"provider": "devcloud", "account": "111122223333"})
    denied(remote.release(vm, theirs_id)[0], "volume_not_found")
    # an instance the volume is not bound to
    stranger = cloud.create(account="999988887777", image_id="img-base")
    denied(remote.release(stranger, fleet)[0], "not_bound")

    # the clone: same disk and image, new instance id, while the original holds the lease
    held, _, _ = remote.released(vm, fleet)
    assert held == secret
    leases_before = remote.leases()
    clone = cloud.clone(vm.id)
    denied(remote.release(clone, fleet)[0], "suspected_clone")
    assert remote.leases() == leases_before
    wait_for(lambda: len(received) == 1)
    assert received[0]["alert"] == "suspected_clone" and received[0]["requester"].endswith(clone.id)
    # the snapshot attached elsewhere after the original is terminated: refused by the binding
    cloud.terminate(vm.id)
    denied(remote.release(clone, pinned)[0], "not_bound")

    # garbage and oversized bodies: refused, the server keeps answering
    client = remote.m.client
    for junk in (b"{", b"\x00" * 64, b'{"tenant": 7}', json.dumps({"evidence": "x" * 70_000}).encode()):
        r = client.post("/v1/release", content=junk, headers={"content-type": "application/json"})
        assert r.status_code in (400, 413, 422), r.text
    assert client.get("/v1/health").status_code == 200

    # revocation and destruction
    assert remote.call("POST", "/v1/volumes/fleet/revoke", json={}).json()["state"] == "revoked"
    survivor = cloud.create(account="111122223333", image_id="img-base")
    denied(remote.release(survivor, fleet)[0], "volume_revoked")
    assert remote.call("POST", "/v1/volumes/fleet/destroy", json={}).json()["state"] == "destroyed"
    denied(remote.release(survivor, fleet)[0], "volume_destroyed")

    # every refusal is in the audit chain with its reason, none with the secret: those of callers whose
    # evidence verified one by one, the others counted (within the refusal interval)
    def reasons(actor: Callable[[str], bool]) -> set[str]:
        records = [r for r in remote.audit() if r["action"] == "volume.release" and r["outcome"] == "denied"]
        return {r["reason"] for r in records if actor(r["actor"])}

    wait_for(lambda: {"nonce_expired", "binding_mismatch", "evidence_invalid"} <= reasons(lambda a: a == "anonymous"))
    assert {"nonce_replayed", "not_bound", "suspected_clone", "volume_revoked", "volume_destroyed"} <= reasons(
        lambda a: a.startswith("instance:devcloud/")
    )
    text = json.dumps(remote.audit()) + remote.m.server.log_path.read_text()
    assert base64.b64encode(secret).decode() not in text and secret.hex() not in text


def test_release_cli_groups(remote: World) -> None:
    """provider list, lease list, instance revoke and volume status/list/revoke, as an operator runs them."""
    server = remote.m.server  # type: ignore[attr-defined]
    vm = remote.cloud.create(account="111122223333", image_id="img-base")
    volume_id, _ = remote.volume("data", {"provider": "devcloud", "account": "111122223333"})
    _, lease_id, token = remote.released(vm, volume_id)

    providers = server.cli_json("provider", "list", token=remote.admin)
    assert {p["name"]: p["kind"] for p in providers} == {"devcloud": "aws-iid", "devgcp": "gcp-jwt"}
    leases = server.cli_json("lease", "list", "--volume", "data", token=remote.admin)
    assert [(x["id"], x["state"], x["holder"]) for x in leases] == [
        (lease_id, "active", f"devcloud/111122223333/{vm.id}")
    ]
    volume_cli = ["volume", "status", "data", "--kms", server.url, "--ca-file", server.settings.server.tls_ca]
    status = json.loads(server.cli(*volume_cli, "--json", token=remote.admin).stdout)
    assert status["volume"]["id"] == volume_id and status["leases"][0]["holder"].endswith(vm.id)
    listed = server.cli("volume", "list", "--kms", server.url, "--ca-file", server.settings.server.tls_ca,
                        token=remote.admin).stdout  # fmt: skip
    assert volume_id in listed and "bound to account=111122223333" in listed

    bad = server.cli("instance", "revoke", "not-a-triple", "--yes", token=remote.admin, check=False)
    assert bad.returncode != 0 and "provider/account/instance-id" in bad.stderr
    holder = f"devcloud/111122223333/{vm.id}"
    listed_before = {i["holder"]: i for i in server.cli_json("instance", "list", token=remote.admin)}
    assert listed_before[holder]["live_leases"] == 1 and listed_before[holder]["revoked"] is False
    server.cli("instance", "revoke", holder, "--yes", "--reason", "test", token=remote.admin)
    assert remote.renew(lease_id, token).json()["action"] == "revoked"
    after = {i["holder"]: i for i in server.cli_json("instance", "list", token=remote.admin)}[holder]
    assert (after["revoked"], after["shred"], after["reason"], after["live_leases"]) == (True, False, "test", 0)
    assert holder in server.cli("instance", "list", token=remote.admin).stdout
    # an auditor may read but not revoke
    auditor = remote.call("POST", "/v1/tokens", json={"name": "aud", "role": "auditor"}).json()["token"]
    refused = server.cli("volume", "revoke", "data", "--yes", "--kms", server.url, "--ca-file",
                         server.settings.server.tls_ca, token=auditor, check=False)  # fmt: skip
    assert refused.returncode == 1 and "role_forbidden" in refused.stderr and "Traceback" not in refused.stderr
