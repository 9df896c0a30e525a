"""Which policies can apply to a request: an index over the simple conditions of their ``when`` clauses.

A policy whose ``when`` requires ``principal.account == "A"`` cannot match a request from another account,
so it need not be evaluated for it. At compile time each policy's top-level ``when`` conjuncts of three
shapes are read from Cedar's JSON form:

- ``path == literal`` (``principal.account == "A"``, ``resource.getTag("team") == "red"``);
- presence: ``principal has image_id``, ``resource.hasTag("pci")``;
- ``context.request.source_ip.isInRange(ip("10.0.0.0/8"))``.

Each policy is filed under its most selective equality (the path with the most distinct literals in the
set); its other conditions are checked before it is selected. Policies with only range or presence
conditions are checked one by one; policies with none are always selected. Leaving a policy out is exact:
one of its ``when`` conjuncts is false for this request, so Cedar could only find it false too (the
validator makes every such read safe, so it cannot error either). The unit tests compare every decision
with plain Cedar over the whole set.

Values are read from a :class:`~keysteward.policy.facts.PolicyRequest` exactly as its Cedar form holds them,
typed (so ``true`` never equals ``1``), by a getter made once per path.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

from keysteward.policy.facts import PolicyRequest
from keysteward.policy.schema import PCR_BANKS, PCR_COUNT

Path = tuple[str, ...]
# ("str", "A") / ("int", 5) / ("bool", True): equal to; ("net", (version, network, mask)): an address within
Test = tuple[str, Any]
Condition = tuple[Path, Test]
Getter = Callable[[PolicyRequest], Any]

SOURCE_IP: Final[Path] = ("context", "request", "source_ip")
_EMPTY: Final[Mapping[str, Any]] = MappingProxyType({})
_RECORD_TYPES: Final = (MappingProxyType, dict)  # exact types: an ABC isinstance check costs more than the read
_INDEXABLE: Final = frozenset(
    {("principal", a) for a in ("tenant", "provider", "account", "instance_id", "image_id", "region", "zone")}
    | {("principal", a) for a in ("name", "role")}
    | {("resource", a) for a in ("tenant", "name", "sensitivity")}
    | {("resource", "binding", a) for a in ("provider", "account", "instance_id", "image_id", "host")}
    | {("context", "identity", a) for a in ("provider", "kind", "account", "instance_id", "image_id")}
    | {("context", "identity", a) for a in ("region", "zone", "launched_at")}
    | {("context", "platform", a) for a in ("tee", "debug", "measurement", "chip_id", "vmpl", "secure_boot")}
    | {("context", "platform", "tcb", a) for a in ("bootloader", "tee", "snp", "microcode")}
    | {("context", "platform", "pcrs", f"{bank}_{n}") for bank in PCR_BANKS for n in range(PCR_COUNT)}
    | {("context", "request", a) for a in ("time", "hour", "weekday")}
)
_RECORDS: Final = frozenset({("context", "platform", "pcrs"), ("context", "platform", "tcb"), SOURCE_IP})


def typed(value: Any) -> Test | None:
    return None if value is None else (type(value).__name__, value)


def conditions_of(clauses: Sequence[Mapping[str, Any]]) -> tuple[Condition, ...]:
    """The indexable conjuncts at the top of the ``when`` clauses of a policy in Cedar's JSON form."""
    found: list[Condition] = []
    for clause in clauses:
        if clause.get("kind") != "when":
            continue
        stack = [clause.get("body", {})]
        while stack:
            expr = stack.pop()
            condition = None
            if "&&" in expr:
                stack += [expr["&&"]["left"], expr["&&"]["right"]]
            elif "==" in expr:
                condition = _equality(expr["=="]["left"], expr["=="]["right"])
            elif "has" in expr or "hasTag" in expr:
                path = _presence(expr)
                condition = None if path is None else (path, ("bool", True))
            elif "isInRange" in expr:
                condition = _range(expr["isInRange"])
            if condition is not None and _indexable(condition[0]):
                found.append(condition)
    return tuple(found)


def _equality(left: Mapping[str, Any], right: Mapping[str, Any]) -> Condition | None:
    path, literal = (_path(left), right) if "Value" in right else (_path(right), left)
    value = literal.get("Value")
    if path is None or path == SOURCE_IP or not isinstance(value, str | int | bool):
        return None
    test = typed(value)
    return None if test is None else (path, test)


def _range(args: Sequence[Mapping[str, Any]]) -> Condition | None:
    """``source_ip.isInRange(ip("10.0.0.0/8"))``, when Python reads the literal as Cedar does."""
    if len(args) != 2 or _path(args[0]) != SOURCE_IP or "ip" not in args[1]:
        return None
    literal = (args[1]["ip"] or [{}])[0].get("Value")
    if not isinstance(literal, str) or ("." in literal and ":" in literal):  # Cedar refuses v4-in-v6 forms
        return None
    try:
        network = ipaddress.ip_network(literal, strict=False)
    except ValueError:
        return None  # Cedar reports it; leave the policy to Cedar
    return (SOURCE_IP, ("net", (network.version, int(network.network_address), int(network.netmask))))


def _presence(expr: Mapping[str, Any]) -> Path | None:
    """``principal has image_id`` as ("has", "principal", "image_id"); ``resource.hasTag("t")`` as ("hastag", ...)."""
    if "has" in expr:
        inner = _path(expr["has"]["left"])
        return None if inner is None or inner[0] == "tag" else ("has", *inner, expr["has"]["attr"])
    owner, tag = expr["hasTag"]["left"], expr["hasTag"]["right"]
    if owner.get("Var") in ("principal", "resource") and isinstance(tag.get("Value"), str):
        return ("hastag", owner["Var"], tag["Value"])
    return None


def _path(expr: Mapping[str, Any]) -> Path | None:
    """``principal.account`` as ("principal", "account"), ``resource.getTag("t")`` as ("tag", "resource", "t")."""
    if "Var" in expr:
        return (expr["Var"],)
    if "." in expr:
        inner = _path(expr["."]["left"])
        return None if inner is None or inner[0] == "tag" else (*inner, expr["."]["attr"])
    if "getTag" in expr:
        owner, tag = expr["getTag"]["left"], expr["getTag"]["right"]
        if owner.get("Var") in ("principal", "resource") and isinstance(tag.get("Value"), str):
            return ("tag", owner["Var"], tag["Value"])
    return None


def _indexable(path: Path) -> bool:
    if path[:1] in (("tag",), ("hastag",)):
        return len(path) == 3 and path[1] in ("principal", "resource")
    if path[:1] == ("has",):
        return path[1:] in _INDEXABLE or path[1:] in _RECORDS
    return path in _INDEXABLE or path == SOURCE_IP


def value_getter(path: Path) -> Getter:
    """A function giving the value Cedar sees at ``path`` in a request (None where it has none)."""
    head, rest = path[0], path[1:]
    if head in ("tag", "hastag"):
        owner, name = rest
        field_name = "tags" if owner == "principal" else "labels"
        if head == "tag":
            return lambda r: (getattr(r, owner).get(field_name) or _EMPTY).get(name)
        return lambda r: True if name in (getattr(r, owner).get(field_name) or _EMPTY) else None
    if head == "has":
        inner = _lookup(rest)
        return lambda r: None if inner(r) is None else True
    if path == SOURCE_IP:
        return lambda r: r.source_address
    inner = _lookup(path)
    return lambda r: None if type(value := inner(r)) in _RECORD_TYPES else value


def _lookup(path: Path) -> Getter:
    if path == ("principal", "tenant"):
        return lambda r: r.tenant
    if path[0] == "principal":
        return lambda r: r.principal.get(path[1])
    if path == ("resource", "sensitivity"):
        return lambda r: r.resource["labels"].get("sensitivity", "normal") if r.resource["type"] == "Volume" else None
    if path == ("resource", "tenant"):
        return lambda r: r.tenant if r.resource["type"] == "Volume" else None
    names = path[1:]

    def walk(r: PolicyRequest) -> Any:
        value: Any = r.resource if path[0] == "resource" else r.context_values
        for name in names:
            value = value.get(name) if type(value) in _RECORD_TYPES else None
        return value

    return walk


def _holds(test: Test, value: Test | None) -> bool:
    if test[0] != "net":
        return value == test
    if value is None or value[0] not in ("IPv4Address", "IPv6Address"):
        return False
    version, network, mask = test[1]
    return bool(value[1].version == version and int(value[1]) & mask == network)


class PolicyIndex:
    """Selects, for a request, the positions of the policies whose indexed conditions all hold.

    ``select`` runs on every release, so it reads as few values as it can: one dictionary lookup per
    indexed path, one pass over the request's tags and labels for the ``hasTag`` buckets, then the
    remaining conditions of the few candidates only.
    """

    def __init__(self, conditions: Sequence[tuple[Condition, ...]]) -> None:
        distinct: dict[Path, set[Test]] = {}
        for policy in conditions:
            for path, test in policy:
                distinct.setdefault(path, set()).add(test)
        always, checked = [], []
        buckets: dict[Path, dict[Test, list[_Entry]]] = {}
        tagged: dict[str, dict[str, list[_Entry]]] = {"principal": {}, "resource": {}}
        for n, policy in enumerate(conditions):
            equalities = [c for c in policy if c[1][0] != "net"]
            if equalities:
                best = max(equalities, key=lambda c: len(distinct[c[0]]))
                entry = (n, tuple(c for c in policy if c != best))
                if best[0][0] == "hastag":
                    tagged[best[0][1]].setdefault(best[0][2], []).append(entry)
                else:
                    buckets.setdefault(best[0], {}).setdefault(best[1], []).append(entry)
            elif policy:
                checked.append((n, policy))
            else:
                always.append(n)
        self._always = tuple(always)
        self._checked = tuple(checked)
        self._getters = {path: value_getter(path) for path in distinct}
        self._buckets = [(self._getters[path], path, bucket) for path, bucket in buckets.items()]
        self._tagged = [
            (owner, "tags" if owner == "principal" else "labels", table) for owner, table in tagged.items() if table
        ]

    def select(self, request: PolicyRequest) -> tuple[int, ...]:
        chosen = list(self._always)
        values: dict[Path, Test | None] = {}  # typed values read so far
        for getter, path, bucket in self._buckets:
            found = getter(request)
            if found is not None:
                key = (type(found).__name__, found)
                entries = bucket.get(key)
                if entries:
                    values[path] = key
                    self._add(entries, chosen, values, request)
        for owner, field_name, table in self._tagged:
            tags = getattr(request, owner).get(field_name) or _EMPTY
            for name in tags if len(tags) <= len(table) else [name for name in table if name in tags]:
                entries = table.get(name)
                if entries:
                    self._add(entries, chosen, values, request)
        self._add(self._checked, chosen, values, request)
        return tuple(sorted(chosen))

    def _add(
        self, entries: Sequence[_Entry], chosen: list[int], values: dict[Path, Test | None], request: PolicyRequest
    ) -> None:
        getters = self._getters
        for n, others in entries:
            for path, test in others:
                if path not in values:
                    values[path] = typed(getters[path](request))
                if not _holds(test, values[path]):
                    break
            else:
                chosen.append(n)


_Entry = tuple[int, tuple[Condition, ...]]
