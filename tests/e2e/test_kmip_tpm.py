"""Issue 12: a hypervisor's enrolled TPM and its latest verified quote as facts of the tenant's KMIP policy.

Real parts only: a ``keysteward server start`` KMIP listener, two swtpm TPMs manufactured with EK certificates,
``keysteward host enroll-tpm`` (credential activation, as a host enrolls) and ``keysteward host report-tpm``
(tpm2_quote over a fresh nonce) for the hypervisors esx-1 and esx-2, and docs/policies/kmip-vm-keys-tpm.cedar
with esx-1's PCR 7 as the approved value:

- esx-1 (approved PCR 7) Gets the key tagged x-Component = Virtual Machine; esx-2 (PCR 7 extended: another
  Secure Boot state) is refused Permission Denied, audited, and still Gets a vSAN key;
- a hypervisor that never reported a quote is refused the VM key;
- esx-2 sending esx-1's PCR 7 value in a quote its TPM did not sign over it is refused (evidence_invalid), and
  replaying esx-1's report (its nonce spent) is refused; neither changes esx-2's facts;
- once esx-1's PCR 7 changes and it reports again, it is refused too: the latest quote is what counts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from keysteward.agent.tpm import TpmDevice
from keysteward.release.nonces import decode
from keysteward.release.platform_reports import report_binding
from tests.fixtures.keysteward import SecretRegistry, ServerProcess
from tests.support.kmip_client import KmipConn, aes_256_template, attribute, text, uid
from tests.support.kmip_site import KmipSite, make_kmip_site
from tests.support.swtpm import Swtpm, running_swtpm

pytestmark = pytest.mark.e2e
APPROVED_IN_DOC = "65caf8dd1e0ea7a6347b635d2b379c93b9a1351edc2afc3ecda700e534eb3068"


@pytest.fixture
def world(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], secret_registry: SecretRegistry
) -> Iterator[tuple[KmipSite, dict[str, Swtpm]]]:
    with (
        running_swtpm(tmp_path / "tpm-1", tmp_path / "tpm-ca") as (tpm_1, ca),
        running_swtpm(tmp_path / "tpm-2", tmp_path / "tpm-ca") as (tpm_2, _),
    ):
        assert ca is not None
        roots = tmp_path / "ek-roots.pem"
        roots.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (ca.root, ca.issuer)))
        site = make_kmip_site(tmp_path, server_factory, secret_registry,
                              env={"KEYSTEWARD_RELEASE_TPM_EK_ROOTS": str(roots)})  # fmt: skip
        yield site, {"esx-1": tpm_1, "esx-2": tpm_2}


def _config(site: KmipSite, name: str, tpm: Swtpm) -> str:
    cert, key = site.issue_once(name)
    path = site.tmp / f"{name}.toml"
    path.write_text(
        f'state_dir = "{site.tmp}/{name}-run"\nsnapshot_dir = "{site.tmp}/snapshots"\n'
        f'status_file = "{site.tmp}/{name}.json"\n[kms]\nurl = "{site.server.url}"\n'
        f'ca_file = "{site.server_ca}"\ncert_file = "{cert}"\nkey_file = "{key}"\n'
        f'[tpm]\ntcti = "{tpm.tcti}"\npcrs = "sha256:0,7"\n'
    )
    return str(path)


def _report(site: KmipSite, config: str) -> dict[str, Any]:
    return dict(site.server.cli_json("host", "report-tpm", "--config", config))


def _vm_key(site: KmipSite, name: str, component: str) -> str:
    with KmipConn(site.port, site.tls(site.issue_once(name))) as c:
        made = c.one("Create", *aes_256_template())
        assert made.ok
        assert c.one("AddAttribute", uid(made.uid()), attribute("x-Component", text(component))).ok
        return made.uid()


def _get(site: KmipSite, name: str, key: str) -> str:
    with KmipConn(site.port, site.tls(site.issue_once(name))) as c:
        got = c.one("Get", uid(key))
        return "ok" if got.ok else str(got.reason)


def test_only_hypervisors_with_an_approved_pcr7_get_vm_keys(world: tuple[KmipSite, dict[str, Swtpm]]) -> None:
    site, tpms = world
    configs = {name: _config(site, name, tpm) for name, tpm in tpms.items()}
    TpmDevice(tpms["esx-2"].tcti, workdir=site.tmp / "tpm-2-work").extend(7, "ab" * 32)  # another boot state
    for name, config in configs.items():
        enrolled = site.server.cli_json("host", "enroll-tpm", "--config", config)
        assert enrolled["holder"] == f"hypervisor:{name}"
    reported = {name: _report(site, config) for name, config in configs.items()}
    assert reported["esx-1"]["holder"] == "hypervisor:esx-1" and reported["esx-1"]["platform"]["tee"] == "tpm2"
    approved = reported["esx-1"]["platform"]["pcrs"]["sha256_7"]
    assert reported["esx-2"]["platform"]["pcrs"]["sha256_7"] != approved

    doc = (Path(__file__).parents[2] / "docs/policies/kmip-vm-keys-tpm.cedar").read_text()
    assert APPROVED_IN_DOC in doc
    with site.server.http(site.admin) as h:
        put = h.put("/policy", json={"sources": {"kmip-vm-keys-tpm.cedar": doc.replace(APPROVED_IN_DOC, approved)}})
        assert put.status_code == 200, put.text
    vm_key, vsan_key = _vm_key(site, "esx-2", "Virtual Machine"), _vm_key(site, "esx-2", "vSAN")
    assert _get(site, "esx-1", vm_key) == "ok"
    assert _get(site, "esx-2", vm_key) == "PermissionDenied"
    assert _get(site, "esx-2", vsan_key) == "ok"
    assert _get(site, "esx-3", vm_key) == "PermissionDenied"  # no TPM, no quote: tee "none"
    records = site.server.cli_json("audit", "list", "--actor", "cert:acme/hypervisor/esx-2", token=site.admin)
    denied = [r for r in records if r["action"] == "kmip.get" and r["outcome"] == "denied"]
    assert denied and denied[0]["reason"] == "forbidden_by_policy"

    # esx-2 claims esx-1's PCR 7 in a quote its TPM signed over other values: refused, its facts unchanged
    device = TpmDevice(tpms["esx-2"].tcti, workdir=site.tmp / "tpm-2-lie")
    with site.server.http(None, cert=site.issue_once("esx-2")) as h:
        nonce = h.post("/release/challenge", json={}).json()["nonce"]
        quote = device.quote(report_binding(decode(nonce)), {"sha256": [0, 7]})
        lying = copy.deepcopy(quote)
        lying["pcrs"]["sha256"]["7"] = approved
        refused = h.post("/attest/tpm/quote", json={"tenant": "acme", "nonce": nonce, "tpm": lying})
        assert refused.status_code == 403 and refused.json()["code"] == "evidence_invalid", refused.text
        # the honest quote over the same nonce is accepted once; the same nonce again is a replay
        assert h.post("/attest/tpm/quote", json={"tenant": "acme", "nonce": nonce, "tpm": quote}).status_code == 200
        replay = h.post("/attest/tpm/quote", json={"tenant": "acme", "nonce": nonce, "tpm": quote})
        assert replay.status_code == 403 and replay.json()["code"] == "nonce_replayed", replay.text
    assert _get(site, "esx-2", vm_key) == "PermissionDenied"

    # esx-1's Secure Boot state changes: its next report replaces its facts, and the VM key is refused
    TpmDevice(tpms["esx-1"].tcti, workdir=site.tmp / "tpm-1-work").extend(7, "cd" * 32)
    assert _report(site, configs["esx-1"])["platform"]["pcrs"]["sha256_7"] != approved
    assert _get(site, "esx-1", vm_key) == "PermissionDenied"
    quotes = [r for r in site.server.cli_json("audit", "list", token=site.admin) if r["action"] == "tpm.quote"]
    assert {r["actor"] for r in quotes} == {"hypervisor:esx-1", "hypervisor:esx-2"}
    assert any(r["outcome"] == "denied" and r["reason"] == "evidence_invalid" for r in quotes)
