"""Issue 12: a KMIP key created on one server is gettable from another server on the same PostgreSQL at once,
and destroyed on one, it is gone on the other (both real ``keysteward server start`` processes). A server
decides a request on an object it read recently from memory: a change made through the other server meanwhile
(a tag the policy reads, a Destroy) is seen in the transaction, and the request is decided again on it."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.keysteward import SecretRegistry, ServerProcess, free_port, init_manager
from tests.support.kmip_client import KmipConn, aes_256_template, attribute, text, uid
from tests.support.kmip_site import KmipSite

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def test_two_servers_on_one_postgresql_serve_the_same_objects(
    tmp_path: Path, pg_url: str, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> None:
    out = init_manager(tmp_path / "a", secret_registry, db_url=pg_url)
    port_a, port_b = free_port(), free_port()
    a = server_factory(tmp_path / "a", env={"KEYSTEWARD_KMIP_LISTEN": f"127.0.0.1:{port_a}"})
    (tmp_path / "b").mkdir()
    toml = (tmp_path / "a" / "keysteward.toml").read_text()
    listen = f"listen_port = {a.settings.server.listen_port}"
    (tmp_path / "b" / "keysteward.toml").write_text(toml.replace(listen, f"listen_port = {free_port()}"))
    server_factory(tmp_path / "b", env={"KEYSTEWARD_KMIP_LISTEN": f"127.0.0.1:{port_b}"})
    with a.http(out.root_token.secret) as c:
        admin = str(c.post("/tenants", json={"name": "acme"}).json()["admin_token"]["token"])
    with a.http(admin) as c:
        assert c.post("/ca/init").status_code == 201
    site_a = KmipSite(a, admin, tmp_path, port_a, out.root_token.secret)
    ctx = site_a.tls(site_a.issue("esx-1")[:2])
    deadline = time.monotonic() + 3  # server B trusts the CA made through A within its one-second refresh
    while True:
        try:
            with KmipConn(port_b, ctx) as probe:
                assert probe.one("DiscoverVersions").ok
            break
        except (ssl.SSLError, ConnectionError, OSError):
            assert time.monotonic() < deadline, "server B never trusted the tenant CA"
            time.sleep(0.2)
    with KmipConn(port_a, ctx) as on_a, KmipConn(port_b, ctx) as on_b:
        key = on_a.one("Create", *aes_256_template()).uid()
        got_a, got_b = on_a.one("Get", uid(key)), on_b.one("Get", uid(key))
        assert got_a.ok and got_b.ok
        material = [i.value for i in got_b.payload.walk() if i.name == "KeyMaterial"]  # type: ignore[union-attr]
        assert material == [i.value for i in got_a.payload.walk() if i.name == "KeyMaterial"]  # type: ignore[union-attr]
        secret_registry.secret(material[0], "kmip key on two servers")  # type: ignore[arg-type]
        assert on_b.one("Destroy", uid(key)).ok
        assert on_a.one("Get", uid(key)).reason == "PermissionDenied"  # destroyed: nothing left to serve
    # a tag the policy reads, changed through B right after A decided a Get on it from its read
    policy = (Path(__file__).parents[2] / "docs/policies/kmip-vm-keys.cedar").read_text()
    with a.http(admin) as h:
        assert h.put("/policy", json={"sources": {"kmip-vm-keys.cedar": policy}}).status_code == 200
    other = site_a.tls(site_a.issue("esx-2")[:2])  # not esx-1: refused keys tagged "Virtual Machine"
    with KmipConn(port_a, other) as on_a, KmipConn(port_b, ctx) as on_b:
        key = on_a.one("Create", *aes_256_template()).uid()
        assert on_a.one("AddAttribute", uid(key), attribute("x-Component", text("Storage"))).ok
        assert on_a.one("Get", uid(key)).ok and on_a.one("Get", uid(key)).ok  # A now holds the record
        changed = on_b.one("ModifyAttribute", uid(key), attribute("x-Component", text("Virtual Machine"), index=0))
        assert changed.ok
        refused = on_a.one("Get", uid(key))
        assert refused.reason == "PermissionDenied" and refused.payload is None
    records = a.cli_json("audit", "list", "--actor", "cert:acme/hypervisor/esx-2", "--action", "kmip.get",
                         token=admin)  # fmt: skip
    reasons = [r.get("reason") for r in sorted(records, key=lambda r: r["seq"]) if r["target"] == f"kmip:{key}"]
    # the Get decided on A's memory did nothing and was refused in its transaction; asked again, it is denied
    assert reasons[-2:] == ["kmip_stale", "forbidden_by_policy"], reasons
