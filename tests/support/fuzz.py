"""Byte-level damage for the bounded fuzz tests of the parsers: flips, inserts, deletes, truncation."""

from __future__ import annotations

from hypothesis import strategies as st


def edits(max_position: int = 1 << 16, max_size: int = 6) -> st.SearchStrategy[list[tuple[int, int, int]]]:
    """Lists of ``(kind, position, byte)`` edits for :func:`mutate`."""
    edit = st.tuples(st.integers(0, 3), st.integers(0, max_position), st.integers(0, 255))
    return st.lists(edit, min_size=1, max_size=max_size)


def mutate(data: bytes, changes: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, byte) edits: 0 flips, 1 inserts, 2 deletes, 3 truncates."""
    out = bytearray(data)
    for kind, pos, value in changes:
        if not out:
            break
        pos %= len(out)
        if kind == 0:
            out[pos] ^= value or 1
        elif kind == 1:
            out.insert(pos, value)
        elif kind == 2:
            del out[pos]
        else:
            del out[pos:]
    return bytes(out)
