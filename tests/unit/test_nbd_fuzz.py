"""Bounded fuzzing of the NBD codec: any bytes either decode or raise NbdProtocolError, nothing else; what
the codec encodes, it decodes back."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keysteward.formats import nbd

pytestmark = pytest.mark.unit

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DECODERS: dict[str, Callable[[bytes], object]] = {
    "greeting": nbd.decode_greeting,
    "client_flags": nbd.decode_client_flags,
    "option_header": nbd.decode_option_header,
    "info_request": nbd.decode_info_request,
    "export_name": nbd.decode_export_name,
    "option_reply_header": nbd.decode_option_reply_header,
    "server_entry": nbd.decode_server_entry,
    "info": nbd.decode_info,
    "request": nbd.decode_request,
    "simple_reply": nbd.decode_simple_reply,
    "structured_header": lambda b: nbd.decode_structured_header(b, 1 << 20),
    "structured_error": nbd.decode_structured_error,
    "offset": nbd.decode_offset,
}

VALID = [
    nbd.encode_greeting(),
    nbd.encode_option(nbd.OPT_GO)[:16],
    nbd.encode_info_request("vol", (1, 2, 3)),
    nbd.encode_option_reply(7, 3, b"")[:20],
    nbd.encode_server_entry("vol", "d"),
    nbd.encode_info_block_size(512, 4096, 1 << 25),
    nbd.encode_request(0, 1, 0, 4096),
    nbd.encode_simple_reply(1),
    nbd.encode_offset_data_header(1, 0, 10)[:20],
    nbd.encode_structured_error(1, 5, "m")[20:],
]


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        if buf:
            buf[pos % len(buf)] = value
    return bytes(buf[: max(0, len(buf) - cut)])


@pytest.mark.parametrize("name", sorted(DECODERS))
@FUZZ
@given(data=st.binary(max_size=64))
def test_random_bytes_decode_or_raise_protocol_errors(name: str, data: bytes) -> None:
    try:
        DECODERS[name](data)
    except nbd.NbdProtocolError:
        pass


@FUZZ
@given(
    which=st.integers(0, len(VALID) - 1),
    edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 4),
)
def test_damaged_valid_messages_decode_or_raise_protocol_errors(
    which: int, edits: list[tuple[int, int]], cut: int
) -> None:
    damaged = _mutate(VALID[which], edits, cut)
    for decode in DECODERS.values():
        try:
            decode(damaged)
        except nbd.NbdProtocolError:
            pass


@FUZZ
@given(name=st.text(max_size=64), types=st.lists(st.integers(0, 0xFFFF), max_size=64))
def test_info_request_roundtrip(name: str, types: list[int]) -> None:
    assert nbd.decode_info_request(nbd.encode_info_request(name, tuple(types))) == nbd.InfoRequest(name, tuple(types))


@FUZZ
@given(
    command=st.integers(0, 0xFFFF),
    flags=st.integers(0, 0xFFFF),
    handle=st.integers(0, (1 << 64) - 1),
    offset=st.integers(0, (1 << 64) - 1),
    length=st.integers(0, (1 << 32) - 1),
)
def test_request_roundtrip(command: int, flags: int, handle: int, offset: int, length: int) -> None:
    raw = nbd.encode_request(command, handle, offset, length, flags)
    assert nbd.decode_request(raw) == nbd.Request(flags, command, handle, offset, length)
