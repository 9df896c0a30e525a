"""Bounded fuzzing of the policy engine's two inputs: policy text and request facts.

Whatever the text, compile() either succeeds or raises PolicyInvalid whose every problem is placed at a
real line and column of a real file; whatever the JSON, from_json() either gives a request that
round-trips and can be decided, or raises PolicyRequestInvalid. Nothing else escapes (no ValueError from
Cedar, no KeyError or TypeError from the facts model).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keysteward.policy.engine import CompiledPolicySet
from keysteward.policy.errors import PolicyInvalid, PolicyRequestInvalid
from keysteward.policy.facts import PolicyRequest

pytestmark = pytest.mark.unit

FUZZ = settings(max_examples=200, deadline=None)
EXAMPLES = {p.name: p.read_text() for p in (Path(__file__).resolve().parents[2] / "docs" / "policies").glob("*.cedar")}
ALL_EXAMPLES = CompiledPolicySet.compile(EXAMPLES)
PLACE = re.compile(r"(?P<file>[^:]+):(?P<line>\d+):(?P<column>\d+): \S")
TOKENS = [
    "permit", "forbid", "(", ")", "principal", "action", "resource", "context", ",", ";", "when", "unless",
    "{", "}", "==", "!=", "&&", "||", "!", ".", "has", "in", "is", "like", "if", "then", "else", "true", "1",
    '"x"', "[", "]", "@id", '("a")', "Keysteward::Action::\"release\"", "Keysteward::Instance", "account",
    "platform", "tee", "getTag", "hasTag", "<", ">=", "+", "-", "*", "::", "?principal", "@", "//", "\n",
]  # fmt: skip


def check_outcome(sources: dict[str, str]) -> None:
    try:
        compiled = CompiledPolicySet.compile(sources)
    except PolicyInvalid as error:
        assert error.problems and error.code in ("policy_invalid", "policy_too_large")
        for problem in error.problems:
            place = PLACE.match(problem)
            if place is None:  # a set-level problem (sizes, names) names no line
                continue
            text = sources[place["file"]]
            lines = text.split("\n")
            line, column = int(place["line"]), int(place["column"])
            assert 1 <= line <= len(lines), problem
            assert 1 <= column <= len(lines[line - 1]) + 1, problem
    else:
        assert len(compiled.ids) == len(set(compiled.ids))


@FUZZ
@given(st.text(alphabet=st.sampled_from("permitforbid(),;{}=!&|.@\"'\\ \n:?<>0123456789_xyzKA"), max_size=300))
def test_compile_arbitrary_text(text: str) -> None:
    check_outcome({"f.cedar": text})


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=80))
def test_compile_token_soup(tokens: list[str]) -> None:
    check_outcome({"soup.cedar": " ".join(tokens)})


@FUZZ
@given(
    st.sampled_from(sorted(EXAMPLES)),
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10_000), st.sampled_from(TOKENS)), min_size=1, max_size=4),
)
def test_compile_damaged_examples(name: str, edits: list[tuple[int, int, str]]) -> None:
    text = EXAMPLES[name]
    for kind, position, token in edits:
        at = position % (len(text) + 1)
        if kind == 0:
            text = text[:at] + token + text[at:]  # insert
        elif kind == 1:
            text = text[:at] + text[at + len(token) :]  # delete
        elif kind == 2:
            text = text[:at] + token + text[at + len(token) :]  # replace
        else:
            text = text[:at]  # truncate
    check_outcome({name: text, "other.cedar": EXAMPLES["allowlist.cedar"].replace("allowlist-prod-images", "x")})


VALID = PolicyRequest.from_json(
    {
        "tenant": "acme",
        "action": "release",
        "principal": {"type": "Instance", "provider": "aws", "account": "111122223333", "instance_id": "i-1",
                      "image_id": "ami-0a1b2c3d4e5f60718", "tags": {"env": "prod"}},
        "resource": {"id": "vol-1", "name": "db", "key": "k1", "labels": {"pci": "", "sensitivity": "confidential"}},
        "identity": {"provider": "aws", "kind": "aws-iid", "account": "111122223333", "instance_id": "i-1"},
        "platform": {"tee": "sev-snp", "debug": False, "measurement": "aa" * 48, "vmpl": 0,
                     "tcb": {"bootloader": 1, "tee": 2, "snp": 3, "microcode": 4}, "pcrs": {"sha256_7": "bb" * 32}},
        "time": "2026-11-23T10:00:00Z",
        "source_ip": "203.0.113.9",
    }
).to_json()  # fmt: skip
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def accept_or_refuse(data: Any) -> None:
    try:
        request = PolicyRequest.from_json(data)
    except PolicyRequestInvalid as error:
        assert error.code == "bad_policy_request" and error.message
        return
    again = json.loads(json.dumps(request.to_json()))
    assert PolicyRequest.from_json(again) == request
    assert ALL_EXAMPLES.evaluate(request).effect in ("permit", "deny", "approval")


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    return out


PATHS = _paths(VALID)[1:]


@FUZZ
@given(json_values)
def test_from_json_arbitrary(data: Any) -> None:
    accept_or_refuse(data)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(PATHS), json_values, st.booleans()), min_size=1, max_size=3))
def test_from_json_damaged_request(edits: list[tuple[tuple[Any, ...], Any, bool]]) -> None:
    data = json.loads(json.dumps(VALID))
    for path, value, delete in edits:
        target = data
        for name in path[:-1]:
            if not isinstance(target, dict) or name not in target:
                break
            target = target[name]
        else:
            if isinstance(target, dict):
                if delete:
                    target.pop(path[-1], None)
                else:
                    target[path[-1]] = value
    accept_or_refuse(data)
