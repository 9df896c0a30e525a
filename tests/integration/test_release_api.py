"""The release protocol's server side on both engines, with evidence from a real devcloud provider.

Plays the attacker of the issue: replayed and expired nonces, evidence for another key, altered and
foreign documents, another tenant's volume, an unbound instance, a clone while the original runs, a
snapshot attached elsewhere, revoked and destroyed volumes. Each is denied with its code, audited, and
leaves the leases alone.
"""

from __future__ import annotations

import base64
import importlib.resources
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from keysteward.attest.binding import binding
from keysteward.crypto.hpke import MLKEM768_X25519, X25519, OneTimeKey
from keysteward.devcloud.provider import DevCloud, Instance
from keysteward.formats.release_wire import MAGIC, TOKEN_SIZE, seal_info
from keysteward.store.models import DataKey
from tests.fixtures.keysteward import Manager

pytestmark = pytest.mark.integration
AUDIENCE = "keysteward"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unpack(plain: bytearray) -> tuple[bytes, bytes]:
    assert plain[:4] == MAGIC
    n = plain[4]
    assert len(plain) == 5 + n + TOKEN_SIZE
    return bytes(plain[5 : 5 + n]), bytes(plain[5 + n :])


class World:
    """A tenant with a key, a trusted devcloud and helpers to play instances."""

    def __init__(self, manager: Manager, cloud: DevCloud, tenant: str = "acme") -> None:
        self.m = manager
        self.cloud = cloud
        self.tenant = tenant
        self.admin = manager.tenant(tenant)
        assert self.call("POST", "/v1/keys", json={"name": "volumes"}).status_code == 201
        r = self.call(
            "POST",
            "/v1/providers",
            json={"name": "devcloud", "kind": "aws-iid", "certificates_pem": cloud.certificate_pem()},
        )
        assert r.status_code == 201, r.text
        r = self.call(
            "POST",
            "/v1/providers",
            json={
                "name": "devgcp",
                "kind": "gcp-jwt",
                "certificates_pem": cloud.certificate_pem(),
                "audience": AUDIENCE,
            },
        )
        assert r.status_code == 201, r.text

    def call(self, method: str, path: str, **kw: Any) -> Any:
        return self.m.call(self.admin, method, path, **kw)

    def volume(self, name: str, binding_: dict[str, str], **extra: Any) -> tuple[str, bytes]:
        otk = OneTimeKey.generate()
        r = self.call(
            "POST",
            "/v1/volumes",
            json={"name": name, "key": "volumes", "binding": binding_, "public_key": b64(otk.public_bytes), **extra},
        )
        assert r.status_code == 201, r.text
        body = r.json()
        plain = otk.open(base64.b64decode(body["sealed"]), seal_info(self.tenant, body["volume"]["id"], "create"))
        secret, token = unpack(plain)
        assert token == bytes(32) and len(secret) == 32
        self.m.registry.secret(secret, "volume secret")
        return body["volume"]["id"], secret

    def challenge(self) -> str:
        r = self.m.client.post("/v1/release/challenge", json={})
        assert r.status_code == 200, r.text
        return str(r.json()["nonce"])

    def evidence(self, instance: Instance, nonce: str, public_key: bytes, kind: str = "aws-iid") -> dict[str, Any]:
        raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        hexed = binding(raw, public_key).hex()
        if kind == "aws-iid":
            document, signature = self.cloud.aws_document(instance, hexed)
            return {"type": "aws-iid", "document": b64(document), "signature": b64(signature)}
        return {"type": "gcp-jwt", "token": self.cloud.gcp_token(instance, AUDIENCE, hexed, datetime.now(UTC))}

    def release(
        self,
        instance: Instance,
        volume_id: str,
        *,
        suite: str = X25519,
        kind: str = "aws-iid",
        nonce: str | None = None,
        evidence: dict[str, Any] | None = None,
        tenant: str | None = None,
        platform: Callable[[bytes], dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> tuple[Any, OneTimeKey]:
        """``platform(binding)`` adds platform evidence (``tpm``, ``snp``) bound to this request; ``headers``
        go with it (a person's ``authorization`` proves who asks)."""
        otk = OneTimeKey.generate(suite)
        nonce = nonce or self.challenge()
        body = {
            "tenant": tenant or self.tenant,
            "volume_id": volume_id,
            "nonce": nonce,
            "suite": suite,
            "public_key": b64(otk.public_bytes),
            "evidence": {"identity": evidence or self.evidence(instance, nonce, otk.public_bytes, kind)},
            **extra,
        }
        if platform is not None:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
            body["evidence"].update(platform(binding(raw, otk.public_bytes)))
        return self.m.client.post("/v1/release", json=body, headers=headers), otk

    def released(self, instance: Instance, volume_id: str, **kw: Any) -> tuple[bytes, str, bytes]:
        r, otk = self.release(instance, volume_id, **kw)
        assert r.status_code == 200, r.text
        body = r.json()
        lease_id = body["lease"]["id"]
        plain = otk.open(base64.b64decode(body["sealed"]), seal_info(self.tenant, volume_id, lease_id))
        secret, token = unpack(plain)
        return secret, lease_id, token

    def renew(self, lease_id: str, token: bytes) -> Any:
        return self.m.client.post(f"/v1/leases/{lease_id}/renew", json={"token": b64(token)})

    def audit(self) -> list[dict[str, Any]]:
        r = self.call("GET", "/v1/audit", params={"limit": 1000})
        assert r.status_code == 200, r.text
        return [json.loads(rec["body"]) for rec in r.json()["records"]]

    def leases(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "/v1/leases").json())


def denied(r: Any, code: str) -> None:
    assert r.status_code == 403, r.text
    assert r.json()["code"] == code and r.json()["decision"] == "denied", r.text


@pytest.fixture
def cloud(tmp_path: Path) -> DevCloud:
    return DevCloud.init(tmp_path / "devcloud")


@pytest.fixture
def world(manager: Manager, cloud: DevCloud) -> World:
    return World(manager, cloud)


def test_release_renew_end_with_both_suites_and_both_evidence_shapes(world: World) -> None:
    vm = world.cloud.create(account="111122223333", image_id="img-base")
    volume_id, secret = world.volume("data", {"provider": "devcloud", "account": "111122223333"})
    got, lease_id, token = world.released(vm, volume_id)
    assert got == secret
    r = world.renew(lease_id, token)
    assert r.status_code == 200 and r.json()["action"] == "continue", r.text
    # the same instance asking again (agent restarted) supersedes its own lease; the hybrid PQ suite works
    got2, lease2, token2 = world.released(vm, volume_id, suite=MLKEM768_X25519)
    assert got2 == secret and lease2 != lease_id
    assert world.renew(lease_id, token).json()["action"] == "expired"
    # a wrong token and an unknown lease look the same
    assert world.renew(lease2, bytes(32)).json()["code"] == "lease_not_found"
    assert world.renew("00000000-0000-0000-0000-000000000000", token2).json()["code"] == "lease_not_found"
    assert world.m.client.post(f"/v1/leases/{lease2}/end", json={"token": b64(token2)}).status_code == 204
    # GCP-shaped evidence for a volume bound to that provider
    gvm = world.cloud.create(account="proj-7", image_id="img-g")
    gvol, gsecret = world.volume("gdata", {"provider": "devgcp", "account": "proj-7", "instance_id": gvm.id})
    assert world.released(gvm, gvol, kind="gcp-jwt")[0] == gsecret
    records = [r for r in world.audit() if r["action"] == "volume.release"]
    assert [(r["outcome"], r["details"]["decision"]) for r in records] == [("ok", "released")] * 3
    text = json.dumps(world.audit())
    assert b64(secret) not in text and secret.hex() not in text


def test_replay_expiry_binding_and_forgery_are_denied(world: World, cloud: DevCloud, tmp_path: Path) -> None:
    vm = cloud.create(account="111122223333", image_id="img-base")
    volume_id, _ = world.volume("data", {"provider": "devcloud", "account": "111122223333"})
    otk = OneTimeKey.generate()
    nonce = world.challenge()
    evidence = world.evidence(vm, nonce, otk.public_bytes)
    # evidence made for another HPKE key
    r, _ = world.release(vm, volume_id, nonce=nonce, evidence=evidence)
    denied(r, "binding_mismatch")
    # the nonce was spent by that attempt: the genuine evidence can not use it any more
    body = {
        "tenant": "acme",
        "volume_id": volume_id,
        "nonce": nonce,
        "public_key": b64(otk.public_bytes),
        "evidence": {"identity": evidence},
    }
    denied(world.m.client.post("/v1/release", json=body), "nonce_replayed")
    # a successful release, replayed verbatim
    nonce2 = world.challenge()
    body2 = dict(body, nonce=nonce2, evidence={"identity": world.evidence(vm, nonce2, otk.public_bytes)})
    assert world.m.client.post("/v1/release", json=body2).status_code == 200
    denied(world.m.client.post("/v1/release", json=body2), "nonce_replayed")
    # forged and expired nonces
    fake = base64.urlsafe_b64encode(b"\x01" + bytes(40)).decode().rstrip("=")
    denied(world.release(vm, volume_id, nonce=fake)[0], "nonce_invalid")
    world.m.svc.nonces.ttl = -1.0
    denied(world.release(vm, volume_id)[0], "nonce_expired")
    world.m.svc.nonces.ttl = 60.0
    # an altered document (same signature), and a document signed by another provider's key
    nonce3 = world.challenge()
    ev = world.evidence(vm, nonce3, otk.public_bytes)
    doc = json.loads(base64.b64decode(ev["document"]))
    doc["accountId"] = "999999999999"
    altered = dict(ev, document=b64(json.dumps(doc, indent=2).encode()))
    denied(world.release(vm, volume_id, nonce=nonce3, evidence=altered)[0], "evidence_invalid")
    other = DevCloud.init(tmp_path / "other-cloud")
    twin = other.create(account="111122223333", image_id="img-base")
    nonce4 = world.challenge()
    otk4 = OneTimeKey.generate()
    hexed = binding(base64.urlsafe_b64decode(nonce4 + "=" * (-len(nonce4) % 4)), otk4.public_bytes).hex()
    document, signature = other.aws_document(twin, hexed)
    body4 = {
        "tenant": "acme",
        "volume_id": volume_id,
        "nonce": nonce4,
        "public_key": b64(otk4.public_bytes),
        "evidence": {"identity": {"type": "aws-iid", "document": b64(document), "signature": b64(signature)}},
    }
    denied(world.m.client.post("/v1/release", json=body4), "evidence_invalid")
    # the replays came with evidence that verified: a record each; the others proved nobody: counted
    world.m.svc.refusals.flush()
    denials = [r for r in world.audit() if r["action"] == "volume.release" and r["outcome"] == "denied"]
    assert [r["reason"] for r in denials if r["actor"] != "anonymous"] == ["nonce_replayed", "nonce_replayed"]
    counted = {r["reason"]: r["details"]["count"] for r in denials if r["actor"] == "anonymous"}
    assert counted == {"binding_mismatch": 1, "nonce_invalid": 1, "nonce_expired": 1, "evidence_invalid": 2}
    # only the one genuine release holds a lease
    assert [lease["state"] for lease in world.leases()] == ["active"]


def test_tenants_bindings_and_clones(world: World, cloud: DevCloud) -> None:
    alerts: list[dict[str, Any]] = []
    with webhook(alerts) as url:
        world.m.svc.alerts.url = url
        vm = cloud.create(account="111122223333", image_id="img-base")
        pinned, _ = world.volume("pinned", {"provider": "devcloud", "account": "111122223333", "instance_id": vm.id})
        fleet, _ = world.volume("fleet", {"provider": "devcloud", "account": "111122223333", "image_id": "img-base"})
        # another tenant's volume id reads as no volume
        other = World(world.m, cloud, tenant="globex")
        globex_vol, _ = other.volume("theirs", {"provider": "devcloud", "account": "111122223333"})
        denied(world.release(vm, globex_vol)[0], "volume_not_found")
        denied(world.release(vm, pinned, tenant="nosuchtenant")[0], "volume_not_found")
        # an instance of another account or image is not bound
        stranger = cloud.create(account="444455556666", image_id="img-base")
        denied(world.release(stranger, fleet)[0], "not_bound")
        wrong_image = cloud.create(account="111122223333", image_id="img-evil")
        denied(world.release(wrong_image, fleet)[0], "not_bound")
        # the original takes both volumes
        _, lease_pinned, token_pinned = world.released(vm, pinned)
        _, lease_fleet, token_fleet = world.released(vm, fleet)
        before = {lease["id"]: lease for lease in world.leases()}
        # a clone (same disk and image, new instance id) while the original runs
        clone = cloud.clone(vm.id)
        denied(world.release(clone, fleet)[0], "suspected_clone")
        denied(world.release(clone, pinned)[0], "suspected_clone")
        after = {lease["id"]: lease for lease in world.leases()}
        assert after == before, "a denied clone must not touch any lease"
        alert_records = [r for r in world.audit() if r.get("details", {}).get("alert") == "suspected_clone"]
        assert len(alert_records) == 2 and all(r["details"]["holder"].endswith(vm.id) for r in alert_records)
        wait_for(lambda: len(alerts) == 2)
        assert {a["requester"] for a in alerts} == {f"devcloud/111122223333/{clone.id}"}
        assert all(a["holder"] == f"devcloud/111122223333/{vm.id}" for a in alerts)
        # the original detaches cleanly: the fleet volume may move to the other instance
        world.m.client.post(f"/v1/leases/{lease_fleet}/end", json={"token": b64(token_fleet)})
        assert world.released(clone, fleet)[0]
        # the original is terminated; its volume snapshot attached to the clone is refused by binding
        world.m.client.post(f"/v1/leases/{lease_pinned}/end", json={"token": b64(token_pinned)})
        cloud.terminate(vm.id)
        denied(world.release(clone, pinned)[0], "not_bound")


def test_revoke_shred_destroy_and_instance_revocation(world: World, cloud: DevCloud) -> None:
    vm = cloud.create(account="111122223333", image_id="img-base")
    bind = {"provider": "devcloud", "account": "111122223333"}
    ids = {name: world.volume(name, bind)[0] for name in ("a", "b", "c", "d")}
    held = {name: world.released(vm, vid)[1:] for name, vid in ids.items()}
    assert world.call("POST", "/v1/volumes/a/revoke", json={"reason": "incident 7"}).json()["state"] == "revoked"
    assert world.call("POST", "/v1/volumes/b/revoke", json={"shred": True}).json()["state"] == "shred"
    assert world.call("POST", "/v1/volumes/c/destroy", json={}).json()["state"] == "destroyed"
    assert world.renew(*held["a"]).json()["action"] == "revoked"
    assert world.renew(*held["b"]).json()["action"] == "shred"
    assert world.renew(*held["c"]).json()["action"] == "shred"
    assert world.renew(*held["d"]).json()["action"] == "continue"
    denied(world.release(vm, ids["a"])[0], "volume_revoked")
    denied(world.release(vm, ids["b"])[0], "volume_revoked")
    denied(world.release(vm, ids["c"])[0], "volume_destroyed")
    # the destroyed volume's secret is gone from the database
    with world.m.svc.db.read() as conn:
        wrapped = conn.execute(select(DataKey.wrapped).where(DataKey.name == f"volume-{ids['c']}")).scalar_one()
    assert wrapped is None
    # revoking the instance reaches its running volume at the next renewal
    r = world.call(
        "POST",
        "/v1/instances/revoke",
        json={"provider": "devcloud", "account": "111122223333", "instance_id": vm.id, "reason": "compromised"},
    )
    assert r.status_code == 204, r.text
    assert world.renew(*held["d"]).json()["action"] == "revoked"
    denied(world.release(vm, ids["d"])[0], "instance_revoked")
    actions = [r["action"] for r in world.audit()]
    for action in ("volume.revoke", "volume.destroy", "instance.revoke", "lease.renew"):
        assert action in actions
    # roles: an auditor reads volumes but may not revoke them
    token = world.call("POST", "/v1/tokens", json={"name": "aud", "role": "auditor"}).json()["token"]
    assert world.m.call(token, "GET", "/v1/volumes").status_code == 200
    assert world.m.call(token, "POST", "/v1/volumes/d/revoke", json={}).status_code == 403


def test_lease_expiry_frees_the_volume(world: World, cloud: DevCloud) -> None:
    vm = cloud.create(account="111122223333", image_id="img-base")
    other = cloud.create(account="111122223333", image_id="img-base")
    vid, _ = world.volume(
        "short", {"provider": "devcloud", "account": "111122223333"}, lease_seconds=5, renew_seconds=1
    )
    _, lease_id, token = world.released(vm, vid)
    denied(world.release(other, vid)[0], "suspected_clone")
    time.sleep(5.2)
    assert world.renew(lease_id, token).json()["action"] == "expired"
    assert world.released(other, vid)[0]


def test_bad_bodies_are_refused_and_change_nothing(world: World, cloud: DevCloud) -> None:
    vm = cloud.create(account="111122223333", image_id="img-base")
    vid, _ = world.volume("data", {"provider": "devcloud", "account": "111122223333"})
    before = len(world.audit())
    client = world.m.client
    for body in (b"", b"{", b"[]", b"null", json.dumps({"tenant": "acme"}).encode(), b"\xff" * 100):
        assert client.post("/v1/release", content=body, headers={"content-type": "application/json"}).status_code in (
            400,
            422,
        )
    huge = {"tenant": "acme", "volume_id": vid, "nonce": "x", "public_key": "AA==", "evidence": {"identity": {}}}
    huge["evidence"]["identity"] = {"type": "aws-iid", "document": "A" * 200_000, "signature": "AA=="}
    assert client.post("/v1/release", json=huge).status_code in (413, 422)
    # a public key of the wrong size, an unknown suite
    r, _ = world.release(vm, vid)
    assert r.status_code == 200
    bad_key = {
        "tenant": "acme",
        "volume_id": vid,
        "nonce": world.challenge(),
        "public_key": b64(b"short"),
        "evidence": {"identity": {"type": "aws-iid", "document": "", "signature": ""}},
    }
    assert client.post("/v1/release", json=bad_key).json()["code"] == "hpke_invalid"
    assert client.post("/v1/release", json=dict(bad_key, suite="rsa")).status_code == 422
    assert client.post("/v1/leases/not-a-uuid/renew", json={"token": "AA=="}).status_code == 404
    world.m.svc.refusals.flush()
    records = world.audit()[before:]
    assert [(r["action"], r["outcome"], r["actor"]) for r in records] == [
        ("volume.release", "ok", f"instance:devcloud/111122223333/{vm.id}"),
        ("volume.release", "denied", "anonymous"),  # the bad one-time key, counted
    ]
    assert records[1]["reason"] == "hpke_invalid" and records[1]["details"]["count"] == 1


def wait_for(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@contextmanager
def webhook(received: list[dict[str, Any]]) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/alerts"
    finally:
        server.shutdown()


def test_renewal_asks_the_policy_again(world: World, cloud: DevCloud) -> None:
    """A policy change that no longer permits a holder turns its next renewal into ``revoked``."""
    vm = cloud.create(account="111122223333", image_id="img-base")
    other = cloud.create(account="111122223333", image_id="img-base")
    volume_id, secret = world.volume("data", {"provider": "devcloud", "account": "111122223333"})
    got, lease_id, token = world.released(vm, volume_id)
    assert got == secret
    more, _ = world.volume("more", {"provider": "devcloud", "account": "111122223333"})
    _, other_lease, other_token = world.released(other, more)
    for _ in range(2):  # answered, and remembered (no policy reads the time): a policy change must still win
        assert world.renew(lease_id, token).json()["action"] == "continue"
    binding_ = importlib.resources.files("keysteward.policy").joinpath("binding.cedar").read_text()
    forbid = (
        "forbid (principal, action, resource) when "
        f'{{ principal is Keysteward::Instance && principal.instance_id == "{vm.id}" }};'
    )
    r = world.call("PUT", "/v1/policy", json={"sources": {"binding.cedar": binding_, "quarantine.cedar": forbid}})
    assert r.status_code in (200, 201), r.text
    assert world.renew(lease_id, token).json()["action"] == "revoked"
    assert world.renew(lease_id, token).json()["action"] == "revoked"  # and stays so
    assert world.renew(other_lease, other_token).json()["action"] == "continue"  # the others keep going
    records = [r for r in world.audit() if r["action"] == "lease.renew"]
    assert len(records) == 1 and records[0]["details"]["answer"] == "revoked"
    assert records[0]["details"]["reason"] == "forbidden_by_policy"
