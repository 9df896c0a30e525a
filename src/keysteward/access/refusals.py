"""Refusals of callers nobody has proven yet (an instance's release before its evidence verified).

Such a caller can be anyone on the network. Its refusals are limited per source (an IPv4 address or an
IPv6 /64; ``[release] refusals_per_source`` in ``refusal_window_seconds``, then ``429 rate_limited`` without
any work) and counted rather than recorded one by one (:mod:`keysteward.audit.refusals`: one record per
interval per tenant, action and reason). There is no overall limit: many failing sources must not lock out
the instances that prove themselves. Refusals of proven callers are recorded one by one, as before.
"""

from __future__ import annotations

import math

from keysteward.audit.refusals import RefusalTally
from keysteward.errors import RateLimited
from keysteward.identity.tenants import NO_TENANT_ID
from keysteward.ratelimit import FailureLimiter


class RefusalGate:
    def __init__(self, limiter: FailureLimiter, tally: RefusalTally) -> None:
        self.limiter = limiter
        self.tally = tally

    def admit(self, source: str, tenant_id: str | None, action: str, target: str, sample: str) -> None:
        """Raise RateLimited when ``source`` is over its limit (counted for the tenant, when it is known)."""
        wait = self.limiter.retry_after(source)
        if not wait:
            return
        if tenant_id is not None and tenant_id != NO_TENANT_ID:
            self.tally.count(tenant_id, action, "rate_limited", source=source, target=target, sample=sample)
        seconds = max(1, math.ceil(wait))
        raise RateLimited(f"too many refused requests from this address; try again in {seconds} s", retry_after=seconds)

    def refused(self, tenant_id: str, action: str, reason: str, *, source: str, target: str, sample: str) -> None:
        """Count one refusal against ``source``, and into the tenant's next counted record."""
        self.limiter.fail(source)
        if tenant_id != NO_TENANT_ID:
            self.tally.count(tenant_id, action, reason, source=source, target=target, sample=sample)
