"""The published Cedar schema: every name a keysteward policy may speak of, in namespace ``Keysteward``.

The schema is the contract between policy authors and the facts the release path proves. Policies are
validated against it in strict mode when they are compiled, so a typo in an attribute, a comparison of a
Long with a String or a read of an optional claim without ``has`` is rejected before it can silently
never match. The same text is published as ``docs/policies/keysteward.cedarschema`` (a unit test keeps
the two equal) for operators and for ``cedar validate``.

PCR values are a record of optional attributes named ``<bank>_<index>`` (``sha256_7``), so "PCR 7 of the
sha256 bank equals X" reads ``context.platform has pcrs.sha256_7 && context.platform.pcrs.sha256_7 == "…"``.
"""

from __future__ import annotations

from functools import cache
from typing import Final

import cedarpy

NAMESPACE: Final = "Keysteward"
PCR_BANKS: Final[dict[str, int]] = {"sha1": 40, "sha256": 64, "sha384": 96}  # bank -> hex digits of a value
PCR_COUNT: Final = 24
TEE_KINDS: Final = ("none", "tpm2", "sev-snp")
# action -> (principal types, resource type, context type); the facts model checks requests against it
ACTIONS: Final[dict[str, tuple[tuple[str, ...], str, str]]] = {
    "release": (("Instance", "Host"), "Volume", "ReleaseContext"),
    "renew": (("Instance", "Host"), "Volume", "ReleaseContext"),
    "approve": (("Human",), "Volume", "AdminContext"),
    "volume_create": (("Human",), "Volume", "AdminContext"),
    "volume_revoke": (("Human",), "Volume", "AdminContext"),
    "volume_destroy": (("Human",), "Volume", "AdminContext"),
    "policy_update": (("Human",), "Tenant", "AdminContext"),
    "encrypt": (("Human", "Agent", "Host", "CloudService"), "Key", "KeyUseContext"),
    "decrypt": (("Human", "Agent", "Host", "CloudService"), "Key", "KeyUseContext"),
    "describe_key": (("CloudService",), "Key", "KeyUseContext"),
    "generate_data_key": (("Human", "Agent", "Host"), "Key", "KeyUseContext"),
    "re_encrypt": (("Human", "Agent", "Host"), "Key", "KeyUseContext"),
    # KMIP (docs/kmip.md): a hypervisor's operations on its tenant's KMIP objects
    "kmip_create": (("Hypervisor",), "KmipObject", "KmipContext"),
    "kmip_register": (("Hypervisor",), "KmipObject", "KmipContext"),
    "kmip_get": (("Hypervisor",), "KmipObject", "KmipContext"),
    "kmip_get_attributes": (("Hypervisor",), "KmipObject", "KmipContext"),
    "kmip_modify_attributes": (("Hypervisor",), "KmipObject", "KmipContext"),
    "kmip_activate": (("Hypervisor",), "KmipObject", "KmipContext"),
    "kmip_revoke": (("Hypervisor",), "KmipObject", "KmipContext"),
    "kmip_destroy": (("Hypervisor",), "KmipObject", "KmipContext"),
    "kmip_encrypt": (("Hypervisor",), "KmipObject", "KmipContext"),
    "kmip_decrypt": (("Hypervisor",), "KmipObject", "KmipContext"),
    "kmip_mac": (("Hypervisor",), "KmipObject", "KmipContext"),
    "kmip_mac_verify": (("Hypervisor",), "KmipObject", "KmipContext"),
    "kmip_rekey": (("Hypervisor",), "KmipObject", "KmipContext"),
    "kmip_wrap": (("Hypervisor",), "KmipObject", "KmipContext"),
    "kmip_locate": (("Hypervisor",), "Tenant", "KmipContext"),
    # hypervisor hosts (docs/hosts.md): a host asks to run a VM, save its state, restore it, keep its lease
    "vm_start": (("Host",), "Vm", "HostContext"),
    "vm_restore": (("Host",), "Vm", "HostContext"),
    "vm_snapshot": (("Host",), "Vm", "HostContext"),
    "vm_renew": (("Host",), "Vm", "HostContext"),
    "vm_migrate": (("Host",), "Vm", "HostContext"),
    "vm_create": (("Human",), "Vm", "AdminContext"),
    "vm_revoke": (("Human",), "Vm", "AdminContext"),
    "vm_destroy": (("Human",), "Vm", "AdminContext"),
}
KMIP_ACTIONS: Final = tuple(name for name in ACTIONS if name.startswith("kmip_"))
HOST_FACTS: Final = ("kvm", "sev", "sev_es", "sev_snp", "tdx", "memory_encryption")
"""``context.host`` of a VM action: what the host's hardware offers, read by its agent (docs/hosts.md)."""
RENEWAL_OF: Final = {"release": "renew", "vm_start": "vm_renew", "vm_restore": "vm_renew", "vm_migrate": "vm_renew"}
"""The action a lease's renewal also asks, by the action that granted the lease."""
KEY_USE_ACTIONS: Final = ("encrypt", "decrypt", "generate_data_key", "re_encrypt")
KMS_FIELDS: Final = ("operation", "request_id", "principal_arn", "key_arn", "via_service", "source_vpc", "source_vpce")
"""``context.kms`` of an XKS call: its requestMetadata (operation and request_id always, the rest when sent)."""


def _pcr_record() -> str:
    lines: list[str] = []
    for bank in PCR_BANKS:
        names = [f"{bank}_{index}?: String" for index in range(PCR_COUNT)]
        lines.extend("    " + ", ".join(names[start : start + 6]) for start in range(0, PCR_COUNT, 6))
    return "  type Pcrs = {\n" + ",\n".join(lines) + "\n  };\n"


def _actions() -> str:
    groups: dict[tuple[tuple[str, ...], str, str], list[str]] = {}
    for action, applies in ACTIONS.items():
        groups.setdefault(applies, []).append(action)
    out = []
    for (principals, resource, context), names in groups.items():
        principal = principals[0] if len(principals) == 1 else "[" + ", ".join(principals) + "]"
        out.append(
            f"  action {', '.join(names)} appliesTo {{\n"
            f"    principal: {principal},\n    resource: {resource},\n    context: {context}\n  }};\n"
        )
    return "".join(out)


SCHEMA_TEXT: Final = (
    "// keysteward policy schema (namespace Keysteward). Generated from keysteward.policy.schema;\n"
    "// docs/policy.md explains every entity, attribute and action.\n"
    "namespace Keysteward {\n"
    "  // The tenant itself: the resource of policy_update, and the parent of its keys and volumes.\n"
    "  entity Tenant;\n"
    '  // A group of humans, e.g. Group::"security-officer"; approval annotations name these.\n'
    "  entity Group;\n"
    "\n"
    "  // -- principals --------------------------------------------------------------------------\n"
    '  // A cloud instance, id "provider/account/instance_id"; its cloud tags are entity tags.\n'
    "  entity Instance {\n"
    "    tenant: String, provider: String, account: String, instance_id: String,\n"
    "    image_id?: String, region?: String, zone?: String\n"
    "  } tags String;\n"
    '  // A hypervisor host or NBD proxy authenticated by its certificate, id "tenant/name".\n'
    "  entity Host { tenant: String, name: String };\n"
    '  // A machine with an agent certificate of the tenant CA (an application, an instance agent), id "tenant/name".\n'
    "  entity Agent { tenant: String, name: String };\n"
    '  // A KMIP client (hypervisor, storage array) with a hypervisor certificate of the tenant CA, id "tenant/name".\n'
    "  entity Hypervisor { tenant: String, name: String };\n"
    '  // A person (admin, security officer), id "tenant/name".\n'
    "  entity Human in [Group] { tenant: String, name: String, role: String };\n"
    "  // A cloud KMS calling through an external key store (XKS) with one of the store's SigV4 credentials,\n"
    '  // id "tenant/access key id"; store is the store\'s URI path prefix.\n'
    "  entity CloudService { tenant: String, name: String, store: String };\n"
    "\n"
    "  // -- resources ---------------------------------------------------------------------------\n"
    '  // A key, id "tenant/name".\n'
    "  entity Key in [Tenant] { tenant: String, name: String };\n"
    "  // A volume, id = its uuid; its labels are entity tags, sensitivity is the label of that name.\n"
    "  // Who the volume's binding names (set when it was created): the built-in policy set uses it.\n"
    "  type Binding = {\n"
    "    provider?: String, account?: String, instance_id?: String, image_id?: String, host?: String\n"
    "  };\n"
    "  entity Volume in [Tenant] {\n"
    "    tenant: String, name: String, key: Key, sensitivity: String, binding: Binding\n"
    "  } tags String;\n"
    '  // A KMIP managed object, id "tenant/uid"; its custom attributes (x-Name, x-Component...) are entity tags.\n'
    "  // state: PreActive, Active, Deactivated, Compromised, Destroyed; object_type: SymmetricKey, SecretData...\n"
    "  entity KmipObject in [Tenant] { tenant: String, uid: String, object_type: String, state: String } tags String;\n"
    "  // A VM of a hypervisor host, id = its uuid; its labels are entity tags.\n"
    "  entity Vm in [Tenant] { tenant: String, name: String, memory_mb: Long, cpus: Long } tags String;\n"
    "\n"
    "  // -- verified claims, carried in the context ---------------------------------------------\n"
    "  type Identity = {\n"
    "    provider: String, kind: String, account: String, instance_id: String,\n"
    "    image_id?: String, region?: String, zone?: String, launched_at?: Long\n"
    "  };\n"
    "  type Tcb = { bootloader: Long, tee: Long, snp: Long, microcode: Long };\n"
    + _pcr_record()
    + "  type Platform = {\n"
    "    tee: String, debug?: Bool, measurement?: String, tcb?: Tcb, chip_id?: String,\n"
    "    vmpl?: Long, secure_boot?: Bool, pcrs?: Pcrs\n"
    "  };\n"
    "  // time: unix seconds; hour: 0-23 UTC; weekday: 1-7, Monday 1 (UTC).\n"
    "  type RequestInfo = { time: Long, hour: Long, weekday: Long, source_ip?: ipaddr };\n"
    "  type ReleaseContext = { identity: Identity, platform: Platform, request: RequestInfo };\n"
    "  // What a host's hardware offers, read from the host by its agent and covered by its TPM quote:\n"
    "  // KVM, AMD SEV / SEV-ES / SEV-SNP, Intel TDX; memory_encryption is any of the last four.\n"
    "  type HostFacts = {\n"
    "    kvm: Bool, sev: Bool, sev_es: Bool, sev_snp: Bool, tdx: Bool, memory_encryption: Bool\n"
    "  };\n"
    "  type HostContext = { identity: Identity, platform: Platform, host: HostFacts, request: RequestInfo };\n"
    "  type AdminContext = { request: RequestInfo };\n"
    '  // platform: the hypervisor\'s latest verified TPM quote ({ tee: "none" } without a fresh one).\n'
    "  type KmipContext = { platform: Platform, request: RequestInfo };\n"
    '  // encryption_context: the caller\'s encryption context as "key=value" strings (bound as AAD).\n'
    "  // kms: an XKS call's requestMetadata (kmsOperation, kmsRequestId, awsPrincipalArn, kmsKeyArn,\n"
    "  // kmsViaService, awsSourceVpc, awsSourceVpce); present on XKS calls only.\n"
    "  type KmsRequest = {\n"
    "    operation: String, request_id: String, principal_arn?: String, key_arn?: String,\n"
    "    via_service?: String, source_vpc?: String, source_vpce?: String\n"
    "  };\n"
    "  type KeyUseContext = { request: RequestInfo, encryption_context: Set<String>, kms?: KmsRequest };\n"
    "\n"
    "  // -- actions -----------------------------------------------------------------------------\n"
    + _actions()
    + "}\n"
)


@cache
def cedar_schema() -> cedarpy.Schema:
    """The parsed schema handle, built once per process (parsing a schema costs milliseconds)."""
    return cedarpy.Schema.from_str(SCHEMA_TEXT)


def entity_type(name: str) -> str:
    """The namespaced Cedar type of an entity or action: ``Keysteward::Volume``."""
    return f"{NAMESPACE}::{name}"
