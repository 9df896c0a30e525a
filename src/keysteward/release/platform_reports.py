"""A machine's latest verified TPM quote, kept as the platform facts of the actions that carry no evidence.

A KMIP client cannot send a TPM quote inside KMIP. A hypervisor therefore reports one beside it: it enrolls
its TPM's attestation key as an agent or a host does (:mod:`keysteward.release.tpm_enrollment`, its mTLS
certificate as its identity), then sends a quote over a fresh server nonce (``keysteward host report-tpm``,
``POST /v1/attest/tpm/quote``). The quote is verified with the enrolled AK by the release path's own verifier
(:class:`~keysteward.release.platform.PlatformVerifier`), bound to the nonce (spent: single use), and the
facts it proves (``tee``, ``pcrs``) replace the machine's previous ones, audited as ``tpm.quote``. The KMIP
actions read them as ``context.platform`` while they are younger than ``[kmip] platform_max_age``; older,
absent or after the AK was removed they read ``{"tee": "none"}``, and the policy decides.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import Connection, delete, insert, select

from keysteward.attest.errors import EvidenceRejected
from keysteward.audit.log import AuditLog
from keysteward.errors import BadRequest, Denied
from keysteward.release.nonces import Nonces, decode
from keysteward.release.platform import PlatformVerifier
from keysteward.store.db import Database
from keysteward.store.models import PlatformReport, TpmKey
from keysteward.ttlcache import TtlCache

CACHE_SECONDS: Final = 1.0
NO_PLATFORM: Final[dict[str, Any]] = {"tee": "none"}
"""Shared, never changed: one object, so a cache of facts made from it (access/kmip_actions.py) can key on it."""


def report_binding(nonce: bytes) -> bytes:
    """The quote's qualifying data: the nonce, under a label no release binding starts with."""
    return hashlib.sha256(b"keysteward-platform-report/1\x00" + nonce).digest()


class PlatformReports:
    def __init__(
        self, db: Database, audit: AuditLog, nonces: Nonces, platform: PlatformVerifier, max_age: float
    ) -> None:
        if not 0 < max_age <= 366 * 86400:
            raise BadRequest("kmip.platform_max_age must be from 1 second to 366 days", code="bad_setting")
        self.db = db
        self.audit = audit
        self.nonces = nonces
        self.platform = platform
        self.max_age = timedelta(seconds=max_age)
        self._latest: TtlCache[tuple[str, str], tuple[dict[str, Any], datetime]] = TtlCache(CACHE_SECONDS)

    def report(self, tenant_id: str, holder: str, nonce: str, quote: Mapping[str, Any]) -> dict[str, Any]:
        """Verify ``quote`` (the TPM evidence) for ``holder`` over ``nonce``; keep and return its facts."""
        raw = decode(nonce)
        expires = self.nonces.check(raw)
        now = datetime.now(UTC)
        try:
            facts, summary = self.platform.verify(tenant_id, holder, {"tpm": quote}, binding=report_binding(raw),
                                                  now=now)  # fmt: skip
        except EvidenceRejected as exc:
            self.audit.record(tenant_id, actor=holder, action="tpm.quote", target=holder, outcome="denied",
                              reason=exc.code, details={})  # fmt: skip
            raise Denied(exc.message, code=exc.code) from None

        def effect(conn: Connection) -> dict[str, Any]:
            self.nonces.spend(conn, raw, expires)
            conn.execute(delete(PlatformReport).where(PlatformReport.tenant_id == tenant_id,
                                                      PlatformReport.holder == holder))  # fmt: skip
            conn.execute(insert(PlatformReport).values(
                tenant_id=tenant_id, holder=holder, facts=json.dumps(facts), ak_name=str(summary.get("tpm_ak", "")),
                verified_at=now,
            ))  # fmt: skip
            return {"actor": holder, "action": "tpm.quote", "target": holder,
                    "details": {"ak_name": summary.get("tpm_ak", ""), "pcrs": facts.get("pcrs", {})}}  # fmt: skip

        self.audit.commit(tenant_id, effect)
        self._latest.drop_where(lambda k, _: k == (tenant_id, holder))
        return facts

    def is_warm(self, tenant_id: str, holder: str) -> bool:
        """Whether :meth:`latest` answers from memory now (no database read)."""
        return self._latest.get((tenant_id, holder)) is not None

    def latest(self, tenant_id: str, holder: str) -> dict[str, Any]:
        """The facts of ``holder``'s latest verified quote while it is young enough and the AK that signed it is
        still the one enrolled; ``{"tee": "none"}`` otherwise."""
        key = (tenant_id, holder)
        hit = self._latest.get(key)
        if hit is None:
            hit = self._read(tenant_id, holder)
            self._latest.put(key, hit)
        facts, verified_at = hit
        if datetime.now(UTC) - verified_at > self.max_age:
            return NO_PLATFORM
        return facts

    def _read(self, tenant_id: str, holder: str) -> tuple[dict[str, Any], datetime]:
        with self.db.read() as conn:
            row = conn.execute(
                select(PlatformReport.facts, PlatformReport.verified_at)
                .join(TpmKey, (TpmKey.tenant_id == PlatformReport.tenant_id) & (TpmKey.holder == PlatformReport.holder)
                      & (TpmKey.ak_name == PlatformReport.ak_name))
                .where(PlatformReport.tenant_id == tenant_id, PlatformReport.holder == holder)
            ).first()  # fmt: skip
        if row is None:
            return dict(NO_PLATFORM), datetime.now(UTC)
        at = row.verified_at if row.verified_at.tzinfo else row.verified_at.replace(tzinfo=UTC)
        facts = json.loads(row.facts)
        return (facts if isinstance(facts, dict) else dict(NO_PLATFORM)), at
