"""Tenant CA: init, import, show, issue, renew, revoke, rotate and retire machine certificates."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from keysteward.errors import Forbidden, Unauthenticated
from keysteward.identity.principal import Permission, Principal
from keysteward.keys.ca import SEEN_TTL_SECONDS
from keysteward.server.deps import need, principal, services
from keysteward.server.schemas import (
    CaImport,
    CaOut,
    CertIssue,
    CertOut,
    CertRenew,
    CertRevoke,
    CertRevokeOut,
    RevocationListOut,
)
from keysteward.server.tls import client_cert_der

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
    cas = services(request).cas
    cert_pem, wrapped = cas.certificate(who.tenant_id)
    return CaOut(cert_pem=cert_pem, can_issue=wrapped is not None, previous_pem=cas.previous_pem(who.tenant_id))


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


@router.post("/renew", status_code=201)
def ca_renew(body: CertRenew, request: Request) -> CertOut:
    """The holder of a valid, unrevoked certificate gets a new one for the same identity (its own CSR)."""
    der = client_cert_der(request)
    if request.headers.get("authorization"):
        raise Forbidden("renewal is by the certificate's holder: connect with the certificate, no token",
                        code="renew_needs_certificate")  # fmt: skip
    if not der:
        raise Unauthenticated("connect with the client certificate to renew", code="no_credentials")
    cas = services(request).cas
    issued = cas.renew(der, body.csr_pem.encode(), body.days)
    tenant_id = cas.authenticate(der).tenant_id
    return CertOut(
        cert_pem=issued.cert_pem,
        key_pem=None,
        serial=issued.serial,
        not_after=issued.not_after,
        ca_pem=cas.certificate(tenant_id)[0],
    )


@router.post("/revoke")
def ca_revoke(
    body: CertRevoke, request: Request, who: Annotated[Principal, Depends(need(Permission.CA_REVOKE))]
) -> CertRevokeOut:
    revoked = services(request).cas.revoke(who, body.target, body.reason)
    return CertRevokeOut(target=body.target, revoked=revoked)


@router.post("/rotate", status_code=201)
def ca_rotate(request: Request, who: Manage) -> CaOut:
    cas = services(request).cas
    cert_pem = cas.rotate(who)
    return CaOut(cert_pem=cert_pem, can_issue=True, previous_pem=cas.previous_pem(who.tenant_id))


@router.post("/retire")
def ca_retire(request: Request, who: Manage) -> CaOut:
    """Finish a rotation: the previous CA's certificates are refused from now on."""
    cas = services(request).cas
    cas.retire(who)
    cert_pem, wrapped = cas.certificate(who.tenant_id)
    return CaOut(cert_pem=cert_pem, can_issue=wrapped is not None)


@router.get("/revocations")
def ca_revocations(request: Request) -> RevocationListOut:
    """The caller's tenant's revoked serials and retired CAs, for listeners outside the servers (the NBD proxy,
    fetching it every second with its host certificate). Any authenticated caller of the tenant may read it."""
    who = principal(request)
    listing = services(request).cas.revocation_list(who.tenant_id)
    return RevocationListOut(tenant=who.tenant, max_age_seconds=SEEN_TTL_SECONDS, **listing)
