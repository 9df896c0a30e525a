"""keysteward.policy.decision_key: an XKS call's kmsRequestId (new on every call) is left out of the decision
cache's key only when no policy can read it, and a decision from the cache is always the one Cedar gives."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keysteward.policy.decision_key import decision_key, unread_fields
from keysteward.policy.engine import CompiledPolicySet
from keysteward.policy.errors import PolicyRequestInvalid
from keysteward.policy.facts import PolicyRequest

pytestmark = pytest.mark.unit

PERMIT = """
@id("kms-uses-keys")
permit (principal is Keysteward::CloudService, action in [Keysteward::Action::"encrypt",
        Keysteward::Action::"decrypt"], resource);
"""
BY_OPERATION = """
@id("no-reencrypt")
forbid (principal is Keysteward::CloudService, action, resource)
when { context has kms && context.kms.operation == "ReEncrypt" };
@id("decrypt-only-for-ebs")
forbid (principal is Keysteward::CloudService, action == Keysteward::Action::"decrypt", resource)
unless { context has kms && context.kms has via_service && context.kms.via_service == "ebs" };
"""
BY_REQUEST_ID = """
@id("no-test-requests")
forbid (principal is Keysteward::CloudService, action, resource)
when { context has kms && context.kms.request_id like "test-*" };
"""
BUSINESS_HOURS = """
@id("working-hours-only")
forbid (principal is Keysteward::CloudService, action, resource)
unless { context.request.hour >= 8 && context.request.hour < 18 };
"""
NOW = datetime(2026, 12, 5, 12, 0, 0, tzinfo=UTC)


def _call(
    request_id: str, operation: str = "Encrypt", action: str = "encrypt", at: datetime = NOW, **more: str
) -> PolicyRequest:
    return PolicyRequest(
        tenant="acme",
        action=action,
        principal={"type": "CloudService", "name": "AKIDBENCH", "store": "acme/ebs"},
        resource={"type": "Key", "name": "k1"},
        identity={},
        platform={},
        time=at,
        source_ip="10.0.0.7",
        kms={"operation": operation, "request_id": request_id, **more},
    )


@pytest.mark.parametrize(
    ("text", "unread"),
    [
        (PERMIT, {"operation", "request_id", "principal_arn", "key_arn", "via_service", "source_vpc", "source_vpce"}),
        (PERMIT + BY_OPERATION, {"request_id", "principal_arn", "key_arn", "source_vpc", "source_vpce"}),
        (PERMIT + BY_REQUEST_ID, {"operation", "principal_arn", "key_arn", "via_service", "source_vpc", "source_vpce"}),
        (
            PERMIT + '// forbid when context.kms.request_id == "x"\n',  # a name in a comment counts as read
            {"operation", "principal_arn", "key_arn", "via_service", "source_vpc", "source_vpce"},
        ),
        ('permit (principal, action, resource) when { context["kms"]["request_id"] == "x" };', None),
        ('permit (principal, action, resource) when { context.kms == {operation: "Encrypt"} };', set()),
        ("permit (principal, action, resource) when { [context.kms].contains(context.kms) };", set()),
        ("permit (principal, action, resource) when { context == context };", set()),
        ('permit (principal, action, resource) when { context has "kms" && context.kms has "key_arn" };', None),
    ],
)
def test_only_fields_no_policy_names_are_unread(text: str, unread: set[str] | None) -> None:
    found = unread_fields({"a.cedar": text}).get("kms", frozenset())
    if unread is None:  # named in a bracket or a quoted presence test: read
        assert ("request_id" in text) == ("request_id" not in found)
        assert ("key_arn" in text) == ("key_arn" not in found)
    else:
        assert found == unread


def test_calls_that_differ_only_in_an_unread_request_id_are_decided_once() -> None:
    unread = CompiledPolicySet.compile({"p.cedar": PERMIT + BY_OPERATION})
    for n in range(50):
        assert unread.evaluate(_call(f"r-{n}")).effect == "permit"
    assert len(unread._decisions) == 1
    read = CompiledPolicySet.compile({"p.cedar": PERMIT + BY_REQUEST_ID})
    for n in range(50):
        assert read.evaluate(_call(f"r-{n}")).effect == "permit"
    assert read.evaluate(_call("test-1")).effect == "deny"  # the id this set reads still decides
    assert len(read._decisions) == 51


calls = st.builds(
    lambda rid, op, action, via, minutes: _call(
        rid, op, action, NOW + timedelta(minutes=minutes), **({"via_service": via} if via else {})
    ),
    st.sampled_from(["r-1", "r-2", "test-3", "test-4"]),
    st.sampled_from(["Encrypt", "Decrypt", "ReEncrypt"]),
    st.sampled_from(["encrypt", "decrypt"]),
    st.sampled_from([None, "ebs", "s3"]),
    st.integers(0, 24 * 60 * 8),
)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([PERMIT, PERMIT + BY_OPERATION, PERMIT + BY_REQUEST_ID, PERMIT + BY_OPERATION + BY_REQUEST_ID,
                        PERMIT + BUSINESS_HOURS, PERMIT + BY_REQUEST_ID + BUSINESS_HOURS]),
       st.lists(calls, min_size=1, max_size=12))  # fmt: skip
def test_a_remembered_decision_is_cedars(text: str, requests: list[Any]) -> None:
    _each_as_cedar_decides(text, requests)


def _each_as_cedar_decides(text: str, requests: list[PolicyRequest]) -> None:
    """Asked in turn of one set (remembering), every request gets what a fresh set's Cedar gives it."""
    cached = CompiledPolicySet.compile({"p.cedar": text})
    for request in requests:
        fresh = CompiledPolicySet.compile({"p.cedar": text})._decide(request)
        got = cached.evaluate(request)
        assert (got.effect, got.policies) == (fresh.effect, fresh.policies)


@settings(max_examples=60, deadline=None)
@given(calls, st.sampled_from(["r-9", "test-9"]), st.sampled_from([None, "ebs", "rds"]))
def test_facts_with_another_kms_are_the_facts_made_afresh(first: PolicyRequest, rid: str, via: str | None) -> None:
    kms = {"operation": first.kms["operation"], "request_id": rid, **({"via_service": via} if via else {})}
    made = _call(rid, first.kms["operation"], first.action, first.time, **({"via_service": via} if via else {}))
    rebound = first.with_kms(kms)
    assert rebound == made and rebound.to_json() == made.to_json()
    assert (rebound.cedar_context, rebound.cedar_entities, rebound.cedar_uids) == (
        made.cedar_context, made.cedar_entities, made.cedar_uids,
    )  # fmt: skip
    assert first.kms["request_id"] != rid or first == made  # the first is unchanged


WHOLE = "permit (principal, action, resource) when { context == context };"
SETS = [PERMIT, PERMIT + BY_OPERATION, PERMIT + BY_REQUEST_ID, PERMIT + BUSINESS_HOURS, WHOLE]


@settings(max_examples=60, deadline=None)
@given(calls, st.lists(st.tuples(st.sampled_from(["r-9", "test-9"]), st.sampled_from(["Encrypt", "ReEncrypt"])),
                       min_size=1, max_size=4))  # fmt: skip
def test_the_key_of_facts_with_another_kms_is_the_key_of_the_facts_made_afresh(
    first: PolicyRequest, others: list[tuple[str, str]]
) -> None:
    """Requests made by ``with_kms`` share what the key is made of outside ``context.kms`` with the request
    they came from (for every set asked about it): that part must never carry one request's kms into another's
    key, and a second set must never get the first set's part."""
    unreads = [unread_fields({"p.cedar": text}) for text in SETS]
    keys_of_first = [decision_key(first, unread) for unread in unreads]
    for rid, operation in others:
        rebound = first.with_kms({"operation": operation, "request_id": rid})
        afresh = [decision_key(_call(rid, operation, first.action, first.time), u) for u in unreads]  # one each
        assert [decision_key(rebound, u) for u in unreads] == afresh
    assert [decision_key(first, unread) for unread in unreads] == keys_of_first
    assert len({decision_key(_call("a", "Encrypt"), u) for u in unreads[:1]} | {
        decision_key(_call("b", "ReEncrypt"), u) for u in unreads[:1]}) == 1  # fmt: skip
    assert decision_key(_call("a", "Encrypt"), unreads[1]) != decision_key(_call("b", "ReEncrypt"), unreads[1])


@pytest.mark.parametrize(
    "kms",
    [{"operation": "Encrypt"}, {"operation": "Encrypt", "request_id": "x" * 3000}, {"request_id": "r", "bogus": "x"}],
)
def test_facts_with_bad_kms_are_refused_as_new_facts_would_be(kms: dict[str, str]) -> None:
    with pytest.raises(PolicyRequestInvalid):
        _call("r-1").with_kms(kms)
    release = PolicyRequest(
        tenant="acme", action="encrypt", principal={"type": "CloudService", "name": "A", "store": "s"},
        resource={"type": "Key", "name": "k1"}, identity={}, platform={}, time=NOW,
    )  # fmt: skip
    with pytest.raises(PolicyRequestInvalid):
        release.with_kms({"operation": "Encrypt", "request_id": "r"})  # no kms to begin with: not an XKS call


def test_the_time_is_left_out_only_when_no_policy_reads_it() -> None:
    assert unread_fields({"p.cedar": PERMIT})["request"] == {"time", "hour", "weekday", "source_ip"}
    assert unread_fields({"p.cedar": PERMIT + BUSINESS_HOURS})["request"] == {"time", "weekday", "source_ip"}
    assert "request" not in unread_fields(
        {"p.cedar": "permit (principal, action, resource) when { context.request == context.request };"}
    )  # the record compared whole: every field counts
    assert unread_fields({"p.cedar": "permit (principal, action, resource) when { context == context };"}) == {}


def test_a_set_says_whether_it_reads_the_time() -> None:
    assert not CompiledPolicySet.compile({"p.cedar": PERMIT + BY_OPERATION}).reads_time
    assert CompiledPolicySet.compile({"p.cedar": PERMIT + BUSINESS_HOURS}).reads_time
    weekday = "forbid (principal, action, resource) when { context.request.weekday == 7 };"
    assert CompiledPolicySet.compile({"p.cedar": PERMIT + weekday}).reads_time


def test_a_question_asked_again_later_is_decided_once_unless_the_time_is_read() -> None:
    """A lease's renewals ask the same question every ten seconds: remembered when no policy reads the time;
    decided again, and rightly, when one does."""
    timeless = CompiledPolicySet.compile({"p.cedar": PERMIT})
    for minute in range(0, 600, 7):
        assert timeless.evaluate(_call("r-1", at=NOW + timedelta(minutes=minute))).effect == "permit"
    assert len(timeless._decisions) == 1
    hours = CompiledPolicySet.compile({"p.cedar": PERMIT + BUSINESS_HOURS})
    effects = {
        hour: hours.evaluate(_call("r-1", at=NOW.replace(hour=hour, minute=m))).effect
        for hour in range(24)
        for m in (0, 30)
    }
    assert {h for h, e in effects.items() if e == "permit"} == set(range(8, 18))
    assert len(hours._decisions) == 24  # one per hour: the minutes are not read


KMIP_PERMIT = """
@id("hypervisors-get-vm-keys")
permit (principal is Keysteward::Hypervisor, action == Keysteward::Action::"kmip_get", resource)
when { resource.hasTag("x-Component") && resource.getTag("x-Component") == "Virtual Machine" };
"""
BY_UID = """
@id("not-that-one")
forbid (principal, action, resource is Keysteward::KmipObject) when { resource.uid == "u-7" };
"""
BY_LITERAL = """
@id("not-that-entity")
forbid (principal, action, resource == Keysteward::KmipObject::"acme/u-7");
"""


def _kmip_get(uid: str, labels: dict[str, str] | None = None, state: str = "Active") -> PolicyRequest:
    return PolicyRequest(
        tenant="acme", action="kmip_get", principal={"type": "Hypervisor", "name": "esx-1"},
        resource={"type": "KmipObject", "uid": uid, "object_type": "SymmetricKey", "state": state,
                  "labels": {"x-Component": "Virtual Machine"} if labels is None else labels},
        identity={}, platform={}, time=NOW, source_ip="10.0.0.7",
    )  # fmt: skip


def test_kmip_objects_alike_but_for_their_id_are_decided_once_when_no_policy_can_tell_them_apart() -> None:
    assert unread_fields({"p.cedar": KMIP_PERMIT})["resource"] == {"KmipObject"}
    policy = CompiledPolicySet.compile({"p.cedar": KMIP_PERMIT})
    for n in range(30):
        assert policy.evaluate(_kmip_get(f"u-{n}")).effect == "permit"
    assert len(policy._decisions) == 1
    assert policy.evaluate(_kmip_get("u-99", labels={})).effect == "deny"  # what the policy reads still counts
    assert policy.evaluate(_kmip_get("u-98", state="Pre-Active")).effect == "permit"
    assert len(policy._decisions) == 3
    # the id found anywhere else in the facts (a label holding it): left in the key
    assert decision_key(_kmip_get("u-1", {"x-Component": "Virtual Machine", "x-Name": "u-1"}), policy._unread) != (
        decision_key(_kmip_get("u-2", {"x-Component": "Virtual Machine", "x-Name": "u-2"}), policy._unread)
    )


@pytest.mark.parametrize("text", [BY_UID, BY_LITERAL, "// resource.uid is read in a comment\n"])
def test_a_set_that_names_the_id_or_the_entity_decides_each_object_on_its_own(text: str) -> None:
    assert "resource" not in unread_fields({"p.cedar": KMIP_PERMIT + text})
    policy = CompiledPolicySet.compile({"p.cedar": KMIP_PERMIT + text})
    assert policy.evaluate(_kmip_get("u-6")).effect == "permit"
    seventh = policy.evaluate(_kmip_get("u-7")).effect
    assert seventh == ("permit" if text.startswith("//") else "deny")
    assert policy.evaluate(_kmip_get("u-8")).effect == "permit"


kmip_gets = st.builds(
    _kmip_get,
    st.sampled_from(["u-1", "u-7", "a", "acme", "Virtual", "7"]),
    st.sampled_from([None, {}, {"x-Name": "u-7"}, {"x-Component": "Virtual Machine", "x-Name": "a"}]),
    st.sampled_from(["Active", "Pre-Active"]),
)


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([KMIP_PERMIT, KMIP_PERMIT + BY_UID, KMIP_PERMIT + BY_LITERAL]),
       st.lists(kmip_gets, min_size=1, max_size=12))  # fmt: skip
def test_a_remembered_kmip_decision_is_cedars(text: str, requests: list[Any]) -> None:
    _each_as_cedar_decides(text, requests)
