"""Read the tenant's audit chain (verification happens on the client, against the public key)."""

from __future__ import annotations

from typing import Annotated

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi import APIRouter, Depends, Query, Request

from keysteward.identity.principal import Permission, Principal
from keysteward.server.deps import need, services
from keysteward.server.schemas import AuditLinkOut, AuditPage

router = APIRouter(prefix="/audit", tags=["audit"])


@router.get("")
def audit_page(
    request: Request,
    who: Annotated[Principal, Depends(need(Permission.AUDIT_READ))],
    after: Annotated[int, Query(ge=0, le=2**62)] = 0,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
) -> AuditPage:
    audit = services(request).audit
    links = audit.links(who.tenant_id, after=after, limit=limit)
    public = audit.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    return AuditPage(
        tenant=who.tenant,
        tenant_id=who.tenant_id,
        public_key=public,
        records=[
            AuditLinkOut(
                tenant_id=x.tenant_id,
                seq=x.seq,
                body=x.body,
                hash=x.hash,
                signature=x.signature.hex() if x.signature else None,
            )
            for x in links
        ],
    )
