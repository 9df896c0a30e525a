"""SigV4 verification of XKS calls against requests signed by botocore itself (the signer AWS ships)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from keysteward.formats.xks_wire import XksError
from keysteward.xks import sigv4

pytestmark = pytest.mark.unit
AKID, SECRET, REGION = "ABCDEFGHIJKLMNOPQRSTUVWX", "c2VjcmV0IGtleSBmb3IgdGVzdHMgb25seSAwMTIzNDU2Nzg=", "eu-west-1"
PATH = "/acme/kms/xks/v1/keys/k1/encrypt"
BODY = json.dumps({"requestMetadata": {"kmsOperation": "Encrypt", "kmsRequestId": "r"}}).encode()


def _signed(
    body: bytes = BODY,
    *,
    region: str = REGION,
    service: str = "kms-xks-proxy",
    secret: str = SECRET,
    headers: dict[str, str] | None = None,
) -> list[tuple[str, str]]:
    request = AWSRequest(method="POST", url="https://xks.example.com:8444" + PATH, data=body, headers=headers or {})
    SigV4Auth(Credentials(AKID, secret), service, region).add_auth(request)
    out = [(k.lower(), v) for k, v in request.headers.items()]
    return [*out, ("host", "xks.example.com:8444")]


def _verify(
    headers: list[tuple[str, str]],
    body: bytes = BODY,
    *,
    now: datetime | None = None,
    secrets: dict[str, str] | None = None,
    path: str = PATH,
    method: str = "POST",
) -> sigv4.Authorization:
    return sigv4.verify(
        method=method,
        path=path,
        headers=headers,
        body=body,
        region=REGION,
        secret_of=({AKID: SECRET} if secrets is None else secrets).get,
        now=now or datetime.now(UTC),
        max_skew=300,
    )


def _refused(headers: list[tuple[str, str]], **kw: object) -> str:
    with pytest.raises(XksError) as caught:
        _verify(headers, **kw)  # type: ignore[arg-type]
    assert caught.value.name == "AuthenticationFailedException" and caught.value.status == 401
    return caught.value.message


def test_botocore_signatures_verify_whatever_headers_were_signed() -> None:
    assert _verify(_signed()).access_key_id == AKID  # host;x-amz-date as KMS signs
    auth = _verify(_signed(headers={"Content-Type": "application/json"}))  # as curl signs
    assert auth.signed_headers == ("content-type", "host", "x-amz-date")


def test_tampering_and_wrong_scopes_are_refused() -> None:
    good = _signed()
    assert "signature" in _refused(good, body=BODY + b" ")
    assert "signature" in _refused(good, path=PATH.replace("k1", "k2"))
    assert "signature" in _refused([(k, v if k != "host" else "evil:1") for k, v in good])
    assert "region" in _refused(_signed(region="us-east-1"))
    assert "service" in _refused(_signed(service="kms"))
    assert "signature" in _refused(_signed(secret=SECRET[:-2] + "x="))
    assert "active credential" in _refused(good, secrets={})
    assert "not signed" in _refused([h for h in good if h[0] != "authorization"])
    assert "more than one" in _refused([*good, ("authorization", dict(good)["authorization"])])
    signed_ct = _signed(headers={"Content-Type": "application/json"})
    assert "signature" in _refused([(k, v if k != "content-type" else "text/plain") for k, v in signed_ct])
    assert "missing" in _refused([h for h in signed_ct if h[0] != "content-type"])


def test_replays_outside_five_minutes_are_refused() -> None:
    good = _signed()
    _verify(good, now=datetime.now(UTC) + timedelta(seconds=290))
    assert "seconds" in _refused(good, now=datetime.now(UTC) + timedelta(minutes=6))
    assert "seconds" in _refused(good, now=datetime.now(UTC) - timedelta(minutes=6))


def test_a_lying_content_hash_is_refused_even_when_signed() -> None:
    lying = _signed(headers={"X-Amz-Content-SHA256": "0" * 64})
    assert "x-amz-content-sha256" in _refused(lying)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Bearer x",
        "AWS4-HMAC-SHA256 Credential=A/2026/eu-west-1/kms-xks-proxy/aws4_request, "
        "SignedHeaders=host;x-amz-date, Signature=" + "0" * 64,
        "AWS4-HMAC-SHA256 Credential=A/20260101/eu-west-1/kms-xks-proxy/aws4_request, SignedHeaders=host, Signature=zz",
    ],
)
def test_malformed_authorization_headers(value: str) -> None:
    headers = [(k, v) for k, v in _signed() if k != "authorization"] + [("authorization", value)]
    _refused(headers)


def test_signed_headers_must_cover_host_and_date() -> None:
    good = dict(_signed())
    auth = good["authorization"].replace("SignedHeaders=host;x-amz-date", "SignedHeaders=x-amz-date")
    assert "SignedHeaders" in _refused([(k, v if k != "authorization" else auth) for k, v in _signed()])


def test_the_kept_signing_key_is_that_secrets_days_and_regions_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The signing key is derived once per secret, day and region: a request verified with one secret is
    refused when the store's secret for that key id has changed, and a request of another day verifies."""
    import botocore.auth

    headers = _signed()
    _verify(headers)  # derives and keeps the key of SECRET, today, REGION
    assert "signature does not match" in _refused(headers, secrets={AKID: SECRET + "-rotated"})
    _verify(_signed(secret=SECRET + "-rotated"), secrets={AKID: SECRET + "-rotated"})
    yesterday = datetime.now(UTC) - timedelta(days=1)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: yesterday.replace(tzinfo=None))
    old = _signed()
    assert old != headers
    _verify(old, now=yesterday)
    assert "signature does not match" in _refused(old, now=yesterday, secrets={AKID: SECRET + "-rotated"})
    for signed in (headers, old):  # one key kept per day
        assert sigv4._SIGNING_KEYS.get((SECRET, dict(signed)["x-amz-date"][:8], REGION)) is not None
