"""The audit hash chain, as pure functions: build the next link, verify a sequence of links.

Each tenant has its own chain. A link is a canonical JSON *body*::

    {"seq": n, "prev": <hash of link n-1 or 64 zeros>, "ts": ..., "actor": ..., "action": ...,
     "target": ..., "outcome": "ok" | "denied" | "error", "reason": <code or "">, "details": {...}}

``hash = sha256(body)`` and ``signature = Ed25519(b"keysteward-audit-v1" | tenant | seq | hash)``
signs the chain head as of that link. The writer signs the last link of each commit (each tenant's
lot in a batch), and links written while the server is sealed carry no signature: the next signed link
covers them through the chain.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from keysteward.errors import KeystewardError

GENESIS = "0" * 64
SIGNING_CONTEXT = b"keysteward-audit-v1"
OUTCOMES = ("ok", "denied", "error", "pending")


class ChainBroken(KeystewardError):
    code = "audit_chain_broken"
    status = 409
    title = "Audit chain broken"

    def __init__(self, message: str, seq: int) -> None:
        super().__init__(message)
        self.seq = seq


class UnsignedTail(ChainBroken):
    """The newest records carry no signature: anyone who can write the database or an export made them."""

    code = "audit_unsigned_tail"


@dataclass(frozen=True)
class Link:
    tenant_id: str
    seq: int
    body: str
    hash: str
    signature: bytes | None


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
"""One encoder for every call: ``json.dumps`` with these options made a new one each time, a fifth of the
cost of a record's short values."""


def canonical(obj: Mapping[str, Any]) -> str:
    return _CANONICAL.encode(obj)


def make_body(
    *,
    seq: int,
    prev: str,
    ts: str,
    actor: str,
    action: str,
    target: str,
    outcome: str,
    reason: str,
    details: Mapping[str, Any],
) -> str:
    """The record's canonical body (:func:`canonical` of its fields, keys sorted)."""
    return join_body(body_parts(ts=ts, actor=actor, action=action, target=target, outcome=outcome,
                                reason=reason, details=details), seq, prev)  # fmt: skip


@dataclass(frozen=True, slots=True)
class BodyParts:
    """A body without its place in the chain: the canonical text before ``prev``, between ``prev`` and ``seq``,
    and after ``seq``. The writer makes these before it takes the database's write lock (the JSON encoding
    is most of a record's cost) and only joins them, with the head it read, while it holds the lock."""

    head: str
    mid: str
    tail: str


def body_parts(
    *, ts: str, actor: str, action: str, target: str, outcome: str, reason: str, details: Mapping[str, Any]
) -> BodyParts:
    """The parts of :func:`make_body`'s text; the keys in :func:`canonical`'s sorted order: action, actor,
    details, outcome, prev, reason, seq, target, ts."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}")
    return BodyParts(
        head=f'{{"action":{_json(action)},"actor":{_json(actor)},"details":{canonical(dict(details))},'
        f'"outcome":{_json(outcome)},"prev":',
        mid=f',"reason":{_json(reason)},"seq":',
        tail=f',"target":{_json(target)},"ts":{_json(ts)}}}',
    )


def join_body(parts: BodyParts, seq: int, prev: str) -> str:
    """The canonical body of ``parts`` at ``seq`` after ``prev``."""
    return f"{parts.head}{_json(prev)}{parts.mid}{int(seq)}{parts.tail}"


def _json(value: Any) -> str:
    """One value as :func:`canonical` writes it inside an object."""
    return _CANONICAL.encode(value)


def link_hash(body: str) -> str:
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def signed_message(tenant_id: str, seq: int, hash_hex: str) -> bytes:
    return b"|".join([SIGNING_CONTEXT, tenant_id.encode(), str(seq).encode(), hash_hex.encode()])


def sign(key: Ed25519PrivateKey, tenant_id: str, seq: int, hash_hex: str) -> bytes:
    return key.sign(signed_message(tenant_id, seq, hash_hex))


@dataclass(frozen=True)
class VerifyReport:
    records: int
    signed: int
    head_seq: int
    head_hash: str
    unsigned_tail: int


def verify(
    links: Iterable[Link],
    public_key: Ed25519PublicKey,
    *,
    tenant_id: str | None = None,
    start_seq: int = 1,
    start_prev: str = GENESIS,
) -> VerifyReport:
    """Check every link; raise :class:`ChainBroken` naming the first bad record.

    Detects a modified body (hash mismatch), a modified hash or a deleted, inserted or
    reordered record (sequence gap or ``prev`` mismatch), forged signatures, and records of another
    tenant's chain. Pass ``tenant_id`` to pin whose chain this is; otherwise the first link names it.
    """
    expected_seq, prev = start_seq, start_prev
    count = signed = unsigned_tail = 0
    tenant = tenant_id
    for link in links:
        if tenant is None:
            tenant = link.tenant_id
        elif link.tenant_id != tenant:
            raise ChainBroken(f"record {expected_seq} belongs to another tenant's chain", expected_seq)
        if link.seq != expected_seq:
            raise ChainBroken(
                f"record {expected_seq} is missing or out of order (found {link.seq} in its place)",
                expected_seq,
            )
        try:
            digest = link_hash(link.body)
        except UnicodeEncodeError as exc:
            raise ChainBroken(f"record {link.seq} body is not valid text", link.seq) from exc
        if digest != link.hash:
            raise ChainBroken(f"record {link.seq} was modified: its hash does not match its body", link.seq)
        try:
            body = json.loads(link.body)
        except ValueError as exc:
            raise ChainBroken(f"record {link.seq} body is not JSON", link.seq) from exc
        if not isinstance(body, dict) or body.get("seq") != link.seq:
            raise ChainBroken(f"record {link.seq} body names another sequence number", link.seq)
        if body.get("prev") != prev:
            raise ChainBroken(
                f"record {link.seq} does not follow record {link.seq - 1} (inserted, deleted or reordered)",
                link.seq,
            )
        if link.signature is not None:
            try:
                public_key.verify(link.signature, signed_message(link.tenant_id, link.seq, link.hash))
            except InvalidSignature as exc:
                raise ChainBroken(f"record {link.seq} has a signature that does not verify", link.seq) from exc
            signed += 1
            unsigned_tail = 0
        else:
            unsigned_tail += 1
        prev, expected_seq = link.hash, expected_seq + 1
        count += 1
    return VerifyReport(count, signed, expected_seq - 1, prev, unsigned_tail)


def require_signed_head(report: VerifyReport) -> None:
    """Raise :class:`UnsignedTail` unless the newest record is signed.

    An unsigned link is legal while the server is sealed, and the next signed link covers it; but an
    unsigned *tail* is covered by nothing: a hand-made record appended to a database or an export looks
    exactly like it. Verifiers refuse it unless told to allow it (a server that is sealed right now).
    """
    if report.unsigned_tail:
        first = report.head_seq - report.unsigned_tail + 1
        raise UnsignedTail(
            f"the newest {report.unsigned_tail} record(s), from record {first}, carry no signature: nothing "
            "proves the server wrote them (allow only while the server is sealed)",
            first,
        )
