"""Tenant CA import (the customer's own CA), and the Alembic migrations matching the models on both engines."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import load_pem_x509_certificate
from sqlalchemy import select, text

from keysteward.crypto import x509ca, x509csr
from keysteward.store import db as store_db
from keysteward.store.db import Database
from keysteward.store.models import ApiToken, Base, Person
from tests.fixtures.keysteward import Manager

pytestmark = pytest.mark.integration
PEOPLE = "0006"  # the migration that makes people


def test_migrations_match_models(db_url: str) -> None:
    db = Database(db_url)
    try:
        db.migrate()
        db.migrate()  # idempotent
        with db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
    finally:
        db.dispose()


def test_import_customer_ca(manager: Manager) -> None:
    admin = manager.tenant("acme")
    cert_pem, key_pem = x509ca.new_ca("ACME corp machine CA")
    other_cert, _ = x509ca.new_ca("someone else")
    leaf = x509ca.issue_client_cert(cert_pem, key_pem, tenant="acme", role="agent", name="x")
    # refused: a leaf is not a CA, a key of another CA, garbage; none of them leaves a CA behind
    for body, code in (
        ({"cert_pem": leaf.cert_pem}, "ca_not_a_ca"),
        ({"cert_pem": other_cert, "key_pem": key_pem.decode()}, "ca_key_mismatch"),
        ({"cert_pem": "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"}, "bad_pem"),
    ):
        r = manager.call(admin, "POST", "/v1/ca/import", json=body)
        assert r.status_code == 400 and r.json()["code"] == code, r.text
    assert manager.call(admin, "GET", "/v1/ca").json()["code"] == "ca_not_found"
    # without its key keysteward only verifies: issuing is refused, certificates the customer issues work
    r = manager.call(admin, "POST", "/v1/ca/import", json={"cert_pem": cert_pem})
    assert r.status_code == 201 and r.json()["can_issue"] is False
    assert manager.call(admin, "POST", "/v1/ca/import", json={"cert_pem": cert_pem}).json()["code"] == "ca_exists"
    csr = x509csr.make_csr("acme", "agent", "web-1")[1].decode()
    r = manager.call(admin, "POST", "/v1/ca/issue", json={"name": "web-1", "role": "agent", "csr_pem": csr})
    assert r.status_code == 409 and r.json()["code"] == "ca_key_absent"
    der = load_pem_x509_certificate(leaf.cert_pem.encode())
    principal = manager.svc.cas.authenticate(der.public_bytes(Encoding.DER))
    assert (principal.tenant, principal.role, principal.name, principal.kind) == ("acme", "agent", "x", "cert")
    # roles outside the machine roles are refused at issue time
    beta = manager.tenant("beta")
    manager.call(beta, "POST", "/v1/ca/init")
    r = manager.call(beta, "POST", "/v1/ca/issue", json={"name": "boss", "role": "admin"})
    assert r.status_code == 422
    key_pem, csr = x509csr.make_csr("beta", "host", "h1")
    issued = manager.call(
        beta, "POST", "/v1/ca/issue", json={"name": "h1", "role": "host", "days": 30, "csr_pem": csr.decode()}
    ).json()
    assert issued["key_pem"] is None and "BEGIN CERTIFICATE" in issued["ca_pem"]  # the server never had the key
    assert bytes(key_pem).decode() not in str(issued)
    records = manager.call(beta, "GET", "/v1/audit").json()["records"]
    assert "ca.issue" in records[-1]["body"] and "PRIVATE KEY" not in "".join(r["body"] for r in records)


def test_migration_0006_makes_each_token_a_person(db_url: str) -> None:
    """Tokens made before people existed become one person each, named and dated after the token, so no
    officer who could vote before the upgrade is held in a cooling-off period by it."""
    db = Database(db_url)
    try:
        cfg = Config()
        cfg.set_main_option("script_location", str(store_db._MIGRATIONS))
        made = datetime.now(UTC) - timedelta(days=30)
        with db.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            before = ScriptDirectory.from_config(cfg).get_revision(PEOPLE).down_revision
            assert isinstance(before, str)
            command.upgrade(cfg, before)  # the schema just before people
            conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES ('t1', 'acme', :at)"), {"at": made})
            for token_id, name, role in (("a1", "admin", "admin"), ("s1", "sam", "security-officer")):
                conn.execute(
                    text(
                        "INSERT INTO api_tokens (id, tenant_id, name, role, secret_hash, created_at) "
                        "VALUES (:id, 't1', :name, :role, :hash, :at)"
                    ),
                    {"id": token_id, "name": name, "role": role, "hash": bytes(32), "at": made},
                )
        db.migrate()
        with db.engine.connect() as conn:
            rows = conn.execute(
                select(ApiToken.name, Person.name, Person.created_at, ApiToken.created_by)
                .join(Person, Person.id == ApiToken.person_id)
                .order_by(ApiToken.name)
            ).all()
        assert [(r[0], r[1], r[3]) for r in rows] == [("admin", "admin", None), ("sam", "sam", None)]
        for row in rows:
            at = row[2] if row[2].tzinfo else row[2].replace(tzinfo=UTC)
            assert abs(at - made) < timedelta(seconds=1)
    finally:
        db.dispose()
