"""The policy engine: compile errors an operator can act on, the decision rules, the index, the facts model."""

from __future__ import annotations

import json
import random
import re
import threading
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import cedarpy
import pytest

from keysteward.errors import BadRequest, KeystewardError
from keysteward.policy.diff import diff
from keysteward.policy.engine import MAX_POLICIES, MAX_SET_BYTES, Approval, CompiledPolicySet, PolicyDecision
from keysteward.policy.errors import PolicyInvalid, PolicyRequestInvalid, PolicyTooLarge
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


def compile_error(sources: dict[str, str]) -> PolicyInvalid:
    with pytest.raises(PolicyInvalid) as caught:
        CompiledPolicySet.compile(sources)
    assert caught.value.code == "policy_invalid" and caught.value.status == 400
    assert isinstance(caught.value, BadRequest)
    return caught.value


# -- compile: errors at file:line:column ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where", "says"),
    [
        pytest.param(
            "permit(principal, action, resource)\nwhen { context.x == };", "2:21", "unexpected token `}`", id="token"
        ),
        pytest.param(
            'permit(principal, action, resource) when { "abc };', "1:44", "invalid token", id="unterminated-string"
        ),
        pytest.param("permit(principal, action, resource) when { 1 $ 2 };", "1:46", "invalid token", id="bad-char"),
        pytest.param("permit(principal, action, resource)", "1:36", "unexpected end of input", id="no-semicolon"),
        pytest.param(
            "// c\n\npermit(principal, action, resource) when { foo(1) };", "3:44", "`foo` is not a valid", id="fn"
        ),
        pytest.param(
            "permit(?principal, action, resource);", "1:8", "unexpected token `?principal`", id="slot-in-scope"
        ),
        pytest.param("permit(principal == ?principal, action, resource);", "1:1", "templates", id="template"),
        pytest.param(
            "permit(principal, action, resource) when {\n  context.request.hour > 8 &&\n"
            '  context.request.hour == "x"\n};',
            "3:3",
            "not compatible",
            id="type-mismatch-line",
        ),
        pytest.param(
            f'permit(principal is Keysteward::Instance, {RELEASE}, resource)\nwhen {{ principal.acount == "1" }};',
            "2:18",
            "attribute `acount`",
            id="attribute-typo",
        ),
        pytest.param(
            f"permit(principal, {RELEASE}, resource) when {{\n  true &&\n  context.platform.debug == false }};",
            "3:3",
            "optional attribute",
            id="optional-without-has",
        ),
        pytest.param(
            'permit(principal, action == Keysteward::Action::"relase", resource);', "1:1", "relase", id="unknown-action"
        ),
    ],
)
def test_bad_policy_is_placed_at_file_line_column(text: str, where: str, says: str) -> None:
    error = compile_error({"team/a.cedar": text})
    assert error.problems[0].startswith(f"team/a.cedar:{where}: "), error.problems
    assert says in error.problems[0]
    assert error.message.startswith(f"team/a.cedar:{where}: ")


def test_every_bad_file_and_policy_is_reported() -> None:
    error = compile_error(
        {
            "a.cedar": "permit(principal, action, resource);\nforbid(principal, action, resource) when { x };",
            "b.cedar": "\n\npermit(principal, action, resource) when { 1 + };",
        }
    )
    assert [p.split(": ")[0] for p in error.problems] == ["a.cedar:2:44", "b.cedar:3:48"]
    assert error.message.endswith("(and 1 more)")
    assert error.diagnostics().count("policy_invalid: ") == 2


def test_schema_errors_name_the_policy_by_its_id() -> None:
    text = (
        f'permit(principal, {RELEASE}, resource);\n@id("tee")\n'
        f"permit(principal, {RELEASE}, resource) when {{ context.platform.tee == 1 }};"
    )
    error = compile_error({"p.cedar": text})
    assert error.problems[0].startswith("p.cedar:3:") and "not compatible" in error.problems[0]


@pytest.mark.parametrize(
    ("annotations", "says"),
    [
        ('@approval_group("security-officer") @approval_quorum("two")', "@approval_quorum needs"),
        ('@approval_group("security-officer") @approval_quorum("0")', "@approval_quorum needs"),
        ('@approval_group("security-officer") @approval_quorum("33")', "@approval_quorum needs"),
        ('@approval_group("security-officer")', "@approval_quorum needs"),
        ('@approval_quorum("2")', "@approval_group needs"),
        ('@approval_group("security officer") @approval_quorum("2")', "@approval_group needs"),
        ('@approval_group("so") @approval_quorum("2") @approval_valid_for("-1")', "@approval_valid_for needs"),
        ('@approval_group("so") @approval_quorum("2") @approval_valid_for("9999999")', "@approval_valid_for needs"),
        ('@approval_qourum("2")', "unknown annotation @approval_qourum"),
        ('@id("")', "@id needs"),
    ],
)
def test_bad_annotations_are_refused(annotations: str, says: str) -> None:
    error = compile_error({"p.cedar": f"// header\n{annotations}\npermit(principal, action, resource);"})
    assert error.problems[0].startswith("p.cedar:2:") and says in error.problems[0]


def test_approval_on_a_forbid_is_refused() -> None:
    text = '@approval_group("so") @approval_quorum("2")\nforbid(principal, action, resource);'
    assert "belong on a permit" in compile_error({"p.cedar": text}).message


def test_duplicate_ids_are_refused_across_files() -> None:
    error = compile_error(
        {
            "a.cedar": '@id("x") permit(principal, action, resource);',
            "b.cedar": '@id("x") forbid(principal, action, resource);',
        }
    )
    assert error.problems == ("b.cedar:1:1: duplicate policy id 'x'",)


def test_sizes_are_capped() -> None:
    policy = "permit(principal, action, resource);\n"
    with pytest.raises(PolicyTooLarge) as caught:
        CompiledPolicySet.compile({"a.cedar": policy * (MAX_POLICIES + 1)})
    assert caught.value.status == 413 and caught.value.code == "policy_too_large"
    with pytest.raises(PolicyTooLarge):
        CompiledPolicySet.compile({"a.cedar": "//" + "x" * MAX_SET_BYTES})
    with pytest.raises(PolicyTooLarge):
        CompiledPolicySet.compile({f"f{n}.cedar": "" for n in range(101)})
    assert len(CompiledPolicySet.compile({"a.cedar": policy * MAX_POLICIES}).ids) == MAX_POLICIES


@pytest.mark.parametrize(
    "sources",
    [[], {"../x.cedar": ""}, {"": ""}, {"a b.cedar": ""}, {"a.cedar": b"permit"}, {1: ""}, {"a.cedar": "// \ud800"}],
)
def test_malformed_sets_are_refused(sources: Any) -> None:
    with pytest.raises(PolicyInvalid):
        CompiledPolicySet.compile(sources)


def test_empty_sets_compile_and_deny_everything() -> None:
    for sources in ({}, {"a.cedar": ""}, {"a.cedar": "// nothing yet\n"}):
        policies = CompiledPolicySet.compile(sources)
        assert policies.ids == ()
        assert policies.evaluate(request()) == PolicyDecision("deny", (), None, (), "no_permit")


def test_ids_and_sources() -> None:
    text = (
        'permit(principal, action, resource);\n@id("named") forbid(principal, action, resource) when { false };\n'
        "permit(principal, action, resource);"
    )
    policies = CompiledPolicySet.compile({"t.cedar": text})
    assert policies.ids == ("t.cedar#1", "named", "t.cedar#3")
    assert policies.sources == {"t.cedar": text}


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


# -- diff ----------------------------------------------------------------------------------------


def test_diff_for_the_audit_record() -> None:
    old = {"a.cedar": "permit(principal, action, resource);\n", "gone.cedar": "forbid(principal, action, resource);"}
    new = {"a.cedar": "permit(principal, action, resource) when { false };\n", "new.cedar": "// empty\n"}
    text = diff(old, new)
    assert "--- a/a.cedar\n+++ b/a.cedar\n" in text
    assert "-permit(principal, action, resource);\n+permit(principal, action, resource) when { false };\n" in text
    assert "--- a/gone.cedar\n+++ /dev/null\n" in text and "\\ No newline at end of file" in text
    assert "--- /dev/null\n+++ b/new.cedar\n@@ -0,0 +1 @@\n+// empty\n" in text
    assert diff(old, dict(old)) == ""


# -- facts ---------------------------------------------------------------------------------------


def test_request_json_round_trip() -> None:
    req = request(
        platform={
            "tee": "sev-snp",
            "debug": False,
            "measurement": "AB" * 48,
            "tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115},
            "chip_id": "cd" * 64,
            "vmpl": 0,
            "pcrs": {"sha256": {7: "ef" * 32}, "sha1_0": "01" * 20},
        },
        identity={
            "provider": "aws",
            "kind": "aws-iid",
            "account": "111",
            "instance_id": "i-1",
            "launched_at": "2026-11-23T09:00:00+00:00",
        },
        time=datetime(2026, 11, 23, 11, 30, tzinfo=timezone(timedelta(hours=1, minutes=30))),
        source_ip="2001:DB8::1",
    )
    data = json.loads(json.dumps(req.to_json()))
    assert PolicyRequest.from_json(data) == req
    assert data["platform"]["measurement"] == "ab" * 48
    assert data["platform"]["pcrs"] == {"sha256_7": "ef" * 32, "sha1_0": "01" * 20}
    assert data["identity"]["launched_at"] == 1795424400
    assert data["time"] == "2026-11-23T10:00:00Z" and data["source_ip"] == "2001:db8::1"
    assert data["principal"]["id"] == "aws/111/i-1"
    context = json.loads(req.cedar_context)
    assert context["request"] == {
        "time": 1795428000,
        "hour": 10,
        "weekday": 1,
        "source_ip": {"__extn": {"fn": "ip", "arg": "2001:db8::1"}},
    }


def test_request_facts_conform_to_the_schema() -> None:
    req = request(
        principal={
            "type": "Instance",
            "provider": "aws",
            "account": "111",
            "instance_id": "i-1",
            "zone": "z",
            "tags": {"a": ""},
        }
    )
    cedarpy.Entities.from_json_str(req.cedar_entities, cedar_schema())  # raises if they did not
    principal, action, resource = req.cedar_uids
    cedar_req = {"principal": principal, "action": action, "resource": resource, "context": req.cedar_context}
    result = cedarpy.is_authorized(
        cedar_req, "permit(principal, action, resource);", req.cedar_entities, cedar_schema()
    )
    assert result.allowed and result.diagnostics.errors == []


VALID = request().to_json()


def _without(field: str) -> dict[str, Any]:
    return {k: v for k, v in VALID.items() if k != field}


def _with(path: str, value: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(VALID))
    *parents, last = path.split(".")
    target = data
    for name in parents:
        target = target[name]
    target[last] = value
    return data


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ([], "request must be an object"),
        (_without("tenant"), "tenant is missing"),
        (_without("principal"), "principal is missing"),
        (_without("time"), "time is missing"),
        (VALID | {"extra": 1}, "unknown field(s): extra"),
        (_with("tenant", ""), "tenant must be a string"),
        (_with("tenant", 7), "tenant must be a string"),
        (_with("action", "steal"), "action must be one of"),
        (_with("action", ["release"]), "action must be one of"),
        (_with("action", "approve"), "approve applies to a Human principal"),
        (_with("principal.type", "Robot"), "principal.type must be one of"),
        (_with("principal.account", None), "principal.account must be a string"),
        (_with("principal.account", "x" * 257), "principal.account must be a string"),
        (_with("principal.id", "aws/222/i-1"), "principal.id must be 'aws/111/i-1'"),
        (_with("principal.tags", {"k": 1}), "principal.tags.k must be a string"),
        (_with("principal.tags", {"k": "\ud800"}), "principal.tags.k must be valid Unicode"),
        (_with("principal.tags", {"\udfff": ""}), "principal.tags key must be valid Unicode"),
        (_with("principal.tags", {str(n): "" for n in range(65)}), "principal.tags has more than 64"),
        (_with("resource.labels", ["pci"]), "resource.labels must be an object"),
        (_with("resource.type", "Disk"), "resource.type must be Volume, Vm, Key, KmipObject or Tenant"),
        (_with("identity.account", "222"), "identity names another instance"),
        (_with("identity.kind", None), "identity.kind must be a string"),
        (_with("identity.launched_at", "yesterday"), "identity.launched_at must be an ISO 8601"),
        (_with("platform.tee", "sgx"), "platform.tee must be one of none, tpm2, sev-snp"),
        (_with("platform.debug", "false"), "platform.debug must be true or false"),
        (_with("platform.vmpl", 4), "platform.vmpl must be an integer from 0 to 3"),
        (_with("platform.vmpl", True), "platform.vmpl must be an integer"),
        (_with("platform.measurement", "xyz"), "platform.measurement must be an even number of hex digits"),
        (_with("platform.tcb", {"bootloader": 1}), "platform.tcb.tee must be an integer"),
        (_with("platform.pcrs", {"sha256_24": "00" * 32}), "bad PCR name 'sha256_24'"),
        (_with("platform.pcrs", {"sha256_07": "00" * 32}), "bad PCR name 'sha256_07'"),
        (_with("platform.pcrs", {"md5_1": "00" * 16}), "bad PCR name 'md5_1'"),
        (_with("platform.pcrs", {"sha256_7": "00" * 20}), "platform.pcrs.sha256_7 must be 64 hex digits"),
        (_with("platform.secret", "x"), "platform has unknown field(s): secret"),
        (_with("time", "2026-11-23T10:00:00"), "time must be an ISO 8601 time with a UTC offset"),
        (_with("time", 1795428000), "time must be an ISO 8601"),
        (_with("source_ip", "10.0.0.300"), "source_ip must be an IPv4 or IPv6 address"),
        (_with("source_ip", 167772161), "source_ip must be an IPv4 or IPv6 address"),
    ],
)
def test_bad_request_json_is_refused_with_the_field(data: Any, says: str) -> None:
    with pytest.raises(PolicyRequestInvalid) as caught:
        PolicyRequest.from_json(data)
    assert says in caught.value.message
    assert caught.value.code == "bad_policy_request" and caught.value.status == 400


def test_human_actions_take_no_platform_claims() -> None:
    human = {"type": "Human", "name": "ada", "role": "officer", "groups": ["security-officer"]}
    with pytest.raises(PolicyRequestInvalid, match="apply to release and renew only"):
        request(action="approve", principal=human)
    with pytest.raises(KeystewardError, match="policy_update applies to a Human principal and a Tenant resource"):
        request(action="policy_update", principal=human, identity={}, platform={})
    ok = request(action="approve", principal=human, identity={}, platform={})
    assert ok.principal["id"] == "acme/ada" and ok.to_json()["principal"]["groups"] == ["security-officer"]


def test_source_addresses_as_cedar_reads_them() -> None:
    assert request(source_ip="::ffff:10.1.0.1").source_ip == "10.1.0.1"  # a dual-stack socket's IPv4 client
    assert request(source_ip=None).to_json().get("source_ip") is None
    assert "source_ip" not in json.loads(request(source_ip=None).cedar_context)["request"]
    with pytest.raises(PolicyRequestInvalid, match="without a zone"):
        request(source_ip="fe80::1%eth0")


def test_naive_times_are_refused() -> None:
    with pytest.raises(PolicyRequestInvalid, match="time must be"):
        request(time=datetime(2026, 11, 23, 10, 0))


def _key_use(source_ip: str, moment: datetime, context: dict[str, str] | None = None) -> PolicyRequest:
    return PolicyRequest(
        tenant="acme", action="decrypt", principal={"type": "Human", "name": "bob", "role": "admin", "groups": []},
        resource={"type": "Key", "name": "orders"}, identity={}, platform={}, time=moment, source_ip=source_ip,
        encryption_context=context or {},
    )  # fmt: skip


def test_remembered_decisions_never_answer_a_different_question() -> None:
    """Decisions are remembered by Cedar's exact inputs: another address, another second (a policy on the
    hour), another encryption context or another compiled set is decided afresh."""
    text = (
        '@id("p")\npermit (principal, action == Keysteward::Action::"decrypt", resource)\n'
        'when { context.request has source_ip && context.request.source_ip.isInRange(ip("10.0.0.0/8"))'
        " && context.request.hour < 11 };\n"
        '@id("f")\nforbid (principal, action == Keysteward::Action::"decrypt", resource)\n'
        'when { context.encryption_context.contains("team=red") };\n'
    )
    policies = CompiledPolicySet.compile({"p.cedar": text})
    for _ in range(3):  # asked again: the same answers
        assert policies.evaluate(_key_use("10.1.2.3", NOW)).effect == "permit"
        assert policies.evaluate(_key_use("192.0.2.1", NOW)).effect == "deny"
        assert policies.evaluate(_key_use("10.1.2.3", NOW + timedelta(hours=1))).effect == "deny"
        assert policies.evaluate(_key_use("10.1.2.3", NOW, {"team": "red"})).reason == "forbidden_by_policy"
    narrower = CompiledPolicySet.compile({"p.cedar": text.replace("hour < 11", "hour < 10")})
    assert narrower.evaluate(_key_use("10.1.2.3", NOW)).effect == "deny"


def test_a_typo_is_the_first_problem_not_what_it_brings_with_it() -> None:
    """A typo in ``principal.acount`` makes Cedar also doubt the ``has``-guarded ``image_id`` after it and list
    that first: the operator is shown the typo, at its line, with the attribute it was meant to be."""
    text = (
        f"permit(principal is Keysteward::Instance, {RELEASE}, resource)\n"
        'when { principal.acount == "1" &&\n'
        '  principal has image_id && principal.image_id == "img" };'
    )
    error = compile_error({"p.cedar": text})
    assert error.problems == (
        "p.cedar:2:18: for policy `p.cedar#1`, unknown attribute `acount` of the principal type "
        "`Keysteward::Instance`; did you mean `account`? "
        "(attributes: account, image_id, instance_id, provider, region, tenant, zone)",
    )
    assert "more)" not in error.message


def test_an_unknown_attribute_of_several_principal_types_is_one_problem() -> None:
    error = compile_error({"p.cedar": f'permit(principal, {RELEASE}, resource)\nwhen {{ principal.acount == "1" }};'})
    assert len(error.problems) == 1
    assert "`acount` of the principal type `Keysteward::Host` or `Keysteward::Instance`" in error.problems[0]


def test_problems_come_in_the_order_of_the_text() -> None:
    text = (
        f'permit(principal is Keysteward::Instance, {RELEASE}, resource) when {{ principal.zzz == "1" }};\n'
        f'permit(principal is Keysteward::Instance, {RELEASE}, resource) when {{ resource.bindin == "1" }};'
    )
    error = compile_error({"p.cedar": text})
    assert [p.split(":")[:2] for p in error.problems] == [["p.cedar", "1"], ["p.cedar", "2"]]
    assert (
        "unknown attribute `bindin` of the resource type `Keysteward::Volume`; did you mean `binding`?"
        in (error.problems[1])
    )


def test_a_context_attribute_of_some_actions_is_one_problem() -> None:
    """A policy for every action reading ``context.identity``: one problem naming the actions, not 20."""
    error = compile_error({"p.cedar": 'forbid(principal, action, resource) when { context.identity.provider == "x" };'})
    assert len(error.problems) == 1, error.problems
    assert "unknown attribute `identity` of the context of actions " in error.problems[0]
    assert "more)" not in error.message
