"""The host side without a server: the host agent's config, its hardware facts, and the VM facts the policy sees.

Every config mistake is one ``host_config`` error naming the key (and a bounded fuzz never gets anything
else out of the parser); hardware facts come from what the kernel says, never from the file; a VM request
to the policy checks its host facts and derives ``memory_encryption`` itself.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keysteward.access.vm_actions import hardware_facts
from keysteward.attest.binding import canonical_hardware, host_binding
from keysteward.errors import BadRequest, Denied, KeystewardError
from keysteward.host.config import HostConfigError, load_config, parse_config
from keysteward.host.hardware import PARAMETERS, facts_from
from keysteward.policy.engine import CompiledPolicySet
from keysteward.policy.errors import PolicyRequestInvalid
from keysteward.policy.facts import PolicyRequest
from keysteward.policy.schema import RENEWAL_OF
from keysteward.policy.store import default_sources
from keysteward.release.vms import VmSpec
from tests.support.fuzz import edits, mutate

pytestmark = pytest.mark.unit

GOOD = """
state_dir = "run"
snapshot_dir = "/srv/vm-state"
poll_seconds = 0.5
[kms]
url = "https://kms.internal:8443"
cert_file = "host.pem"
key_file = "host.key"
[tpm]
tcti = "device:/dev/tpmrm0"
pcrs = "sha256:0,7"
[qemu]
accel = "tcg"
"""


def test_a_good_file_parses_whole_with_paths_from_its_directory() -> None:
    config = parse_config(GOOD, base_dir="/etc/keysteward")
    assert config.state_dir == "/etc/keysteward/run" and config.snapshot_dir == "/srv/vm-state"
    assert config.kms.cert_file == "/etc/keysteward/host.pem" and config.url == "https://kms.internal:8443"
    assert config.tpm == "device:/dev/tpmrm0" and config.accel == "tcg" and config.poll_seconds == 0.5


@pytest.mark.parametrize(
    ("edit", "names"),
    [
        (lambda t: t + "\nhardware = { sev_snp = true }\n", "unknown key 'hardware'"),  # facts are never claimed
        (lambda t: t.replace('accel = "tcg"', 'accel = "xen"'), "qemu.accel"),
        (lambda t: t.replace('pcrs = "sha256:0,7"', 'pcrs = "sha999:0"'), "tpm.pcrs"),
        (lambda t: t.replace('url = "https://kms.internal:8443"', 'url = "http://kms"'), "kms.url"),
        (lambda t: t.replace('state_dir = "run"\n', ""), "state_dir"),
        (lambda t: t.replace("poll_seconds = 0.5", "poll_seconds = 0"), "poll_seconds"),
        (lambda t: t.replace("[kms]", "[kmz]"), "unknown key 'kmz'"),
        (lambda t: t.replace('key_file = "host.key"\n', ""), "kms.key_file"),
        (lambda t: t + "\n[qemu.extra]\n", "qemu"),
        (lambda t: t.replace("[tpm]", "tpm = 3\n[tpmx]"), "tpm"),
    ],
)
def test_each_mistake_is_one_error_naming_its_key(edit: object, names: str) -> None:
    with pytest.raises(HostConfigError) as caught:
        parse_config(edit(GOOD))  # type: ignore[operator]
    assert caught.value.code == "host_config" and names in caught.value.message


def test_a_file_that_is_not_toml_or_names_unreadable_files_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "host.toml"
    bad.write_bytes(b"\xff\xfe not toml")
    with pytest.raises(HostConfigError, match="not UTF-8"):
        load_config(str(bad))
    bad.write_text(GOOD)
    with pytest.raises(HostConfigError, match="cannot read"):
        load_config(str(bad))  # host.pem is not there
    with pytest.raises(HostConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.toml"))
    bad.write_bytes(b"x" * (1 << 21))
    with pytest.raises(HostConfigError, match="larger than"):
        load_config(str(bad))


@settings(max_examples=200, deadline=None)
@given(edits(max_position=len(GOOD)))
def test_fuzzed_files_parse_or_fail_with_the_config_error(changes: list[tuple[int, int, int]]) -> None:
    text = mutate(GOOD.encode(), changes).decode("utf-8", errors="replace")
    try:
        parse_config(text)
    except HostConfigError:
        pass


def test_hardware_facts_are_what_the_kernel_reports() -> None:
    files = {PARAMETERS["sev"]: "Y\n", PARAMETERS["sev_es"]: "N\n", PARAMETERS["sev_snp"]: "1\n"}
    facts = facts_from(files.get, kvm=True)
    assert facts == {"sev": True, "sev_es": False, "sev_snp": True, "tdx": False, "kvm": True}
    assert facts_from(lambda _: None, kvm=False) == dict.fromkeys(("sev", "sev_es", "sev_snp", "tdx", "kvm"), False)
    assert facts_from(lambda _: "garbage", kvm=False)["sev"] is False


def test_the_binding_covers_the_reported_facts() -> None:
    plain = {"kvm": True, "sev": False, "sev_es": False, "sev_snp": False, "tdx": False}
    claimed = {**plain, "sev_snp": True}
    nonce, key = b"n" * 32, b"k" * 32
    assert host_binding(nonce, key, canonical_hardware(plain)) != host_binding(nonce, key, canonical_hardware(claimed))
    assert canonical_hardware(plain) == canonical_hardware(dict(reversed(list(plain.items()))))


def _vm_request(host: dict[str, bool], action: str = "vm_start") -> PolicyRequest:
    return PolicyRequest(
        tenant="acme", action=action, principal={"type": "Host", "name": "host-a"},
        resource={"type": "Vm", "id": "7d1e", "name": "web", "memory_mb": 512, "cpus": 1, "labels": {"tier": "db"}},
        identity={"provider": "host", "kind": "host", "account": "acme", "instance_id": "host-a"},
        platform={"tee": "tpm2", "pcrs": {"sha256_7": "ab" * 32}}, time=datetime(2026, 12, 4, tzinfo=UTC), host=host,
    )  # fmt: skip


def test_vm_requests_check_their_host_facts_and_round_trip() -> None:
    request = _vm_request({"kvm": True, "sev_snp": True})
    assert request.host["memory_encryption"] is True and request.host["tdx"] is False
    assert PolicyRequest.from_json(request.to_json()) == request
    renewal = PolicyRequest.from_json({**request.to_json(), "action": RENEWAL_OF["vm_start"]})
    assert renewal.action == "vm_renew"
    with pytest.raises(PolicyRequestInvalid, match=r"host\.memory_encryption"):
        _vm_request({"kvm": True, "memory_encryption": True})  # claimed without SEV or TDX
    with pytest.raises(PolicyRequestInvalid, match="host"):
        _vm_request({"sgx": True})
    with pytest.raises(PolicyRequestInvalid, match="applies to VM actions only"):
        PolicyRequest.from_json({**request.to_json(), "action": "vm_create", "principal": {"type": "Human",
                                 "name": "bob", "role": "admin"}, "identity": {}, "platform": {}})  # fmt: skip
    with pytest.raises(Denied, match="booleans"):
        hardware_facts({"kvm": "yes"})


def test_the_built_in_roles_let_hosts_run_vms_and_policies_read_host_facts() -> None:
    compiled = CompiledPolicySet.compile(default_sources())
    assert compiled.evaluate(_vm_request({"kvm": True})).effect == "permit"
    forbid = (
        '@id("memory-encryption-only")\nforbid (principal is Keysteward::Host, action == '
        'Keysteward::Action::"vm_start", resource is Keysteward::Vm) unless { context.host.memory_encryption };\n'
    )
    compiled = CompiledPolicySet.compile({**default_sources(), "enc.cedar": forbid})
    denied = compiled.evaluate(_vm_request({"kvm": True}))
    assert denied.effect == "deny" and denied.policies == ("memory-encryption-only",)
    assert compiled.evaluate(_vm_request({"sev_snp": True})).effect == "permit"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"memory_mb": 8}, "memory_mb"),
        ({"disks": (("v", "relative/path"),)}, "absolute path"),
        ({"disks": tuple((f"v{i}", f"/d{i}") for i in range(9))}, "at most 8"),
        ({"launch": {"bios": "/x"}}, "launch takes"),
        ({"name": "Bad Name"}, "vm"),
    ],
)
def test_a_bad_vm_spec_is_refused(change: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"name": "web", "key": "volumes", "memory_mb": 512, "cpus": 1, "disks": ()}
    with pytest.raises((BadRequest, KeystewardError), match=message):
        VmSpec(**{**fields, **change}).check()  # type: ignore[arg-type]


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.text(max_size=12), st.one_of(st.booleans(), st.integers(), st.text(max_size=4)), max_size=7))
def test_fuzzed_host_facts_are_accepted_whole_or_refused(raw: dict[str, object]) -> None:
    try:
        facts = hardware_facts(raw)
    except Denied as exc:
        assert exc.code == "evidence_invalid"
        return
    assert set(facts) == {"kvm", "sev", "sev_es", "sev_snp", "tdx", "memory_encryption"}
