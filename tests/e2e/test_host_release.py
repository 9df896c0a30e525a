"""A host of the tenant (the NBD proxy) receives a volume's key by its mTLS client certificate alone.

Against a real ``keysteward server start`` process over TLS: the bound host gets the key (and only its
volume's); another host, an agent certificate, a host certificate of another tenant and a host that sends
an identity document are denied with a reason; revoking the host ends its lease at the next renewal.
"""

from __future__ import annotations

import json
from base64 import b64encode
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keysteward.agent.client import AgentClient
from keysteward.crypto import x509csr
from keysteward.devcloud.provider import DevCloud
from keysteward.errors import Denied
from tests.e2e.test_release_attacks import ProcessManager
from tests.fixtures.keysteward import SecretRegistry, ServerProcess, init_manager
from tests.integration.test_release_api import World

pytestmark = pytest.mark.e2e


@pytest.fixture
def world(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> Iterator[World]:
    out = init_manager(tmp_path / "ks", secret_registry)
    server = server_factory(tmp_path / "ks")
    manager = ProcessManager(server, out.root_token.secret, secret_registry)
    yield World(manager, DevCloud.init(tmp_path / "devcloud"))  # type: ignore[arg-type]
    manager.client.close()


def _cert(world: World, tmp_path: Path, role: str, name: str) -> tuple[str, str]:
    if world.call("GET", "/v1/ca").status_code != 200:
        assert world.call("POST", "/v1/ca/init").status_code == 201
    key_pem, csr = x509csr.make_csr(world.tenant, role, name)
    r = world.call("POST", "/v1/ca/issue", json={"name": name, "role": role, "csr_pem": csr.decode()})
    assert r.status_code == 201, r.text
    cert, key = tmp_path / f"{world.tenant}-{name}.crt", tmp_path / f"{world.tenant}-{name}.key"
    cert.write_text(r.json()["cert_pem"])
    key.write_bytes(bytes(key_pem))
    return str(cert), str(key)


def _client(world: World, cert: tuple[str, str]) -> AgentClient:
    server: ServerProcess = world.m.server  # type: ignore[attr-defined]
    return AgentClient(server.url, ca_file=server.settings.server.tls_ca, client_cert=cert)


def _no_document(binding: bytes) -> dict[str, Any]:
    return {}


def _document(world: World, vm: Any, binding: bytes) -> dict[str, Any]:
    document, signature = world.cloud.aws_document(vm, binding.hex())
    return {"type": "aws-iid", "document": b64encode(document).decode(), "signature": b64encode(signature).decode()}


def test_a_host_gets_its_volume_by_certificate(world: World, tmp_path: Path) -> None:
    proxy = _cert(world, tmp_path, "host", "proxy-1")
    volume_id, secret = world.volume("served", {"host": "proxy-1"})
    other_id, _ = world.volume("someone-elses", {"host": "proxy-2"})
    instances_id, _ = world.volume("fleet", {"provider": "devcloud", "account": "111122223333"})

    with _client(world, proxy) as client:
        released = client.release(world.tenant, volume_id, _no_document)
        assert bytes(released.secret.view()) == secret
        assert client.renew(released.lease).action == "continue"
        for foreign in (other_id, instances_id):
            with pytest.raises(Denied) as denied:
                client.release(world.tenant, foreign, _no_document)
            assert denied.value.code == "not_bound"
        # a host proves itself by its certificate: an identity document besides it is refused
        vm = world.cloud.create(account="111122223333")
        with pytest.raises(Denied) as denied:
            client.release(world.tenant, instances_id, lambda b: _document(world, vm, b))
        assert denied.value.code == "evidence_invalid"

        holders = {lease["holder"] for lease in world.leases() if lease["state"] == "active"}
        assert holders == {"host:proxy-1"}
        # revoking the host: its next renewal says so, and it gets no new release
        r = world.call("POST", "/v1/instances/revoke", json={"host": "proxy-1", "reason": "decommissioned"})
        assert r.status_code == 204, r.text
        assert client.renew(released.lease).action == "revoked"
        with pytest.raises(Denied) as denied:
            client.release(world.tenant, volume_id, _no_document)
        assert denied.value.code == "instance_revoked"
        released.secret.wipe()

    # another host, an agent's certificate, a host of another tenant: no key
    with _client(world, _cert(world, tmp_path, "host", "proxy-2")) as client, pytest.raises(Denied) as denied:
        client.release(world.tenant, volume_id, _no_document)
    assert denied.value.code == "not_bound"
    with _client(world, _cert(world, tmp_path, "agent", "proxy-1")) as client, pytest.raises(Denied) as denied:
        client.release(world.tenant, volume_id, _no_document)
    assert denied.value.code == "evidence_invalid"
    globex = World(world.m, world.cloud, tenant="globex")
    with _client(globex, _cert(globex, tmp_path, "host", "proxy-1")) as client, pytest.raises(Denied) as denied:
        client.release(world.tenant, volume_id, _no_document)
    assert denied.value.code == "tenant_mismatch"
    bodies = [json.loads(r["body"]) for r in world.call("GET", "/v1/audit").json()["records"]]
    released_to = [b for b in bodies if b["action"] == "volume.release" and b.get("outcome") != "denied"]
    assert [b["actor"] for b in released_to] == ["host:proxy-1"]
