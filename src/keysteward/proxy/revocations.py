"""What the proxy learns from the key manager about its guests' certificates: revoked serials, retired CAs.

The proxy verifies its NBD clients' certificates itself (``[tls] client_ca_file``, normally the tenant CA), so
the key manager's ``ca revoke`` and ``ca rotate --retire`` would not reach it on their own. Every
:data:`POLL_SECONDS` the proxy fetches ``GET /v1/ca/revocations`` over its existing mutual-TLS host identity
(``[kms]``: its host certificate, the key manager's CA): the channel authenticates the list, the host's tenant
scopes it. The NBD server then drops the open connections of a revoked certificate (or one from a retired CA)
and refuses new ones (:meth:`keysteward.proxy.server.NbdServer.set_revocations`).

A fetch that fails keeps the last list in force and is logged (once per failing streak); the proxy never
forgets a revocation it has seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from cryptography import x509

from keysteward.crypto.x509identity import subject_of
from keysteward.errors import BadRequest, KeystewardError
from keysteward.kms_failover import split_urls
from keysteward.proxy.config import KmsConfig

log = logging.getLogger("keysteward.proxy")

POLL_SECONDS = 1.0
MAX_SERIALS = 100_000


@dataclass(frozen=True)
class Revocations:
    """Certificates the proxy must not serve: by serial (hex, lowercase), or by the CA that issued them."""

    serials: frozenset[str] = frozenset()
    retired_issuers: frozenset[x509.Name] = field(default_factory=frozenset)

    def refuses(self, cert: CertRef | None) -> bool:
        return cert is not None and (cert.serial in self.serials or cert.issuer in self.retired_issuers)


@dataclass(frozen=True)
class CertRef:
    """What a revocation names of a client certificate."""

    serial: str
    issuer: x509.Name


def cert_ref(der: bytes | None) -> CertRef | None:
    """The serial and issuer of a (TLS-verified) client certificate in DER, or None if there is none."""
    if not der:
        return None
    cert = x509.load_der_x509_certificate(der)
    return CertRef(format(cert.serial_number, "x"), cert.issuer)


def parse(body: Any) -> Revocations:
    """The key manager's answer; anything malformed raises BadRequest (the last good list stays in force)."""
    if not isinstance(body, dict):
        raise BadRequest("the revocation list is not a JSON object", code="bad_revocations")
    serials, retired = body.get("revoked_serials"), body.get("retired_cas")
    if not isinstance(serials, list) or not isinstance(retired, list) or len(serials) > MAX_SERIALS:
        raise BadRequest("the revocation list lacks revoked_serials or retired_cas", code="bad_revocations")
    if not all(isinstance(s, str) and 0 < len(s) <= 40 for s in serials) or not all(
        isinstance(p, str) for p in retired
    ):
        raise BadRequest("the revocation list holds a malformed entry", code="bad_revocations")
    return Revocations(frozenset(s.lower() for s in serials), frozenset(subject_of(pem) for pem in retired))


class RevocationFetcher:
    """``GET /v1/ca/revocations`` as the proxy's host (blocking: the service calls it in a worker thread)."""

    def __init__(self, kms: KmsConfig, url_hint: Callable[[], str | None]) -> None:
        self.kms = kms
        self.url_hint = url_hint
        """The key manager of the released volumes' tokens, when ``[kms] url`` is not set."""
        self._client: httpx.Client | None = None
        self._url: str | None = None
        self._failing = False
        self._turn = 0

    def _http(self) -> httpx.Client | None:
        """A client of the key manager; of a list, the one after the last that failed (``_turn``)."""
        given = self.kms.url or self.url_hint()
        if given is None:
            return None
        urls = split_urls(given)
        url = urls[self._turn % len(urls)]
        if self._client is None or url != self._url:
            self.close()
            ctx = ssl.create_default_context(cafile=self.kms.ca_file)
            ctx.load_cert_chain(self.kms.cert_file, self.kms.key_file)
            self._client = httpx.Client(base_url=url.rstrip("/") + "/v1", verify=ctx, timeout=self.kms.timeout)
            self._url = url
        return self._client

    def fetch(self) -> Revocations | None:
        """The current list, or None (no key manager known yet, or it failed: logged once per streak)."""
        try:
            client = self._http()
            if client is None:
                return None
            response = client.get("/ca/revocations")
            if response.status_code != 200:
                raise BadRequest(f"the key manager answered {response.status_code}", code="revocations_refused")
            found = parse(response.json())
        except (httpx.HTTPError, OSError, ssl.SSLError, ValueError, KeystewardError) as exc:
            if not self._failing:
                log.warning("event=revocations_unavailable error=%s", type(exc).__name__)
            self._failing = True
            self._turn += 1  # several key managers: the next fetch asks the next one
            self.close()  # the next try reads the host certificate again (renewed onto a rotated CA, say)
            return None
        if self._failing:
            log.info("event=revocations_available serials=%d", len(found.serials))
        self._failing = False
        return found

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


async def follow(fetcher: RevocationFetcher, apply: Callable[[Revocations], None], stop: asyncio.Event) -> None:
    """Every :data:`POLL_SECONDS` until ``stop``: fetch (in a worker thread) and ``apply`` what was found."""
    try:
        while not stop.is_set():
            found = await asyncio.to_thread(fetcher.fetch)
            if found is not None:
                apply(found)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=POLL_SECONDS)
    finally:
        fetcher.close()


def add_client_cas(ctx: ssl.SSLContext, ca_file: str) -> None:
    """A reload trusts the CAs now in ``client_ca_file`` as well (a rotated tenant CA beside the old one). A live
    context cannot forget a CA: a retired one is refused through the revocation list instead."""
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        log.error("event=client_ca_reload_failed error=%s", type(exc).__name__)
