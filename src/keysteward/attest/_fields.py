"""Checks of the identity fields a verified document carries (shared by both document shapes)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from keysteward.attest.errors import EvidenceRejected

_IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
"""Account, instance, image, region and zone names: no '/', no spaces, no control characters."""


def ident(doc: Mapping[str, Any], name: str, *, where: str) -> str:
    """A required identifier field of a verified document."""
    value = doc.get(name)
    if not isinstance(value, str) or not _IDENT.fullmatch(value):
        raise EvidenceRejected(
            f"{where} field {name!r} is missing or not an identifier (letters, digits, '.', '_', ':', '-')"
        )
    return value


def optional_ident(doc: Mapping[str, Any], name: str, *, where: str) -> str | None:
    return None if doc.get(name) is None else ident(doc, name, where=where)


def nonce_field(doc: Mapping[str, Any], *, where: str) -> str:
    value = doc.get("nonce")
    if not isinstance(value, str) or not value or len(value) > 256:
        raise EvidenceRejected(f"{where} has no 'nonce' field: ask the provider for evidence bound to the nonce")
    return value


def timestamp(value: object, name: str, *, where: str) -> datetime:
    """An RFC 3339 string (AWS pendingTime) or integer seconds (GCP), as an aware UTC datetime."""
    try:
        if isinstance(value, str) and len(value) <= 64:
            parsed = datetime.fromisoformat(value)
            if parsed.tzinfo is None:
                raise ValueError("no time zone")
            return parsed.astimezone(UTC)
        if isinstance(value, int) and not isinstance(value, bool):
            return datetime.fromtimestamp(value, UTC)
    except (ValueError, OverflowError, OSError) as exc:
        raise EvidenceRejected(f"{where} field {name!r} is not a valid time") from exc
    raise EvidenceRejected(f"{where} field {name!r} is missing or not a time")
