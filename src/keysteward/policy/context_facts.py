"""The parts of a request's context that only some actions carry: an XKS call's ``kms`` metadata (key uses)
and a host's hardware facts (``host``, VM actions). Checked here; :mod:`keysteward.policy.facts` builds them in."""

from __future__ import annotations

from typing import Any, Final

from keysteward.policy import fact_values as check
from keysteward.policy.schema import HOST_FACTS, KMS_FIELDS

MAX_KMS_TEXT: Final = 2048  # ARNs are up to 2048 characters


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
