"""Cedar's schema validation errors as an operator should read them: the first mistake first, its
consequences left out, in plain words.

Cedar reports a policy's errors in no useful order, and one typo brings others with it: once
``principal.acount`` fails to type-check, the ``principal has image_id &&`` beside it no longer
guards anything, so a correct ``principal.image_id`` is reported too ("unable to guarantee safety of
access to optional attribute"), and an unknown entity type in the scope leaves no applicable action.
So the errors are put in the order of the text, a policy's consequential errors are dropped while it has
a mistake they follow from, and an unknown attribute is named with the attributes the type does have.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Final

from keysteward.policy.schema import SCHEMA_TEXT

_UNKNOWN_ATTRIBUTE: Final = re.compile(
    r"for policy `(?P<policy>[^`]+)`, attribute `(?P<attr>[^`]+)` on entity type `(?P<type>[^`]+)` not found"
)
_UNKNOWN_CONTEXT: Final = re.compile(
    r"for policy `(?P<policy>[^`]+)`, attribute `(?P<attr>[^`]+)` in context for (?P<type>\S+) not found"
)
_CAUSES: Final = ("not found", "unrecognized entity type", "undeclared", "unknown")
"""Words of an error that is a mistake of its own (a name that does not exist)."""
_CONSEQUENCES: Final = ("unable to guarantee safety of access", "unable to find an applicable action")
"""Words of an error that a mistake elsewhere in the same policy can cause."""
_ENTITY: Final = re.compile(r"entity (\w+)(?: in \[[^\]]*\])? \{([^}]*)\}")
_ATTRIBUTE: Final = re.compile(r"(\w+)\??\s*:")
_ROLES: Final = ("principal", "resource")


@dataclass(frozen=True)
class SchemaError:
    """One error Cedar reported: the policy's place in the set, its file, where in the file, the message;
    for an unknown attribute, the attribute and the entity types it was looked up on."""

    policy: int
    file: str
    offset: int
    message: str
    attribute: str = ""
    types: tuple[str, ...] = ()
    """The entity types an unknown attribute was looked up on, or (``in_context``) the actions."""
    in_context: bool = False


@cache
def entity_attributes() -> dict[str, tuple[str, ...]]:
    """``{"Keysteward::Instance": ("tenant", "provider", ...)}``: the attributes of every entity type."""
    return {f"Keysteward::{name}": tuple(_ATTRIBUTE.findall(body)) for name, body in _ENTITY.findall(SCHEMA_TEXT)}


def first_mistakes(errors: Sequence[SchemaError]) -> list[SchemaError]:
    """``errors`` in the order of the text (file, then position), without the errors that follow from a
    mistake in the same policy, and with an unknown attribute reported once for all the types it was
    looked up on (an unconstrained ``principal`` is each principal type in turn; an unconstrained ``action``
    each action's context)."""
    caused = {e.policy for e in errors if any(word in e.message for word in _CAUSES)}
    kept = [e for e in errors if not (e.policy in caused and any(word in e.message for word in _CONSEQUENCES))]
    kept.sort(key=lambda e: (e.file, e.offset))
    merged: dict[tuple[str, int, str], SchemaError] = {}
    for error in kept:
        unknown = _UNKNOWN_ATTRIBUTE.search(error.message)
        context = _UNKNOWN_CONTEXT.search(error.message) if unknown is None else None
        found = unknown or context
        if found is None:
            merged[(error.file, error.offset, error.message)] = error
            continue
        place = (error.file, error.offset, f"\n{context is not None}\n{found['attr']}")
        before = merged.get(place)
        types = (*(before.types if before else ()), found["type"])
        message = f"for policy `{found['policy']}`, unknown attribute `{found['attr']}`"
        merged[place] = SchemaError(
            error.policy, error.file, error.offset, message, found["attr"], types, in_context=context is not None
        )
    return list(merged.values())


def plain(error: SchemaError, text: str) -> str:
    """The message of ``error`` for an operator; an unknown attribute names its role (``principal``,
    ``resource``) as the text spells it, the closest attribute that exists, and all that do."""
    if not error.attribute:
        return error.message
    if error.in_context:
        actions = sorted(t.rpartition("::")[2].strip('"') for t in error.types)
        shown = ", ".join(actions[:6]) + (f" and {len(actions) - 6} more" if len(actions) > 6 else "")
        return (
            f"{error.message} of the context of {'action' if len(actions) == 1 else 'actions'} {shown}; "
            "name in the policy's scope the actions whose context has it (docs/policy.md)"
        )
    role = next((r for r in _ROLES if text[: error.offset].rstrip().endswith(f"{r}.")), None)
    known = sorted({a for t in error.types for a in entity_attributes().get(t, ())})
    of = " or ".join(f"`{t}`" for t in sorted(error.types))
    what = f"the {role} type {of}" if role else f"the entity type {of}"
    close = difflib.get_close_matches(error.attribute, known, n=1)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    listed = f" (attributes: {', '.join(known)})" if known else ""
    return f"{error.message} of {what}{hint}{listed}"
