"""Issue 11 item 5: one admin cannot meet an N-of-M approval quorum alone, against a ``keysteward server
start`` process. Each test plays one attack with the shipped "2 security officers for pci volumes" policy:

- one admin minting two security-officer tokens for themselves is one person: one vote;
- a freshly made (or promoted) officer cannot vote for the cooling-off period, a day by default;
- the admin who minted an approver's token cannot count that vote beside their own, or on their own
  request, within the cooling-off period, nor launder the token through an admin token they minted;
- the requester and policy-changer exclusions hold for the person, whichever of their tokens votes;
  what the instance claims (``on_behalf_of``) excludes nobody, only a person's own token proves a requester;
- bad person names and bad requester proofs are refused.

Every refused vote is in the audit log with its reason and the person.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from keysteward.devcloud.provider import DevCloud
from tests.e2e.test_release_attacks import ProcessManager
from tests.fixtures.keysteward import SecretRegistry, ServerProcess, init_manager
from tests.integration.test_release_api import World

pytestmark = pytest.mark.e2e
POLICY = (Path(__file__).resolve().parents[2] / "docs" / "policies" / "pci-approval.cedar").read_text()
ACCOUNT = "111122223333"  # the account the example policy names
COOLING = 3.0  # seconds, where a test plays the period through


@dataclass
class Quorum:
    world: World
    server: ServerProcess
    vm: Any

    def token(self, name: str, role: str = "security-officer", person: str | None = None, by: str = "") -> str:
        """A new token minted by ``by`` (an admin token; the tenant's first admin when empty)."""
        body = {"name": name, "role": role, **({"person": person} if person else {})}
        r = self.world.m.call(by or self.world.admin, "POST", "/v1/tokens", json=body)
        assert r.status_code == 201, r.text
        assert r.json()["person"] == (person or name)
        return str(r.json()["token"])

    def pending(self, volume: str, asker: str | None = None, **extra: Any) -> str:
        """A release of ``volume`` by the instance, held for approval: the request id."""
        headers = {"authorization": f"Bearer {asker}"} if asker else None
        r, _ = self.world.release(self.vm, volume, headers=headers, **extra)
        assert r.status_code == 202 and r.json()["approvers"] == [{"group": "security-officer", "quorum": 2}], r.text
        return str(r.json()["request_id"])

    def vote(self, token: str, request_id: str, verb: str = "approve") -> Any:
        r = self.world.m.call(token, "POST", f"/v1/approvals/{request_id}/{verb}", json={"reason": "ticket 7"})
        return r

    def state(self, request_id: str) -> str:
        found = [a for a in self.world.call("GET", "/v1/approvals").json() if a["id"] == request_id]
        return str(found[0]["state"])

    def volume(self, name: str) -> str:
        volume, _ = self.world.volume(name, {"provider": "devcloud", "account": ACCOUNT}, labels={"pci": "yes"})
        return volume

    def refused(self) -> list[tuple[str, str]]:
        return [
            (r["reason"], r["details"].get("person", ""))
            for r in self.world.audit()
            if r["action"].startswith("approval.") and r["outcome"] == "denied"
        ]


@pytest.fixture
def quorum(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> Iterator[Callable[[float | None], Quorum]]:
    """``quorum(seconds)``: a server whose cooling-off period is ``seconds`` (None: the default), a tenant
    whose policy an admin of its own ("policy-admin", never an officer) set to the pci example."""
    managers: list[ProcessManager] = []

    def make(cooling: float | None) -> Quorum:
        out = init_manager(tmp_path / "ks", secret_registry)
        env = {} if cooling is None else {"KEYSTEWARD_RELEASE_APPROVER_COOLING_OFF_SECONDS": str(cooling)}
        server = server_factory(tmp_path / "ks", env=env)
        manager = ProcessManager(server, out.root_token.secret, secret_registry)
        managers.append(manager)
        world = World(manager, DevCloud.init(tmp_path / "devcloud"))  # type: ignore[arg-type]
        q = Quorum(world, server, world.cloud.create(account=ACCOUNT))
        policy_admin = q.token("policy-admin", "admin")
        r = manager.call(policy_admin, "PUT", "/v1/policy", json={"sources": {"pci.cedar": POLICY}})
        assert r.status_code == 200, r.text
        return q

    yield make
    for m in managers:
        m.client.close()


def test_one_admin_with_two_officer_tokens_is_one_vote(quorum: Callable[[float | None], Quorum]) -> None:
    q = quorum(COOLING)
    # the tenant's admin mints two officer tokens for themselves, one through the CLI's --person
    first = q.token("admin-officer-1", person="admin")
    made = q.server.cli_json(
        "token", "create", "admin-officer-2", "--role", "security-officer", "--person", "admin", token=q.world.admin
    )
    assert made["person"] == "admin"
    second = str(made["token"])
    bob = q.token("bob")
    listed = {t["name"]: t for t in q.world.call("GET", "/v1/tokens").json()}
    assert listed["admin-officer-2"]["person"] == "admin" and listed["bob"]["created_by"] == "admin"
    time.sleep(COOLING + 0.5)

    cards = q.volume("cards")
    request_id = q.pending(cards)
    assert q.vote(first, request_id).json()["state"] == "pending"
    again = q.vote(second, request_id)  # the same person with their other token
    assert again.status_code == 409 and again.json()["code"] == "approval_already_voted", again.text
    assert q.state(request_id) == "pending"
    assert q.pending(cards) == request_id  # the instance still waits
    # a second person makes the quorum
    assert q.vote(bob, request_id).json()["state"] == "approved"
    released, _ = q.world.release(q.vm, cards)
    assert released.status_code == 200, released.text
    votes = next(a for a in q.world.call("GET", "/v1/approvals").json() if a["id"] == request_id)["votes"]
    assert sorted(v["person"] for v in votes) == ["admin", "bob"]
    assert ("approval_already_voted", "admin") in q.refused()


def test_a_fresh_officer_cannot_vote_by_default(quorum: Callable[[float | None], Quorum]) -> None:
    q = quorum(None)  # the shipped default: a day
    carol, dave = q.token("carol"), q.token("dave")
    request_id = q.pending(q.volume("cards"))
    for token in (carol, dave):
        refused = q.vote(token, request_id)
        assert refused.status_code == 403 and refused.json()["code"] == "approver_cooling_off", refused.text
        assert "24 h" in refused.json()["detail"]
    # a deny is a vote too
    assert q.vote(carol, request_id, "deny").json()["code"] == "approver_cooling_off"
    assert q.state(request_id) == "pending"
    assert {("approver_cooling_off", p) for p in ("carol", "dave")} <= set(q.refused())


def test_a_cooling_off_period_ends(quorum: Callable[[float | None], Quorum]) -> None:
    q = quorum(COOLING)
    carol, dave = q.token("carol"), q.token("dave")
    erin_auditor = q.token("erin", "auditor")
    request_id = q.pending(q.volume("cards"))
    assert q.vote(carol, request_id).json()["code"] == "approver_cooling_off"
    time.sleep(COOLING + 0.5)
    assert q.vote(carol, request_id).json()["state"] == "pending"
    # promoting a long-standing person (erin, an auditor) to officer starts the period for her
    assert q.vote(erin_auditor, request_id).json()["code"] == "role_forbidden"  # auditors never vote
    promoted = q.token("erin-officer", person="erin")
    assert q.vote(promoted, request_id).json()["code"] == "approver_cooling_off"
    assert q.vote(dave, request_id).json()["state"] == "approved"


def test_the_minting_admin_cannot_count_the_token_they_made(quorum: Callable[[float | None], Quorum]) -> None:
    q = quorum(COOLING)
    ops = q.token("ops", "admin")  # a second admin, who is also an officer
    ops_officer = q.token("ops-officer", person="ops")
    alice = q.token("alice")
    time.sleep(COOLING + 0.5)
    # ops mints a new token for alice, a long-standing officer, and so holds a secret that votes as alice
    alice_new = q.token("alice-new", person="alice", by=ops)

    cards = q.volume("cards")
    request_id = q.pending(cards)
    assert q.vote(ops_officer, request_id).json()["state"] == "pending"
    shadowed = q.vote(alice_new, request_id)
    assert shadowed.status_code == 403 and shadowed.json()["code"] == "approver_granted_by_party", shadowed.text
    # alice's own old token too: while ops holds a live token of hers, her vote may be theirs
    assert q.vote(alice, request_id).json()["code"] == "approver_granted_by_party"
    assert q.state(request_id) == "pending"

    # the other order: the minted token votes first, then the admin who minted it is refused
    vault = q.volume("vault")
    other = q.pending(vault)
    assert q.vote(alice_new, other).json()["state"] == "pending"
    late = q.vote(ops_officer, other)
    assert late.status_code == 403 and late.json()["code"] == "approver_granted_by_party", late.text

    # on ops's own request (proven by their token) alice's minted token does not count either
    ledger = q.volume("ledger")
    own = q.pending(ledger, asker=ops)
    assert q.vote(alice_new, own).json()["code"] == "approver_granted_by_party"
    assert q.vote(ops_officer, own).json()["code"] == "approver_is_requester"
    # revoking the token ops saw ends the shadow over alice at once: her own token counts again
    minted = next(t for t in q.world.call("GET", "/v1/tokens").json() if t["name"] == "alice-new")
    assert minted["created_by"] == "ops"
    assert q.world.call("DELETE", f"/v1/tokens/{minted['id']}").status_code == 204
    assert q.vote(alice, own).json()["state"] == "pending"

    # once the period is over a token ops minted is alice's alone
    alice_later = q.token("alice-later", person="alice", by=ops)
    assert q.vote(alice_later, request_id).json()["code"] == "approver_granted_by_party"
    time.sleep(COOLING + 0.5)
    assert q.vote(ops_officer, request_id).json()["code"] == "approval_already_voted"
    assert q.vote(alice_later, request_id).json()["state"] == "approved"
    assert ("approver_granted_by_party", "alice") in q.refused() and ("approver_granted_by_party", "ops") in q.refused()


def test_the_minting_admin_cannot_launder_a_token_through_an_admin_token(
    quorum: Callable[[float | None], Quorum],
) -> None:
    q = quorum(COOLING)
    ops = q.token("ops", "admin")
    ops_officer = q.token("ops-officer", person="ops")
    alice, carol = q.token("alice"), q.token("carol")
    time.sleep(COOLING + 0.5)
    # ops mints alice an admin token and with it an officer token in alice's own name (created_by alice) ...
    alice_admin = q.token("alice-admin", "admin", person="alice", by=ops)
    alice_new = q.token("alice-new", person="alice", by=alice_admin)
    # ... and a new person bob an admin token, with which an officer token for carol (created_by bob)
    bob_admin = q.token("bob-admin", "admin", person="bob", by=ops)
    carol_new = q.token("carol-new", person="carol", by=bob_admin)
    minted = {t["name"]: t for t in q.world.call("GET", "/v1/tokens").json()}
    assert minted["alice-new"]["created_by"] == "alice" and minted["carol-new"]["created_by"] == "bob"

    request_id = q.pending(q.volume("cards"))
    assert q.vote(ops_officer, request_id).json()["state"] == "pending"
    for token in (alice_new, carol_new, alice, carol):  # ops may hold a secret voting as alice or carol
        laundered = q.vote(token, request_id)
        assert laundered.status_code == 403 and laundered.json()["code"] == "approver_granted_by_party", laundered.text
    # revoking the admin token does not unmint what it minted: the shadow stays for the period
    assert q.world.call("DELETE", f"/v1/tokens/{minted['alice-admin']['id']}").status_code == 204
    assert q.vote(alice, request_id).json()["code"] == "approver_granted_by_party"
    assert q.state(request_id) == "pending"
    assert {("approver_granted_by_party", "alice"), ("approver_granted_by_party", "carol")} <= set(q.refused())


def test_exclusions_apply_to_people_not_tokens_or_claims(quorum: Callable[[float | None], Quorum]) -> None:
    q = quorum(COOLING)
    bob, bob_laptop = q.token("bob"), q.token("bob-laptop", person="bob")
    carol, dave = q.token("carol"), q.token("dave")
    ops = q.token("ops", "admin")
    ops_officer = q.token("ops-officer", person="ops")
    time.sleep(COOLING + 0.5)

    # bob asks with one token and votes with the other: the person asked, the person is refused
    cards = q.volume("cards")
    asked = q.pending(cards, asker=bob_laptop)
    refused = q.vote(bob, asked)
    assert refused.status_code == 403 and refused.json()["code"] == "approver_is_requester", refused.text

    # the instance claims carol asked: carol still votes (a claim excludes nobody) ...
    listed = next(a for a in q.world.call("GET", "/v1/approvals").json() if a["id"] == asked)
    assert listed["requested_by"] == "bob"
    held = [r for r in q.world.audit() if r["action"] == "volume.release" and r["outcome"] == "pending"]
    assert held[-1]["details"]["requested_by"] == "bob" and held[-1]["details"]["approval"] == asked
    vault = q.volume("vault")
    claimed = q.pending(vault, on_behalf_of="carol")
    listed = next(a for a in q.world.call("GET", "/v1/approvals").json() if a["id"] == claimed)
    assert listed["on_behalf_of"] == "carol" and listed["requested_by"] is None
    assert q.vote(carol, claimed).json()["state"] == "pending"
    # ... and naming someone else does not let the real asker in: dave proves he asked on the same request
    assert q.pending(vault, asker=dave, on_behalf_of="erin") == claimed
    assert q.vote(dave, claimed).json()["code"] == "approver_is_requester"

    # ops changes the policy with the admin token and votes with the officer token: refused, as a person
    r = q.world.m.call(ops, "PUT", "/v1/policy", json={"sources": {"pci.cedar": POLICY + "\n// reviewed\n"}})
    assert r.status_code == 200, r.text
    changer = q.vote(ops_officer, claimed)
    assert changer.status_code == 403 and changer.json()["code"] == "approver_changed_policy", changer.text
    assert q.state(claimed) == "pending"

    # another tenant's person cannot be the requester of this tenant's release
    beta = q.world.m.tenant("beta")
    foreign, _ = q.world.release(q.vm, cards, headers={"authorization": f"Bearer {beta}"})
    assert foreign.status_code == 403 and foreign.json()["code"] == "tenant_mismatch", foreign.text
    bad, _ = q.world.release(q.vm, cards, headers={"authorization": "Bearer kst_nope.nope"})
    assert bad.status_code == 401 and bad.json()["code"] == "bad_token"

    assert {("approver_is_requester", "bob"), ("approver_is_requester", "dave"),
            ("approver_changed_policy", "ops")} <= set(q.refused())  # fmt: skip


def test_bad_person_names_and_proofs_are_refused(quorum: Callable[[float | None], Quorum]) -> None:
    q = quorum(COOLING)
    for person in ("", "Alice", "a b", "../x", "-lead", "x" * 65, "ops\n", 5, ["ops"]):
        body = {"name": "stray", "role": "security-officer", "person": person}
        r = q.world.m.call(q.world.admin, "POST", "/v1/tokens", json=body)
        assert r.status_code in (400, 422), (person, r.text)
    r = q.world.m.call(q.world.admin, "POST", "/v1/tokens", json={"name": "stray", "role": "security-officer",
                                                                   "person": "ok", "persons": "x"})  # fmt: skip
    assert r.status_code in (400, 422), r.text  # an unknown field is not ignored
    cli = q.server.cli("token", "create", "stray", "--person", "Not A Name", token=q.world.admin, check=False)
    assert cli.returncode != 0 and "person" in (cli.stderr + cli.stdout).lower(), cli.stderr
    assert "stray" not in {t["name"] for t in q.world.call("GET", "/v1/tokens").json()}

    # what proves a requester is a good token of the tenant, nothing else
    cards = q.volume("cards")
    for header in ("Basic YWRtaW46YWRtaW4=", "Bearer", "Bearer kst_", "kst_x.y", f"Bearer {q.world.admin}x"):
        r, _ = q.world.release(q.vm, cards, headers={"authorization": header})
        assert r.status_code == 401 and r.json()["code"] in ("bad_token", "no_credentials"), (header, r.text)
    assert not q.world.call("GET", "/v1/approvals").json()  # no request was made by any of them
