"""The table of actions, and what an action's handler provides to the one path.

Each action of the access path (``volume.release``, ``key.decrypt``, ``volume.destroy``...) is one
:class:`ActionHandler` registered in an :class:`ActionTable` under its audit name, with the Cedar action it
is decided by and how its result is delivered. The handler holds what differs between actions (how the
resource and the evidence turn into facts, what the bookkeeping writes, what is delivered); the order, the
policy evaluation, the audit record and the rule "nothing is delivered before the commit, nothing on a
denial" belong to :class:`~keysteward.access.service.AccessService` alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from keysteward.access.request import AccessRequest, Delivery
from keysteward.audit.pending import Effect
from keysteward.errors import Denied, KeystewardError, NotFound
from keysteward.policy import approvals
from keysteward.policy.engine import PolicyDecision
from keysteward.policy.facts import PolicyRequest
from keysteward.policy.store import PolicyVersion
from keysteward.store.driver import Fetch


@dataclass
class Subject:
    """What :meth:`ActionHandler.resolve` proved and found: the facts the policy sees and the handler's state."""

    tenant_id: str
    actor: str
    """The audit actor: ``token:acme/admin/bob``, ``instance:devcloud/111/i-1``, ``host:proxy-1``."""
    target: str
    """The audit target: ``volume:<uuid>``, ``key:<name>``."""
    facts: PolicyRequest | None
    """The Cedar request, or None for an action that is not a policy question (giving a lease back)."""
    more_facts: tuple[PolicyRequest, ...] = ()
    """Further requests the policy must also permit (re-encrypt to another key asks for both keys)."""
    details: dict[str, Any] = field(default_factory=dict)
    state: Any = None
    """Handler-private: the loaded resource, the spent nonce, the one-time key..."""
    alerts: list[dict[str, Any]] = field(default_factory=list)
    """Alerts the transaction raised (a suspected clone), sent after the commit."""
    fetched: list[Any] | None = None
    """In the transaction: the rows of the statement :meth:`ActionHandler.prefetch` gave, when the batch sent
    it ahead (the checks then run on them instead of running it); None otherwise."""


@dataclass
class Booked:
    """What the bookkeeping wrote: a value for delivery, or a pending approval (nothing is delivered)."""

    value: Any = None
    pending: approvals.Waiting | None = None
    quiet: bool = False
    """A routine step that needs no audit record (a renewal that continues: the lease row says it)."""


@dataclass(frozen=True)
class Unproven:
    """A request whose caller nothing has proven yet: what its counted refusal record names."""

    target: str
    """The record's target, for every refusal of the kind: ``volume:*``."""
    sample: str
    """What this caller named (a volume id): attacker-chosen, so escaped and cut before it is recorded."""


class Refusal(Exception):
    """Raised by ``resolve`` when the request fails before its caller is proven by what resolve verifies.

    ``effect`` (if any) runs in a transaction (it may spend a genuine nonce presented with the request) and
    returns the record of a proven caller's refusal; for an ``unproven`` caller it returns no record and the
    refusal is counted instead (:mod:`keysteward.access.refusals`). ``denied`` is raised to the caller."""

    def __init__(
        self, tenant_id: str, denied: Denied, effect: Effect | None, *, unproven: Unproven | None = None
    ) -> None:
        super().__init__(denied.message)
        self.tenant_id = tenant_id
        self.denied = denied
        self.effect = effect
        self.unproven = unproven


class ActionHandler:
    """One action of the access path. Subclasses set the class attributes and override the steps they need."""

    action: str = ""
    """The audit action and the table key, e.g. ``volume.release``."""
    cedar_action: str | None = None
    """The schema action the tenant's policy is asked (``release``, ``decrypt``), or None: no policy question."""
    delivery: Delivery = Delivery.NOTHING
    writes: bool = True
    """False for an action whose ``check`` and ``book`` never write (key uses): its record is appended without
    a savepoint of its own."""
    first: bool = False
    """True for an action that must not wait behind the others at the audit writer (a lease's renewal: a
    live lease that waits out its expiry behind a boot storm's releases is lost)."""
    reads_many: bool = False
    """True for an action whose steps may read many rows (KMIP Locate): a cold request of it goes to a thread even
    on SQLite, where the others' few reads by key are made on the event loop (see AccessService.decide_async)."""
    audited_refusals: tuple[type[KeystewardError], ...] = (Denied,)
    """Errors ``check`` and ``book`` raise that are refusals, recorded as ``denied`` with their code (and what
    the step wrote before raising is kept). Other errors undo the step and write nothing."""

    def unknown_tenant(self) -> KeystewardError:
        """What a request naming no tenant of this server gets (the same answer as an unknown resource)."""
        return NotFound("no such tenant", code="tenant_not_found")

    def unproven(self, request: AccessRequest) -> Unproven | None:
        """For a request with no principal whose caller only :meth:`resolve` can prove (by its evidence): what
        its refusals are counted as. Such requests are limited per source, their refusals counted, and one
        naming an unknown tenant is resolved with ``NO_TENANT_ID``, to get the answer a known tenant's
        unknown resource gets. None (the default): the front-end proved the caller."""
        return None

    def warm(self, request: AccessRequest, tenant_id: str) -> bool:
        """Whether :meth:`resolve` needs no database read (then it runs on the event loop)."""
        return False

    def resolve(self, request: AccessRequest, tenant_id: str, now: datetime) -> Subject:
        """Steps 1-2: the principal proven (with the nonce), the evidence verified into facts, the resource loaded."""
        raise NotImplementedError

    def check(self, conn: Connection, subject: Subject, decision: PolicyDecision) -> None:
        """Step 3, in the transaction: nonce spent, revocations and resource state (raise Denied)."""

    def prefetch(self, subject: Subject, decision: PolicyDecision) -> Fetch | None:
        """The one statement that is all :meth:`check` and :meth:`book` write for this decision, which the
        audit batch may send ahead with others (then ``subject.fetched`` holds its rows when they run), or
        None (the default): they run their own statements."""
        return None

    def denial(self, policy: PolicyVersion, decision: PolicyDecision, subject: Subject) -> Denied:
        """The denial an operator can act on when the policy says no."""
        named = ", ".join(decision.policies[:5]) or "none"
        if decision.reason == "forbidden_by_policy":
            return Denied(f"forbidden by policy version {policy.version} ({named})", code="forbidden_by_policy")
        if decision.reason == "policy_error":
            return Denied(f"the policy could not be evaluated: {'; '.join(decision.errors)[:300]}", code="policy_error")
        return Denied(f"no policy of version {policy.version} permits this {self.cedar_action}", code="no_permit")

    def book(self, conn: Connection, subject: Subject, decision: PolicyDecision, now: datetime) -> Booked:
        """Step 4, in the transaction with the audit record: lease, approval, state change (raise Denied)."""
        return Booked()

    def perform(self, subject: Subject) -> Any:
        """For :attr:`Delivery.OPERATION`: the operation, run after a permit and before the commit; its
        result is held back until the record of it is committed. Errors (KeystewardError) are recorded."""
        return None

    def deliver(self, subject: Subject, booked: Booked, performed: Any) -> Any:
        """Step 5, after the commit and only on permit: unwrap and deliver (or hand back the operation's result)."""
        return booked.value

    def discard(self, subject: Subject, performed: Any) -> None:
        """Wipe what :meth:`perform` produced when it is not delivered (the record could not be written)."""


class ActionTable:
    """Every action the access path knows, by name: the one registry front-ends reach through."""

    def __init__(self) -> None:
        self._handlers: dict[str, ActionHandler] = {}

    def register(self, handler: ActionHandler) -> None:
        if not handler.action or handler.action in self._handlers:
            raise ValueError(f"action {handler.action!r} is empty or registered twice")
        self._handlers[handler.action] = handler

    def get(self, action: str) -> ActionHandler:
        try:
            return self._handlers[action]
        except KeyError:
            raise NotFound(f"no action '{action[:64]}'", code="action_not_found") from None

    def __iter__(self) -> Iterator[ActionHandler]:
        return iter(self._handlers.values())
