"""The key manager API on both storage engines: lifecycle, envelope operations, isolation, roles."""

from __future__ import annotations

import base64

import pytest

from tests.fixtures.keysteward import Manager

pytestmark = pytest.mark.integration


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_key_lifecycle_and_envelope(manager: Manager) -> None:
    admin = manager.tenant("acme")
    call = manager.call
    r = call(admin, "POST", "/v1/keys", json={"name": "orders", "description": "orders db"})
    assert r.status_code == 201, r.text
    assert r.json()["primary_version"] == 1
    assert call(admin, "POST", "/v1/keys", json={"name": "orders"}).json()["code"] == "key_exists"

    gen = call(admin, "POST", "/v1/keys/orders/generate-data-key", json={"context": {"app": "orders"}}).json()
    manager.registry.b64(gen["plaintext"], "generated data key")
    assert len(base64.b64decode(gen["plaintext"])) == 32
    dec = call(admin, "POST", "/v1/decrypt", json={"ciphertext": gen["ciphertext"], "context": {"app": "orders"}})
    assert dec.status_code == 200 and dec.json()["plaintext"] == gen["plaintext"]
    # the context is bound: another context, or none, does not open it
    for ctx in ({"app": "billing"}, None):
        bad = call(admin, "POST", "/v1/decrypt", json={"ciphertext": gen["ciphertext"], "context": ctx})
        assert bad.status_code == 400 and bad.json()["code"] == "invalid_ciphertext"

    rotated = call(admin, "POST", "/v1/keys/orders/rotate").json()
    assert rotated["primary_version"] == 2 and [v["version"] for v in rotated["versions"]] == [1, 2]
    # old versions keep decrypting
    again = call(admin, "POST", "/v1/decrypt", json={"ciphertext": gen["ciphertext"], "context": {"app": "orders"}})
    assert again.json()["plaintext"] == gen["plaintext"] and again.json()["version"] == 1
    # re-encrypt moves it to v2 without the plaintext crossing the API
    re = call(admin, "POST", "/v1/re-encrypt", json={"ciphertext": gen["ciphertext"], "context": {"app": "orders"}})
    assert re.status_code == 200 and re.json()["version"] == 2 and "plaintext" not in re.json()
    dec2 = call(
        admin, "POST", "/v1/decrypt", json={"ciphertext": re.json()["ciphertext"], "context": {"app": "orders"}}
    )
    assert dec2.json()["plaintext"] == gen["plaintext"] and dec2.json()["version"] == 2

    enc = call(admin, "POST", "/v1/keys/orders/encrypt", json={"plaintext": b64(b"card 4111")}).json()
    assert call(admin, "POST", "/v1/keys/orders/disable").json()["state"] == "disabled"
    off = call(admin, "POST", "/v1/decrypt", json={"ciphertext": enc["ciphertext"]})
    assert off.status_code == 409 and off.json()["code"] == "key_disabled"
    assert call(admin, "POST", "/v1/keys/orders/generate-data-key", json={}).json()["code"] == "key_disabled"
    call(admin, "POST", "/v1/keys/orders/enable")
    back = call(admin, "POST", "/v1/decrypt", json={"ciphertext": enc["ciphertext"]})
    assert base64.b64decode(back.json()["plaintext"]) == b"card 4111"

    names = [k["name"] for k in call(admin, "GET", "/v1/keys").json()]
    assert names == ["orders"]


def test_tampered_ciphertext_is_refused(manager: Manager) -> None:
    admin = manager.tenant("acme")
    manager.call(admin, "POST", "/v1/keys", json={"name": "k"})
    ct = base64.b64decode(
        manager.call(admin, "POST", "/v1/keys/k/encrypt", json={"plaintext": b64(b"x" * 40)}).json()["ciphertext"]
    )
    for i in (0, 3, 20, 23, 30, len(ct) - 1):
        bad = bytearray(ct)
        bad[i] ^= 1
        r = manager.call(admin, "POST", "/v1/decrypt", json={"ciphertext": b64(bytes(bad))})
        assert r.status_code in (400, 404), (i, r.text)
        assert r.json()["code"] in {"invalid_ciphertext", "key_version_not_found"}
    for junk in (b"", b"KC", ct[:30], b"A" * 70000):
        r = manager.call(admin, "POST", "/v1/decrypt", json={"ciphertext": b64(junk)})
        assert r.status_code in (400, 413, 422), r.text


def test_tenants_are_isolated(manager: Manager) -> None:
    a, b = manager.tenant("alpha"), manager.tenant("beta")
    manager.call(a, "POST", "/v1/keys", json={"name": "shared-name"})
    manager.call(b, "POST", "/v1/keys", json={"name": "shared-name"})
    ct = manager.call(a, "POST", "/v1/keys/shared-name/encrypt", json={"plaintext": b64(b"alpha secret")}).json()
    # beta holds a key of the same name, but alpha's ciphertext names alpha's key id: beta cannot open it
    r = manager.call(b, "POST", "/v1/decrypt", json={"ciphertext": ct["ciphertext"]})
    assert r.status_code == 400 and r.json()["code"] == "invalid_ciphertext"
    assert "alpha secret" not in r.text
    assert manager.call(b, "GET", "/v1/keys").json()[0]["id"] != manager.call(a, "GET", "/v1/keys").json()[0]["id"]
    # tenant admins cannot manage tenants; the system admin cannot use tenant keys
    assert manager.call(a, "GET", "/v1/tenants").status_code == 403
    assert manager.call(manager.root_token, "GET", "/v1/keys").status_code == 403
    assert (
        manager.call(manager.root_token, "POST", "/v1/decrypt", json={"ciphertext": ct["ciphertext"]}).status_code
        == 403
    )


def test_roles_and_tokens(manager: Manager) -> None:
    admin = manager.tenant("acme")
    auditor = manager.call(admin, "POST", "/v1/tokens", json={"name": "audrey", "role": "auditor"}).json()["token"]
    officer = manager.call(admin, "POST", "/v1/tokens", json={"name": "sam", "role": "security-officer"}).json()
    assert manager.call(admin, "POST", "/v1/tokens", json={"name": "bot", "role": "agent"}).status_code == 422
    manager.call(admin, "POST", "/v1/keys", json={"name": "k"})
    assert manager.call(auditor, "GET", "/v1/keys/k").status_code == 200
    denied = manager.call(auditor, "POST", "/v1/keys", json={"name": "evil"})
    assert denied.status_code == 403 and denied.json()["code"] == "role_forbidden"
    assert manager.call(auditor, "POST", "/v1/keys/k/generate-data-key", json={}).status_code == 403
    assert manager.call(officer["token"], "POST", "/v1/keys/k/rotate").status_code == 403
    # the denials are in the audit log
    records = manager.call(auditor, "GET", "/v1/audit").json()["records"]
    assert sum('"outcome":"denied"' in r["body"] for r in records) >= 2
    # revoked tokens stop working at once; garbage tokens read the same as revoked ones
    assert manager.call(admin, "DELETE", f"/v1/tokens/{officer['id']}").status_code == 204
    gone = manager.call(officer["token"], "GET", "/v1/keys")
    assert gone.status_code == 401 and gone.json()["code"] == "bad_token"
    for junk in ("kst_nope.nope", "x" * 5000, admin[:-1] + ("A" if admin[-1] != "A" else "B")):
        assert manager.call(junk, "GET", "/v1/keys").json()["code"] == "bad_token"
    assert manager.client.get("/v1/keys").json()["code"] == "no_credentials"


def test_bad_input_changes_nothing(manager: Manager) -> None:
    admin = manager.tenant("acme")
    before = manager.call(admin, "GET", "/v1/audit").json()["records"]
    cases = [
        ("POST", "/v1/keys", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422),
        ("POST", "/v1/keys", {"json": {"name": 12}}, 422),
        ("POST", "/v1/keys", {"json": {"name": "UPPER"}}, 422),
        ("POST", "/v1/keys", {"json": {"name": "ok", "extra": 1}}, 422),
        ("POST", "/v1/keys", {"json": {"name": "x" * 65}}, 422),
        (
            "POST",
            "/v1/keys",
            {"content": b"{" + b" " * 70000 + b"}", "headers": {"content-type": "application/json"}},
            413,
        ),
        ("POST", "/v1/keys/nope/rotate", {}, 404),
        ("POST", "/v1/decrypt", {"json": {"ciphertext": "***"}}, 422),
        ("POST", "/v1/keys/k/encrypt", {"json": {"plaintext": b64(b"x" * 5000)}}, 400),
        ("GET", "/v1/audit?after=-1", {}, 422),
    ]
    for method, path, kw, status in cases:
        r = manager.call(admin, method, path, **kw)
        assert r.status_code == status, (path, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert {"type", "title", "status", "detail", "code"} <= r.json().keys()
    assert manager.call(admin, "GET", "/v1/keys").json() == []
    after = manager.call(admin, "GET", "/v1/audit").json()["records"]
    assert len(after) == len(before)


def test_sealed_server_serves_nothing_that_touches_keys(manager: Manager) -> None:
    admin = manager.tenant("acme")
    manager.call(admin, "POST", "/v1/keys", json={"name": "k"})
    ct = manager.call(admin, "POST", "/v1/keys/k/encrypt", json={"plaintext": b64(b"hello")}).json()["ciphertext"]
    assert manager.call(admin, "POST", "/v1/sys/seal").status_code == 403  # tenant admins do not hold the seal
    assert manager.call(manager.root_token, "POST", "/v1/sys/seal").json()["sealed"] is True
    assert manager.svc.keys.cache.get("x", 1) is None and manager.svc.root._root is None
    for method, path, body in (
        ("POST", "/v1/decrypt", {"ciphertext": ct}),
        ("POST", "/v1/keys/k/rotate", None),
        ("POST", "/v1/keys", {"name": "k2"}),
        ("POST", "/v1/ca/init", None),
    ):
        r = manager.call(admin, method, path, json=body)
        assert r.status_code == 503 and r.json()["code"] == "sealed", (path, r.text)
    assert manager.client.get("/v1/sys/status").json()["sealed"] is True
    manager.svc.root.auto_unseal()
    assert (
        base64.b64decode(manager.call(admin, "POST", "/v1/decrypt", json={"ciphertext": ct}).json()["plaintext"])
        == b"hello"
    )


def test_openapi_and_metrics(manager: Manager) -> None:
    spec = manager.client.get("/v1/openapi.json").json()
    assert spec["openapi"].startswith("3.") and "/v1/decrypt" in spec["paths"]
    manager.client.get("/v1/health")
    # the test client is not a loopback peer: /metrics wants a system token from it
    assert manager.client.get("/metrics").status_code == 401
    metrics = manager.call(manager.root_token, "GET", "/metrics").text
    assert "keysteward_http_requests_total" in metrics and "keysteward_sealed 0.0" in metrics
