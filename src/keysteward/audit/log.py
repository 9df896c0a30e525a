"""The audit log service: appends links to a tenant's chain, fail-closed, and reads them back.

A caller that changes state appends its record inside its own write transaction, so the
change and its record commit together or not at all. A caller that only reads (decrypt)
writes its record with :meth:`AuditLog.record` before it answers. Either way, if the record
cannot be written the request fails with ``audit_unavailable``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from keysteward.audit import chain
from keysteward.errors import KeystewardError, Unavailable
from keysteward.store.db import Database, for_update
from keysteward.store.models import AuditHead, AuditRecord, Cluster

_SCALARS = (str, int, float, bool, type(None))


def _check_details(details: Mapping[str, Any]) -> None:
    """Audit details are plain metadata: refuse bytes and anything else that could carry a secret."""
    for key, value in details.items():
        items = value if isinstance(value, list | tuple) else [value]
        if not isinstance(key, str) or not all(isinstance(v, _SCALARS) for v in items):
            raise TypeError(f"audit detail {key!r} must be a string, number, boolean or a list of them")


class AuditLog:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._signer: Ed25519PrivateKey | None = None
        self._lock = threading.Lock()

    def set_signer(self, key: Ed25519PrivateKey | None) -> None:
        with self._lock:
            self._signer = key

    def public_key(self) -> Ed25519PublicKey:
        with self.db.read() as conn:
            raw = conn.execute(select(Cluster.audit_public_key)).scalar_one()
        return Ed25519PublicKey.from_public_bytes(raw)

    def ensure_head(self, conn: Connection, tenant_id: str) -> None:
        conn.execute(insert(AuditHead).values(tenant_id=tenant_id, seq=0, hash=chain.GENESIS))

    def append(
        self,
        conn: Connection,
        tenant_id: str,
        *,
        actor: str,
        action: str,
        target: str = "",
        outcome: str = "ok",
        reason: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> int:
        """Append one record inside the caller's write transaction; returns its sequence number."""
        details = details or {}
        _check_details(details)
        try:
            head = conn.execute(
                for_update(select(AuditHead.seq, AuditHead.hash).where(AuditHead.tenant_id == tenant_id), self.db)
            ).one_or_none()
            if head is None:
                self.ensure_head(conn, tenant_id)
                seq, prev = 1, chain.GENESIS
            else:
                seq, prev = head.seq + 1, head.hash
            body = chain.make_body(
                seq=seq,
                prev=prev,
                ts=datetime.now(UTC).isoformat(timespec="microseconds"),
                actor=actor,
                action=action,
                target=target,
                outcome=outcome,
                reason=reason,
                details=details,
            )
            digest = chain.link_hash(body)
            signer = self._signer
            signature = chain.sign(signer, tenant_id, seq, digest) if signer is not None else None
            conn.execute(
                insert(AuditRecord).values(tenant_id=tenant_id, seq=seq, body=body, hash=digest, signature=signature)
            )
            conn.execute(update(AuditHead).where(AuditHead.tenant_id == tenant_id).values(seq=seq, hash=digest))
        except (SQLAlchemyError, KeystewardError) as exc:
            raise Unavailable(
                "the audit record could not be written, so the request was not carried out",
                code="audit_unavailable",
            ) from exc
        return seq

    def record(self, tenant_id: str, **fields: Any) -> int:
        """Append one record in a transaction of its own (for requests that change nothing)."""
        try:
            with self.db.write() as conn:
                return self.append(conn, tenant_id, **fields)
        except (SQLAlchemyError, KeystewardError) as exc:
            if isinstance(exc, Unavailable) and exc.code == "audit_unavailable":
                raise
            raise Unavailable(
                "the audit record could not be written, so the request was not carried out",
                code="audit_unavailable",
            ) from exc

    def links(self, tenant_id: str, *, after: int = 0, limit: int = 1000) -> list[chain.Link]:
        with self.db.read() as conn:
            rows = conn.execute(
                select(AuditRecord)
                .where(AuditRecord.tenant_id == tenant_id, AuditRecord.seq > after)
                .order_by(AuditRecord.seq)
                .limit(limit)
            ).all()
        return [chain.Link(r.tenant_id, r.seq, r.body, r.hash, r.signature) for r in rows]
