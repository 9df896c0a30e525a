"""The parts of a request's context that only some actions carry: a release's verified ``identity`` and
``platform``, an XKS call's ``kms`` metadata (key uses) and a host's hardware facts (``host``, VM actions).
Checked here; :mod:`keysteward.policy.facts` builds them in."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from keysteward.policy import fact_values as check
from keysteward.policy.schema import HOST_FACTS, KMS_FIELDS, PCR_BANKS, PCR_COUNT, TEE_KINDS

MAX_KMS_TEXT: Final = 2048  # ARNs are up to 2048 characters
_PCR_NAME = re.compile(r"(sha1|sha256|sha384)_([0-9]{1,2})")
_IDENTITY_REQUIRED: Final = ("provider", "kind", "account", "instance_id")
_IDENTITY_OPTIONAL: Final = ("image_id", "region", "zone")
_TCB_FIELDS: Final = ("bootloader", "tee", "snp", "microcode")
_PLATFORM_FIELDS: Final = frozenset({"tee", "debug", "measurement", "tcb", "chip_id", "vmpl", "secure_boot", "pcrs"})


def identity_facts(raw: Any) -> dict[str, Any]:
    """A release's verified instance identity: provider, kind, account and instance_id required."""
    data = check.mapping(raw, "identity")
    check.only(data, (*_IDENTITY_REQUIRED, *_IDENTITY_OPTIONAL, "launched_at"), "identity")
    out: dict[str, Any] = {name: check.text(data.get(name), f"identity.{name}") for name in _IDENTITY_REQUIRED}
    for name in _IDENTITY_OPTIONAL:
        if data.get(name) is not None:
            out[name] = check.text(data[name], f"identity.{name}", empty=True)
    launched = data.get("launched_at")
    if isinstance(launched, str):  # InstanceIdentity.claims() gives ISO 8601; policies compare unix seconds
        launched = int(check.moment(launched, "identity.launched_at").timestamp())
    if launched is not None:
        out["launched_at"] = check.long_int(launched, "identity.launched_at")
    return out


def _pcrs(raw: Any) -> dict[str, str]:
    """PCR values as ``{"sha256_7": hex}``; a nested ``{"sha256": {"7": hex}}`` is accepted and flattened."""
    data = check.mapping(raw, "platform.pcrs")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in PCR_BANKS and isinstance(value, Mapping):
            flat.update({f"{key}_{index}": digest for index, digest in value.items()})
        else:
            flat[str(key)] = value
    out = {}
    for name, value in flat.items():
        match = _PCR_NAME.fullmatch(name)
        if match is None or int(match.group(2)) >= PCR_COUNT or str(int(match.group(2))) != match.group(2):
            raise check.fail("platform.pcrs", f"has a bad PCR name {name[:64]!r} (want e.g. sha256_7)")
        out[name] = check.hex_text(value, f"platform.pcrs.{name}", PCR_BANKS[match.group(1)])
    return out


def platform_facts(raw: Any) -> dict[str, Any]:
    """A release's verified platform: its TEE kind and what its report or quote proved."""
    data = check.mapping(raw, "platform")
    check.only(data, _PLATFORM_FIELDS, "platform")
    if data.get("tee") not in TEE_KINDS:
        raise check.fail("platform.tee", f"must be one of {', '.join(TEE_KINDS)}")
    out: dict[str, Any] = {"tee": data["tee"]}
    for name in ("debug", "secure_boot"):
        if data.get(name) is not None:
            out[name] = check.boolean(data[name], f"platform.{name}")
    for name in ("measurement", "chip_id"):
        if data.get(name) is not None:
            out[name] = check.hex_text(data[name], f"platform.{name}")
    if data.get("vmpl") is not None:
        out["vmpl"] = check.long_int(data["vmpl"], "platform.vmpl", 0, 3)
    if data.get("tcb") is not None:
        tcb = check.mapping(data["tcb"], "platform.tcb")
        check.only(tcb, _TCB_FIELDS, "platform.tcb")
        out["tcb"] = {name: check.long_int(tcb.get(name), f"platform.tcb.{name}", 0, 255) for name in _TCB_FIELDS}
    if data.get("pcrs") is not None:
        out["pcrs"] = _pcrs(data["pcrs"])
    return out


def host_facts(raw: Any) -> dict[str, bool]:
    """A host's hardware facts: every one of :data:`HOST_FACTS` a bool; ``memory_encryption`` is derived."""
    data = check.mapping(raw, "host")
    check.only(data, HOST_FACTS, "host")
    out = {name: check.boolean(data.get(name, False), f"host.{name}") for name in HOST_FACTS[:-1]}
    derived = out["sev"] or out["sev_es"] or out["sev_snp"] or out["tdx"]
    claimed = data.get("memory_encryption")
    if claimed is not None and check.boolean(claimed, "host.memory_encryption") != derived:
        raise check.fail("host.memory_encryption", "must be true exactly when sev, sev_es, sev_snp or tdx is")
    out["memory_encryption"] = derived
    return out


def kms_facts(raw: Any) -> dict[str, str]:
    """An XKS call's requestMetadata facts: ``operation`` and ``request_id`` required, the rest optional."""
    data = check.mapping(raw, "kms")
    check.only(data, KMS_FIELDS, "kms")
    out: dict[str, str] = {}
    for name in KMS_FIELDS:
        value = data.get(name)
        if value is None and name in ("operation", "request_id"):
            raise check.fail(f"kms.{name}", "is missing")
        if value is not None:
            if not isinstance(value, str) or len(value) > MAX_KMS_TEXT or not check.is_unicode(value):
                raise check.fail(f"kms.{name}", f"must be a string of at most {MAX_KMS_TEXT} characters")
            out[name] = value
    return out
