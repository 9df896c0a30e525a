"""Rotation rewraps stored DEKs without touching data; destroy crypto-shreds, and a test tries to undo it."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest
from sqlalchemy import inspect, select, text

from keysteward.crypto.aead import AuthenticationFailed
from keysteward.errors import Conflict
from keysteward.identity.principal import Principal
from keysteward.keys.wrapping import kek_aad
from keysteward.store.models import Base, DataKey, KeyVersion
from tests.fixtures.keysteward import Manager

pytestmark = pytest.mark.integration


def admin_of(m: Manager, tenant: str) -> Principal:
    m.tenant(tenant)
    info = m.svc.tenants.get(tenant)
    return Principal(info.id, tenant, "admin", "admin", "token")


def drain(m: Manager) -> None:
    while m.svc.rewrapper.run_once():
        pass


def dek_plaintexts(m: Manager, who: Principal, ids: list[str]) -> dict[str, bytes]:
    out = {}
    for dek_id in ids:
        with m.svc.keys.data.unwrap(who.tenant_id, dek_id) as buf:
            out[dek_id] = buf.bytes()
    return out


def test_rotation_rewraps_every_data_key(manager: Manager) -> None:
    who = admin_of(manager, "acme")
    manager.svc.keys.create(who, "vols")
    ids = [manager.svc.keys.data.create(who, "vols", f"vol-{i}").id for i in range(45)]
    before = dek_plaintexts(manager, who, ids)
    for value in before.values():
        manager.registry.secret(value, "stored DEK")
    info = manager.svc.keys.rotate(who, "vols")
    assert info.primary_version == 2 and info.rotation and info.rotation["state"] == "running"
    drain(manager)
    described = manager.svc.keys.describe(who, "vols")
    assert described.rotation and described.rotation["state"] == "done" and described.rotation["rewrapped"] == 45
    assert {v.version: v.data_keys for v in described.versions} == {1: 0, 2: 45}
    assert dek_plaintexts(manager, who, ids) == before  # same keys, new wrapping: no data touched
    # a second rotation supersedes nothing that is done, and moves everything to v3
    manager.svc.keys.rotate(who, "vols")
    drain(manager)
    assert {v.version: v.data_keys for v in manager.svc.keys.describe(who, "vols").versions} == {1: 0, 2: 0, 3: 45}
    # version 1 no longer holds anything: it can be destroyed without force
    manager.svc.keys.destroy_version(who, "vols", 1)
    assert dek_plaintexts(manager, who, ids) == before


def test_destroy_refuses_primary_and_in_use_versions(manager: Manager) -> None:
    who = admin_of(manager, "acme")
    manager.svc.keys.create(who, "k")
    dek = manager.svc.keys.data.create(who, "k", "d1")
    with pytest.raises(Conflict) as err:
        manager.svc.keys.destroy_version(who, "k", 1)
    assert err.value.code == "destroy_primary_version"
    manager.svc.keys.rotate(who, "k")  # rewrap job not run yet: d1 still under v1
    with pytest.raises(Conflict) as err:
        manager.svc.keys.destroy_version(who, "k", 1)
    assert err.value.code == "version_in_use"
    manager.svc.keys.destroy_version(who, "k", 1, force=True)
    with pytest.raises(Conflict) as err:
        manager.svc.keys.data.unwrap(who.tenant_id, dek.id)
    assert err.value.code == "data_key_shredded"


def test_crypto_shred_cannot_be_undone(manager: Manager) -> None:
    """After destroy, nothing the server holds (rows, free pages, WAL) plus the root key recovers the data."""
    admin = manager.tenant("acme")
    who = Principal(manager.svc.tenants.get("acme").id, "acme", "admin", "admin", "token")
    manager.call(admin, "POST", "/v1/keys", json={"name": "pii"})
    secret = b"customer record 0042: the plaintext that must die"
    ct = manager.call(
        admin, "POST", "/v1/keys/pii/encrypt", json={"plaintext": base64.b64encode(secret).decode()}
    ).json()["ciphertext"]
    key_id = manager.svc.keys.describe(who, "pii").id
    with manager.svc.db.read() as conn:
        wrapped_v1 = conn.execute(select(KeyVersion.wrapped).where(KeyVersion.key_id == key_id)).scalar_one()
    assert wrapped_v1
    dek = manager.svc.keys.data.create(who, "pii", "vol")
    manager.svc.keys.rotate(who, "pii")
    destroyed = manager.call(admin, "POST", "/v1/keys/pii/versions/1/destroy", json={"force": True}).json()
    assert [v["state"] for v in destroyed["versions"]] == ["destroyed", "enabled"]

    r = manager.call(admin, "POST", "/v1/decrypt", json={"ciphertext": ct})
    assert r.status_code == 409 and r.json()["code"] == "key_version_destroyed"
    with pytest.raises(Conflict):
        manager.svc.keys.data.unwrap(who.tenant_id, dek.id)

    # The attacker's try: every binary value in every table, opened with the root key as version 1's KEK.
    root = manager.svc.root.root()
    aad = kek_aad(who.tenant_id, key_id, 1)
    with manager.svc.db.read() as conn:
        blobs = []
        for table in Base.metadata.sorted_tables:
            for row in conn.execute(table.select()):
                blobs += [v for v in row if isinstance(v, bytes | memoryview)]
        assert all(bytes(b) != bytes(wrapped_v1) for b in blobs)
        for blob in blobs:
            with pytest.raises(AuthenticationFailed):
                root.open(bytes(blob), aad)
        if manager.svc.db.is_sqlite:
            assert conn.execute(text("PRAGMA secure_delete")).scalar() == 1
    # and the raw files: SQLite's database and WAL no longer hold the wrapped KEK anywhere
    if manager.svc.db.is_sqlite:
        db_path = manager.svc.db.url.removeprefix("sqlite:///")
        raw = b"".join(open(p, "rb").read() for p in (db_path, db_path + "-wal") if __import__("os").path.exists(p))
        assert bytes(wrapped_v1) not in raw and bytes(wrapped_v1)[12:40] not in raw
    assert secret not in b"".join(bytes(b) for b in blobs)
    # the schema has the columns we think it has (a new blob column must be thought about here)
    with manager.svc.db.read() as conn:
        cols = {c["name"] for c in inspect(conn).get_columns("data_keys")}
    assert {"wrapped", "kek_version"} <= cols


def test_destroy_whole_key(manager: Manager) -> None:
    admin = manager.tenant("acme")
    manager.call(admin, "POST", "/v1/keys", json={"name": "gone"})
    gen = manager.call(admin, "POST", "/v1/keys/gone/generate-data-key", json={}).json()
    manager.registry.b64(gen["plaintext"], "data key of destroyed key")
    manager.call(admin, "POST", "/v1/keys/gone/rotate")
    out = manager.call(admin, "POST", "/v1/keys/gone/destroy").json()
    assert out["state"] == "destroyed" and {v["state"] for v in out["versions"]} == {"destroyed"}
    assert manager.call(admin, "POST", "/v1/decrypt", json={"ciphertext": gen["ciphertext"]}).json()["code"] in {
        "key_destroyed",
        "key_version_destroyed",
    }
    assert manager.call(admin, "POST", "/v1/keys", json={"name": "gone"}).json()["code"] == "key_exists"
    with manager.svc.db.read() as conn:
        assert (
            conn.execute(
                select(KeyVersion.wrapped).where(KeyVersion.wrapped.is_not(None), KeyVersion.key_id == out["id"])
            ).first()
            is None
        )
        assert (
            conn.execute(
                select(DataKey.wrapped).where(DataKey.key_id == out["id"], DataKey.wrapped.is_not(None))
            ).first()
            is None
        )


def test_audit_fails_closed(manager_factory: Callable[..., Manager], db_url: str) -> None:
    m = manager_factory(db_url)
    admin = m.tenant("acme")
    m.call(admin, "POST", "/v1/keys", json={"name": "k"})
    gen = m.call(admin, "POST", "/v1/keys/k/generate-data-key", json={}).json()
    m.registry.b64(gen["plaintext"], "data key")
    with m.svc.db.engine.begin() as conn:  # the audit table refuses writes from now on
        if m.svc.db.is_sqlite:
            conn.exec_driver_sql(
                "CREATE TRIGGER no_audit BEFORE INSERT ON audit_records "
                "BEGIN SELECT RAISE(ABORT, 'audit disk full'); END"
            )
        else:
            conn.exec_driver_sql(
                "CREATE FUNCTION no_audit() RETURNS trigger AS $$ BEGIN "
                "RAISE EXCEPTION 'audit disk full'; END $$ LANGUAGE plpgsql"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER no_audit BEFORE INSERT ON audit_records FOR EACH ROW EXECUTE FUNCTION no_audit()"
            )
    r = m.call(admin, "POST", "/v1/decrypt", json={"ciphertext": gen["ciphertext"]})
    assert r.status_code == 503 and r.json()["code"] == "audit_unavailable"
    assert gen["plaintext"] not in r.text
    r = m.call(admin, "POST", "/v1/keys", json={"name": "k2"})
    assert r.status_code == 503 and r.json()["code"] == "audit_unavailable"
    assert m.call(admin, "POST", "/v1/keys/k/rotate").status_code == 503
    with m.svc.db.engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER no_audit" + ("" if m.svc.db.is_sqlite else " ON audit_records"))
    keys = m.call(admin, "GET", "/v1/keys/k").json()
    assert keys["primary_version"] == 1  # the failed rotation left nothing behind
    assert [k["name"] for k in m.call(admin, "GET", "/v1/keys").json()] == ["k"]
