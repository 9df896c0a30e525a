"""Step 2 for the platform: the TPM quote and the SEV-SNP report a release carries, verified, as policy facts.

``evidence.tpm`` is checked against the attestation key the instance enrolled (or an admin pinned);
``evidence.snp`` against AMD's roots (plus the ARKs the operator configured) and the certificate cache.
Both must be bound to the same ``sha256(nonce || public key)`` as the identity. What they prove becomes
``context.platform`` of the policy request (:func:`platform_facts`); evidence a policy needs but the
request lacks leaves ``tee = "none"`` and the policy decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from sqlalchemy import select

from keysteward.attest.errors import EvidenceRejected
from keysteward.attest.snp import SnpClaims, SnpTrust, verify_snp
from keysteward.attest.tpm import TpmClaims, verify_quote
from keysteward.errors import BadRequest
from keysteward.settings import ReleaseSettings
from keysteward.store.db import Database
from keysteward.store.models import TpmKey
from keysteward.ttlcache import TtlCache

CACHE_SECONDS = 1.0


def load_pem_certificates(path: str, what: str) -> tuple[x509.Certificate, ...]:
    if not path:
        return ()
    try:
        return tuple(x509.load_pem_x509_certificates(Path(path).read_bytes()))
    except (OSError, ValueError) as exc:
        raise BadRequest(f"cannot read {what} from {path}: {exc}", code="bad_settings") from exc


def snp_trust(settings: ReleaseSettings) -> SnpTrust:
    """AMD's built-in roots, plus ``[release] snp_roots`` (never test roots by default) and the cache dir."""
    base = SnpTrust.default(Path(settings.snp_cert_cache) if settings.snp_cert_cache else None)
    extra = load_pem_certificates(settings.snp_roots, "[release] snp_roots")
    return SnpTrust(roots=base.roots + extra, cache_dir=base.cache_dir, asks=base.asks)


def platform_facts(tpm: TpmClaims | None, snp: SnpClaims | None) -> dict[str, Any]:
    """``context.platform``: what the verified quote and report prove (``tee = "none"`` without either)."""
    out: dict[str, Any] = {"tee": "none"}
    if tpm is not None:
        out["tee"] = "tpm2"
        out["pcrs"] = {f"{bank}_{index}": value for bank, values in tpm.pcrs.items() for index, value in values.items()}
    if snp is not None:  # a vTPM inside an SNP guest: the TEE is SNP, its PCRs still count
        out.update(
            tee="sev-snp",
            debug=snp.debug_allowed,
            measurement=snp.measurement,
            tcb={k: snp.reported_tcb[k] for k in ("bootloader", "tee", "snp", "microcode")},
            chip_id=snp.chip_id,
            vmpl=snp.vmpl,
        )
    return out


class PlatformVerifier:
    def __init__(self, db: Database, settings: ReleaseSettings) -> None:
        self.db = db
        self.snp = snp_trust(settings)
        self._aks: TtlCache[tuple[str, str], bytes | None] = TtlCache(CACHE_SECONDS)

    def enrolled_ak(self, tenant_id: str, holder: str) -> bytes | None:
        key = (tenant_id, holder)
        hit = self._aks.get(key)
        if hit is not None:
            return hit
        with self.db.read() as conn:
            found = conn.execute(
                select(TpmKey.ak_public).where(TpmKey.tenant_id == tenant_id, TpmKey.holder == holder)
            ).scalar_one_or_none()
        if found is not None:
            self._aks.put(key, bytes(found))
        return None if found is None else bytes(found)

    def forget(self, tenant_id: str, holder: str) -> None:
        self._aks.drop_where(lambda k, _: k == (tenant_id, holder))

    def verify(
        self, tenant_id: str, holder: str, evidence: Mapping[str, Any], *, binding: bytes, now: datetime
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The policy's platform facts and a summary for the audit record; raises EvidenceRejected."""
        tpm = snp = None
        summary: dict[str, Any] = {}
        if evidence.get("tpm") is not None:
            ak = self.enrolled_ak(tenant_id, holder)
            if ak is None:
                raise EvidenceRejected(
                    f"instance {holder} sent a TPM quote but has no enrolled attestation key: enroll it first "
                    "(keysteward agent enroll-tpm) or have an admin pin one"
                )
            tpm = verify_quote(evidence["tpm"], ak, binding=binding)
            summary["tpm_ak"] = tpm.ak_name
        if evidence.get("snp") is not None:
            snp = verify_snp(evidence["snp"], self.snp, binding=binding, now=now)
            summary.update(snp_measurement=snp.measurement, snp_debug=snp.debug_allowed, snp_chip=snp.chip_id[:16])
        return platform_facts(tpm, snp), summary
