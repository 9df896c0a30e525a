"""What an audit record's details may hold (keysteward.audit.log._check_details): named scalars, lists of
them and one level of named scalars; bytes, nesting and any other object are refused, however they hide."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keysteward.audit.log import _check_details

pytestmark = pytest.mark.unit


class Label(str):
    """A str subclass: still a string (accepted), not the exact built-in type."""


@pytest.mark.parametrize(
    "details",
    [
        {},
        {"a": "x", "b": 1, "c": 2.5, "d": True, "e": None},
        {"policies": ["p1", "p2"], "claims": {"sub": "host-1", "n": 3}},
        {Label("name"): Label("value"), "t": ("a", 1)},
    ],
)
def test_plain_metadata_is_accepted(details: dict[Any, Any]) -> None:
    _check_details(details)


@pytest.mark.parametrize(
    "details",
    [
        {"key": b"\x00" * 32},
        {"key": bytearray(16)},
        {"key": memoryview(b"x")},
        {"ok": "x", "list": ["a", b"b"]},
        {"nested": {"deeper": {"key": "x"}}},
        {"map": {"k": b"v"}},
        {"map": {1: "v"}},
        {1: "x"},
        {"obj": object()},
        {"set": {"a"}},
    ],
)
def test_anything_that_could_carry_a_secret_is_refused(details: dict[Any, Any]) -> None:
    with pytest.raises(TypeError, match="audit detail"):
        _check_details(details)


scalars = st.one_of(st.text(max_size=8), st.integers(), st.floats(allow_nan=False), st.booleans(), st.none())
values = st.one_of(
    scalars, st.binary(max_size=8), st.lists(st.one_of(scalars, st.binary(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.one_of(scalars, st.binary(max_size=4)), max_size=3),
)  # fmt: skip


def _allowed(value: Any) -> bool:
    plain = (str, int, float, bool, type(None))
    if isinstance(value, dict):
        return all(isinstance(k, str) and isinstance(v, plain) for k, v in value.items())
    items = value if isinstance(value, list) else [value]
    return all(isinstance(v, plain) for v in items)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=6), values, max_size=5))
def test_the_check_agrees_with_the_rule(details: dict[str, Any]) -> None:
    if all(_allowed(v) for v in details.values()):
        _check_details(details)
    else:
        with pytest.raises(TypeError):
            _check_details(details)
