"""ReleaseService: the one decision path every key release goes through (DESIGN.md section 2).

    decide(request)
      1. the request: tenant, nonce (issued here, unexpired), one-time HPKE public key
      2. evidence: verified against the tenant's providers, bound to sha256(nonce || public key)
      3. rule: revocations, the volume's binding (the policy issue replaces it), the live lease: an
         instance matching the binding but for its instance id, while another holds the lease, is a
         suspected clone (audited as an alert, sent to the webhook)
      4. bookkeeping: the nonce spent, the lease granted, in one transaction with ...
      5. ... the audit record; only after it is committed is the sealed key handed out.

Front-ends turn their protocol into a :class:`ReleaseRequest` and a :class:`Released` (or the
:class:`~keysteward.errors.Denied` raised) back into theirs; none unwraps a key itself.
Renewals and lease ends run through here too, so revocation reaches running instances.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio.to_thread
from sqlalchemy import Connection, select

from keysteward.attest.binding import binding
from keysteward.attest.errors import EvidenceRejected
from keysteward.attest.identity import InstanceIdentity, verify_identity
from keysteward.audit.log import AuditLog
from keysteward.crypto import hpke
from keysteward.crypto.secret import wipe_bytearray
from keysteward.errors import Conflict, Denied, KeystewardError, NotFound
from keysteward.identity.tenants import Tenants
from keysteward.keys.keystore import KeyStore
from keysteward.policy import approvals
from keysteward.policy.engine import PolicyDecision
from keysteward.policy.errors import PolicyRequestInvalid
from keysteward.policy.store import PolicyStore
from keysteward.release import leases
from keysteward.release.alerts import Alerts
from keysteward.release.nonces import Nonces, decode
from keysteward.release.platform import PlatformVerifier
from keysteward.release.policy_facts import policy_denial, policy_request
from keysteward.release.registry import ACTIVE, DESTROYED, SHRED, Caller, HostIdentity, Registry, VolumeInfo, actor_of
from keysteward.settings import ReleaseSettings
from keysteward.store.db import for_update
from keysteward.store.models import Lease, Volume

log = logging.getLogger("keysteward.release")
PROTOCOL = "keysteward-release/1"
MAGIC = b"KSR1"
TOKEN_SIZE = 32
SWEEP_SECONDS = 60.0


def seal_info(tenant: str, volume_id: str, lease_id: str) -> bytes:
    """HPKE ``info``: binds the sealed key to the protocol, tenant, volume and lease."""
    return b"\x00".join(part.encode() for part in (PROTOCOL, tenant, volume_id, lease_id))


def pack_secret(secret: bytes | bytearray | memoryview, token: bytes | bytearray) -> bytearray:
    """``"KSR1" || u8 len || secret || lease token``: the plaintext inside ``sealed`` (the caller wipes it)."""
    if not 0 < len(secret) < 256 or len(token) != TOKEN_SIZE:
        raise ValueError("secret must be 1-255 bytes and the token 32")
    out = bytearray(MAGIC)
    out.append(len(secret))
    out += secret
    out += token
    return out


@dataclass(frozen=True, repr=False)
class ReleaseRequest:
    tenant: str
    volume_id: str
    nonce: str
    suite: str
    public_key: bytes
    evidence: Mapping[str, Any]
    source: str = ""
    on_behalf_of: str | None = None
    """The human (name in the tenant) who asked for this release on the instance's behalf, if any: they
    may not approve it."""
    host: str | None = None
    """Set by the front-end when the caller proved itself with a ``host`` client certificate of ``tenant``;
    the certificate is then the identity evidence (the platform evidence still counts)."""


@dataclass(frozen=True, repr=False)
class Released:
    suite: str
    sealed: bytes
    key_version: int
    lease: leases.LeaseInfo
    lease_seconds: int
    renew_seconds: int
    grace_seconds: int | None

    def __repr__(self) -> str:
        return f"Released(lease={self.lease.id}, version={self.key_version})"


@dataclass
class _Verdict:
    """What the transaction decided; filled in by the effect run in the audit writer."""

    denied: Denied | None = None
    lease: leases.LeaseInfo | None = None
    waiting: approvals.Waiting | None = None
    alert: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Step:
    """A prepared decision: the effect to commit with its audit record, and what to answer after."""

    tenant_id: str
    effect: Callable[[Connection], dict[str, Any]]
    verdict: _Verdict
    token: bytearray | None = None
    released: Callable[[leases.LeaseInfo], Released] | None = None

    def wipe(self) -> None:
        if self.token is not None:
            wipe_bytearray(self.token)


class _Refused(Exception):
    def __init__(self, step: _Step) -> None:
        self.step = step


class ReleaseService:
    def __init__(
        self,
        tenants: Tenants,
        registry: Registry,
        keys: KeyStore,
        audit: AuditLog,
        nonces: Nonces,
        alerts: Alerts,
        settings: ReleaseSettings,
        policies: PolicyStore,
        platform: PlatformVerifier,
    ) -> None:
        self.policies = policies
        self.platform = platform
        self.tenants = tenants
        self.registry = registry
        self.keys = keys
        self.audit = audit
        self.nonces = nonces
        self.alerts = alerts
        self.settings = settings
        self._next_sweep = 0.0

    def _sweep_due(self) -> bool:
        """Whether this transaction should also forget expired spent nonces (about once a minute)."""
        now = time.monotonic()
        if now < self._next_sweep:
            return False
        self._next_sweep = now + SWEEP_SECONDS
        return True

    def challenge(self) -> tuple[str, datetime]:
        return self.nonces.issue()

    # -- release ------------------------------------------------------------------------------------
    def _refusal(
        self,
        tenant_id: str,
        volume_id: str,
        exc: KeystewardError,
        spent: tuple[bytes, datetime] | None,
        **details: Any,
    ) -> _Step:
        """A refusal before the evidence named anyone; a genuine nonce presented with it is spent too."""
        denied = exc if isinstance(exc, Denied) else Denied(exc.message, code=exc.code)

        def effect(conn: Connection) -> dict[str, Any]:
            if spent is not None:
                try:
                    self.nonces.spend(conn, *spent)
                except Denied:
                    pass  # spent before: the refusal stands with its own reason
            return {
                "actor": "instance:unverified",
                "action": "volume.release",
                "target": f"volume:{volume_id[:64]}",
                "outcome": "denied",
                "reason": denied.code,
                "details": details,
            }

        return _Step(tenant_id, effect, _Verdict(denied=denied))

    def _verify(
        self, tenant_id: str, request: ReleaseRequest, now: datetime
    ) -> tuple[bytes, datetime, tuple[VolumeInfo, str, bytes | None], Caller, dict[str, Any], dict[str, Any]]:
        """Steps 1-2 (with the platform facts and their audit summary); a refusal raises :class:`_Refused`
        carrying the step that audits it."""
        spent: tuple[bytes, datetime] | None = None
        try:
            raw = decode(request.nonce)
            expires = self.nonces.check(raw)
            spent = (raw, expires)
            hpke.load_public_key(request.suite, request.public_key)
            try:
                volume = self.registry.for_release(tenant_id, request.volume_id)
            except NotFound:
                raise Denied("no such volume in this tenant", code="volume_not_found") from None
            identity: Caller
            if request.host is not None:
                if request.evidence.get("identity"):
                    raise Denied("a host proves itself by its certificate: send no identity document",
                                 code="evidence_invalid")  # fmt: skip
                identity = HostIdentity(request.tenant, request.host)
            else:
                identity = self._identity(tenant_id, request, raw, now)
            try:
                platform, summary = self.platform.verify(
                    tenant_id, identity.key(), request.evidence, binding=binding(raw, request.public_key), now=now
                )
            except EvidenceRejected as exc:
                raise Denied(exc.message, code=exc.code) from None
        except (Denied, hpke.HpkeError) as exc:
            step = self._refusal(tenant_id, request.volume_id, exc, spent, source=request.source[:64])
            raise _Refused(step) from None
        return raw, expires, volume, identity, platform, summary

    def _identity(self, tenant_id: str, request: ReleaseRequest, raw: bytes, now: datetime) -> InstanceIdentity:
        """Step 2 for instances: the provider-signed identity document, bound to this request."""
        try:
            return verify_identity(
                request.evidence.get("identity") or {},
                self.registry.trusts(tenant_id),
                binding=binding(raw, request.public_key),
                now=now,
                audience=self.settings.audience,
            )
        except EvidenceRejected as exc:
            raise Denied(exc.message, code=exc.code) from None

    def decide(self, request: ReleaseRequest) -> Released | approvals.Waiting:
        """The decision for one release request: :class:`Released`, :class:`~keysteward.policy.approvals.Waiting`
        for approval, or :class:`Denied` raised (and audited)."""
        step = self._prepare(request)
        try:
            self.audit.commit(step.tenant_id, step.effect)
        finally:
            step.wipe()
        return self._finish(step)

    async def decide_async(self, request: ReleaseRequest) -> Released | approvals.Waiting:
        """:meth:`decide` on the event loop: what is cached runs here, a database read goes to a thread."""
        if self._warm(request):
            step = self._prepare(request)
        else:
            step = await anyio.to_thread.run_sync(self._prepare, request)
        try:
            await self.audit.commit_async(step.tenant_id, step.effect)
        finally:
            step.wipe()
        return self._finish(step)

    def _warm(self, request: ReleaseRequest) -> bool:
        """Whether preparing this request needs no database read (tenant, volume, providers, KEK cached)."""
        tenant_id = self.tenants.cached_id(request.tenant)
        if tenant_id is None or not self.registry.trusts_cached(tenant_id) or self.policies.cached(tenant_id) is None:
            return False
        if request.evidence.get("tpm") is not None:
            return False  # the enrolled AK may need a read
        cached = self.registry.cached_for_release(tenant_id, request.volume_id)
        if cached is None:
            return False
        volume, key_id, _ = cached
        return self.keys.is_warm(tenant_id, key_id=key_id, version=volume.key_version)

    def _finish(self, step: _Step) -> Released | approvals.Waiting:
        verdict = step.verdict
        if verdict.alert:
            self.alerts.send(verdict.alert)
        if verdict.denied is not None:
            raise verdict.denied
        if verdict.waiting is not None:
            return verdict.waiting
        assert verdict.lease is not None and step.released is not None
        return step.released(verdict.lease)

    def _prepare(self, request: ReleaseRequest) -> _Step:
        """Steps 1-3 outside the transaction: the checks, the key sealed, and the effect that decides."""
        now = datetime.now(UTC)
        try:
            tenant_id = self.tenants.id_of(request.tenant)
        except NotFound:
            log.info("release for unknown tenant denied")
            raise Denied("no such volume in this tenant", code="volume_not_found") from None
        try:
            prepared = self._verify(tenant_id, request, now)
        except _Refused as refused:
            return refused.step
        raw, expires, (volume, key_id, wrapped), identity, platform, summary = prepared
        holder = identity.key()
        policy = self.policies.current(tenant_id)
        try:
            facts = policy_request(request, volume, identity, platform, now)
            decision = policy.compiled.evaluate(facts)
        except PolicyRequestInvalid as exc:
            log.warning("release facts did not make a policy request: %s", exc.code)
            decision = PolicyDecision("deny", (), None, (exc.message,), "policy_error")
            facts = None
        lease_id, token = str(uuid.uuid4()), bytearray(os.urandom(TOKEN_SIZE))
        sealed = b""
        try:
            secret = self.keys.open_data_key(tenant_id, key_id, volume.key_version, volume.dek_id, wrapped)
        except Conflict:  # shredded: the transaction below says so with the right reason
            secret = None
        if secret is not None:
            with secret:
                plaintext = pack_secret(secret.view(), token)
                try:
                    sealed = hpke.seal(
                        request.suite, request.public_key, plaintext, seal_info(request.tenant, volume.id, lease_id)
                    )
                finally:
                    wipe_bytearray(plaintext)
        verdict = _Verdict()

        def effect(conn: Connection) -> dict[str, Any]:
            details: dict[str, Any] = {"instance": identity.claims(), "volume": volume.name}
            if request.source:
                details["source"] = request.source[:64]
            try:
                if self._sweep_due():
                    self.nonces.sweep(conn, now)
                self.nonces.spend(conn, raw, expires)
                self._check_volume(conn, tenant_id, volume.id, holder, secret is None)
                details.update(policy_version=policy.version, policies=list(decision.policies))
                if summary:
                    details["platform"] = summary
                # An instance the policy permits, or one matching a pinned binding in all but its instance
                # id, while another instance holds a live lease has the clone's signature (a copy of the
                # disk booted as a new instance): alert. Others are simply not permitted.
                live = leases.live_holder(conn, volume.id, now)
                clone_like = decision.effect != "deny" or volume.binding.mismatch(identity) == "instance_id"
                if live is not None and live.holder != holder and clone_like:
                    verdict.alert = {
                        "alert": "suspected_clone",
                        "tenant": request.tenant,
                        "volume_id": volume.id,
                        "volume": volume.name,
                        "holder": live.holder,
                        "requester": holder,
                        "lease_expires_at": leases.aware(live.expires_at).isoformat(),
                        "at": now.isoformat(),
                    }
                    details.update(alert="suspected_clone", holder=live.holder)
                    raise Denied(
                        f"volume '{volume.name}' is held by another instance under a live lease: suspected clone",
                        code="suspected_clone",
                    )
                if decision.effect == "deny":
                    details["request"] = json.dumps(facts.to_json() if facts else {}, sort_keys=True)
                    raise policy_denial(policy, decision, volume, identity)
                if decision.effect == "approval":
                    assert decision.approval is not None and facts is not None
                    outcome, found = approvals.settle(
                        conn,
                        tenant_id=tenant_id,
                        volume_id=volume.id,
                        holder=holder,
                        approval=decision.approval,
                        policy_version=policy.version,
                        policies=decision.policies,
                        facts=facts.to_json(),
                        on_behalf_of=request.on_behalf_of,
                        now=now,
                        ttl=timedelta(seconds=self.settings.approval_ttl_seconds),
                    )
                    if isinstance(found, approvals.Waiting):
                        verdict.waiting = found
                        details.update(approval=found.request_id, request=json.dumps(facts.to_json(), sort_keys=True))
                        return {
                            "actor": actor_of(holder),
                            "action": "volume.release",
                            "target": f"volume:{volume.id}",
                            "outcome": "pending",
                            "reason": "approval_required",
                            "details": details,
                        }
                    details["approval"] = found
                    if outcome == "denied":
                        raise Denied(
                            f"an approver denied the release of volume '{volume.name}'", code="approval_denied"
                        )
                verdict.lease = leases.grant(
                    conn,
                    lease_id=lease_id,
                    tenant_id=tenant_id,
                    volume_id=volume.id,
                    holder=holder,
                    token=token,
                    now=now,
                    seconds=volume.lease_seconds,
                )
            except Denied as exc:
                verdict.denied = exc
                return {
                    "actor": actor_of(holder),
                    "action": "volume.release",
                    "target": f"volume:{volume.id}",
                    "outcome": "denied",
                    "reason": exc.code,
                    "details": details,
                }
            details.update(decision="released", lease=lease_id, key_version=volume.key_version, suite=request.suite)
            return {
                "actor": actor_of(holder),
                "action": "volume.release",
                "target": f"volume:{volume.id}",
                "details": details,
            }

        def released(lease: leases.LeaseInfo) -> Released:
            return Released(
                request.suite,
                sealed,
                volume.key_version,
                lease,
                volume.lease_seconds,
                volume.renew_seconds,
                volume.grace_seconds,
            )

        return _Step(tenant_id, effect, verdict, token, released)

    def _check_volume(self, conn: Connection, tenant_id: str, volume_id: str, holder: str, shredded: bool) -> None:
        state = conn.execute(
            for_update(select(Volume.state).where(Volume.id == volume_id), self.registry.db)
        ).scalar_one()
        if state == DESTROYED or shredded:
            raise Denied("the volume's key was destroyed", code="volume_destroyed")
        if state != ACTIVE:
            raise Denied("the volume is revoked", code="volume_revoked")
        if self.registry.instance_revocation(conn, tenant_id, holder) is not None:
            raise Denied("this instance is revoked", code="instance_revoked")

    # -- renewal and end ----------------------------------------------------------------------------
    def renew(self, lease_id: str, token: bytes) -> tuple[str, datetime]:
        """``continue`` (lease extended), ``revoked``, ``shred`` or ``expired``, and the lease's expiry."""
        answer: dict[str, Any] = {}

        def effect(conn: Connection) -> dict[str, Any]:
            row = leases.load(conn, lease_id, token)
            now = datetime.now(UTC)
            volume = conn.execute(select(Volume.state, Volume.lease_seconds).where(Volume.id == row.volume_id)).one()
            instance = self.registry.instance_revocation(conn, row.tenant_id, row.holder)
            expires = leases.aware(row.expires_at)
            if row.state in (leases.REVOKED, leases.SHRED):
                action = row.state
            elif row.state != leases.ACTIVE or expires <= now:
                action = "expired"
                if row.state == leases.ACTIVE:
                    leases.set_state(conn, row.id, leases.EXPIRED, now)
            elif volume.state in (SHRED, DESTROYED) or instance is True:
                action = leases.SHRED
            elif volume.state != ACTIVE or instance is False:
                action = leases.REVOKED
            else:
                answer.update(action="continue", expires_at=leases.extend(conn, row.id, now, volume.lease_seconds))
                return {}
            if action in (leases.REVOKED, leases.SHRED) and row.state == leases.ACTIVE:
                leases.set_state(conn, row.id, action, now)
            answer.update(action=action, expires_at=expires)
            if action == row.state:
                return {}  # delivered before: the record exists
            return {
                "actor": actor_of(row.holder),
                "action": "lease.renew",
                "target": f"volume:{row.volume_id}",
                "details": {"lease": row.id, "answer": action},
            }

        tenant_id = self._lease_tenant(lease_id)
        self.audit.commit(tenant_id, effect)
        return answer["action"], answer["expires_at"]

    def end(self, lease_id: str, token: bytes) -> None:
        """The holder gives the lease back (clean detach): another instance may take the volume at once."""

        def effect(conn: Connection) -> dict[str, Any]:
            row = leases.load(conn, lease_id, token)
            if row.state != leases.ACTIVE:
                return {}
            leases.set_state(conn, row.id, leases.ENDED, datetime.now(UTC))
            return {
                "actor": actor_of(row.holder),
                "action": "lease.end",
                "target": f"volume:{row.volume_id}",
                "details": {"lease": row.id},
            }

        self.audit.commit(self._lease_tenant(lease_id), effect)

    def _lease_tenant(self, lease_id: str) -> str:
        try:
            uuid.UUID(lease_id)
        except ValueError:
            raise NotFound("no such lease, or not this token", code="lease_not_found") from None
        with self.registry.db.read() as conn:
            tenant_id = conn.execute(select(Lease.tenant_id).where(Lease.id == lease_id)).scalar_one_or_none()
        if tenant_id is None:
            raise NotFound("no such lease, or not this token", code="lease_not_found")
        return str(tenant_id)
