"""Who a KMIP client certificate is: a pinned self-signed certificate, or one a tenant CA issued.

Trust modes A and B (keysteward issued the certificate, or signed the hypervisor's CSR) are the tenant CAs'
business (:class:`~keysteward.keys.ca.CertificateAuthorities`). Trust mode C is a pin
(:mod:`keysteward.keys.kmip_pins`): the listener's TLS context trusts the pinned certificate so that the
handshake can finish, and then only the exact certificate is accepted, by the SHA-256 of its DER. A pinned
certificate is never an issuer here: a certificate it signed has another fingerprint, is no pin, and is
then checked as a tenant CA's certificate, which it is not. Every message re-checks its certificate (cached
for at most :data:`~keysteward.keys.ca.SEEN_TTL_SECONDS`), so a removed pin stops working on open
connections too within about a second, as a revoked certificate does.

A refused certificate (unknown pin, removed pin, expired, revoked, not of role ``hypervisor``) is counted in
the tenant it can be traced to (:class:`~keysteward.audit.refusals.RefusalTally`: one record per interval,
tenant and reason, naming the certificate's fingerprint, actor ``anonymous``); nothing is recorded where no
tenant can be named.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import threading
from collections.abc import Callable

from cryptography import x509

from keysteward.audit.refusals import RefusalTally
from keysteward.crypto import x509identity
from keysteward.crypto.x509pin import fingerprint, valid_at
from keysteward.errors import BadRequest, KeystewardError, Unauthenticated
from keysteward.identity.principal import Principal
from keysteward.identity.tenants import NO_TENANT_ID
from keysteward.keys.ca import SEEN_TTL_SECONDS, CertificateAuthorities
from keysteward.keys.kmip_pins import ROLE, KmipPins
from keysteward.ttlcache import TtlCache

log = logging.getLogger("keysteward.kmip")
ACTION = "kmip.connect"
REFRESH_SECONDS = 1.0


class ClientTrust:
    def __init__(
        self, cas: CertificateAuthorities, pins: KmipPins, refusals: RefusalTally, tenant_id: Callable[[str], str]
    ) -> None:
        self.cas = cas
        self.pins = pins
        self.refusals = refusals
        self.tenant_id = tenant_id
        """A tenant's id by name (:data:`NO_TENANT_ID` for none)."""
        self._seen: TtlCache[bytes, Principal] = TtlCache(SEEN_TTL_SECONDS)

    def seen(self, der: bytes) -> Principal | None:
        """A client accepted within the last second, without a database read."""
        hit = self._seen.get(hashlib.sha256(der).digest()) or self.cas.seen(der)
        return hit if hit is not None and hit.role == ROLE else None

    def authenticate(self, der: bytes, source: str = "") -> Principal:
        """The ``hypervisor`` principal of ``der``; Unauthenticated (counted where a tenant is known) if not."""
        hit = self.seen(der)
        if hit is not None:
            return hit
        print_ = fingerprint(der)
        pin = self.pins.find(print_)
        if pin is not None:
            if pin.removed:
                raise self._refused(pin.tenant_id, "kmip_client_removed", der, source, "this certificate was unpinned")
            if not valid_at(pin.not_after):
                raise self._refused(pin.tenant_id, "cert_expired", der, source, "the pinned certificate expired")
            who = Principal(tenant_id=pin.tenant_id, tenant=pin.tenant, role=ROLE, name=pin.name, kind="cert",
                            serial=f"sha256:{print_}")  # fmt: skip
            self._seen.put(hashlib.sha256(der).digest(), who)
            return who
        try:
            who = self.cas.authenticate(der)
        except KeystewardError as exc:
            raise self._refused(self._tenant_of(der), exc.code or "bad_client_cert", der, source, exc.message) from None
        if who.role != ROLE:
            raise self._refused(who.tenant_id, "role_forbidden", der, source, f"KMIP clients are of role {ROLE}")
        return who

    def _tenant_of(self, der: bytes) -> str:
        """The tenant a refused certificate names (its identity URI), or whose pin it imitates or was signed by."""
        try:
            return self.tenant_id(x509identity.peek_identity(der).tenant)
        except KeystewardError:
            pass
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return NO_TENANT_ID
        for name in (cert.subject, cert.issuer):
            found = self.pins.tenant_of_subject(name.rfc4514_string())
            if found is not None:
                return found
        return NO_TENANT_ID

    def _refused(self, tenant_id: str, reason: str, der: bytes, source: str, message: str) -> Unauthenticated:
        if tenant_id != NO_TENANT_ID:
            self.refusals.count(tenant_id, ACTION, reason, source=source or "kmip", target=f"cert-sha256:"
                                f"{fingerprint(der)}", sample=message)  # fmt: skip
        return Unauthenticated(message, code=reason)

    def forget(self) -> None:
        self._seen.clear()


def trust_pins(ctx: ssl.SSLContext, pins: KmipPins, stop: threading.Event) -> None:
    """Make every pinned certificate a trust anchor of the listener's context, now and each second after (a pin
    added on another server reaches this one). A context cannot forget one: a removed pin still completes the
    handshake, and is refused at its first message."""
    known: set[str] = set()
    lock = threading.Lock()

    def trust(pem: str) -> None:
        with lock:
            if pem in known:
                return
            try:
                ctx.load_verify_locations(cadata=pem)
            except (ssl.SSLError, ValueError) as exc:
                raise BadRequest("a pinned certificate does not load", code="bad_client_cert") from exc
            known.add(pem)

    def refresh() -> None:
        for pem in pins.pems():
            trust(pem)

    pins.on_new_pin.append(trust)
    refresh()

    def loop() -> None:
        while not stop.wait(REFRESH_SECONDS):
            try:
                refresh()
            except Exception:  # noqa: BLE001 - keep refreshing; the next round may succeed
                log.warning("could not refresh the pinned KMIP client certificates")

    threading.Thread(target=loop, name="kmip-pins", daemon=True).start()
