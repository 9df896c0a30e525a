"""The example policies shipped in docs/policies/, decided end to end on hand-made facts.

Each example is compiled as an operator would load it (alone, and all together), then asked the
requests it is meant to permit and the ones it must refuse: another account or image, a debug-enabled
or unknown SEV-SNP guest, a PCR 7 that differs, a weekend, a pci volume without approval.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from keysteward.policy.engine import Approval, CompiledPolicySet, PolicyDecision
from keysteward.policy.facts import PolicyRequest
from keysteward.policy.schema import SCHEMA_TEXT

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "policies"
PROD, ANALYTICS, BOUND = "111122223333", "444455556666", "777788889999"
GOOD_IMAGE = "ami-0a1b2c3d4e5f60718"
GOOD_MEASUREMENT = "4c7d36d7c6f1d1e6a0e5a1a0a7f1b8b59e0e1c4b0c6a3ff5d8e8f4d5b8ac7ea2a9f1c9d4b35e4a0e7fdc3e21d9a6b7c0"
GOOD_PCR7 = "65caf8dd1e0ea7a6347b635d2b379c93b9a1351edc2afc3ecda700e534eb3068"
MONDAY_10 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
BOUND_VOLUME = "3f1c9a52-7d4e-4b8a-9c61-2e5f0d7a8b90"


def source(name: str) -> dict[str, str]:
    return {name: (EXAMPLES / name).read_text()}


def release(
    account: str = PROD,
    *,
    image: str | None = GOOD_IMAGE,
    provider: str = "aws",
    labels: dict[str, str] | None = None,
    platform: dict[str, Any] | None = None,
    when: datetime = MONDAY_10,
    volume: str = "0b6f4a7e-1111-4c2d-9e8f-000000000001",
    action: str = "release",
) -> PolicyRequest:
    principal: dict[str, Any] = {"type": "Instance", "provider": provider, "account": account, "instance_id": "i-0abc"}
    identity = {"provider": provider, "kind": "aws-iid", "account": account, "instance_id": "i-0abc"}
    if image is not None:
        principal["image_id"] = identity["image_id"] = image
    return PolicyRequest(
        tenant="acme",
        action=action,
        principal=principal,
        resource={"id": volume, "name": "data", "key": "k1", "labels": labels or {}},
        identity=identity,
        platform=platform or {"tee": "none"},
        time=when,
        source_ip="203.0.113.7",
    )


def officer(groups: list[str], action: str = "approve", labels: dict[str, str] | None = None) -> PolicyRequest:
    return PolicyRequest(
        tenant="acme",
        action=action,
        principal={"type": "Human", "name": "ada", "role": "officer", "groups": groups},
        resource={"id": "0b6f4a7e-1111-4c2d-9e8f-000000000001", "name": "cards", "key": "k1", "labels": labels or {}},
        identity={},
        platform={},
        time=MONDAY_10,
    )


def check(decision: PolicyDecision, effect: str, reason: str, policies: tuple[str, ...] | None = None) -> None:
    assert (decision.effect, decision.reason) == (effect, reason), decision
    if policies is not None:
        assert decision.policies == policies
    assert decision.errors == ()


def test_published_schema_is_the_one_the_engine_uses() -> None:
    assert (EXAMPLES / "keysteward.cedarschema").read_text() == SCHEMA_TEXT, (
        "docs/policies/keysteward.cedarschema is stale: write keysteward.policy.schema.SCHEMA_TEXT to it"
    )


def test_every_example_has_a_header_and_they_compile_together() -> None:
    names = sorted(p.name for p in EXAMPLES.glob("*.cedar"))
    assert names == sorted(
        [
            "admin-rules.cedar",
            "allowlist.cedar",
            "app-keys.cedar",
            "label-binding.cedar",
            "business-hours.cedar",
            "kmip-vm-keys.cedar",
            "kmip-vm-keys-tpm.cedar",
            "pci-approval.cedar",
            "snp-only.cedar",
            "tpm-pcr7.cedar",
            "vm-hosts.cedar",
        ]
    )
    for name in names:
        assert (EXAMPLES / name).read_text().startswith("// "), f"{name} needs a header comment"
    together = CompiledPolicySet.compile({name: (EXAMPLES / name).read_text() for name in names})
    assert len(together.ids) == 18 and len(set(together.ids)) == 18


def test_allowlist() -> None:
    policies = CompiledPolicySet.compile(source("allowlist.cedar"))
    check(policies.evaluate(release()), "permit", "permitted", ("allowlist-prod-images",))
    check(policies.evaluate(release(image="ami-0fedcba9876543210", action="renew")), "permit", "permitted")
    check(policies.evaluate(release(image="ami-00000000000000bad")), "deny", "no_permit", ())
    check(policies.evaluate(release(image=None)), "deny", "no_permit")
    check(policies.evaluate(release(ANALYTICS)), "deny", "no_permit")
    check(policies.evaluate(release(provider="gcp")), "deny", "no_permit")


SNP_GOOD = {"tee": "sev-snp", "debug": False, "measurement": GOOD_MEASUREMENT, "vmpl": 0}
CONFIDENTIAL = {"sensitivity": "confidential"}


def test_snp_only_permits_a_clean_known_guest() -> None:
    policies = CompiledPolicySet.compile(source("snp-only.cedar"))
    decision = policies.evaluate(release(ANALYTICS, labels=CONFIDENTIAL, platform=SNP_GOOD))
    check(decision, "permit", "permitted", ("analytics-instances",))
    upper = dict(SNP_GOOD, measurement=GOOD_MEASUREMENT.upper())  # facts are normalised to lower case
    check(policies.evaluate(release(ANALYTICS, labels=CONFIDENTIAL, platform=upper)), "permit", "permitted")
    # a volume that is not confidential needs no TEE
    check(policies.evaluate(release(ANALYTICS, platform={"tee": "none"})), "permit", "permitted")


@pytest.mark.parametrize(
    "platform",
    [
        pytest.param(dict(SNP_GOOD, debug=True), id="debug-on"),
        pytest.param(dict(SNP_GOOD, measurement="00" * 48), id="unknown-measurement"),
        pytest.param({"tee": "sev-snp", "measurement": GOOD_MEASUREMENT}, id="debug-claim-missing"),
        pytest.param({"tee": "sev-snp", "debug": False}, id="measurement-missing"),
        pytest.param({"tee": "tpm2", "debug": False, "measurement": GOOD_MEASUREMENT}, id="tpm-not-snp"),
        pytest.param({"tee": "none"}, id="no-tee"),
    ],
)
def test_snp_only_refuses(platform: dict[str, Any]) -> None:
    policies = CompiledPolicySet.compile(source("snp-only.cedar"))
    decision = policies.evaluate(release(ANALYTICS, labels=CONFIDENTIAL, platform=platform))
    check(decision, "deny", "forbidden_by_policy", ("snp-required-for-confidential",))


def test_snp_guard_wins_over_any_other_permit() -> None:
    policies = CompiledPolicySet.compile(source("snp-only.cedar") | source("allowlist.cedar"))
    debug = dict(SNP_GOOD, debug=True)
    check(policies.evaluate(release(PROD, labels=CONFIDENTIAL, platform=debug)), "deny", "forbidden_by_policy")
    check(policies.evaluate(release(PROD, labels=CONFIDENTIAL, platform=SNP_GOOD)), "permit", "permitted")


def tpm(pcr7: str, bank: str = "sha256") -> dict[str, Any]:
    return {"tee": "tpm2", "secure_boot": True, "pcrs": {bank: {"0": "11" * (len(pcr7) // 2), "7": pcr7}}}


def test_tpm_pcr7() -> None:
    policies = CompiledPolicySet.compile(source("tpm-pcr7.cedar"))
    check(policies.evaluate(release(platform=tpm(GOOD_PCR7))), "permit", "permitted", ("tpm-secure-boot-pcr7",))
    flipped = GOOD_PCR7[:-1] + ("9" if GOOD_PCR7[-1] != "9" else "8")
    check(policies.evaluate(release(platform=tpm(flipped))), "deny", "no_permit")
    check(policies.evaluate(release(platform={"tee": "tpm2"})), "deny", "no_permit")  # no PCRs quoted
    check(policies.evaluate(release(platform=tpm(GOOD_PCR7[:40], "sha1"))), "deny", "no_permit")  # other bank
    check(policies.evaluate(release(platform={"tee": "none"})), "deny", "no_permit")
    check(policies.evaluate(release(ANALYTICS, platform=tpm(GOOD_PCR7))), "deny", "no_permit")


def test_pci_needs_two_security_officers() -> None:
    policies = CompiledPolicySet.compile(source("pci-approval.cedar"))
    decision = policies.evaluate(release(labels={"pci": "true"}))
    assert decision == PolicyDecision(
        effect="approval",
        policies=("pci-two-officers",),
        approval=Approval(groups=(("security-officer", 2),), valid_for_seconds=0),
        errors=(),
        reason="approval_required",
    )
    check(policies.evaluate(release(labels={"team": "payments"})), "permit", "permitted", ("payments-instances",))
    check(policies.evaluate(release(ANALYTICS, labels={"pci": "true"})), "deny", "no_permit")
    check(policies.evaluate(officer(["security-officer"], labels={"pci": ""})), "permit", "permitted")
    check(policies.evaluate(officer(["dba"], labels={"pci": ""})), "deny", "no_permit")
    check(policies.evaluate(officer(["security-officer"], "volume_destroy", {"pci": ""})), "deny", "no_permit")


def test_pci_approval_still_loses_to_a_forbid() -> None:
    policies = CompiledPolicySet.compile(source("pci-approval.cedar") | source("business-hours.cedar"))
    saturday = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
    check(policies.evaluate(release(labels={"pci": "1"}, when=saturday)), "deny", "forbidden_by_policy")


@pytest.mark.parametrize(
    ("when", "allowed"),
    [
        (datetime(2026, 11, 23, 8, 0, tzinfo=UTC), True),  # Monday 08:00
        (datetime(2026, 11, 27, 17, 59, 59, tzinfo=UTC), True),  # Friday 17:59:59
        (datetime(2026, 11, 23, 7, 59, 59, tzinfo=UTC), False),  # Monday before opening
        (datetime(2026, 11, 23, 18, 0, tzinfo=UTC), False),  # Monday 18:00 is closed
        (datetime(2026, 11, 28, 10, 0, tzinfo=UTC), False),  # Saturday
        (datetime(2026, 11, 29, 12, 0, tzinfo=UTC), False),  # Sunday
        (datetime.fromisoformat("2026-11-23T23:30:00-10:00"), True),  # Tuesday 09:30 UTC
        (datetime.fromisoformat("2026-11-27T20:00:00+05:00"), True),  # Friday 15:00 UTC
        (datetime.fromisoformat("2026-11-27T20:00:00-05:00"), False),  # Saturday 01:00 UTC
    ],
)
def test_business_hours(when: datetime, allowed: bool) -> None:
    policies = CompiledPolicySet.compile(source("business-hours.cedar") | source("allowlist.cedar"))
    decision = policies.evaluate(release(when=when))
    if allowed:
        check(decision, "permit", "permitted", ("allowlist-prod-images",))
    else:
        check(decision, "deny", "forbidden_by_policy", ("business-hours-only",))


def test_business_hours_alone_permits_nothing() -> None:
    check(CompiledPolicySet.compile(source("business-hours.cedar")).evaluate(release()), "deny", "no_permit")


BIND = {"bind-provider": "aws", "bind-account": PROD}


def test_binding_by_labels() -> None:
    policies = CompiledPolicySet.compile(source("label-binding.cedar"))
    check(policies.evaluate(release(labels=BIND)), "permit", "permitted", ("binding-by-labels",))
    check(policies.evaluate(release(labels=BIND, image=None)), "permit", "permitted")  # no image bound
    check(policies.evaluate(release(ANALYTICS, labels=BIND)), "deny", "no_permit")  # other account
    check(policies.evaluate(release(labels=BIND, provider="gcp")), "deny", "no_permit")  # other provider
    check(policies.evaluate(release(labels={})), "deny", "no_permit")  # an unbound volume goes to nobody
    with_image = BIND | {"bind-image": GOOD_IMAGE}
    check(policies.evaluate(release(labels=with_image)), "permit", "permitted")
    check(policies.evaluate(release(labels=with_image, image="ami-00000000000000bad")), "deny", "no_permit")
    check(policies.evaluate(release(labels=with_image, image=None)), "deny", "no_permit")


def test_binding_of_one_volume_by_uuid() -> None:
    policies = CompiledPolicySet.compile(source("label-binding.cedar"))
    check(policies.evaluate(release(BOUND, volume=BOUND_VOLUME)), "permit", "permitted", ("binding-db-volume",))
    check(policies.evaluate(release(BOUND)), "deny", "no_permit")  # another volume
    check(policies.evaluate(release(PROD, volume=BOUND_VOLUME)), "deny", "no_permit")  # another account


def test_app_keys_example_lets_only_the_application_use_its_key_with_its_context() -> None:
    policy = CompiledPolicySet.compile(source("app-keys.cedar"))
    now = datetime(2026, 12, 4, 12, tzinfo=UTC)

    def ask(principal: dict[str, Any], action: str, context: dict[str, str], source: str | None) -> str:
        request = PolicyRequest(
            tenant="acme", action=action, principal=principal, resource={"type": "Key", "name": "orders"},
            identity={}, platform={}, time=now, source_ip=source, encryption_context=context,
        )  # fmt: skip
        return policy.evaluate(request).reason

    app = {"type": "Agent", "name": "orders-app"}
    assert ask(app, "encrypt", {"app": "orders"}, None) == "permitted"
    assert ask(app, "decrypt", {"app": "orders"}, "10.1.2.3") == "permitted"
    assert ask(app, "decrypt", {"app": "orders"}, "192.0.2.7") == "forbidden_by_policy"
    assert ask(app, "encrypt", {"app": "billing"}, None) == "no_permit"
    officer = {"type": "Human", "name": "sam", "role": "security-officer", "groups": ["security-officer"]}
    assert ask(officer, "encrypt", {"app": "orders"}, None) == "no_permit"
    assert ask({"type": "Agent", "name": "web-1"}, "generate_data_key", {"app": "orders"}, None) == "no_permit"


def kmip_get(hypervisor: str, tags: dict[str, str], platform: dict[str, Any] | None = None) -> PolicyRequest:
    return PolicyRequest(
        tenant="acme",
        action="kmip_get",
        principal={"type": "Hypervisor", "name": hypervisor},
        resource={
            "type": "KmipObject",
            "uid": "u-1",
            "object_type": "SymmetricKey",
            "state": "Active",
            "labels": tags,
        },
        identity={},
        platform=platform or {},
        time=MONDAY_10,
    )


def test_kmip_vm_keys_go_to_esx_1_only() -> None:
    roles = (EXAMPLES.parents[1] / "src/keysteward/policy/roles.cedar").read_text()
    policies = CompiledPolicySet.compile({"roles.cedar": roles, **source("kmip-vm-keys.cedar")})
    vm = {"x-Component": "Virtual Machine"}
    check(policies.evaluate(kmip_get("esx-1", vm)), "permit", "permitted", ("roles-hypervisor-kmip",))
    check(policies.evaluate(kmip_get("esx-2", vm)), "deny", "forbidden_by_policy", ("kmip-vm-keys-only-to-esx-1",))
    check(policies.evaluate(kmip_get("esx-2", {"x-Component": "vSAN"})), "permit", "permitted")
    check(policies.evaluate(kmip_get("esx-2", {})), "permit", "permitted")


def test_kmip_vm_keys_need_an_approved_pcr7() -> None:
    roles = (EXAMPLES.parents[1] / "src/keysteward/policy/roles.cedar").read_text()
    policies = CompiledPolicySet.compile({"roles.cedar": roles, **source("kmip-vm-keys-tpm.cedar")})
    vm = {"x-Component": "Virtual Machine"}
    good = {"tee": "tpm2", "pcrs": {"sha256_7": GOOD_PCR7, "sha256_0": "00" * 32}}
    check(policies.evaluate(kmip_get("esx-1", vm, good)), "permit", "permitted", ("roles-hypervisor-kmip",))
    forbidden = ("kmip-vm-keys-need-approved-pcr7",)
    other = {"tee": "tpm2", "pcrs": {"sha256_7": "ab" * 32}}
    check(policies.evaluate(kmip_get("esx-1", vm, other)), "deny", "forbidden_by_policy", forbidden)
    check(policies.evaluate(kmip_get("esx-1", vm, {"tee": "tpm2"})), "deny", "forbidden_by_policy", forbidden)
    check(policies.evaluate(kmip_get("esx-1", vm)), "deny", "forbidden_by_policy", forbidden)  # no quote: tee none
    check(policies.evaluate(kmip_get("esx-2", {"x-Component": "vSAN"})), "permit", "permitted")


def _vm(action: str, *, pcr7: str | None, host: dict[str, bool], labels: dict[str, str]) -> PolicyRequest:
    platform: dict[str, Any] = {"tee": "tpm2"}
    if pcr7 is not None:
        platform["pcrs"] = {"sha256_7": pcr7}
    return PolicyRequest(
        tenant="acme", action=action, principal={"type": "Host", "name": "host-a"},
        resource={"type": "Vm", "id": "5a0c", "name": "db-1", "memory_mb": 4096, "cpus": 2, "labels": labels},
        identity={"provider": "host", "kind": "host", "account": "acme", "instance_id": "host-a"},
        platform=platform, time=MONDAY_10, host=host,
    )  # fmt: skip


def test_vm_hosts_pcr7_and_memory_encryption() -> None:
    from keysteward.policy.store import default_sources

    policies = CompiledPolicySet.compile({**default_sources(), **source("vm-hosts.cedar")})
    plain, snp = {"kvm": True}, {"kvm": True, "sev_snp": True}
    assert policies.evaluate(_vm("vm_start", pcr7=GOOD_PCR7, host=plain, labels={})).effect == "permit"
    other = policies.evaluate(_vm("vm_start", pcr7="00" * 32, host=plain, labels={}))
    assert other.effect == "deny" and other.policies == ("vm-hosts-pcr7",)
    assert policies.evaluate(_vm("vm_restore", pcr7=None, host=snp, labels={})).policies == ("vm-hosts-pcr7",)
    confidential = {"confidential": "true"}
    refused = policies.evaluate(_vm("vm_start", pcr7=GOOD_PCR7, host=plain, labels=confidential))
    assert refused.effect == "deny" and refused.policies == ("confidential-vms-need-memory-encryption",)
    assert policies.evaluate(_vm("vm_start", pcr7=GOOD_PCR7, host=snp, labels=confidential)).effect == "permit"
    assert policies.evaluate(_vm("vm_renew", pcr7=GOOD_PCR7, host=plain, labels=confidential)).effect == "deny"
    # a migration's destination is held to the same rules as a start
    assert policies.evaluate(_vm("vm_migrate", pcr7=GOOD_PCR7, host=plain, labels={})).effect == "permit"
    moved = policies.evaluate(_vm("vm_migrate", pcr7="00" * 32, host=plain, labels={}))
    assert moved.effect == "deny" and moved.policies == ("vm-hosts-pcr7",)
    assert policies.evaluate(_vm("vm_migrate", pcr7=GOOD_PCR7, host=plain, labels=confidential)).effect == "deny"
