"""The policy's facts model (requests as JSON, checked against the schema) and the audit diff of a set."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import cedarpy
import pytest

from keysteward.errors import KeystewardError
from keysteward.policy.diff import diff
from keysteward.policy.engine import CompiledPolicySet
from keysteward.policy.errors import PolicyRequestInvalid
from keysteward.policy.facts import PolicyRequest
from keysteward.policy.schema import cedar_schema
from tests.unit.test_policy_engine import request

pytestmark = pytest.mark.unit

RELEASE = 'action == Keysteward::Action::"release"'
NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


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


def _kmip(platform: Any, identity: Any = None) -> PolicyRequest:
    return PolicyRequest(
        tenant="acme", action="kmip_get", principal={"type": "Hypervisor", "name": "esx-1"},
        resource={"type": "KmipObject", "uid": "u-1", "object_type": "SymmetricKey", "state": "Active", "labels": {}},
        identity=identity or {}, platform=platform, time=NOW,
    )  # fmt: skip


def test_kmip_actions_read_the_hypervisors_verified_platform() -> None:
    none = _kmip({})
    assert json.loads(none.cedar_context)["platform"] == {"tee": "none"}  # no fresh quote
    quoted = _kmip({"tee": "tpm2", "pcrs": {"sha256_7": "AB" * 32}})
    assert json.loads(quoted.cedar_context)["platform"] == {"tee": "tpm2", "pcrs": {"sha256_7": "ab" * 32}}
    assert PolicyRequest.from_json(quoted.to_json()).cedar_context == quoted.cedar_context  # `policy test` replays
    with pytest.raises(PolicyRequestInvalid, match=r"platform\.tee"):
        _kmip({"tee": "sgx"})
    with pytest.raises(PolicyRequestInvalid, match=r"platform\.pcrs"):
        _kmip({"tee": "tpm2", "pcrs": {"sha256_7": "not hex"}})
    with pytest.raises(PolicyRequestInvalid, match="platform"):
        _kmip(["tee"])
    with pytest.raises(PolicyRequestInvalid, match="release and renew only"):
        _kmip({}, identity={"provider": "aws"})


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
