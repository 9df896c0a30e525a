"""The key a compiled set remembers a decision under: Cedar's inputs, less the fields of ``context.kms`` and
``context.request`` that no policy of the set can read.

KMS gives every XKS call a new ``kmsRequestId``, and every request holds the time to the second
(``context.request.time``), so a key holding them never came back: every XKS call and every lease renewal
cost a Cedar evaluation. Cedar reads a record's attribute only by naming it: ``.name``, ``["name"]`` or
``has name``; it has no way to list a record's fields or to reach one by a computed name. So a field whose
name appears nowhere in the set's text cannot change a decision, as long as the set never uses the record
(or ``context``) as a whole value, which could compare it with another (``context.kms == ...``).
:func:`unread_fields` finds the fields that are safe to leave out by that rule and answers none for a
record the text does anything else with; :func:`decision_key` leaves them out. Comments and strings only
make the rule more careful (a name in a comment counts as read).

The key is a digest of what is left (BLAKE2b, 32 bytes), so a set can remember a decision for every lease
of a large fleet in little memory.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Final

from keysteward.policy import fact_values as check
from keysteward.policy.facts import PolicyRequest
from keysteward.policy.schema import KMS_FIELDS

PRUNABLE: Final = {"kms": KMS_FIELDS, "request": ("time", "hour", "weekday", "source_ip")}
"""The context records whose unread fields are left out of the key, and their fields."""
ANONYMOUS: Final = {"KmipObject": "uid"}
"""Resource types a set may tell apart by nothing but their id, and the attribute that holds the id: the
KMIP object's. A set whose text has neither an entity literal of the type (``KmipObject::``) nor the
attribute's name anywhere (``uid``) decides alike for two objects that differ only in their id: Cedar has
no other way to reach an entity's id, and keysteward's facts refer to such an object nowhere but in its own
entity. The key then leaves the id out, under ``unread["resource"]`` (KMIP: every Create makes a new object,
and vCenter's Get, Activate and GetAttributes of it come on new connections, each a Cedar evaluation when
the id was in the key). It is left in when the id is found anywhere else in the facts (a label holding it),
and a decision with errors (whose messages may quote the id) is not remembered."""
Unread = Mapping[str, frozenset[str]]

_STRING = r'"(?:[^"\\]|\\.)*"'
_STRINGS_AND_COMMENTS = re.compile(_STRING + r"|//[^\n]*")
_WHOLE_CONTEXT = re.compile(r"\bcontext\b(?!\s*(?:\.|\[|has\b))")


def _record_rules(record: str) -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    bracket = re.compile(r'\[\s*"' + record + r'"\s*\]')
    field_use = re.compile(  # context.record.name, context.record["name"], context.record has name
        r"\bcontext\s*\.\s*" + record + r"\s*(?:\.\s*[A-Za-z_]\w*|\[\s*" + _STRING + r"\s*\]|has\s+(?:[A-Za-z_]\w*|"
        + _STRING + "))"
    )  # fmt: skip
    presence = re.compile(r"\bcontext\s+has\s+(?:" + record + r'\b|"' + record + '")')
    return bracket, field_use, presence, re.compile(r"\b" + record + r"\b")


_RULES: Final = {record: _record_rules(record) for record in PRUNABLE}


def unread_fields(sources: Mapping[str, str]) -> dict[str, frozenset[str]]:
    """Per record of :data:`PRUNABLE`, the fields no policy of ``sources`` can read (none when that cannot
    be shown)."""
    text = "\n".join(sources.values())
    if _WHOLE_CONTEXT.search(_STRINGS_AND_COMMENTS.sub(" ", text)):
        return {}  # context used whole: every field of every record counts
    unread: dict[str, frozenset[str]] = {}
    for record, (bracket, field_use, presence, anywhere) in _RULES.items():
        rest = presence.sub(" ", field_use.sub(" ", bracket.sub("." + record, text)))
        if anywhere.search(_STRINGS_AND_COMMENTS.sub(" ", rest)):
            continue  # the record is used some other way (compared, passed whole): its fields all count
        names = frozenset(name for name in PRUNABLE[record] if name not in text)
        if names:
            unread[record] = names
    anonymous = frozenset(
        kind
        for kind, attribute in ANONYMOUS.items()
        if not re.search(r"\b" + kind + r"\s*::", text) and not re.search(r"\b" + attribute + r"\b", text)
    )
    if anonymous:
        unread["resource"] = anonymous
    return unread


def _resource_for_key(request: PolicyRequest, unread: Unread) -> tuple[str, str]:
    """The resource's id and the entities' JSON as the key holds them: both without the id when the set
    cannot tell the resource's objects apart by it (see :data:`ANONYMOUS`)."""
    resource = request.cedar_uids[2]
    entities = request.cedar_entities
    kind = request.resource["type"]
    if kind in unread.get("resource", ()):
        held = request.resource.get(ANONYMOUS[kind])
        needle = json.dumps(held)[1:-1] if isinstance(held, str) else ""
        # its own two places, the entity's id and the attribute, and no other: else the id stays in the key
        if needle and entities.count(needle) == 2:
            return "", entities.replace(needle, "")
    return resource["id"], entities


def decision_key(request: PolicyRequest, unread: Unread) -> bytes:
    """A digest of Cedar's inputs for ``request``, without the ``unread`` fields."""
    values = request.context_values
    if not any(record in values and not names.isdisjoint(values[record]) for record, names in unread.items()):
        principal, action, resource = request.cedar_uids
        resource_id, entities = _resource_for_key(request, unread)
        parts = (principal["type"], principal["id"], action["id"], resource["type"], resource_id,
                 entities, request.cedar_context)  # fmt: skip
        return hashlib.blake2b("\x00".join(parts).encode(), digest_size=32).digest()
    digest = _outside_kms(request, unread).copy()
    kms = values.get("kms")
    if kms is None:
        digest.update(b"\x00-")  # no context.kms at all, which Cedar can tell from an empty one
    else:
        left_out = unread.get("kms", frozenset())
        kept = {k: v for k, v in kms.items() if k not in left_out}
        digest.update(b"\x00" + json.dumps(kept, sort_keys=True).encode())
    return digest.digest()


def _outside_kms(request: PolicyRequest, unread: Unread) -> hashlib.blake2b:
    """The digest of Cedar's inputs but ``context.kms``, pruned, remembered with the request: the requests
    :meth:`PolicyRequest.with_kms` makes from it share it, and differ from it only in ``context.kms``."""
    remembered = request.memo.get(id(unread))
    if remembered is not None and remembered[0] is unread:  # the mapping is held, so its id is not reused
        held: hashlib.blake2b = remembered[1]
        return held
    pruned = {name: check.thaw(value) for name, value in request.context_values.items() if name != "kms"}
    for record, names in unread.items():
        if record in pruned and record != "kms":
            pruned[record] = {k: v for k, v in pruned[record].items() if k not in names}
    principal, action, resource = request.cedar_uids
    resource_id, entities = _resource_for_key(request, unread)
    parts = (principal["type"], principal["id"], action["id"], resource["type"], resource_id,
             entities, json.dumps(pruned, sort_keys=True), "")  # fmt: skip
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=32)
    request.memo[id(unread)] = (unread, digest)
    return digest
