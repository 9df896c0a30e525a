"""Compile a tenant's Cedar policy set once, then decide requests on it: permit, deny, or approval.

Outcomes, in order: a matching ``forbid`` denies (forbid wins); a matching ``permit`` carrying
``@approval_group("g") @approval_quorum("n")`` makes the outcome "approval" (when several such permits
match, the strictest requirement: every named group, each with its largest quorum, and the shortest
``@approval_valid_for``); any other matching ``permit`` permits; nothing matching denies (default deny).

Cedar skips a policy whose evaluation errors (an integer overflow, say). For a ``permit`` that is the
safe side; for a ``forbid`` it would grant what the author meant to refuse, so here a forbid that errored
denies with reason ``policy_error`` (fail closed). Policies are validated strictly against the schema,
so such errors are rare.

Speed: the release path runs this per request. The set is cut at compile time per action (a policy whose
action scope cannot match is never evaluated for it); within an action :mod:`keysteward.policy.index`
selects the few policies whose simple conditions hold for the request, and only those go to Cedar (their
Cedar sets are cached). The request's Cedar JSON is built once on the
:class:`~keysteward.policy.facts.PolicyRequest`, and parsed entities are cached by their text across
requests and tenants. Cedar handles are immutable and the caches are locked, so evaluation is thread-safe.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import cedarpy

from keysteward.lru import Lru
from keysteward.policy.decision_key import decision_key, unread_fields
from keysteward.policy.errors import (
    PolicyInvalid,
    PolicyRequestInvalid,
    PolicySpan,
    PolicyTooLarge,
    schema_error_at,
    split_policies,
    syntax_error_at,
    where,
)
from keysteward.policy.facts import PolicyRequest
from keysteward.policy.index import Condition, PolicyIndex, conditions_of
from keysteward.policy.schema import ACTIONS, cedar_schema, entity_type
from keysteward.policy.schema_errors import SchemaError, first_mistakes, plain

MAX_SET_BYTES: Final = 256 * 1024
MAX_POLICIES: Final = 1000
MAX_FILES: Final = 100
MAX_PROBLEMS: Final = 20
MAX_QUORUM: Final = 32
MAX_VALID_FOR: Final = 30 * 86400
ENTITY_CACHE_SIZE: Final = 4096
SELECTED_SET_CACHE_SIZE: Final = 1024
DECISION_CACHE_SIZE: Final = 16384
"""Decisions remembered per compiled set, keyed by a digest of Cedar's inputs less what no policy can read
(:mod:`keysteward.policy.decision_key`): the same question is decided once (Cedar is deterministic). When
no policy reads the time, a lease's renewals ask the same question every time: a decision for each lease
of a fleet of several thousand fits."""
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,127}")
_GROUP = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_CEDAR_ID = re.compile(r"policy\d+")
_APPROVAL_KEYS: Final = frozenset({"approval_group", "approval_quorum", "approval_valid_for"})
_ACTION_TYPE: Final = entity_type("Action")

Effect = Literal["permit", "deny", "approval"]


@dataclass(frozen=True)
class Approval:
    """Who must approve: ``(group, quorum)`` pairs, all required; how long a grant stands (0: this request)."""

    groups: tuple[tuple[str, int], ...]
    valid_for_seconds: int


@dataclass(frozen=True)
class PolicyDecision:
    """The outcome, the ids of the policies that determined it, and a stable reason code.

    ``reason`` is one of ``permitted``, ``forbidden_by_policy``, ``no_permit``, ``approval_required`` and
    ``policy_error`` (a forbid failed to evaluate: denied, fail closed).
    """

    effect: Effect
    policies: tuple[str, ...]
    approval: Approval | None
    errors: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class _Policy:
    id: str
    file: str
    effect: Literal["permit", "forbid"]
    actions: frozenset[str] | None  # None: the scope does not narrow the action
    approval: Approval | None
    text: str
    conditions: tuple[Condition, ...]  # what the index can check before Cedar runs


class _CedarSet:
    """Some policies as one parsed Cedar set, and how to read its answers back into a decision."""

    def __init__(self, policies: Sequence[_Policy]) -> None:
        self.by_cedar_id = {f"policy{n}": policy for n, policy in enumerate(policies)}
        self.policy_set = cedarpy.PolicySet.from_str("\n".join(policy.text for policy in policies))

    def decide(self, result: cedarpy.AuthzResult) -> PolicyDecision:
        matched = [self.by_cedar_id[name] for name in result.diagnostics.reasons]
        errors = tuple(_CEDAR_ID.sub(lambda m: self._name(m.group()), e) for e in result.diagnostics.errors)
        failed = [self.by_cedar_id[name] for e in result.diagnostics.errors for name in _CEDAR_ID.findall(e)[:1]]
        forbids = sorted(p.id for p in matched if p.effect == "forbid")
        if forbids:
            return PolicyDecision("deny", tuple(forbids), None, errors, "forbidden_by_policy")
        failed_forbids = sorted(p.id for p in failed if p.effect == "forbid")
        if failed_forbids:
            return PolicyDecision("deny", tuple(failed_forbids), None, errors, "policy_error")
        if not matched:
            return PolicyDecision("deny", (), None, errors, "no_permit")
        gated = [p.approval for p in matched if p.approval is not None]
        if not gated:
            return PolicyDecision("permit", tuple(sorted(p.id for p in matched)), None, errors, "permitted")
        quorum: dict[str, int] = {}
        for approval in gated:
            for group, count in approval.groups:
                quorum[group] = max(quorum.get(group, 0), count)
        strictest = Approval(tuple(sorted(quorum.items())), min(a.valid_for_seconds for a in gated))
        ids = tuple(sorted(p.id for p in matched if p.approval is not None))
        return PolicyDecision("approval", ids, strictest, errors, "approval_required")

    def _name(self, cedar_id: str) -> str:
        policy = self.by_cedar_id.get(cedar_id)
        return policy.id if policy else cedar_id


def _parse_entities(text: str) -> cedarpy.Entities:
    try:
        return cedarpy.Entities.from_json_str(text, cedar_schema())
    except ValueError as exc:  # facts are checked on construction: this is a bug, and it denies
        raise PolicyRequestInvalid(f"the request's entities do not fit the schema: {exc}"[:400]) from exc


def _entities(text: str) -> cedarpy.Entities:
    """Parsed Cedar entities by their JSON text: a principal asking again skips the parse."""
    return _ENTITIES.get_or_make(text, lambda: _parse_entities(text))


_ENTITIES: Lru[str, cedarpy.Entities] = Lru(ENTITY_CACHE_SIZE)


class _Partition:
    """The policies that may apply to one action, and the Cedar sets of the selections made from them.

    :class:`~keysteward.policy.index.PolicyIndex` picks the policies a request can match; their Cedar set
    is built on first use and cached (LRU), so the release path evaluates a handful of policies, not
    every policy of the tenant.
    """

    def __init__(self, policies: Sequence[_Policy]) -> None:
        self.policies = tuple(policies)
        self.index = PolicyIndex([policy.conditions for policy in policies])
        self._sets: Lru[tuple[int, ...], _CedarSet] = Lru(SELECTED_SET_CACHE_SIZE)

    def select(self, request: PolicyRequest) -> _CedarSet:
        selector = self.index.select(request)
        return self._sets.get_or_make(selector, lambda: _CedarSet([self.policies[n] for n in selector]))


class CompiledPolicySet:
    """One tenant's policy set, parsed and validated once; ``evaluate`` is fast and thread-safe."""

    def __init__(self, sources: Mapping[str, str], policies: Sequence[_Policy]) -> None:
        self.sources: Mapping[str, str] = dict(sources)
        self.ids: tuple[str, ...] = tuple(policy.id for policy in policies)
        self._partitions = {
            action: _Partition([p for p in policies if p.actions is None or action in p.actions]) for action in ACTIONS
        }
        self._decisions: Lru[bytes, PolicyDecision] = Lru(DECISION_CACHE_SIZE)
        self._unread = unread_fields(self.sources)

    @classmethod
    def compile(cls, sources: Mapping[str, str]) -> CompiledPolicySet:
        """Parse and strictly validate ``{"file.cedar": text}``; PolicyInvalid names ``file:line:column``."""
        _check_limits(sources)
        problems: list[str] = []
        policies: list[_Policy] = []
        spans: list[tuple[str, PolicySpan]] = []
        for name in sorted(sources):
            policies.extend(_read_file(name, sources[name], problems, spans))
            if len(problems) >= MAX_PROBLEMS:
                break
        seen: dict[str, _Policy] = {}
        for policy, (name, span) in zip(policies, spans, strict=True):
            if policy.id in seen:
                problems.append(_at(name, sources[name], span.tokens[0].start, f"duplicate policy id {policy.id!r}"))
            seen[policy.id] = policy
        if not problems and policies:
            problems.extend(_validate(policies, spans, sources))
        if problems:
            raise PolicyInvalid.of(problems[:MAX_PROBLEMS])
        return cls(sources, policies)

    @property
    def reads_time(self) -> bool:
        """Whether a policy of the set can read ``context.request.time``, ``hour`` or ``weekday``."""
        return not {"time", "hour", "weekday"} <= self._unread.get("request", frozenset())

    def candidates(self, request: PolicyRequest) -> tuple[str, ...]:
        """The ids of the policies Cedar evaluates for ``request`` (the others cannot match it), for dry runs."""
        return tuple(policy.id for policy in self._partitions[request.action].select(request).by_cedar_id.values())

    def evaluate(self, request: PolicyRequest) -> PolicyDecision:
        """Decide one request (see the module docstring for the outcomes)."""
        key = decision_key(request, self._unread)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._decide(request)
            # errors may quote the resource's id, when the key left it out
            if not decision.errors or request.resource["type"] not in self._unread.get("resource", ()):
                self._decisions.put(key, decision)
        return decision

    def _decide(self, request: PolicyRequest) -> PolicyDecision:
        selected = self._partitions[request.action].select(request)
        result = cedarpy.is_authorized(_cedar_request(request), selected.policy_set, _entities(request.cedar_entities))
        return selected.decide(result)

    def evaluate_many(self, requests: Sequence[PolicyRequest]) -> list[PolicyDecision]:
        """Decide many requests: those sharing their selected policies and entities go to Cedar in one batch."""
        groups: dict[tuple[int, str], tuple[_CedarSet, list[int]]] = {}
        for index, request in enumerate(requests):
            selected = self._partitions[request.action].select(request)
            groups.setdefault((id(selected), request.cedar_entities), (selected, []))[1].append(index)
        decisions: list[PolicyDecision | None] = [None] * len(requests)
        for (_, entities), (selected, indexes) in groups.items():
            batch = [_cedar_request(requests[i]) for i in indexes]
            results = cedarpy.is_authorized_batch(batch, selected.policy_set, _entities(entities))
            for index, result in zip(indexes, results, strict=True):
                decisions[index] = selected.decide(result)
        return [decision for decision in decisions if decision is not None]


def _cedar_request(request: PolicyRequest) -> dict[str, Any]:
    principal, action, resource = request.cedar_uids
    return {"principal": principal, "action": action, "resource": resource, "context": request.cedar_context}


def _at(name: str, text: str, offset: int, message: str) -> str:
    return where(name, text, offset, message)


def _check_limits(sources: Mapping[str, str]) -> None:
    if not isinstance(sources, Mapping):
        raise PolicyInvalid("a policy set is a mapping of file names to Cedar text")
    if len(sources) > MAX_FILES:
        raise PolicyTooLarge(f"a policy set has at most {MAX_FILES} files, not {len(sources)}")
    size = 0
    for name, text in sources.items():
        if not isinstance(name, str) or not _FILE_NAME.fullmatch(name) or ".." in name:
            raise PolicyInvalid(f"bad policy file name {str(name)[:64]!r} (letters, digits, . _ - /)")
        if not isinstance(text, str):
            raise PolicyInvalid(f"{name}: the policy text must be a string")
        try:
            size += len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise PolicyInvalid(f"{name}: the policy text is not valid Unicode (a lone surrogate)") from None
    if size > MAX_SET_BYTES:
        raise PolicyTooLarge(f"a policy set has at most {MAX_SET_BYTES} bytes of text, not {size}")


def _parse_message(text: str) -> str | None:
    try:
        cedarpy.PolicySet.from_str(text)
    except ValueError as exc:
        return str(exc)
    return None


def _read_file(name: str, text: str, problems: list[str], spans: list[tuple[str, PolicySpan]]) -> list[_Policy]:
    """The file's policies with their annotations read; parse errors go to ``problems`` with their place."""
    file_spans = split_policies(text)
    if len(spans) + len(file_spans) > MAX_POLICIES:
        raise PolicyTooLarge(f"a policy set has at most {MAX_POLICIES} policies")
    try:
        est = json.loads(cedarpy.policies_to_json_str(text))
    except ValueError as exc:
        before = len(problems)
        for span in file_spans:
            if len(problems) >= MAX_PROBLEMS:
                break
            if _parse_message(text[span.start : span.end]) is not None:
                offset, message = syntax_error_at(text, span, _parse_message)
                problems.append(_at(name, text, offset, message))
        if len(problems) == before:  # the pieces parse but the whole does not: say so at its start
            problems.append(_at(name, text, 0, str(exc)))
        return []
    statics, templates = est.get("staticPolicies", {}), est.get("templates", {})
    if len(statics) + len(templates) != len(file_spans):
        problems.append(_at(name, text, 0, "could not cut the file into policies; is a `;` missing?"))
        return []
    policies = []
    for n, span in enumerate(file_spans):
        cedar_id = f"policy{n}"
        if cedar_id in templates:
            problems.append(_at(name, text, span.start, "templates (?principal, ?resource) are not supported"))
            continue
        policy = _policy(name, n, text, span, statics[cedar_id], problems)
        if policy is not None:
            policies.append(policy)
            spans.append((name, span))
    return policies


def _annotation_at(span: PolicySpan, key: str) -> int:
    tokens = span.tokens
    for first, second in itertools.pairwise(tokens):
        if first.text == "@" and second.text == key:
            return first.start
    return span.start


def _policy(
    name: str, n: int, text: str, span: PolicySpan, est: Mapping[str, Any], problems: list[str]
) -> _Policy | None:
    annotations: Mapping[str, str | None] = est.get("annotations") or {}
    effect = est["effect"]
    before = len(problems)

    def bad(key: str, message: str) -> None:
        problems.append(_at(name, text, _annotation_at(span, key), message))

    policy_id = annotations.get("id")
    if "id" in annotations and (not policy_id or len(policy_id) > 128 or not policy_id.isprintable()):
        bad("id", "@id needs a printable value of 1-128 characters")
    for key in annotations:
        if key.startswith("approval") and key not in _APPROVAL_KEYS:
            bad(key, f"unknown annotation @{key} (did you mean one of {', '.join(sorted(_APPROVAL_KEYS))}?)")
    approval = None
    if _APPROVAL_KEYS & set(annotations):
        group = annotations.get("approval_group") or ""
        quorum = _number(annotations.get("approval_quorum"), 1, MAX_QUORUM)
        valid_for = _number(annotations.get("approval_valid_for", "0"), 0, MAX_VALID_FOR)
        if effect != "permit":
            bad("approval_group", "approval annotations belong on a permit, not on a forbid")
        elif not _GROUP.fullmatch(group):
            bad("approval_group", "@approval_group needs a group name (letters, digits, . _ -)")
        elif quorum is None:
            bad("approval_quorum", f'@approval_quorum needs a number of approvers from 1 to {MAX_QUORUM}, e.g. "2"')
        elif valid_for is None:
            bad("approval_valid_for", f"@approval_valid_for needs seconds from 0 to {MAX_VALID_FOR}")
        else:
            approval = Approval(((group, quorum),), valid_for)
    if len(problems) > before:
        return None
    return _Policy(
        id=policy_id or f"{name}#{n + 1}",
        file=name,
        effect=effect,
        actions=_actions(est.get("action", {})),
        approval=approval,
        text=text[span.start : span.end],
        conditions=conditions_of(est.get("conditions", [])),
    )


def _number(value: str | None, low: int, high: int) -> int | None:
    if value is None or not value.isdigit() or len(value) > 9 or not low <= int(value) <= high:
        return None
    return int(value)


def _actions(scope: Mapping[str, Any]) -> frozenset[str] | None:
    """The actions a policy's scope can match, or None when it does not narrow them to known actions."""
    entities = scope.get("entities") or ([scope["entity"]] if "entity" in scope else [])
    if scope.get("op") not in ("==", "in") or not entities:
        return None
    if any(e.get("type") != _ACTION_TYPE for e in entities):
        return None  # schema validation reports it
    return frozenset(e["id"] for e in entities)


def _validate(
    policies: Sequence[_Policy], spans: Sequence[tuple[str, PolicySpan]], sources: Mapping[str, str]
) -> list[str]:
    """Strict schema validation of the whole set; each error placed at its policy's culprit condition."""
    result = cedarpy.validate_policies("\n".join(p.text for p in policies), cedar_schema())
    found = []
    for error in result.errors[:MAX_PROBLEMS]:
        index = int(error.policy_id[6:]) if _CEDAR_ID.fullmatch(error.policy_id) else 0
        name, span = spans[index]
        text = sources[name]
        message = error.error.replace(f"`{error.policy_id}`", f"`{policies[index].id}`")
        found.append(SchemaError(index, name, schema_error_at(text, span, error.error), message))
    return [_at(e.file, sources[e.file], e.offset, plain(e, sources[e.file])) for e in first_mistakes(found)]
