"""SigV4 verification of XKS calls (service ``kms-xks-proxy``), canonicalised by botocore's own signer.

Nothing here builds a canonical request by hand: the request as received (method, raw path, the headers
``SignedHeaders`` lists, the body) becomes a botocore ``AWSRequest``, and ``SigV4Auth`` computes the
canonical request, the string to sign and the signature with the stored secret; the result is compared
with the one sent in constant time (:func:`hmac.compare_digest`). Whatever headers the caller signed are
used (KMS signs ``host;x-amz-date``, curl ``content-type;host;x-amz-date``), as long as ``host`` and
``x-amz-date`` are among them.

Checked before the signature: the scope names this service, the store's region and the date of
``x-amz-date``, which must be within ``max_skew`` of this server's clock (a replay past the window fails).
A signed ``x-amz-content-sha256`` must be the body's hash (botocore would take it on trust). Every
failure is one :class:`~keysteward.formats.xks_wire.XksError` ``AuthenticationFailedException``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from botocore.auth import SIGNED_HEADERS_BLACKLIST, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from keysteward.formats.xks_wire import XksError
from keysteward.lru import Lru

SERVICE = "kms-xks-proxy"
_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([A-Za-z0-9]{1,128})/([0-9]{8})/([a-z0-9-]{1,32})/([a-z0-9-]{1,32})/aws4_request,"
    r" ?SignedHeaders=([a-z0-9;-]{1,512}), ?Signature=([0-9a-f]{64})"
)
_DATE_RE = re.compile(r"[0-9]{8}T[0-9]{6}Z")


@dataclass(frozen=True)
class Authorization:
    access_key_id: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str


def _fail(message: str) -> XksError:
    return XksError("AuthenticationFailedException", message)


def parse_authorization(value: str | None) -> Authorization:
    if not value:
        raise _fail("the request is not signed (no Authorization header)")
    match = _AUTH_RE.fullmatch(value.strip())
    if match is None:
        raise _fail("the Authorization header is not an AWS4-HMAC-SHA256 signature")
    akid, date, region, service, signed, signature = match.groups()
    return Authorization(akid, date, region, service, tuple(signed.split(";")), signature)


def access_key_id(headers: Sequence[tuple[str, str]]) -> str | None:
    """The access key id an Authorization header names, or None (nothing checked: :func:`verify` does)."""
    match = _AUTH_RE.fullmatch(next((v for k, v in headers if k == "authorization"), "").strip())
    return match.group(1) if match else None


def request_time(amz_date: str) -> datetime:
    if not _DATE_RE.fullmatch(amz_date):
        raise _fail("x-amz-date is not YYYYMMDDTHHMMSSZ")
    d = amz_date
    try:
        return datetime(int(d[:4]), int(d[4:6]), int(d[6:8]), int(d[9:11]), int(d[11:13]), int(d[13:15]), tzinfo=UTC)
    except ValueError:
        raise _fail("x-amz-date is not a date") from None


_SIGNING_KEYS: Lru[tuple[str, str, str], bytes] = Lru(256)


def _signing_key(secret: str, date: str, region: str) -> bytes:
    """SigV4's key for one secret, day and region (HMAC chain ``AWS4`` + secret, date, region, service,
    ``aws4_request``), kept as the SDKs keep it: it changes once a day, and deriving it is four HMACs a
    call."""

    def derive() -> bytes:
        key = ("AWS4" + secret).encode()
        for part in (date, region, SERVICE, "aws4_request"):
            key = hmac.digest(key, part.encode(), "sha256")
        return key

    return _SIGNING_KEYS.get_or_make((secret, date, region), derive)


class _Signer(SigV4Auth):  # type: ignore[misc]
    """botocore's SigV4 canonicalisation with the body's hash computed once, here (it hashes the body
    itself otherwise), and the signing key of :func:`_signing_key`."""

    def payload(self, request: AWSRequest) -> str:
        return str(request.context["payload_sha256"])

    def signature(self, string_to_sign: str, request: AWSRequest) -> str:
        key = _signing_key(self.credentials.secret_key, request.context["timestamp"][0:8], self._region_name)
        return hmac.digest(key, string_to_sign.encode(), "sha256").hex()


def verify(
    *,
    method: str,
    path: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    region: str,
    secret_of: Callable[[str], str | None],
    now: datetime,
    max_skew: float,
) -> Authorization:
    """Verify one request; ``headers`` are (lower-case name, value) pairs as received, ``path`` the raw
    request target. ``secret_of(access_key_id)`` gives the secret of an active credential of the store,
    or None. Returns the parsed Authorization, or raises AuthenticationFailedException."""
    by_name: dict[str, list[str]] = {}
    for key, value in headers:
        by_name.setdefault(key, []).append(value)
    auths = by_name.get("authorization", [])
    if len(auths) > 1:
        raise _fail("more than one Authorization header")
    auth = parse_authorization(auths[0] if auths else None)
    dates = by_name.get("x-amz-date", [])
    if len(dates) != 1:
        raise _fail("the request needs exactly one x-amz-date header")
    moment = request_time(dates[0])
    if abs((now - moment).total_seconds()) > max_skew:
        raise _fail(f"x-amz-date is more than {int(max_skew)} seconds from the proxy's clock")
    if auth.service != SERVICE:
        raise _fail(f"the credential scope names service '{auth.service}', not {SERVICE}")
    if auth.region != region:
        raise _fail(f"the credential scope names region '{auth.region}'; this store's region is {region}")
    if auth.date != dates[0][:8]:
        raise _fail("the credential scope's date is not the date of x-amz-date")
    signed = auth.signed_headers
    if list(signed) != sorted(set(signed)) or not {"host", "x-amz-date"} <= set(signed):
        raise _fail("SignedHeaders must be sorted, unique, and include host and x-amz-date")
    if any(name in SIGNED_HEADERS_BLACKLIST for name in signed):
        raise _fail("SignedHeaders names a header SigV4 never signs")
    body_hash = hashlib.sha256(body).hexdigest()
    for claimed in by_name.get("x-amz-content-sha256", ()):
        if claimed != body_hash:
            raise _fail("x-amz-content-sha256 is not the hash of the body")
    secret = secret_of(auth.access_key_id)
    if secret is None:
        raise _fail("the access key id is not an active credential of this store")
    request = AWSRequest(method=method, url="https://xks.invalid" + path, data=body)
    for name in signed:
        values = by_name.get(name)
        if not values:
            raise _fail(f"signed header '{name}' is missing")
        for value in values:
            request.headers[name] = value
    request.context["timestamp"] = dates[0]
    request.context["payload_sha256"] = body_hash
    signer = _Signer(Credentials(auth.access_key_id, secret), SERVICE, region)
    if signer.signed_headers(signer.headers_to_sign(request)) != ";".join(signed):
        raise _fail("the signed headers cannot be reproduced")
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    if not hmac.compare_digest(expected.encode(), auth.signature.encode()):
        raise _fail("the signature does not match")
    return auth
