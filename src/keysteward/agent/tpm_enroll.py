"""The agent's side of TPM attestation key enrollment (server side: keysteward.release.tpm_enrollment).

The agent makes (or finds) its EK and AK at persistent handles, proves who it is with identity evidence
bound to a challenge and its AK, activates the credential the key manager answers, and returns the secret.
The secret only passes through memory; the AK is then enrolled for this instance.
"""

from __future__ import annotations

import base64
from typing import Any

from keysteward.agent.client import AgentClient, protocol_error
from keysteward.agent.evidence import collect_identity
from keysteward.agent.tpm import TpmDevice
from keysteward.agent.unlock import UnlockOptions
from keysteward.attest.binding import binding


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def enroll(url: str, tenant: str, tcti: str, options: UnlockOptions, *, client: AgentClient | None = None) -> str:
    """Enroll the AK of the TPM at ``tcti`` with the key manager at ``url``; returns the instance."""
    device = TpmDevice(tcti, timeout=options.timeout)
    ek, ak = device.ensure_keys()
    certificate = device.ek_certificate()
    own = client is None
    client = client or options.client(url)
    try:
        challenge = client.challenge()
        document = (
            {}
            if options.identity == "host"
            else collect_identity(
                options.metadata(),
                options.identity,
                binding(challenge.nonce_bytes, ak),
                audience=options.audience,
                timeout=options.timeout,
            )
        )  # fmt: skip  (a host proves itself by its client certificate)
        body: dict[str, Any] = {
            "tenant": tenant, "nonce": challenge.nonce, "identity": document, "ek_public": _b64(ek),
            "ak_public": _b64(ak), "ek_certificate": _b64(certificate) if certificate else None,
        }  # fmt: skip
        _, started = client.post("/attest/tpm/enroll", body)
        try:
            credential = base64.b64decode(str(started["credential"]), validate=True)
            enrollment = str(started["enrollment_id"])
        except (KeyError, ValueError) as exc:
            raise protocol_error("an enrollment answer without a credential") from exc
        secret = bytearray(device.activate(credential))
        try:
            _, done = client.post(
                "/attest/tpm/activate", {"tenant": tenant, "enrollment_id": enrollment, "secret": _b64(bytes(secret))}
            )
        finally:
            secret[:] = bytes(len(secret))
        return str(done.get("instance", ""))
    finally:
        if own:
            client.close()


def report_quote(
    url: str, tenant: str, tcti: str, pcrs: dict[str, list[int]], options: UnlockOptions,
    *, client: AgentClient | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Quote ``pcrs`` with the enrolled AK over a fresh nonce and send it (``POST /v1/attest/tpm/quote``, the
    machine's client certificate as its identity); the platform facts the key manager verified and keeps."""
    from keysteward.release.platform_reports import report_binding

    device = TpmDevice(tcti, timeout=options.timeout)
    device.ensure_keys()
    own = client is None
    client = client or options.client(url)
    try:
        challenge = client.challenge()
        quote = device.quote(report_binding(challenge.nonce_bytes), pcrs)
        _, done = client.post("/attest/tpm/quote", {"tenant": tenant, "nonce": challenge.nonce, "tpm": quote})
        return done
    finally:
        if own:
            client.close()
