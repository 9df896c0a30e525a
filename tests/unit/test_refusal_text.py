"""What an unproven caller named, as the counted refusal record carries it (keysteward.audit.refusals)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keysteward.audit.refusals import MAX_SAMPLE, escaped

pytestmark = pytest.mark.unit


def test_control_characters_bidi_overrides_and_non_ascii_are_escaped() -> None:
    assert escaped('\u202e"}\n\x1b[31mok\u00e9\\') == '\\u202e"}\\n\\x1b[31mok\\xe9\\\\'
    assert escaped("a" * 1000) == "a" * MAX_SAMPLE
    assert escaped("\U0001f600" * 100, 15) == "\\U0001f600\\U000"  # cut, never longer than asked
    assert escaped("") == ""


@given(st.text(max_size=2000), st.integers(min_value=0, max_value=300))
def test_any_text_comes_out_printable_ascii_and_bounded(text: str, limit: int) -> None:
    out = escaped(text, limit)
    assert len(out) <= limit and out.isascii() and (out.isprintable() or out == "")
