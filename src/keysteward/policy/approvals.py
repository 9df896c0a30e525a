"""Quorum approval of key releases, with separation of duties.

A release the policy marks ``approval`` waits as a pending request (one per requester and volume at a
time). Security officers approve or deny it, each with a reason:

- the approvers come from the groups the policy names (a human's group is their token's role), ``quorum``
  distinct *people* per group, every group: a person's tokens are one vote between them;
- a person votes only once they have held the approving role for the cooling-off period
  (``[release] approver_cooling_off_seconds``, a day by default): an admin cannot make an approver and
  use them at once;
- for the cooling-off period after an admin mints someone an approving token, that person's vote does
  not count on a request the admin is a party to (requester, policy changer, voter), nor the admin's
  vote beside it: the admin saw the token's secret. Minting them an admin token counts the same (it
  mints approving tokens in their name), and so does minting an admin token for whoever minted theirs;
- the person who asked for the release, proven by their own token on the release request
  (``requested_by``), and anyone who changed the tenant's policy within the last hour may not approve;
  what the instance claims (``on_behalf_of``) is shown, never trusted; nobody votes twice;
- a deny by any approver ends the request; pending requests expire (``ttl``);
- an approval is for one request: the requester's next release uses it up. When the policy says how long
  it lasts (``@approval_valid_for``), it stands for that long for that requester and volume.

Every vote is audited by the caller's transaction (:class:`keysteward.audit.log.AuditLog`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import ColumnElement, Connection, insert, select, update

from keysteward.errors import Conflict, Forbidden, NotFound
from keysteward.identity.principal import Principal
from keysteward.policy.engine import Approval
from keysteward.store.models import ApiToken, ApprovalRequest, ApprovalVote, Person

PENDING, APPROVED, DENIED, EXPIRED, USED = "pending", "approved", "denied", "expired", "used"
APPROVE, DENY = "approve", "deny"
MAX_REASON: Final = 500


@dataclass(frozen=True)
class Waiting:
    """What a requester is told while its release waits."""

    request_id: str
    expires_at: datetime
    groups: tuple[tuple[str, int], ...]


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _latest(conn: Connection, tenant_id: str, volume_id: str, holder: str) -> Any:
    return (
        conn.execute(
            select(ApprovalRequest)
            .where(
                ApprovalRequest.tenant_id == tenant_id,
                ApprovalRequest.volume_id == volume_id,
                ApprovalRequest.holder == holder,
            )
            .order_by(ApprovalRequest.created_at.desc())
            .limit(1)
        )
    ).first()


def settle(
    conn: Connection,
    *,
    tenant_id: str,
    volume_id: str,
    holder: str,
    approval: Approval,
    policy_version: int,
    policies: tuple[str, ...],
    facts: dict[str, Any],
    on_behalf_of: str | None,
    now: datetime,
    ttl: timedelta,
    requested_by: str | None = None,
) -> tuple[str, Waiting | str]:
    """What a release the policy holds for approval gets now:

    ``("granted", request_id)`` (an approval to use: this release goes ahead and uses it up),
    ``("denied", request_id)`` (an approver said no; until the request would have expired), or
    ``("pending", Waiting)`` (a new or the existing pending request).

    ``on_behalf_of`` is what the instance claims, kept for the listing only; ``requested_by`` is a person
    the front-end proved (their API token on the release request): they may not vote on it.
    """
    row = _latest(conn, tenant_id, volume_id, holder)
    wanted = [list(g) for g in approval.groups]
    if row is not None:
        if row.state == APPROVED and json.loads(row.groups) == wanted:
            if row.grant_until is None:
                conn.execute(update(ApprovalRequest).where(ApprovalRequest.id == row.id).values(state=USED))
                return "granted", row.id
            if _aware(row.grant_until) > now:
                return "granted", row.id  # a standing grant, as long as the policy said
        elif row.state == DENIED and _aware(row.expires_at) > now:
            return "denied", row.id
        elif row.state == PENDING and _aware(row.expires_at) > now and json.loads(row.groups) == wanted:
            if requested_by is not None and row.requested_by is None:
                # a person proves they asked for the instance's pending release: they no longer count
                conn.execute(
                    update(ApprovalRequest).where(ApprovalRequest.id == row.id).values(requested_by=requested_by)
                )
            return "pending", Waiting(row.id, _aware(row.expires_at), approval.groups)
        elif row.state == PENDING:
            conn.execute(update(ApprovalRequest).where(ApprovalRequest.id == row.id).values(state=EXPIRED))
    request_id = str(uuid.uuid4())
    conn.execute(
        insert(ApprovalRequest).values(
            id=request_id,
            tenant_id=tenant_id,
            volume_id=volume_id,
            holder=holder,
            on_behalf_of=on_behalf_of,
            requested_by=requested_by,
            groups=json.dumps(wanted),
            valid_for_seconds=approval.valid_for_seconds,
            policy_version=policy_version,
            policies=json.dumps(list(policies)),
            facts=json.dumps(facts, sort_keys=True),
            state=PENDING,
            created_at=now,
            expires_at=now + ttl,
        )
    )
    return "pending", Waiting(request_id, now + ttl, approval.groups)


def listing(conn: Connection, tenant_id: str, state: str | None, now: datetime) -> list[dict[str, Any]]:
    query = select(ApprovalRequest).where(ApprovalRequest.tenant_id == tenant_id)
    if state is not None:
        query = query.where(ApprovalRequest.state == state)
    rows = conn.execute(query.order_by(ApprovalRequest.created_at.desc()).limit(500)).all()
    votes: dict[str, list[dict[str, Any]]] = {}
    if rows:
        for vote in conn.execute(select(ApprovalVote).where(ApprovalVote.request_id.in_([r.id for r in rows]))):
            votes.setdefault(vote.request_id, []).append(
                {
                    "approver": vote.approver,
                    "person": vote.person,
                    "decision": vote.decision,
                    "reason": vote.reason,
                    "at": vote.at,
                }
            )
    return [describe(r, votes.get(r.id, []), now) for r in rows]


def describe(row: Any, votes: list[dict[str, Any]], now: datetime) -> dict[str, Any]:
    state = row.state
    if state == PENDING and _aware(row.expires_at) <= now:
        state = EXPIRED
    return {
        "id": row.id,
        "volume_id": row.volume_id,
        "requester": row.holder,
        "on_behalf_of": row.on_behalf_of,  # claimed by the instance, not proven
        "requested_by": row.requested_by,  # the person proven to have asked
        "groups": [{"group": g, "quorum": q} for g, q in json.loads(row.groups)],
        "valid_for_seconds": row.valid_for_seconds,
        "policy_version": row.policy_version,
        "policies": json.loads(row.policies),
        "state": state,
        "created_at": _aware(row.created_at),
        "expires_at": _aware(row.expires_at),
        "grant_until": _aware(row.grant_until) if row.grant_until else None,
        "votes": votes,
        "request": json.loads(row.facts),
    }


def _people_of(conn: Connection, tenant_id: str, actors: set[str]) -> set[str]:
    """The people behind ``actors`` (``Principal.describe()`` texts, e.g. policy changers): a token's name
    is unique in its tenant, revoked tokens included, so each text names one person."""
    names = {a.rsplit("/", 1)[-1] for a in actors if a.startswith("token:") and a.count("/") >= 2}
    if not names:
        return set()
    return set(
        conn.execute(
            select(Person.name)
            .join(ApiToken, ApiToken.person_id == Person.id)
            .where(ApiToken.tenant_id == tenant_id, ApiToken.name.in_(names))
        ).scalars()
    )


def _standing(
    conn: Connection, actor: Principal, now: datetime, cooling_off: timedelta
) -> tuple[datetime | None, set[str]]:
    """Since when ``actor``'s person holds ``actor``'s role (their oldest live token with it), and the other
    people who may hold a secret that votes as them: see :func:`_minters`."""
    rows = conn.execute(
        select(ApiToken.created_at)
        .join(Person, Person.id == ApiToken.person_id)
        .where(
            ApiToken.tenant_id == actor.tenant_id,
            Person.name == actor.person,
            ApiToken.role == actor.role,
            ApiToken.revoked_at.is_(None),
        )
    ).all()
    since = min((_aware(r.created_at) for r in rows), default=None)
    return since, _minters(conn, actor, now - cooling_off)


def _minters(conn: Connection, actor: Principal, after: datetime) -> set[str]:
    """Who minted ``actor``'s person, after ``after``, a live token with ``actor``'s role (they saw a secret
    that votes) or an ``admin`` token, revoked or not (until it was revoked it could mint more, recorded as
    the person's own), and so on up the chain through the admin tokens of each of those minters: an admin
    cannot launder a token through a second admin token they minted, for the person or for someone else."""
    seen, found, frontier = {actor.person}, set[str](), {actor.person}
    voting: ColumnElement[bool] = (ApiToken.role == actor.role) & ApiToken.revoked_at.is_(None)
    while frontier:
        rows = conn.execute(
            select(ApiToken.created_at, ApiToken.created_by)
            .join(Person, Person.id == ApiToken.person_id)
            .where(
                ApiToken.tenant_id == actor.tenant_id,
                Person.name.in_(frontier),
                (ApiToken.role == "admin") | voting,
                ApiToken.created_by.is_not(None),
            )
        ).all()
        frontier = {str(r.created_by) for r in rows if _aware(r.created_at) > after} - seen
        found |= frontier
        seen |= frontier
        voting = ApiToken.role == "admin"
    return found


def _hours(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds:g} s"


def _tally(votes: Iterable[Any], requested_by: str | None) -> dict[str, set[str]]:
    """Approving people per role; a vote from before people existed counts as its token."""
    out: dict[str, set[str]] = {}
    for v in votes:
        if v.decision != APPROVE:
            continue
        person = v.person or v.approver
        role = v.role or (v.approver.split("/")[1] if v.approver.count("/") >= 2 else "")
        if person != requested_by:
            out.setdefault(role, set()).add(person)
    return out


def vote(
    conn: Connection,
    actor: Principal,
    request_id: str,
    decision: str,
    reason: str,
    *,
    now: datetime,
    policy_changers: set[str],
    cooling_off: timedelta,
) -> dict[str, Any]:
    """Record ``actor``'s vote (approve or deny) and move the request on; raises on every rule broken."""
    try:
        uuid.UUID(request_id)
    except ValueError:
        raise NotFound("no such approval request", code="approval_not_found") from None
    row = conn.execute(
        select(ApprovalRequest)
        .where(ApprovalRequest.id == request_id, ApprovalRequest.tenant_id == actor.tenant_id)
        .with_for_update()
    ).one_or_none()
    if row is None:
        raise NotFound("no such approval request", code="approval_not_found")
    if not reason.strip():
        raise Conflict("give a reason: it goes into the audit log", code="approval_reason_missing")
    if row.state != PENDING:
        raise Conflict(f"the request is {row.state}, not pending", code="approval_closed")
    if _aware(row.expires_at) <= now:
        conn.execute(update(ApprovalRequest).where(ApprovalRequest.id == row.id).values(state=EXPIRED))
        raise Conflict("the request expired before this vote", code="approval_expired")
    groups = [(str(g), int(q)) for g, q in json.loads(row.groups)]
    if actor.role not in {g for g, _ in groups}:
        wanted = ", ".join(g for g, _ in groups)
        raise Forbidden(f"only members of {wanted} vote on this request", code="approver_not_in_group")
    if actor.kind != "token" or not actor.person:
        raise Forbidden("only people vote on releases", code="approver_not_a_person")
    person = actor.person
    if row.requested_by is not None and row.requested_by == person:
        raise Forbidden("the person who asked for the release may not approve it", code="approver_is_requester")
    changers = _people_of(conn, actor.tenant_id, policy_changers)
    if person in changers or actor.describe() in policy_changers:
        raise Forbidden(
            "you changed the tenant's policy within the last hour: another officer must approve",
            code="approver_changed_policy",
        )
    votes = conn.execute(select(ApprovalVote).where(ApprovalVote.request_id == row.id)).all()
    if any(v.person == person or v.approver == actor.describe() for v in votes):
        raise Conflict("you already voted on this request (with this or another of your tokens)",
                       code="approval_already_voted")  # fmt: skip
    since, granters = _standing(conn, actor, now, cooling_off)
    if since is None or now - since < cooling_off:
        start = (since or now) + cooling_off
        raise Forbidden(
            f"you gained the {actor.role} role less than {_hours(cooling_off)} ago: you may vote from "
            f"{start.isoformat(timespec='seconds')}",
            code="approver_cooling_off",
        )
    parties = ({row.requested_by} | changers | {v.person for v in votes}) - {None}
    shadowing = sorted(granters & parties)
    if shadowing:
        raise Forbidden(
            f"{', '.join(shadowing)} minted your {actor.role} token less than {_hours(cooling_off)} ago and is a "
            "party to this request: that vote would be theirs",
            code="approver_granted_by_party",
        )
    minted = sorted(str(v.person) for v in votes if person in json.loads(v.granted_by or "[]"))
    if minted:
        raise Forbidden(
            f"you minted an approving token for {', '.join(minted)} less than {_hours(cooling_off)} ago and they "
            "voted on this request: that vote was yours already",
            code="approver_granted_by_party",
        )
    conn.execute(
        insert(ApprovalVote).values(
            request_id=row.id,
            approver=actor.describe(),
            person=person,
            role=actor.role,
            granted_by=json.dumps(sorted(granters)),
            decision=decision,
            reason=reason[:MAX_REASON],
            at=now,
        )
    )
    state = PENDING
    votes = conn.execute(select(ApprovalVote).where(ApprovalVote.request_id == row.id)).all()
    approving = _tally(votes, row.requested_by)
    progress = [{"group": g, "quorum": q, "approved": min(len(approving.get(g, ())), q)} for g, q in groups]
    if decision == DENY:
        state = DENIED
    elif all(len(approving.get(group, ())) >= quorum for group, quorum in groups):
        state = APPROVED
    values: dict[str, Any] = {"state": state}
    if state != PENDING:
        values["decided_at"] = now
    if state == APPROVED and row.valid_for_seconds > 0:
        values["grant_until"] = now + timedelta(seconds=row.valid_for_seconds)
    conn.execute(update(ApprovalRequest).where(ApprovalRequest.id == row.id).values(**values))
    return {"id": row.id, "state": state, "volume_id": row.volume_id, "requester": row.holder, "person": person,
            "progress": progress}  # fmt: skip
