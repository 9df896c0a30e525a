"""The key a compiled set remembers a decision under: Cedar's exact inputs, less the fields of an XKS call's
``context.kms`` that no policy of the set can read.

KMS gives every call a new ``kmsRequestId``, so a key holding ``context.kms.request_id`` never comes back
and every call cost a Cedar evaluation. Cedar reads a record's attribute only by naming it: ``.name``,
``["name"]`` or ``has name``; it has no way to list a record's fields or to reach one by a computed name.
So a field whose name appears nowhere in the set's text cannot change a decision, as long as the set
never uses ``context.kms`` (or ``context``) as a whole value, which could compare the record with another
(``context.kms == ...``). :func:`unread_kms_fields` finds the fields that are safe to leave out by that
rule and answers none when the text does anything else with them; :func:`decision_key` leaves them out.
Comments and strings only make the rule more careful (a name in a comment counts as read).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from keysteward.policy import fact_values as check
from keysteward.policy.facts import PolicyRequest
from keysteward.policy.schema import KMS_FIELDS

_STRING = r'"(?:[^"\\]|\\.)*"'
_KMS_BRACKET = re.compile(r'\[\s*"kms"\s*\]')
_FIELD_USE = re.compile(
    r"\bcontext\s*\.\s*kms\s*(?:\.\s*[A-Za-z_]\w*|\[\s*" + _STRING + r"\s*\]|has\s+(?:[A-Za-z_]\w*|" + _STRING + "))"
)
"""``context.kms.name``, ``context.kms["name"]``, ``context.kms has name``: one named field."""
_RECORD_PRESENCE = re.compile(r'\bcontext\s+has\s+(?:kms\b|"kms")')
_STRINGS_AND_COMMENTS = re.compile(_STRING + r"|//[^\n]*")
_ANY_KMS = re.compile(r"\bkms\b")
_WHOLE_CONTEXT = re.compile(r"\bcontext\b(?!\s*(?:\.|\[|has\b))")


def unread_kms_fields(sources: Mapping[str, str]) -> frozenset[str]:
    """The ``context.kms`` fields no policy of ``sources`` can read (empty when that cannot be shown)."""
    text = "\n".join(sources.values())
    rest = _RECORD_PRESENCE.sub(" ", _FIELD_USE.sub(" ", _KMS_BRACKET.sub(".kms", text)))
    rest = _STRINGS_AND_COMMENTS.sub(" ", rest)  # ids and literals name nothing (``@id("kms-keys")``)
    if _ANY_KMS.search(rest) or _WHOLE_CONTEXT.search(rest):
        return frozenset()  # the record is used some other way (compared, passed whole): every field counts
    return frozenset(name for name in KMS_FIELDS if name not in text)


def decision_key(request: PolicyRequest, unread: frozenset[str]) -> tuple[Any, ...]:
    """Cedar's inputs for ``request``, without the ``unread`` fields of ``context.kms``."""
    principal, action, resource = request.cedar_uids
    context = request.cedar_context
    if unread and request.kms and not unread.isdisjoint(request.kms):
        values = check.thaw(request.context_values)
        values["kms"] = {name: value for name, value in values["kms"].items() if name not in unread}
        context = json.dumps(values, sort_keys=True)
    return (principal["type"], principal["id"], action["id"], resource["type"], resource["id"],
            request.cedar_entities, context)  # fmt: skip
