"""Volume registration as an action of the access path: ``volume.register`` (Cedar ``volume_create``).

The new volume's secret is made and stored wrapped in the transaction with its audit record; only after
the commit, on a permit, is it unwrapped and sealed (KSR1, HPKE) to the registering tool's one-time key.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from keysteward.access.actions import ActionHandler, Booked, Subject
from keysteward.access.principals import policy_principal
from keysteward.access.request import AccessRequest, Delivery
from keysteward.access.resources import spec_resource
from keysteward.crypto import hpke
from keysteward.crypto.secret import wipe_bytearray
from keysteward.errors import Denied
from keysteward.formats.release_wire import CREATE_LEASE_ID, TOKEN_SIZE, pack_secret, seal_info
from keysteward.keys.keystore import KeyStore
from keysteward.policy.engine import PolicyDecision
from keysteward.policy.facts import PolicyRequest
from keysteward.release.registry import Registry
from keysteward.release.volumes import VolumeInfo, VolumeSpec


@dataclass(frozen=True, repr=False)
class CreateInputs:
    spec: VolumeSpec
    suite: str
    public_key: bytes


@dataclass(frozen=True, repr=False)
class Created:
    volume: VolumeInfo
    suite: str
    sealed: bytes


class VolumeCreate(ActionHandler):
    """``volume.register`` (Cedar ``volume_create``): the volume's secret is made and stored wrapped in the
    transaction; after the commit it is unwrapped and sealed to the creating tool's one-time key."""

    action, cedar_action, delivery = "volume.register", "volume_create", Delivery.SEALED

    def __init__(self, registry: Registry, keys: KeyStore) -> None:
        self.registry = registry
        self.keys = keys

    def resolve(self, request: AccessRequest, tenant_id: str, now: datetime) -> Subject:
        inputs: CreateInputs = request.inputs
        who = request.principal
        if who is None:
            raise Denied("registering a volume needs an authenticated principal", code="no_credentials")
        hpke.load_public_key(inputs.suite, inputs.public_key)  # a bad key is refused before anything is made
        spec = inputs.spec
        spec.check()
        volume_id = str(uuid.uuid4())
        facts = PolicyRequest(
            tenant=request.tenant,
            action="volume_create",
            principal=policy_principal(who),
            resource=spec_resource(volume_id, spec),
            identity={},
            platform={},
            time=now,
        )
        details = {"name": spec.name, "key": spec.key, "labels": spec.labels, "binding": spec.binding.as_dict()}
        state = (volume_id, inputs)
        return Subject(tenant_id, who.describe(), f"volume:{volume_id}", facts, details=details, state=state)

    def book(self, conn: Connection, subject: Subject, decision: PolicyDecision, now: datetime) -> Booked:
        volume_id, inputs = subject.state
        if decision.effect == "approval":
            raise Denied("registering a volume is not held for approval", code="approval_unsupported")
        info, dek_id = self.registry.insert_volume(conn, subject.tenant_id, inputs.spec, volume_id, now)
        subject.details["key_version"] = info.key_version
        return Booked(value=(info, dek_id))

    def deliver(self, subject: Subject, booked: Booked, performed: Any) -> Created:
        _, inputs = subject.state
        info, dek_id = booked.value
        tenant = subject.facts.tenant if subject.facts is not None else ""
        with self.keys.data.unwrap(subject.tenant_id, dek_id) as secret:
            plaintext = pack_secret(secret.view(), bytes(TOKEN_SIZE))
            try:
                sealed = hpke.seal(
                    inputs.suite, inputs.public_key, plaintext, seal_info(tenant, info.id, CREATE_LEASE_ID)
                )
            finally:
                wipe_bytearray(plaintext)
        return Created(info, inputs.suite, sealed)
