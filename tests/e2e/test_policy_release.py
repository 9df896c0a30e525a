"""The shipped example policies decide real releases, against a ``keysteward server start`` process:

- "only on SEV-SNP with debug off and a known measurement" with SNP reports signed by a TEST chain (the
  server trusts its ARK through ``[release] snp_roots``; by default it would not);
- "TPM with PCR 7 equal to the approved value" with real quotes from swtpm, after the AK was enrolled by
  MakeCredential/ActivateCredential against the EK certificate swtpm-localca issued;
- "approval by 2 security officers for volumes labelled pci": pending, votes, separation of duties,
  expiry, one approval per request;

and the attacks of the issue, each denied with its reason code and audited. A denial's recorded request
is replayed through the dry run and gives the same decision.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from keysteward.agent.client import AgentClient
from keysteward.agent.release_answers import Released
from keysteward.agent.snp import FileSource, collect_snp
from keysteward.agent.tpm import TpmDevice
from keysteward.agent.tpm_enroll import enroll
from keysteward.agent.unlock import UnlockOptions
from keysteward.devcloud.provider import DevCloud
from keysteward.devcloud.server import MetadataServer
from keysteward.errors import KeystewardError
from tests.e2e.test_release_attacks import ProcessManager
from tests.fixtures.keysteward import SecretRegistry, ServerProcess, init_manager
from tests.integration.test_release_api import World, denied
from tests.support.snp_chain import TestChain, make_chain, write_file_source
from tests.support.swtpm import LocalCa, Swtpm, running_swtpm

pytestmark = pytest.mark.e2e
EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "policies"
APPROVAL_TTL = 6.0
ACCOUNT = "111122223333"
DEBUG_BIT = 1 << 19


@dataclass
class Site:
    world: World
    chain: TestChain
    tpm: Swtpm
    other_tpm: Swtpm
    ca: LocalCa
    tmp: Path
    server: ServerProcess
    metadata: MetadataServer

    def options(self, vm: Any, **kw: Any) -> UnlockOptions:
        """The agent's options on instance ``vm``: its metadata service, the key manager's CA."""
        ca_file = str(self.server.settings.server.tls_ca)
        return UnlockOptions(metadata_url=f"{self.metadata.url}/{vm.id}", ca_file=ca_file, timeout=30.0, **kw)

    def agent(self) -> AgentClient:
        return AgentClient(self.server.url, ca_file=str(self.server.settings.server.tls_ca), timeout=30.0)


@pytest.fixture
def site(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> Iterator[Site]:
    chain = make_chain("Policy e2e")
    ark = tmp_path / "test-ark.pem"
    ark.write_bytes(chain.ark.public_bytes(serialization.Encoding.PEM))
    with (
        running_swtpm(tmp_path / "tpm-a", tmp_path / "tpm-ca") as (tpm, ca),
        running_swtpm(tmp_path / "tpm-b") as (other, _),
    ):
        assert ca is not None
        roots = tmp_path / "ek-roots.pem"
        roots.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (ca.root, ca.issuer)))
        out = init_manager(tmp_path / "ks", secret_registry)
        env = {
            "KEYSTEWARD_RELEASE_SNP_ROOTS": str(ark),
            "KEYSTEWARD_RELEASE_TPM_EK_ROOTS": str(roots),
            "KEYSTEWARD_RELEASE_APPROVAL_TTL_SECONDS": str(APPROVAL_TTL),
            # officers made in a test vote at once (the default makes them wait a day):
            # tests/e2e/test_approval_quorum.py plays the cooling-off period
            "KEYSTEWARD_RELEASE_APPROVER_COOLING_OFF_SECONDS": "0",
        }
        server = server_factory(tmp_path / "ks", env=env)
        manager = ProcessManager(server, out.root_token.secret, secret_registry)
        world = World(manager, DevCloud.init(tmp_path / "devcloud"))  # type: ignore[arg-type]
        metadata = MetadataServer(world.cloud, "127.0.0.1", 0)
        threading.Thread(target=metadata.serve_forever, daemon=True).start()
        yield Site(world, chain, tpm, other, ca, tmp_path, server, metadata)
        metadata.shutdown()
        metadata.server_close()
        manager.client.close()


def _policy(world: World, **sources: str) -> dict[str, Any]:
    r = world.call("PUT", "/v1/policy", json={"sources": sources})
    assert r.status_code == 200, r.text
    return dict(r.json())


def _example(name: str) -> str:
    return (EXAMPLES / name).read_text()


def _snp(site: Site, name: str, **fields: Any) -> Callable[[bytes], dict[str, Any]]:
    source = FileSource(write_file_source(site.tmp / name, site.chain, site.chain.report(**fields)))
    return lambda bound: {"snp": collect_snp(source, bound)}


def _last_denial(world: World, code: str) -> dict[str, Any]:
    records = [r for r in world.audit() if r["action"] == "volume.release" and r.get("reason") == code]
    assert records, f"no audited denial {code}"
    return records[-1]


def test_snp_policy_with_a_test_chain(site: Site) -> None:
    world = site.world
    text = _example("snp-only.cedar")
    good = re.findall(r'"([0-9a-f]{96})"', text)[0]  # the first approved measurement in the example
    account = "444455556666"
    assert _policy(world, **{"snp-only.cedar": text})["version"] == 1
    vm = world.cloud.create(account=account)
    volume, secret = world.volume("ledger", {"provider": "devcloud", "account": account},
                                  labels={"sensitivity": "confidential"})  # fmt: skip
    measured = {"measurement": bytes.fromhex(good)}

    got, lease, token = world.released(vm, volume, platform=_snp(site, "good", **measured))
    assert got == secret
    assert world.call("POST", f"/v1/leases/{lease}/end", json={"token": _b64(token)}).status_code in (200, 204)
    # the agent's own path: identity from the metadata service, the report from its SNP source
    source = write_file_source(site.tmp / "agent-snp", site.chain, site.chain.report(**measured))
    with site.agent() as agent:
        released = agent.release(world.tenant, volume, site.options(vm, snp=f"file:{source}").evidence())
    assert isinstance(released, Released) and bytes(released.secret.view()) == secret
    with site.agent() as agent:
        agent.end(released.lease)
    released.secret.wipe()
    # the debug bit lets the host read the guest's memory: forbidden
    debug = _snp(site, "debug", policy=0x30000 | DEBUG_BIT, **measured)
    denied(world.release(vm, volume, platform=debug)[0], "forbidden_by_policy")
    # another build
    denied(world.release(vm, volume, platform=_snp(site, "other", measurement=b"\x01" * 48))[0], "forbidden_by_policy")
    # no SNP evidence at all
    denied(world.release(vm, volume)[0], "forbidden_by_policy")
    # a genuine report, made for another request
    stale = _snp(site, "stale", **measured)(b"\x07" * 32)
    denied(world.release(vm, volume, platform=lambda bound: stale)[0], "binding_mismatch")
    # a chain the server does not trust, however well made
    forger = make_chain("Forger")
    forged = FileSource(write_file_source(site.tmp / "forged", forger, forger.report(**measured)))
    denied(world.release(vm, volume, platform=lambda bound: {"snp": collect_snp(forged, bound)})[0], "evidence_invalid")
    # a flipped bit in the signed report
    flipped = _snp(site, "flip", **measured)

    def tampered(bound: bytes) -> dict[str, Any]:
        evidence = flipped(bound)
        report = bytearray(base64.b64decode(evidence["snp"]["report"]))
        report[0x95] ^= 0x01
        evidence["snp"]["report"] = base64.b64encode(report).decode()
        return evidence

    denied(world.release(vm, volume, platform=tampered)[0], "evidence_invalid")

    # a policy that does not parse is refused with its place; the set in force stays
    r = world.call(
        "PUT", "/v1/policy", json={"sources": {"bad.cedar": "permit (principal, action, resource)\nwhen { 1 + };"}}
    )
    assert r.status_code == 400 and r.json()["code"] == "policy_invalid", r.text
    assert "bad.cedar:2:" in r.json()["detail"]
    assert world.call("GET", "/v1/policy").json()["version"] == 1

    # every denial replays through the dry run with the same decision and the policy that made it
    record = _last_denial(world, "forbidden_by_policy")
    recorded = site.tmp / "denial.json"
    recorded.write_text(json.dumps(record))
    tested = site.server.cli("policy", "test", "--request", str(recorded), token=world.admin, check=False)
    assert tested.returncode == 2, tested.stderr  # a deny fails a CI gate
    cli = tested.stdout
    assert "decision: deny (forbidden_by_policy)" in cli and "snp-required-for-confidential" in cli
    bad_file = site.tmp / "bad.cedar"
    bad_file.write_text("permit (principal, action, resource) when { principal.nope };\n")
    refused = site.server.cli("policy", "set", str(bad_file), token=world.admin, check=False)
    assert refused.returncode == 1 and "bad.cedar:1:" in refused.stderr and "Traceback" not in refused.stderr
    replay = world.call("POST", "/v1/policy/test", json={"request": json.loads(record["details"]["request"])})
    assert replay.status_code == 200, replay.text
    assert replay.json()["effect"] == "deny" and "snp-required-for-confidential" in replay.json()["policies"]
    # ... and against a proposed set that drops the guard it would be permitted
    proposed = {"open.cedar": '@id("analytics-instances")' + text.split('@id("analytics-instances")')[1]}
    again = world.call("POST", "/v1/policy/test",
                       json={"request": json.loads(record["details"]["request"]), "sources": proposed})  # fmt: skip
    assert again.json()["effect"] == "permit", again.text
    updates = [r for r in world.audit() if r["action"] == "policy.update"]
    assert len(updates) == 1 and '+@id("snp-required-for-confidential")' in updates[0]["details"]["diff"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_tpm_policy_with_real_quotes(site: Site) -> None:
    world = site.world
    vm = world.cloud.create(account=ACCOUNT)
    device = TpmDevice(site.tpm.tcti, workdir=site.tmp / "agent-a")
    with site.agent() as agent:
        enrolled = enroll(site.server.url, world.tenant, site.tpm.tcti, site.options(vm), client=agent)
    assert enrolled.endswith(vm.id)
    keys = world.call("GET", "/v1/attest/tpm/keys").json()
    assert [(k["holder"], k["method"]) for k in keys] == [(enrolled, "credential")]

    def quote(bound: bytes) -> dict[str, Any]:
        return {"tpm": device.quote(bound, {"sha256": [0, 7]})}

    pcr7 = quote(b"\x00" * 32)["tpm"]["pcrs"]["sha256"]["7"]
    text = _example("tpm-pcr7.cedar").replace("65caf8dd1e0ea7a6347b635d2b379c93b9a1351edc2afc3ecda700e534eb3068", pcr7)
    _policy(world, **{"tpm-pcr7.cedar": text})
    volume, key = world.volume("boot-disk", {"provider": "devcloud", "account": ACCOUNT})
    got, lease, token = world.released(vm, volume, platform=quote)
    assert got == key
    assert world.call("POST", f"/v1/leases/{lease}/end", json={"token": _b64(token)}).status_code in (204, 200)
    # the agent's own path: its quote over the configured PCRs goes with the identity document
    with site.agent() as agent:
        released = agent.release(world.tenant, volume, site.options(vm, tpm=site.tpm.tcti).evidence())
        assert isinstance(released, Released) and bytes(released.secret.view()) == key
        agent.end(released.lease)
    released.secret.wipe()
    # without a quote, the policy has no PCR 7 to look at
    denied(world.release(vm, volume)[0], "no_permit")
    # a quote signed by another TPM's AK (the AK swapped after enrollment)
    other = TpmDevice(site.other_tpm.tcti, workdir=site.tmp / "agent-b")
    other.ensure_keys()
    denied(world.release(vm, volume, platform=lambda b: {"tpm": other.quote(b, {"sha256": [0, 7]})})[0],
           "evidence_invalid")  # fmt: skip

    # reported PCR values that are not the quoted ones
    def lying(bound: bytes) -> dict[str, Any]:
        evidence = quote(bound)
        evidence["tpm"]["pcrs"]["sha256"]["7"] = ("1" if pcr7[0] != "1" else "2") + pcr7[1:]
        return evidence

    denied(world.release(vm, volume, platform=lying)[0], "evidence_invalid")
    # a quote for another request
    old = quote(b"\x05" * 32)
    denied(world.release(vm, volume, platform=lambda b: old)[0], "binding_mismatch")
    # Secure Boot state changed: PCR 7 no longer the approved value
    device.extend(7, "ab" * 32)
    denied(world.release(vm, volume, platform=quote)[0], "no_permit")
    # a second enrollment with another TPM's AK is refused while one is enrolled
    with site.agent() as agent, pytest.raises(KeystewardError) as refused:
        enroll(site.server.url, world.tenant, site.other_tpm.tcti, site.options(vm), client=agent)
    assert refused.value.code in ("tpm_already_enrolled", "evidence_invalid")
    reasons = {r.get("reason") for r in world.audit() if r["action"] == "volume.release"}
    assert {"no_permit", "evidence_invalid", "binding_mismatch"} <= reasons


def _officer(world: World, name: str, role: str = "security-officer") -> str:
    r = world.call("POST", "/v1/tokens", json={"name": name, "role": role})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def _vote(world: World, token: str, request_id: str, verb: str, reason: str = "checked the change ticket") -> Any:
    return world.m.call(token, "POST", f"/v1/approvals/{request_id}/{verb}", json={"reason": reason})


def test_two_officers_approve_a_pci_release(site: Site) -> None:
    world = site.world
    _policy(world, **{"pci-approval.cedar": _example("pci-approval.cedar")})
    alice, bob, carol, dave = (_officer(world, n) for n in ("alice", "bob", "carol", "dave"))
    auditor = _officer(world, "erin", "auditor")
    vm = world.cloud.create(account=ACCOUNT)
    plain, _ = world.volume("scratch", {"provider": "devcloud", "account": ACCOUNT})
    cards, key = world.volume("cards", {"provider": "devcloud", "account": ACCOUNT}, labels={"pci": "yes"})

    assert world.released(vm, plain)[0] != key  # no label, no approval
    # alice asks with her own token: proven, so she may not approve (a bare on_behalf_of is not trusted)
    first, _ = world.release(vm, cards, headers={"authorization": f"Bearer {alice}"})
    assert first.status_code == 202 and first.json()["status"] == "pending", first.text
    request_id = first.json()["request_id"]
    assert first.json()["approvers"] == [{"group": "security-officer", "quorum": 2}]
    again, _ = world.release(vm, cards)
    assert again.status_code == 202 and again.json()["request_id"] == request_id
    listed = world.m.call(bob, "GET", "/v1/approvals", params={"state": "pending"}).json()
    assert [a["id"] for a in listed] == [request_id] and listed[0]["requester"].endswith(vm.id)

    refused = _vote(world, alice, request_id, "approve")  # asked for it herself
    assert refused.status_code == 403 and refused.json()["code"] == "approver_is_requester", refused.text
    assert _vote(world, auditor, request_id, "approve").status_code == 403  # not an approver at all
    assert _vote(world, world.admin, request_id, "approve").json()["code"] == "approver_not_in_group"
    assert _vote(world, bob, request_id, "approve").json()["state"] == "pending"
    twice = _vote(world, bob, request_id, "approve")
    assert twice.status_code == 409 and twice.json()["code"] == "approval_already_voted"
    listed_cli = site.server.cli("approvals", "list", token=carol).stdout
    assert request_id in listed_cli  # whole: it is typed back
    assert "2 security-officer" in listed_cli and "cards" in listed_cli  # the volume by its name
    approved = site.server.cli_json("approvals", "approve", request_id, "--reason", "ticket 42", token=carol)
    assert approved["state"] == "approved"
    assert approved["progress"] == [{"group": "security-officer", "quorum": 2, "approved": 2}]

    got, _, _ = world.released(vm, cards)
    assert got == key
    # the approval was for that one request: the next release waits again
    next_request = world.release(vm, cards)[0]
    assert next_request.status_code == 202 and next_request.json()["request_id"] != request_id
    short = next_request.json()["request_id"][:8]  # a prefix names the one pending request it starts
    first = site.server.cli("approvals", "approve", short, "--reason", "ticket 43", token=bob).stdout
    assert "pending (1 of 2 security-officer)" in first, first
    too_short = site.server.cli("approvals", "approve", short[:4], "--reason", "x", token=carol, check=False)
    assert too_short.returncode == 1 and "Traceback" not in too_short.stderr
    assert _vote(world, dave, next_request.json()["request_id"], "deny", "no change ticket").json()["state"] == "denied"
    denied(world.release(vm, cards)[0], "approval_denied")

    # a pending request expires; a vote after that is refused
    vault, _ = world.volume("vault", {"provider": "devcloud", "account": ACCOUNT}, labels={"pci": "yes"})
    late = world.release(vm, vault)[0].json()["request_id"]
    time.sleep(APPROVAL_TTL + 0.5)
    expired = _vote(world, bob, late, "approve")
    assert expired.status_code == 409 and expired.json()["code"] == "approval_expired", expired.text

    votes = [r for r in world.audit() if r["action"].startswith("approval.")]
    assert {(r["outcome"], r["reason"]) for r in votes} >= {
        ("ok", ""), ("denied", "approver_is_requester"), ("denied", "approval_already_voted"),
        ("denied", "approval_expired"),
    }  # fmt: skip
    pending = [r for r in world.audit() if r["action"] == "volume.release" and r["outcome"] == "pending"]
    assert pending and all("request" in r["details"] for r in pending)
