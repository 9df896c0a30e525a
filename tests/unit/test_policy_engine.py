"""The policy engine: the decision rules and the index (exact against Cedar over the whole set)."""

from __future__ import annotations

import random
import re
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import cedarpy
import pytest

from keysteward.policy.engine import Approval, CompiledPolicySet, PolicyDecision
from keysteward.policy.facts import PolicyRequest
from keysteward.policy.schema import cedar_schema

pytestmark = pytest.mark.unit

RELEASE = 'action == Keysteward::Action::"release"'
NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def request(**changes: Any) -> PolicyRequest:
    parts: dict[str, Any] = {
        "tenant": "acme",
        "action": "release",
        "principal": {"type": "Instance", "provider": "aws", "account": "111", "instance_id": "i-1", "tags": {}},
        "resource": {"id": "vol-1", "name": "db", "key": "k1", "labels": {}},
        "identity": {"provider": "aws", "kind": "aws-iid", "account": "111", "instance_id": "i-1"},
        "platform": {"tee": "none"},
        "time": NOW,
        "source_ip": "198.51.100.4",
    }
    parts.update(changes)
    return PolicyRequest(**parts)


# -- decisions -----------------------------------------------------------------------------------


def test_forbid_wins_and_names_only_the_forbids() -> None:
    text = (
        f'@id("p") permit(principal, {RELEASE}, resource);\n'
        '@id("f") forbid(principal, action, resource) when { resource.hasTag("frozen") };'
    )
    policies = CompiledPolicySet.compile({"t.cedar": text})
    assert policies.evaluate(request()) == PolicyDecision("permit", ("p",), None, (), "permitted")
    frozen = request(resource={"id": "vol-1", "name": "db", "key": "k1", "labels": {"frozen": ""}})
    assert policies.evaluate(frozen) == PolicyDecision("deny", ("f",), None, (), "forbidden_by_policy")


def test_the_strictest_approval_wins() -> None:
    text = "\n".join(
        [
            '@id("open") permit(principal, action, resource);',
            '@id("a") @approval_group("security-officer") @approval_quorum("2") @approval_valid_for("3600")',
            "permit(principal, action, resource);",
            '@id("b") @approval_group("security-officer") @approval_quorum("3") @approval_valid_for("600")',
            "permit(principal, action, resource);",
            '@id("c") @approval_group("dpo") @approval_quorum("1") @approval_valid_for("7200")',
            "permit(principal, action, resource);",
            '@id("d") @approval_group("nobody") @approval_quorum("9")',
            "permit(principal, action, resource) when { false };",
        ]
    )
    decision = CompiledPolicySet.compile({"t.cedar": text}).evaluate(request())
    assert decision == PolicyDecision(
        "approval", ("a", "b", "c"), Approval((("dpo", 1), ("security-officer", 3)), 600), (), "approval_required"
    )


def test_a_forbid_that_fails_to_evaluate_denies() -> None:
    overflow = "context.request.time * 9223372036854775807 > 0"
    text = (
        '@id("p") permit(principal, action, resource);\n'
        f'@id("f") forbid(principal, action, resource) when {{ {overflow} }};'
    )
    decision = CompiledPolicySet.compile({"t.cedar": text}).evaluate(request())
    assert (decision.effect, decision.reason, decision.policies) == ("deny", "policy_error", ("f",))
    assert len(decision.errors) == 1 and "`f`" in decision.errors[0] and "overflow" in decision.errors[0]


def test_a_permit_that_fails_to_evaluate_grants_nothing() -> None:
    text = '@id("p") permit(principal, action, resource) when { context.request.time * 9223372036854775807 > 0 };'
    decision = CompiledPolicySet.compile({"t.cedar": text}).evaluate(request())
    assert (decision.effect, decision.reason) == ("deny", "no_permit")
    assert "`p`" in decision.errors[0]


def test_admin_actions_are_decided_on_their_own_policies() -> None:
    text = (
        '@id("officers") permit(principal in Keysteward::Group::"security-officer", '
        'action == Keysteward::Action::"policy_update", resource == Keysteward::Tenant::"acme");\n'
        f'@id("release") permit(principal, {RELEASE}, resource);'
    )
    policies = CompiledPolicySet.compile({"t.cedar": text})

    def update(groups: list[str], tenant: str = "acme") -> PolicyRequest:
        human = {"type": "Human", "name": "ada", "role": "officer", "groups": groups}
        return request(
            tenant=tenant,
            action="policy_update",
            principal=human,
            resource={"type": "Tenant"},
            identity={},
            platform={},
        )

    assert policies.evaluate(update(["security-officer"])).policies == ("officers",)
    assert policies.evaluate(update(["dba"])).reason == "no_permit"
    assert policies.evaluate(update(["security-officer"], tenant="other")).reason == "no_permit"


def test_candidates_leave_out_policies_that_cannot_match() -> None:
    text = "\n".join(
        [
            f'@id("acct-111") permit(principal is Keysteward::Instance, {RELEASE}, resource) '
            f'when {{ principal.account == "111" }};',
            f'@id("acct-222") permit(principal is Keysteward::Instance, {RELEASE}, resource) '
            f'when {{ principal.account == "222" }};',
            f'@id("pci") forbid(principal, {RELEASE}, resource) when {{ resource.hasTag("pci") }};',
            f'@id("net") forbid(principal, {RELEASE}, resource) when {{ context.request has source_ip && '
            'context.request.source_ip.isInRange(ip("10.0.0.0/8")) };',
            f'@id("late") forbid(principal, {RELEASE}, resource) when {{ context.request.hour > 20 }};',
            '@id("admin") permit(principal, action == Keysteward::Action::"volume_revoke", resource);',
        ]
    )
    policies = CompiledPolicySet.compile({"t.cedar": text})
    assert policies.candidates(request()) == ("acct-111", "late")
    inside = request(source_ip="10.2.3.4", resource={"id": "v", "name": "n", "key": "k", "labels": {"pci": ""}})
    assert policies.candidates(inside) == ("acct-111", "pci", "net", "late")
    assert policies.evaluate(inside).policies == ("net", "pci")


# -- the index is exact: the same decisions as Cedar over the whole set ---------------------------

ACCOUNTS = ["111", "222", "333"]
IMAGES = ["ami-1", "ami-2"]
TEAMS = ["red", "blue"]
MEASUREMENTS = ["aa" * 48, "bb" * 48]
RANGES = ["10.0.0.0/8", "10.1.2.3/16", "192.0.2.0/24", "0.0.0.0/0", "::/0", "2001:db8::/32", "10.9.9.9"]
ADDRESSES = [None, "10.1.200.7", "10.9.9.9", "192.0.2.77", "198.51.100.1", "2001:db8::5", "::ffff:10.1.0.1", "::1"]


def _condition(rng: random.Random) -> str:
    choices = [
        lambda: f'principal.account == "{rng.choice(ACCOUNTS)}"',
        lambda: f'"{rng.choice(ACCOUNTS)}" == principal.account',
        lambda: f'principal.account != "{rng.choice(ACCOUNTS)}"',
        lambda: f'principal has image_id && principal.image_id == "{rng.choice(IMAGES)}"',
        lambda: f'resource.hasTag("team") && resource.getTag("team") == "{rng.choice(TEAMS)}"',
        lambda: 'resource.hasTag("pci")',
        lambda: f'resource.sensitivity == "{rng.choice(["normal", "high"])}"',
        lambda: f'context.platform.tee == "{rng.choice(["none", "tpm2", "sev-snp"])}"',
        lambda: f'context.platform has measurement && context.platform.measurement == "{rng.choice(MEASUREMENTS)}"',
        lambda: "context.platform has debug && context.platform.debug == false",
        lambda: f"context.request.weekday == {rng.randint(1, 7)}",
        lambda: f"context.request.hour == {rng.randint(0, 23)} || context.request.hour < 12",
        lambda: 'principal.hasTag("env") && principal.getTag("env") == "prod"',
        lambda: "context.identity has image_id",
        lambda: f'resource.binding has account && resource.binding.account == "{rng.choice(ACCOUNTS)}"',
        lambda: "resource.binding has account && resource.binding.account == principal.account",
        lambda: f'context.request has source_ip && context.request.source_ip.isInRange(ip("{rng.choice(RANGES)}"))',
    ]
    return " && ".join(rng.choice(choices)() for _ in range(rng.randint(1, 3)))


def random_set(rng: random.Random, count: int) -> str:
    out = []
    for n in range(count):
        effect = "forbid" if rng.random() < 0.1 else "permit"
        gated = effect == "permit" and rng.random() < 0.15
        gate = '@approval_group("so") @approval_quorum("2") ' if gated else ""
        clause = "unless" if effect == "permit" and not gated and rng.random() < 0.1 else "when"
        condition = ('resource.hasTag("pci") && ' if gated else "") + _condition(rng)
        scope = f"principal is Keysteward::Instance, {RELEASE}, resource"
        out.append(f'@id("p{n}") {gate}{effect}({scope}) {clause} {{ {condition} }};')
    return "\n".join(out)


def random_request(rng: random.Random) -> PolicyRequest:
    account, image = rng.choice(ACCOUNTS), rng.choice([*IMAGES, None])
    labels = {
        k: v for k, v in (("team", rng.choice(TEAMS)), ("pci", "1"), ("sensitivity", "high")) if rng.random() < 0.5
    }
    tee = rng.choice(["none", "tpm2", "sev-snp"])
    platform: dict[str, Any] = {"tee": tee}
    if tee == "sev-snp":
        platform.update(
            {
                k: v
                for k, v in (("measurement", rng.choice(MEASUREMENTS)), ("debug", rng.random() < 0.5))
                if rng.random() < 0.7
            }
        )
    principal = {
        "type": "Instance",
        "provider": "aws",
        "account": account,
        "instance_id": "i-1",
        "tags": {"env": rng.choice(["prod", "dev"])},
    }
    identity = {"provider": "aws", "kind": "aws-iid", "account": account, "instance_id": "i-1"}
    if image:
        principal["image_id"] = identity["image_id"] = image
    binding = {"provider": "aws", "account": rng.choice(ACCOUNTS)} if rng.random() < 0.6 else {}
    return request(
        principal=principal,
        identity=identity,
        platform=platform,
        resource={"id": "vol-1", "name": "db", "key": "k1", "labels": labels, "binding": binding},
        time=NOW + timedelta(hours=rng.randrange(24 * 7)),
        source_ip=rng.choice(ADDRESSES),
    )


def cedar_over_the_whole_set(text: str, req: PolicyRequest) -> tuple[str, tuple[str, ...]]:
    """What plain Cedar decides on the whole text, read with the same outcome rules."""
    principal, action, resource = req.cedar_uids
    cedar_req = {"principal": principal, "action": action, "resource": resource, "context": req.cedar_context}
    result = cedarpy.is_authorized(cedar_req, text, req.cedar_entities, cedar_schema())
    ids = sorted(result.diagnostics.id_annotations_by_reason[r] for r in result.diagnostics.reasons)
    if result.decision == cedarpy.Decision.Deny:
        return "deny", tuple(ids)
    gated = [i for i in ids if re.search(rf'@id\("{i}"\) @approval_group', text)]
    return ("approval", tuple(gated)) if gated else ("permit", tuple(ids))


@pytest.mark.parametrize("seed", range(6))
def test_index_decides_exactly_as_cedar_on_the_whole_set(seed: int) -> None:
    rng = random.Random(seed)
    text = random_set(rng, 40)
    policies = CompiledPolicySet.compile({"r.cedar": text})
    requests = [random_request(rng) for _ in range(150)]
    decisions = [policies.evaluate(r) for r in requests]
    for req, decision in zip(requests, decisions, strict=True):
        assert (decision.effect, decision.policies) == cedar_over_the_whole_set(text, req)
    assert policies.evaluate_many(requests) == decisions
    assert {d.effect for d in decisions} == {"deny", "permit", "approval"}  # every branch was compared


def test_evaluate_is_thread_safe() -> None:
    rng = random.Random(9)
    policies = CompiledPolicySet.compile({"r.cedar": random_set(rng, 80)})
    requests = [random_request(rng) for _ in range(200)]
    expected = [policies.evaluate(r) for r in requests]
    results: list[list[PolicyDecision]] = [[] for _ in range(4)]

    def work(slot: int) -> None:
        results[slot] = [policies.evaluate(r) for r in requests]

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(result == expected for result in results)
