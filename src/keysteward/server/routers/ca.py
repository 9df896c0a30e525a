"""Tenant CA: init, import, show, issue machine certificates."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from keysteward.identity.principal import Permission, Principal
from keysteward.server.deps import need, services
from keysteward.server.schemas import CaImport, CaOut, CertIssue, CertOut

router = APIRouter(prefix="/ca", tags=["ca"])
Manage = Annotated[Principal, Depends(need(Permission.CA_MANAGE))]


@router.post("/init", status_code=201)
def ca_init(request: Request, who: Manage) -> CaOut:
    return CaOut(cert_pem=services(request).cas.init(who), can_issue=True)


@router.post("/import", status_code=201)
def ca_import(body: CaImport, request: Request, who: Manage) -> CaOut:
    key = body.key_pem.encode() if body.key_pem else None
    return CaOut(cert_pem=services(request).cas.import_(who, body.cert_pem, key), can_issue=key is not None)


@router.get("")
def ca_show(request: Request, who: Annotated[Principal, Depends(need(Permission.CA_READ))]) -> CaOut:
    cert_pem, wrapped = services(request).cas.certificate(who.tenant_id)
    return CaOut(cert_pem=cert_pem, can_issue=wrapped is not None)


@router.post("/issue", status_code=201)
def ca_issue(body: CertIssue, request: Request, who: Manage) -> CertOut:
    cas = services(request).cas
    issued = cas.issue(
        who, body.name, body.role, csr_pem=body.csr_pem.encode() if body.csr_pem else None, days=body.days
    )
    return CertOut(
        cert_pem=issued.cert_pem,
        key_pem=None,  # the machine made its own key: only its CSR came here
        serial=issued.serial,
        not_after=issued.not_after,
        ca_pem=cas.certificate(who.tenant_id)[0],
    )
