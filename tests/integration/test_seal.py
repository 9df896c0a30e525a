"""The root of trust: Shamir unseal through the API, the SoftHSM2 seal, the dev seal's warning, seal()."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

import pytest

from keysteward.errors import Unauthenticated
from keysteward.formats import share as share_codec
from keysteward.server.run import build_services
from tests.fixtures.keysteward import Manager, SecretRegistry, init_manager
from tests.fixtures.softhsm import SoftHsmToken

pytestmark = pytest.mark.integration


def unseal(m: Manager, share: str) -> dict[str, object]:
    r = m.client.post("/v1/sys/unseal", json={"share": share})
    return {"status": r.status_code, **r.json()}


def test_shamir_unseal_any_order_and_bad_shares(manager_factory: Callable[..., Manager], db_url: str) -> None:
    m = manager_factory(db_url, seal="shamir")
    shares = m.init.result.shares
    assert len(shares) == 5 and m.init.result.threshold == 3
    status = m.client.get("/v1/sys/status").json()
    assert status["sealed"] is True and status["threshold"] == 3 and status["insecure"] is False
    admin_sys = m.root_token
    # sealed: nothing that changes state is served, since its audit record could not be signed
    r = m.call(admin_sys, "POST", "/v1/tenants", json={"name": "acme"})
    assert r.status_code == 503 and r.json()["code"] == "sealed", r.text
    assert m.call(admin_sys, "GET", "/v1/tenants").status_code == 200  # reading is fine

    assert unseal(m, shares[4])["progress"] == 1
    dup = unseal(m, shares[4])
    assert dup["status"] == 400 and dup["code"] == "share_duplicate"
    # a share of another key manager is refused before it is used
    other = share_codec.decode(shares[0])
    foreign = share_codec.encode(share_codec.Share(secrets.token_bytes(8), other.index, other.value))
    assert unseal(m, foreign)["code"] == "share_wrong_server"
    for junk in ("", "hello", shares[1][:-1] + ("0" if shares[1][-1] != "0" else "1"), "kss1-" + "a" * 2000):
        bad = unseal(m, junk)
        assert bad["status"] in (400, 422) and bad.get("code") in {"invalid_share", "invalid_request"}, bad
    assert m.client.get("/v1/sys/status").json()["progress"] == 1  # bad input changed nothing
    assert unseal(m, shares[1])["sealed"] is True
    done = unseal(m, shares[2])
    assert done["sealed"] is False and done["progress"] == 0 and done["share_commitments"] is True
    r = m.call(admin_sys, "POST", "/v1/tenants", json={"name": "acme"})
    admin = r.json()["admin_token"]["token"]
    assert m.call(admin, "POST", "/v1/keys", json={"name": "k"}).status_code == 201

    # forged shares with this server's id and a valid checksum are refused one by one; progress stays
    m.call(admin_sys, "POST", "/v1/sys/seal")
    cluster = bytes.fromhex(m.svc.root.cluster_id)
    unseal(m, shares[0])
    for index, code in ((9, "share_unknown_index"), (4, "share_rejected"), (1, "share_rejected")):
        forged = share_codec.encode(share_codec.Share(cluster, index, secrets.token_bytes(32)))
        refused = unseal(m, forged)
        assert refused["status"] == 400 and refused["code"] == code, refused
    assert m.client.get("/v1/sys/status").json()["progress"] == 1
    for s in (shares[3], shares[2]):
        last = unseal(m, s)
    assert last["sealed"] is False
    # every share event is in the system tenant's audit chain (the refused ones counted), none carries the share
    m.svc.refusals.flush()
    records = m.call(admin_sys, "GET", "/v1/audit").json()["records"]
    text = "".join(r["body"] for r in records)
    assert "seal.unseal_share" in text and "share_wrong_server" in text and "share_rejected" in text
    assert not any(share.split("-")[3] in text for share in shares)


def test_reset_progress_needs_a_share_or_the_root_token(manager_factory: Callable[..., Manager]) -> None:
    m = manager_factory(seal="shamir")
    shares = m.init.result.shares
    unseal(m, shares[0])
    anonymous = m.client.post("/v1/sys/unseal/reset")
    assert anonymous.status_code == 401 and anonymous.json()["code"] == "reset_needs_share_or_token"
    cluster = bytes.fromhex(m.svc.root.cluster_id)
    forged = share_codec.encode(share_codec.Share(cluster, 2, secrets.token_bytes(32)))
    for bad in (forged, "kss1-nonsense", shares[0][:-1]):
        r = m.client.post("/v1/sys/unseal/reset", json={"share": bad})
        assert r.status_code == 400 and r.json()["code"] in {"share_rejected", "invalid_share"}, r.text
    for bad_body in ({"share": ""}, {"share": 5}, {"other": "x"}, {"share": "k" * 2000}):
        assert m.client.post("/v1/sys/unseal/reset", json=bad_body).status_code == 422
    assert m.client.get("/v1/sys/status").json()["progress"] == 1
    # a custodian's valid share resets (it is checked, not counted)
    assert m.client.post("/v1/sys/unseal/reset", json={"share": shares[3]}).json()["progress"] == 0
    unseal(m, shares[1])
    # so does the root token; a token without seal.manage does not
    assert m.call("nonsense", "POST", "/v1/sys/unseal/reset").status_code == 401
    assert m.call(m.root_token, "POST", "/v1/sys/unseal/reset").json()["progress"] == 0


def test_dev_seal_is_refused_unless_asked_and_flagged(manager_factory: Callable[..., Manager], tmp_path: Path) -> None:
    from keysteward.server.run import initialize
    from tests.fixtures.keysteward import make_settings

    with pytest.raises(Exception, match="insecure-dev-seal") as err:
        initialize(make_settings(tmp_path / "x"), "dev", threshold=3, shares=5, allow_dev_seal=False)
    assert getattr(err.value, "code", "") == "dev_seal_refused"
    assert not (tmp_path / "x" / "keysteward.toml").exists()
    m = manager_factory(seal="dev")
    status = m.client.get("/v1/sys/status").json()
    assert status["insecure"] is True and "demo" in status["warning"]


def test_pkcs11_seal_with_softhsm(
    softhsm: SoftHsmToken, tmp_path: Path, secret_registry: SecretRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(softhsm.pin)
    seal = {
        "pkcs11_module": softhsm.module_path,
        "pkcs11_token_label": softhsm.token_label,
        "pkcs11_key_label": "ks-root",
        "pkcs11_pin_file": str(pin_file),
    }
    out = init_manager(tmp_path / "ks", secret_registry, seal="pkcs11", seal_settings=seal)
    assert out.result.shares == []
    svc = build_services(out.settings)  # unseals through the HSM at start
    try:
        assert not svc.root.sealed
        tenant, _ = svc.tenants.create("acme", actor=None)
        from keysteward.identity.principal import Principal

        admin = Principal(tenant.id, "acme", "admin", "admin", "token")
        svc.keys.create(admin, "k")
        pair = svc.envelope.generate_data_key(admin, "k")
        secret_registry.secret(pair.plaintext, "hsm data key")
        svc.root.seal()
        assert svc.root.sealed
        svc.root.auto_unseal()
        assert bytes(svc.envelope.decrypt(admin, pair.ciphertext).plaintext) == bytes(pair.plaintext)
    finally:
        svc.close()
    # a wrong PIN: a clear error, nothing unsealed, and the PIN is not in the message
    pin_file.write_text("999999")
    with pytest.raises(Unauthenticated) as err:
        build_services(out.settings)
    assert err.value.code == "hsm_pin_incorrect" and "999999" not in str(err.value)


@pytest.mark.parametrize(
    "damaged",
    [["00"], {"1": "zz"}, {"1": "00" * 31}, {"x": "00" * 32}, {"0": "00" * 32}, {"1": 5}, "text"],
)
def test_damaged_commitments_fail_closed(manager_factory: Callable[..., Manager], damaged: object) -> None:
    import json

    from sqlalchemy import update

    from keysteward.store.models import Cluster

    m = manager_factory(seal="shamir")
    params = {**m.svc.root.params, "commitments": damaged}
    with m.svc.db.write() as conn:
        conn.execute(update(Cluster).values(seal_params=json.dumps(params)))
    m.svc.root.params = params
    r = m.client.post("/v1/sys/unseal", json={"share": m.init.result.shares[0]})
    assert r.status_code == 503 and r.json()["code"] == "share_commitments_damaged", r.text
    assert m.svc.root.progress == 0 and m.svc.root.sealed
    assert m.client.get("/v1/sys/status").json()["share_commitments"] is False  # status still answers
