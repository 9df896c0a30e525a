"""The agent's HTTP client for ``keysteward-release/1`` (docs/release-protocol.md).

:meth:`AgentClient.release` runs one release: a challenge, a one-time HPKE key, the binding
``sha256(nonce || public_key)`` handed to the caller's evidence function, the request, and the answer:

- released: ``sealed`` opened with ``info = protocol 0 tenant 0 volume_id 0 lease_id``, its ``KSR1``
  plaintext split into the secret and the lease token, each in a :class:`SecretBuffer`
  (:class:`Released`; the caller wipes it);
- denied: :class:`~keysteward.errors.Denied` with the server's reason ``code``;
- pending: :class:`Pending`, to ask again after ``poll_after_seconds``.

Errors, translated where they enter (``raise ... from exc``)::

    Unavailable  kms_unreachable     no connection, timeout, TLS failure, or a 5xx answer
    Denied       <reason code>       403 with "decision": "denied"
    <by status>  <server's code>     other problem+json answers (NotFound lease_not_found, ...)
    KeystewardError kms_protocol     an answer that does not follow the protocol

Nothing here logs; secrets never reach messages.

The transport is httpx, or, for the boot unlock (``one_shot``), :mod:`keysteward.agent.oneshot_http`
(the standard library alone: httpx is not imported at all then).
"""

from __future__ import annotations

import base64
import binascii
import json
import ssl
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from keysteward.agent.oneshot_http import OneShotHttp
from keysteward.agent.release_answers import Challenge, Lease, Pending, Registered, Released, Renewal
from keysteward.api_errors import answer_error, transport_error
from keysteward.attest.binding import binding
from keysteward.crypto.hpke import SUITES, X25519, OneTimeKey
from keysteward.crypto.secret import SecretBuffer, wipe_bytearray
from keysteward.errors import (
    BadRequest,
    KeystewardError,
)
from keysteward.formats.release_wire import (
    CREATE_LEASE_ID,
    PROTOCOL,
    TOKEN_SIZE,
    ReleaseWireError,
    seal_info,
    split_secret,
)
from keysteward.kms_failover import Failover, split_urls

if TYPE_CHECKING:
    import httpx

LEASE_TOKEN_SIZE = TOKEN_SIZE
UNREACHABLE = "kms_unreachable"
PROTOCOL_ERROR = "kms_protocol"
MAX_ANSWER = 1 << 20
RENEW_ACTIONS = ("continue", "revoked", "shred", "expired")

Evidence = Callable[[bytes], Mapping[str, Any]]
"""``evidence(binding) -> identity``: the ``evidence.identity`` object for a 32-byte binding."""


def protocol_error(message: str) -> KeystewardError:
    return KeystewardError(f"the key manager's answer does not follow {PROTOCOL}: {message}", code=PROTOCOL_ERROR)


# -- the sealed plaintext ------------------------------------------------------------------------


release_info = seal_info
"""HPKE ``info`` of a release (``lease_id`` is ``create`` for a registration)."""


def parse_plaintext(plaintext: bytearray) -> tuple[SecretBuffer, SecretBuffer]:
    """A KSR1 plaintext (:mod:`keysteward.formats.release_wire`) into two locked buffers; ``plaintext`` is wiped."""
    try:
        try:
            secret_at, token_at = split_secret(plaintext)
        except ReleaseWireError as exc:
            raise protocol_error(exc.message) from None
        view = memoryview(plaintext)
        try:
            secret = SecretBuffer.from_bytes(view[secret_at])
            lease_token = SecretBuffer.from_bytes(view[token_at])
        finally:
            view.release()
        return secret, lease_token
    finally:
        wipe_bytearray(plaintext)


def _get(body: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise protocol_error(f"{where}: {key!r} is missing or of the wrong type")
    return value


def _b64(value: str, what: str, *, urlsafe: bool = False) -> bytes:
    try:
        if urlsafe:
            return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise protocol_error(f"{what} is not base64") from None


def parse_time(value: Any, what: str) -> datetime:
    if not isinstance(value, str):
        raise protocol_error(f"{what} is not a time")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise protocol_error(f"{what} is not an RFC 3339 time") from None
    if parsed.tzinfo is None:
        raise protocol_error(f"{what} has no time zone")
    return parsed


def _seconds(value: Any, what: str, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise protocol_error(f"{what} is not a number of seconds")
    return float(value)


def _open_sealed(
    one_time: OneTimeKey, body: Mapping[str, Any], tenant: str, volume_id: str, lease_id: str
) -> tuple[SecretBuffer, SecretBuffer]:
    if body.get("suite") != one_time.suite:
        raise protocol_error(f"sealed with suite {str(body.get('suite'))[:20]!r}, asked for {one_time.suite}")
    sealed = _b64(_get(body, "sealed", str, "answer"), "sealed")
    plaintext = one_time.open(sealed, release_info(tenant, volume_id, lease_id))
    return parse_plaintext(plaintext)


# -- the client ------------------------------------------------------------------------------------


class AgentClient:
    """The key manager at ``url`` (or each of a comma list of URLs, tried in turn: :mod:`keysteward.kms_failover`);
    TLS verified against ``ca_file`` (else the system's CAs)."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        ca_file: str | None = None,
        token: str | None = None,
        timeout: float = 10.0,
        client_cert: tuple[str, str] | None = None,
        one_shot: bool = False,
    ) -> None:
        """``client_cert`` is ``(certificate PEM file, key PEM file)``: a machine (a host) proves itself by mTLS.
        ``one_shot``: a few requests from one thread, then the end (the boot unlock): the standard library's
        HTTP client instead of httpx, unless the environment names an HTTP proxy."""
        self.urls = split_urls(url)
        self.url = ",".join(self.urls)
        context: ssl.SSLContext | None = None
        if any(u.startswith("https://") for u in self.urls):
            try:
                context = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise BadRequest(f"cannot load the CA file {ca_file}: {exc}", code="kms_ca_file") from exc
            if client_cert is not None:
                try:
                    context.load_cert_chain(*client_cert)
                except (OSError, ssl.SSLError) as exc:
                    raise BadRequest(
                        f"cannot load the client certificate {client_cert[0]}: {exc}", code="kms_client_cert"
                    ) from exc
        if client_cert is not None and not all(u.startswith("https://") for u in self.urls):
            raise BadRequest("a client certificate needs an https:// key manager URL", code="kms_client_cert")
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._one_shot: dict[str, OneShotHttp] = {}
        self._https: dict[str, httpx.Client] = {}
        if one_shot and OneShotHttp.usable():
            self._one_shot = {
                u: OneShotHttp(u, context=context, headers=headers, timeout=timeout, code=UNREACHABLE)
                for u in self.urls
            }
        else:
            import httpx

            verify: ssl.SSLContext | bool = context if context is not None else True
            self._https = {
                u: httpx.Client(base_url=u + "/v1", verify=verify, headers=headers, timeout=timeout) for u in self.urls
            }
        self.failover = Failover(self.urls)

    def close(self) -> None:
        for http in self._https.values():
            http.close()
        for one in self._one_shot.values():
            one.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------------------------

    def post(self, path: str, body: Mapping[str, Any], *, safe: bool = False) -> tuple[int, dict[str, Any]]:
        """POST ``body`` to ``/v1`` + ``path``: the status and the JSON answer; errors raised as in the protocol.
        ``safe``: the request may be repeated at another server after a 503 or a lost answer."""
        return self.failover.run(lambda url: self._post(url, path, body), safe=safe)

    def get(self, path: str) -> dict[str, Any]:
        """GET ``/v1`` + ``path``, an answer that is one object (a read: repeated elsewhere after a 503)."""
        return self.failover.run(lambda url: self._get_object(url, path), safe=True)

    def _get_object(self, url: str, path: str) -> dict[str, Any]:
        data = self._fetch(url, path, 0.0)
        if not isinstance(data, dict):
            raise protocol_error(f"{path} did not answer an object")
        return data

    def get_list(self, path: str, *, long_poll: float = 0.0) -> list[dict[str, Any]]:
        """GET ``/v1`` + ``path``, an answer that is a list of objects (not repeated elsewhere after a lost
        answer: a GET may hand something out, as a host's orders are). ``long_poll``: the server may hold
        the request that many seconds (sent as ``wait``), on top of the usual timeout."""
        return self.failover.run(lambda url: self._get_list(url, path, long_poll), safe=False)

    def _get_list(self, url: str, path: str, long_poll: float) -> list[dict[str, Any]]:
        data = self._fetch(url, path, long_poll)
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            raise protocol_error(f"{path} did not answer a list of objects")
        return data

    def _fetch(self, url: str, path: str, long_poll: float) -> Any:
        """One GET at ``url``: its JSON answer (errors translated); a long poll asks ``wait`` and waits longer."""
        params = {"wait": f"{long_poll:.3f}"} if long_poll > 0 else None
        return self._answer(url, path, *self._send(url, "GET", path, None, params, long_poll))

    def _post(self, url: str, path: str, body: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        status, reason, content = self._send(url, "POST", path, dict(body), None, 0.0)
        data = self._answer(url, path, status, reason, content)
        if not isinstance(data, dict):
            raise protocol_error(f"{path} answered {status} without a JSON object")
        return status, data

    def _send(
        self, url: str, method: str, path: str, body: dict[str, Any] | None, params: dict[str, str] | None,
        long_poll: float,
    ) -> tuple[int, str, bytes]:  # fmt: skip
        """``(status, reason, content)`` of one request at ``url``; no answer raises ``kms_unreachable``."""
        one = self._one_shot.get(url)
        if one is not None:
            return one.request(method, path, body=body, params=params, extra_time=long_poll, limit=MAX_ANSWER)
        import httpx

        client = self._https[url]
        try:
            if long_poll > 0:
                read = client.timeout.read
                timeout = httpx.Timeout(None if read is None else read + long_poll, connect=client.timeout.connect)
                response = client.get(path, params=params, timeout=timeout)
            elif method == "GET":
                response = client.get(path)
            else:
                response = client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise transport_error(exc, url, UNREACHABLE) from exc
        return response.status_code, response.reason_phrase, response.content

    @staticmethod
    def _answer(url: str, path: str, status: int, reason: str, content: bytes) -> Any:
        """The JSON of an answer (an object or a list), or the error it stands for."""
        if len(content) > MAX_ANSWER:
            raise protocol_error(f"an answer of over {MAX_ANSWER} bytes")
        try:
            data = json.loads(content) if content else {}
        except ValueError:
            data = None
        if status < 500 and not isinstance(data, dict | list):
            raise protocol_error(f"{path} answered {status} without JSON")
        error = answer_error(status, data, reason, url, unavailable_code=UNREACHABLE)
        if error is not None:
            raise error
        return data

    # -- protocol ----------------------------------------------------------------------------------

    def challenge(self) -> Challenge:
        return self.failover.run(self._challenge, safe=True)

    def _challenge(self, url: str) -> Challenge:
        _, body = self._post(url, "/release/challenge", {})
        if body.get("protocol") != PROTOCOL:
            raise protocol_error(f"protocol {str(body.get('protocol'))[:40]!r}")
        nonce = _get(body, "nonce", str, "challenge")
        suites = _get(body, "suites", list, "challenge")
        return Challenge(nonce, _b64(nonce, "nonce", urlsafe=True), str(body.get("expires_at", "")),
                         tuple(str(s) for s in suites))  # fmt: skip

    def release(self, tenant: str, volume_id: str, evidence: Evidence, *, suite: str = X25519) -> Released | Pending:
        """One release of ``volume_id``'s secret (see the module doc); at another server after a failure, from a
        new challenge (the same holder asking again supersedes its own lease: no clone is suspected)."""
        return self.failover.run(lambda url: self._release(url, tenant, volume_id, evidence, suite), safe=True)

    def _release(self, url: str, tenant: str, volume_id: str, evidence: Evidence, suite: str) -> Released | Pending:
        challenge = self._challenge(url)
        if suite not in challenge.suites or suite not in SUITES:
            raise BadRequest(f"the key manager does not offer HPKE suite {suite!r}", code="hpke_invalid")
        one_time = OneTimeKey.generate(suite)
        given = dict(evidence(binding(challenge.nonce_bytes, one_time.public_bytes)))
        # the whole evidence object ({"identity", "tpm", "snp"}), or just the identity document
        bundle = given if "identity" in given else {"identity": given}
        request = {
            "protocol": PROTOCOL, "tenant": tenant, "volume_id": volume_id, "nonce": challenge.nonce, "suite": suite,
            "public_key": base64.b64encode(one_time.public_bytes).decode(), "evidence": bundle,
        }  # fmt: skip
        status, body = self._post(url, "/release", request)
        if status == 202 or body.get("status") == "pending":
            return Pending(str(body.get("request_id", "")), _seconds(body.get("poll_after_seconds", 5), "poll") or 0.0)
        if body.get("status") != "released":
            raise protocol_error(f"release status {str(body.get('status'))[:20]!r}")
        lease_body = _get(body, "lease", dict, "released")
        lease_id = _get(lease_body, "id", str, "lease")
        secret, lease_token = _open_sealed(one_time, body, tenant, volume_id, lease_id)
        try:
            lease = Lease(
                id=lease_id,
                expires_at=parse_time(lease_body.get("expires_at"), "lease expires_at"),
                renew_seconds=_seconds(lease_body.get("renew_seconds"), "renew_seconds") or 0.0,
                lease_seconds=_seconds(lease_body.get("lease_seconds"), "lease_seconds") or 0.0,
                grace_seconds=_seconds(lease_body.get("grace_seconds"), "grace_seconds", optional=True),
                token=lease_token,
            )
            version = _get(body, "key_version", int, "released")
        except BaseException:
            secret.wipe()
            lease_token.wipe()
            raise
        return Released(tenant, volume_id, suite, version, secret, lease)

    def renew(self, lease: Lease) -> Renewal:
        """``continue`` (with the new expiry), ``revoked``, ``shred`` or ``expired``."""
        _, body = self.post(f"/leases/{lease.id}/renew", {"token": lease.token_b64()}, safe=True)
        action = body.get("action")
        if action not in RENEW_ACTIONS:
            raise protocol_error(f"renewal action {str(action)[:20]!r}")
        expires = body.get("expires_at")
        return Renewal(str(action), parse_time(expires, "renewal expires_at") if expires is not None else None)

    def end(self, lease: Lease) -> None:
        """End the lease early (clean detach), so that another instance may take the volume at once."""
        self.post(f"/leases/{lease.id}/end", {"token": lease.token_b64()}, safe=True)

    def register_volume(self, spec: Mapping[str, Any], *, suite: str = X25519) -> Registered:
        """``POST /v1/volumes`` (admin token): the new volume's record and its secret (section 6)."""
        one_time = OneTimeKey.generate(suite)
        body = {**spec, "suite": suite, "public_key": base64.b64encode(one_time.public_bytes).decode()}
        _, answer = self.post("/volumes", body)
        volume = _get(answer, "volume", dict, "registration")
        tenant = _get(volume, "tenant", str, "volume")
        volume_id = _get(volume, "id", str, "volume")
        secret, lease_token = _open_sealed(one_time, answer, tenant, volume_id, CREATE_LEASE_ID)
        try:
            if any(lease_token.view()):
                secret.wipe()
                raise protocol_error("a registration's lease token is not all zero")
        finally:
            lease_token.wipe()
        return Registered(volume, secret)

    def destroy_volume(self, volume_id: str) -> None:
        """``POST /v1/volumes/{id}/destroy`` (admin token): crypto-shreds the volume's secret."""
        self.post(f"/volumes/{volume_id}/destroy", {})
