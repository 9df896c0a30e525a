"""Tenant CA import (the customer's own CA), and the Alembic migrations matching the models on both engines."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import load_pem_x509_certificate

from keysteward.crypto import x509ca
from keysteward.store.db import Database
from keysteward.store.models import Base
from tests.fixtures.keysteward import Manager

pytestmark = pytest.mark.integration


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
    csr = x509ca.make_csr("acme", "agent", "web-1")[1].decode()
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
    key_pem, csr = x509ca.make_csr("beta", "host", "h1")
    issued = manager.call(
        beta, "POST", "/v1/ca/issue", json={"name": "h1", "role": "host", "days": 30, "csr_pem": csr.decode()}
    ).json()
    assert issued["key_pem"] is None and "BEGIN CERTIFICATE" in issued["ca_pem"]  # the server never had the key
    assert bytes(key_pem).decode() not in str(issued)
    records = manager.call(beta, "GET", "/v1/audit").json()["records"]
    assert "ca.issue" in records[-1]["body"] and "PRIVATE KEY" not in "".join(r["body"] for r in records)
