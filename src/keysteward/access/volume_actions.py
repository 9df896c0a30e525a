"""Volume key release as an action of the access path (docs/release-protocol.md).

``volume.release`` (Cedar ``release``): the caller is an instance proven by its provider-signed identity
document, or a host of the tenant proven by its mTLS certificate; platform evidence (TPM quote, SEV-SNP
report) bound to ``sha256(nonce || one-time key)`` becomes facts. In the transaction: the nonce is spent,
the volume's state and the caller's revocation are read under a row lock, a live lease of another holder
makes a suspected clone, then the policy's denial, approval bookkeeping and the lease. Only after the
commit is the volume secret unwrapped and sealed (KSR1, HPKE) to the one-time key.

Renewal and lease end are :mod:`keysteward.access.lease_actions`; registration (``volume.register``) is
:mod:`keysteward.access.volume_create`.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection

from keysteward.access import lease_actions
from keysteward.access.actions import ActionHandler, ActionTable, Booked, Refusal, Subject, Unproven
from keysteward.access.release_state import Released, ReleaseState
from keysteward.access.request import AccessRequest, Delivery
from keysteward.access.resources import ReleaseInputs, policy_request
from keysteward.access.volume_create import VolumeCreate
from keysteward.attest.binding import binding
from keysteward.attest.errors import EvidenceRejected
from keysteward.attest.identity import InstanceIdentity, verify_identity
from keysteward.audit.refusals import escaped
from keysteward.crypto import hpke
from keysteward.crypto.secret import wipe_bytearray
from keysteward.errors import Conflict, Denied, KeystewardError, NotFound, Unavailable
from keysteward.formats.release_wire import pack_secret, seal_info
from keysteward.keys.keystore import KeyStore
from keysteward.policy import approvals
from keysteward.policy.engine import PolicyDecision
from keysteward.policy.errors import PolicyRequestInvalid
from keysteward.policy.store import PolicyStore, PolicyVersion
from keysteward.release import admission, leases
from keysteward.release.nonces import Nonces, decode
from keysteward.release.platform import PlatformVerifier
from keysteward.release.registry import Registry
from keysteward.release.volumes import ACTIVE, DESTROYED, VM, VM_DISK, Caller, HostIdentity, VolumeInfo, actor_of
from keysteward.settings import ReleaseSettings
from keysteward.store.driver import Fetch

log = logging.getLogger("keysteward.release")
SWEEP_SECONDS = 60.0


class VolumeRelease(ActionHandler):
    action, cedar_action, delivery = "volume.release", "release", Delivery.SEALED
    lease_state = leases.ACTIVE
    """The state of the lease a permit grants (a migration's destination gets an ``incoming`` one)."""
    grants_with_checks = True
    """A permit's lease is granted by the checks' own statement (see :mod:`keysteward.release.admission`);
    False for a subclass whose checks or bookkeeping differ (its book grants the lease)."""

    def __init__(
        self,
        registry: Registry,
        keys: KeyStore,
        nonces: Nonces,
        platform: PlatformVerifier,
        policies: PolicyStore,
        settings: ReleaseSettings,
    ) -> None:
        self.registry = registry
        self.keys = keys
        self.nonces = nonces
        self.platform = platform
        self.policies = policies
        self.settings = settings
        self._next_sweep = 0.0

    def unknown_tenant(self) -> KeystewardError:
        return Denied("no such volume in this tenant", code="volume_not_found")

    def warm(self, request: AccessRequest, tenant_id: str) -> bool:
        inputs: ReleaseInputs = request.inputs
        if not self.registry.trusts_cached(tenant_id) or request.evidence.get("tpm") is not None:
            return False  # the enrolled AK may need a read
        cached = self.registry.cached_for_release(tenant_id, inputs.volume_id)
        if cached is None:
            return False
        volume, key_id, _ = cached
        return self.keys.is_warm(tenant_id, key_id=key_id, version=volume.key_version)

    def _sweep_peek(self) -> bool:
        """Whether :meth:`_sweep_due` would say yes, without moving the next sweep."""
        return time.monotonic() >= self._next_sweep

    def _sweep_due(self) -> bool:
        """Whether this transaction should also forget expired spent nonces (about once a minute)."""
        now = time.monotonic()
        if now < self._next_sweep:
            return False
        self._next_sweep = now + SWEEP_SECONDS
        return True

    # -- steps 1-2 ----------------------------------------------------------------------------------
    def unproven(self, request: AccessRequest) -> Unproven | None:
        inputs: ReleaseInputs = request.inputs
        return None if inputs.host is not None else Unproven("volume:*", inputs.volume_id)

    def resolve(self, request: AccessRequest, tenant_id: str, now: datetime) -> Subject:
        inputs: ReleaseInputs = request.inputs
        spent: tuple[bytes, datetime] | None = None
        try:
            raw = decode(inputs.nonce)
            expires = self.nonces.check(raw)
            spent = (raw, expires)
            hpke.load_public_key(inputs.suite, inputs.public_key)
            volume, key_id, wrapped = self._volume(tenant_id, inputs.volume_id)
            caller: Caller
            if inputs.host is not None:
                if request.evidence.get("identity"):
                    raise Denied("a host proves itself by its certificate: send no identity document",
                                 code="evidence_invalid")  # fmt: skip
                caller = HostIdentity(request.tenant, inputs.host)
            else:
                caller = self._identity(tenant_id, request, raw)
        except (Denied, hpke.HpkeError) as exc:
            raise self._refusal(request, tenant_id, exc, spent, None) from None
        bound = binding(raw, inputs.public_key)
        try:
            platform, summary = self.platform.verify(tenant_id, caller.key(), request.evidence, binding=bound, now=now)
        except EvidenceRejected as exc:  # the caller is proven by now: its own record
            denied = Denied(exc.message, code=exc.code)
            raise self._refusal(request, tenant_id, denied, spent, (caller, volume)) from None
        state = ReleaseState(inputs, request.tenant, raw, expires, volume, key_id, wrapped, caller)
        details: dict[str, Any] = {"instance": caller.claims(), "volume": volume.name}
        if request.context.source:
            details["source"] = request.context.source[:64]
        if summary:
            details["platform"] = summary
        if inputs.requested_by is not None:
            details["requested_by"] = inputs.requested_by
        subject = Subject(tenant_id, actor_of(caller.key()), f"volume:{volume.id}", None, details=details, state=state)
        try:
            subject.facts = policy_request(request.tenant, request.context.address(), volume, caller, platform, now)
        except PolicyRequestInvalid as exc:
            log.warning("release facts did not make a policy request: %s", exc.code)
            denied = Denied(exc.message, code="policy_error")
            raise self._refusal(request, tenant_id, denied, spent, (caller, volume)) from None
        return subject

    def _volume(self, tenant_id: str, volume_id: str) -> tuple[VolumeInfo, str, bytes | None]:
        """The volume asked for, its key id and wrapped secret; a VM's key or disk is not released alone."""
        try:
            volume, key_id, wrapped = self.registry.for_release(tenant_id, volume_id)
        except NotFound:
            raise Denied("no such volume in this tenant", code="volume_not_found") from None
        if volume.kind == VM:
            raise Denied("no such volume in this tenant", code="volume_not_found")
        if volume.kind == VM_DISK:
            raise Denied(f"volume '{volume.name}' is a VM's disk: it is released with its VM", code="vm_disk")
        return volume, key_id, wrapped

    def _identity(self, tenant_id: str, request: AccessRequest, raw: bytes) -> InstanceIdentity:
        """Step 2 for instances: the provider-signed identity document, bound to this request."""
        inputs: ReleaseInputs = request.inputs
        try:
            return verify_identity(
                request.evidence.get("identity") or {},
                self.registry.trusts(tenant_id),
                binding=binding(raw, inputs.public_key),
                now=datetime.now(UTC),
                audience=self.settings.audience,
            )
        except EvidenceRejected as exc:
            raise Denied(exc.message, code=exc.code) from None

    def _refusal(
        self,
        request: AccessRequest,
        tenant_id: str,
        exc: KeystewardError,
        spent: tuple[bytes, datetime] | None,
        proven: tuple[Caller, VolumeInfo] | None,
    ) -> Refusal:
        """A refusal in steps 1-2; a genuine nonce presented with it is spent too. A caller nobody has proven
        gets no record of its own (it is counted: see access/refusals.py); a proven one (its evidence verified,
        or a host by its certificate) gets its record as any denial does."""
        denied = exc if isinstance(exc, Denied) else Denied(exc.message, code=exc.code)
        inputs: ReleaseInputs = request.inputs
        source = request.context.source[:64]
        unproven = self.unproven(request) if proven is None else None
        if unproven is not None and spent is None:
            return Refusal(tenant_id, denied, None, unproven=unproven)
        record: dict[str, Any] = {"action": self.action, "outcome": "denied", "reason": denied.code}
        if proven is not None:
            caller, volume = proven
            record.update(actor=actor_of(caller.key()), target=f"volume:{volume.id}",
                          details={"source": source, "instance": caller.claims(), "volume": volume.name})  # fmt: skip
        else:
            record.update(actor=f"host:{inputs.host}", target=f"volume:{escaped(inputs.volume_id, 64)}",
                          details={"source": source})  # fmt: skip

        def effect(conn: Connection) -> dict[str, Any]:
            if spent is not None:
                try:
                    self.nonces.spend(conn, *spent)
                except Denied:
                    pass  # spent before: the refusal stands with its own reason
            return {} if unproven is not None else dict(record)

        return Refusal(tenant_id, denied, effect, unproven=unproven)

    # -- steps 3-4, in the transaction ----------------------------------------------------------------
    def prefetch(self, subject: Subject, decision: PolicyDecision) -> Fetch | None:
        """A plain permit's or a denial's checks and lease are the admission's one statement (PostgreSQL;
        not when the nonce sweep is due, which is a statement of its own)."""
        if not self.grants_with_checks or decision.effect not in ("permit", "deny") or self._sweep_peek():
            return None
        state: ReleaseState = subject.state
        state.admitted = self._admission(subject, decision, datetime.now(UTC))
        return admission.statement(**state.admitted)

    def _admission(self, subject: Subject, decision: PolicyDecision, now: datetime) -> dict[str, Any]:
        state: ReleaseState = subject.state
        grant = None
        if decision.effect == "permit" and self.grants_with_checks:
            facts = state.lease_facts(subject)
            grant = admission.NewLease(state.lease_id, state.token, state.volume.lease_seconds, facts, self.lease_state)
        return {"raw_nonce": state.raw, "nonce_expires": state.expires, "volume_id": state.volume.id,
                "tenant_id": subject.tenant_id, "holder": state.caller.key(), "now": now, "grant": grant}  # fmt: skip

    def check(self, conn: Connection, subject: Subject, decision: PolicyDecision) -> None:
        state: ReleaseState = subject.state
        volume, holder = state.volume, state.caller.key()
        if subject.fetched is None:
            now = datetime.now(UTC)
            if self._sweep_due():
                self.nonces.sweep(conn, now)
            admitted = self._admission(subject, decision, now)
        else:  # the batch ran the admission's statement ahead, made by prefetch with these arguments
            assert state.admitted is not None
            admitted = state.admitted
            now = admitted["now"]
        state.granted = None
        found = admission.read(conn, **admitted, rows=subject.fetched)
        state.granted = found.granted
        if found.state == DESTROYED or found.shredded:
            raise Denied("the volume's key was destroyed", code="volume_destroyed")
        if found.state != ACTIVE:
            raise Denied("the volume is revoked", code="volume_revoked")
        if found.revoked:
            raise Denied("this instance is revoked", code="instance_revoked")
        # An instance the policy permits, or one matching a pinned binding in all but its instance id,
        # while another instance holds a live lease has the clone's signature (a copy of the disk booted
        # as a new instance): alert. Others are simply not permitted.
        live = found.live
        clone_like = decision.effect != "deny" or volume.binding.mismatch(state.caller) == "instance_id"
        if live is not None and live.holder != holder and clone_like and not self.may_hold(subject, live):
            subject.alerts.append(
                {
                    "alert": "suspected_clone",
                    "tenant": state.tenant,
                    "volume_id": volume.id,
                    "volume": volume.name,
                    "holder": live.holder,
                    "requester": holder,
                    "lease_expires_at": leases.aware(live.expires_at).isoformat(),
                    "at": now.isoformat(),
                }
            )
            subject.details.update(alert="suspected_clone", holder=live.holder)
            raise Denied(
                f"volume '{volume.name}' is held by another instance under a live lease: suspected clone",
                code="suspected_clone",
            )

    def may_hold(self, subject: Subject, live: leases.LeaseInfo) -> bool:
        """Whether ``live``, another holder's live lease, is expected (a migration's source): not a clone."""
        return False

    def denial(self, policy: PolicyVersion, decision: PolicyDecision, subject: Subject) -> Denied:
        state: ReleaseState = subject.state
        if policy.version == 0 and decision.reason == "no_permit":
            mismatch = state.volume.binding.mismatch(state.caller) or "binding"
            return Denied(f"the instance does not match the volume's binding ({mismatch})", code="not_bound")
        if decision.reason == "no_permit":
            return Denied(f"no policy of version {policy.version} permits this release", code="no_permit")
        return super().denial(policy, decision, subject)

    def book(self, conn: Connection, subject: Subject, decision: PolicyDecision, now: datetime) -> Booked:
        state: ReleaseState = subject.state
        facts = subject.facts
        assert facts is not None
        holder = state.caller.key()
        if decision.effect == "approval":
            assert decision.approval is not None
            policy = self.policies.current(subject.tenant_id)
            outcome, found = approvals.settle(
                conn,
                tenant_id=subject.tenant_id,
                volume_id=state.volume.id,
                holder=holder,
                approval=decision.approval,
                policy_version=policy.version,
                policies=decision.policies,
                facts=facts.to_json(),
                on_behalf_of=state.inputs.on_behalf_of,
                requested_by=state.inputs.requested_by,
                now=now,
                ttl=timedelta(seconds=self.settings.approval_ttl_seconds),
            )
            if isinstance(found, approvals.Waiting):
                subject.details.update(approval=found.request_id, request=json.dumps(facts.to_json(), sort_keys=True))
                return Booked(pending=found)
            subject.details["approval"] = found
            if outcome == "denied":
                raise Denied(f"an approver denied the release of volume '{state.volume.name}'", code="approval_denied")
        if state.granted is None and subject.fetched is not None:
            # a statement sent ahead of this one saw no lease of this; none is granted after it either: the
            # batch runs again, each effect on its own (a KeystewardError in a batch without savepoints)
            raise Unavailable("the lease was not granted with the checks", code="database_unavailable")
        lease = state.granted or leases.grant(
            conn,
            lease_id=state.lease_id,
            tenant_id=subject.tenant_id,
            volume_id=state.volume.id,
            holder=holder,
            token=state.token,
            now=now,
            seconds=state.volume.lease_seconds,
            facts=state.lease_facts(subject),
            state=self.lease_state,
        )
        subject.details.update(
            decision="released", lease=state.lease_id, key_version=state.volume.key_version, suite=state.inputs.suite
        )
        return Booked(value=lease)

    # -- step 5 -------------------------------------------------------------------------------------
    def deliver(self, subject: Subject, booked: Booked, performed: Any) -> Released:
        state: ReleaseState = subject.state
        volume = state.volume
        try:
            try:
                secret = self.keys.data.open(
                    subject.tenant_id, state.key_id, volume.key_version, volume.dek_id, state.wrapped
                )
            except Conflict:
                raise Denied("the volume's key was destroyed", code="volume_destroyed") from None
            with secret:
                plaintext = pack_secret(secret.view(), state.token)
                try:
                    sealed = hpke.seal(
                        state.inputs.suite,
                        state.inputs.public_key,
                        plaintext,
                        seal_info(state.tenant, volume.id, state.lease_id),
                    )
                finally:
                    wipe_bytearray(plaintext)
        finally:
            wipe_bytearray(state.token)
        return Released(
            state.inputs.suite,
            sealed,
            volume.key_version,
            booked.value,
            volume.lease_seconds,
            volume.renew_seconds,
            volume.grace_seconds,
        )


def register(
    table: ActionTable,
    registry: Registry,
    keys: KeyStore,
    nonces: Nonces,
    platform: PlatformVerifier,
    policies: PolicyStore,
    settings: ReleaseSettings,
) -> None:
    table.register(VolumeRelease(registry, keys, nonces, platform, policies, settings))
    lease_actions.register(table, registry, policies)
    table.register(VolumeCreate(registry, keys))
