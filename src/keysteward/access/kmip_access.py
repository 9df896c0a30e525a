"""The facade the KMIP front-end calls: each operation one access request, decided by the one path.

A request on an object this server read recently is decided on the event loop (no thread); the transaction
with its audit record reads the object again, and a request decided on a record another request changed
meanwhile (on any server) did nothing, is refused there as ``kmip_stale`` and is asked again on a fresh read.
"""

from __future__ import annotations

from typing import Any

from keysteward.access.kmip_actions import KmipInputs
from keysteward.access.request import AccessRequest, RequestContext, Resource
from keysteward.access.service import AccessService
from keysteward.identity.principal import Principal
from keysteward.keys.kmip_objects import KmipObjects, Stale

STALE_TRIES = 3


class KmipAccess:
    """What the KMIP front-end calls: each operation one access request, decided by the one path."""

    def __init__(self, access: AccessService, objects: KmipObjects) -> None:
        self.access = access
        self.objects = objects

    def new_uid(self) -> str:
        return self.objects.new_uid()

    async def run(self, who: Principal, action: str, inputs: KmipInputs, source: str) -> Any:
        delivery = self.access.actions.get(action).delivery  # each handler says how its result leaves
        request = AccessRequest(
            tenant=who.tenant,
            action=action,
            resource=Resource("Tenant" if action == "kmip.locate" else "KmipObject", inputs.uid),
            delivery=delivery,
            principal=who,
            context=RequestContext(source=source, front_end="kmip", request_id=inputs.request_id or None),
            inputs=inputs,
        )
        # on the event loop when the object was read recently, else in a thread (a read, and Locate's after
        # the commit); a request decided on a record changed meanwhile did nothing and is asked again
        for attempt in range(STALE_TRIES):
            try:
                return await self.access.decide_async(request, cold_in_thread=True)
            except Stale:
                if attempt == STALE_TRIES - 1:
                    raise
                self.objects.forget(who.tenant_id, inputs.uid)
        raise AssertionError("unreachable")
