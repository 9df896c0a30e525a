"""TPM attestation keys: enrollment by credential activation (instances) and pinning (admins).

Enrollment is unauthenticated (the instance's evidence is its credential): a request naming an unknown
tenant gets exactly the answer a known tenant gives the same request, so tenant names cannot be probed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import Field

from keysteward.errors import Denied
from keysteward.identity.principal import Permission, Principal
from keysteward.server.deps import need, services
from keysteward.server.release_schemas import EvidenceField, Uuid
from keysteward.server.schemas import B64, Name, Strict, b64, unb64
from keysteward.server.tls import client_cert_der

router = APIRouter(tags=["attestation"])
Manage = Annotated[Principal, Depends(need(Permission.ATTEST_MANAGE))]
Read = Annotated[Principal, Depends(need(Permission.VOLUME_READ))]
Holder = Annotated[str, Field(min_length=5, max_length=256)]


class EnrollIn(Strict):
    tenant: Name
    nonce: Annotated[str, Field(min_length=1, max_length=64)]
    identity: Annotated[dict[Annotated[str, Field(max_length=32)], EvidenceField], Field(max_length=8)]
    ek_public: B64
    ek_certificate: B64 | None = None
    ak_public: B64


class EnrollOut(Strict):
    enrollment_id: str
    credential: str


class ActivateIn(Strict):
    tenant: Name
    enrollment_id: Uuid
    secret: B64


class ActivateOut(Strict):
    instance: str


class PinIn(Strict):
    instance: Holder
    ak_public: B64


class TpmKeyOut(Strict):
    holder: str
    ak_name: str
    method: str
    created_at: datetime


@router.post("/attest/tpm/enroll")
def enroll(body: EnrollIn, request: Request) -> EnrollOut:
    """Step 1 (the instance, by its identity evidence bound to the nonce and its AK): a credential to activate."""
    svc = services(request)
    enrollment_id, credential = svc.tpm.start(
        svc.tenants.id_or_unknown(body.tenant),  # an unknown tenant answers as one that trusts no such provider
        body.nonce,
        body.identity,
        unb64(body.ek_public),
        unb64(body.ek_certificate) if body.ek_certificate else None,
        unb64(body.ak_public),
        **_enrolling_machine(request, body.tenant),
    )
    return EnrollOut(enrollment_id=enrollment_id, credential=b64(credential))


def _machine(request: Request, tenant: str) -> Principal | None:
    """The tenant's host or hypervisor whose certificate came with the request (it needs no identity document)."""
    der = client_cert_der(request)
    if not der:
        return None
    who = services(request).cas.authenticate(der)
    if who.role not in ("host", "hypervisor"):
        return None
    if who.tenant != tenant:
        raise Denied("a machine enrolls only with its own tenant", code="tenant_mismatch")
    return who


def _enrolling_machine(request: Request, tenant: str) -> dict[str, str]:
    who = _machine(request, tenant)
    return {} if who is None else {"host": who.name, "role": who.role}


class QuoteIn(Strict):
    tenant: Name
    nonce: Annotated[str, Field(min_length=1, max_length=64)]
    tpm: Annotated[dict[Annotated[str, Field(max_length=32)], Any], Field(max_length=8)]


@router.post("/attest/tpm/quote")
def report_quote(body: QuoteIn, request: Request) -> dict[str, Any]:
    """A hypervisor's (or host's) TPM quote over a fresh nonce, verified with its enrolled AK: its facts become
    ``context.platform`` of its KMIP operations (release/platform_reports.py)."""
    who = _machine(request, body.tenant)
    if who is None:
        raise Denied("send this with the machine's client certificate (role host or hypervisor)",
                     code="no_credentials")  # fmt: skip
    facts = services(request).platform_reports.report(who.tenant_id, f"{who.role}:{who.name}", body.nonce, body.tpm)
    return {"holder": f"{who.role}:{who.name}", "platform": facts}


@router.post("/attest/tpm/activate")
def activate(body: ActivateIn, request: Request) -> ActivateOut:
    """Step 2: the secret the TPM recovered; the AK is enrolled for the instance."""
    svc = services(request)
    tenant_id = svc.tenants.id_or_unknown(body.tenant)  # an unknown tenant has no enrollment: the same answer
    return ActivateOut(instance=svc.tpm.finish(tenant_id, body.enrollment_id, unb64(body.secret)))


@router.put("/attest/tpm/keys", status_code=204)
def pin(body: PinIn, request: Request, who: Manage) -> None:
    services(request).tpm.pin(who, body.instance, unb64(body.ak_public))


@router.get("/attest/tpm/keys")
def keys(request: Request, who: Read) -> list[TpmKeyOut]:
    return [TpmKeyOut(**row) for row in services(request).tpm.listing(who.tenant_id)]


@router.delete("/attest/tpm/keys", status_code=204)
def remove(request: Request, who: Manage, instance: Annotated[str, Query(min_length=5, max_length=256)]) -> None:
    services(request).tpm.remove(who, instance)
