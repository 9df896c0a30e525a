"""The NBD codec against the protocol's byte layouts, and every malformed input it must refuse."""

from __future__ import annotations

import struct

import pytest

from keysteward.errors import KeystewardError
from keysteward.formats import nbd

pytestmark = pytest.mark.unit


def test_greeting_is_the_fixed_newstyle_layout() -> None:
    data = nbd.encode_greeting()
    assert data == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert nbd.decode_greeting(data) == nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES


@pytest.mark.parametrize("data", [b"NBDMAGIC" + b"\x00\x00\x42\x02\x81\x86\x12\x53" + b"\x00\x03", b"X" * 18])
def test_greeting_with_oldstyle_or_garbage_magic_is_refused(data: bytes) -> None:
    with pytest.raises(nbd.NbdProtocolError) as caught:
        nbd.decode_greeting(data)
    assert caught.value.code == nbd.BAD_MAGIC


def test_client_flags() -> None:
    assert nbd.decode_client_flags(b"\x00\x00\x00\x03") == 3
    with pytest.raises(nbd.NbdProtocolError) as caught:
        nbd.decode_client_flags(b"\x00\x00\x00\x04")  # a flag the server never offered: the spec says drop
    assert caught.value.code == nbd.BAD_FLAGS
    with pytest.raises(nbd.NbdProtocolError) as caught:
        nbd.decode_client_flags(b"\x00\x00\x03")
    assert caught.value.code == nbd.TRUNCATED


def test_option_header_roundtrip_and_bad_magic() -> None:
    raw = nbd.encode_option(nbd.OPT_GO, b"abc")
    assert raw[:8] == b"IHAVEOPT" and raw[8:16] == b"\x00\x00\x00\x07\x00\x00\x00\x03" and raw[16:] == b"abc"
    assert nbd.decode_option_header(raw[:16]) == nbd.OptionHeader(nbd.OPT_GO, 3)
    with pytest.raises(nbd.NbdProtocolError) as caught:
        nbd.decode_option_header(b"IHAVEOPX" + raw[8:16])
    assert caught.value.code == nbd.BAD_MAGIC
    with pytest.raises(nbd.NbdProtocolError):
        nbd.decode_option_header(raw[:15])


def test_option_header_reports_an_oversized_length_for_the_server_to_refuse() -> None:
    header = nbd.decode_option_header(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, 0xFFFFFFFF))
    assert header.length == 0xFFFFFFFF > nbd.MAX_OPTION_LENGTH


def test_info_request_roundtrip() -> None:
    raw = nbd.encode_info_request("vol-é", (nbd.INFO_NAME, nbd.INFO_BLOCK_SIZE))
    assert raw == b"\x00\x00\x00\x06vol-\xc3\xa9\x00\x02\x00\x01\x00\x03"
    assert nbd.decode_info_request(raw) == nbd.InfoRequest("vol-é", (1, 3))
    assert nbd.decode_info_request(nbd.encode_info_request("")) == nbd.InfoRequest("", ())


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", nbd.TRUNCATED),
        (b"\x00\x00\x00\x05abc", nbd.TRUNCATED),  # name length past the data
        (b"\x00\x00\x00\x03abc\x00", nbd.TRUNCATED),  # no room for the count
        (b"\x00\x00\x00\x03abc\x00\x02\x00\x01", nbd.TRUNCATED),  # 2 info requests, 1 present
        (b"\x00\x00\x00\x03abc\x00\x00\x00\x01", nbd.TRUNCATED),  # trailing bytes
        (b"\x00\x00\x00\x02\xff\xfe\x00\x00", nbd.BAD_STRING),
        (b"\xff\xff\xff\xff" + b"a" * 8, nbd.TOO_LONG),  # a 4 GiB name is refused before any slicing
        (struct.pack(">I", 4097) + b"a" * 4097 + b"\x00\x00", nbd.TOO_LONG),
        (b"\x00" * (nbd.MAX_OPTION_LENGTH + 1), nbd.TOO_LONG),
    ],
)
def test_bad_info_requests(data: bytes, code: str) -> None:
    with pytest.raises(nbd.NbdProtocolError) as caught:
        nbd.decode_info_request(data)
    assert caught.value.code == code
    assert isinstance(caught.value, KeystewardError) and caught.value.status == 400


def test_longest_name_is_accepted() -> None:
    name = "n" * nbd.MAX_STRING
    assert nbd.decode_info_request(nbd.encode_info_request(name)).name == name
    assert nbd.decode_export_name(name.encode()) == name
    with pytest.raises(nbd.NbdProtocolError):
        nbd.decode_export_name(b"n" * (nbd.MAX_STRING + 1))


def test_option_replies() -> None:
    raw = nbd.encode_option_reply(nbd.OPT_GO, nbd.REP_ERR_UNKNOWN, b"no")
    assert raw[:8] == bytes.fromhex("0003e889045565a9")
    assert nbd.decode_option_reply_header(raw[:20]) == (nbd.OPT_GO, nbd.REP_ERR_UNKNOWN, 2)
    assert nbd.OptionReply(7, nbd.REP_ERR_UNKNOWN, b"").is_error and not nbd.OptionReply(7, nbd.REP_ACK, b"").is_error
    with pytest.raises(nbd.NbdProtocolError) as caught:
        nbd.decode_option_reply_header(raw[:8] + raw[8:16] + b"\x10\x00\x00\x00")
    assert caught.value.code == nbd.TOO_LONG
    with pytest.raises(nbd.NbdProtocolError):
        nbd.decode_option_reply_header(b"\x00" * 20)


def test_infos() -> None:
    assert nbd.decode_info(nbd.encode_info_export(1 << 40, 0x16D)) == (nbd.INFO_EXPORT, nbd.ExportInfo(1 << 40, 0x16D))
    assert nbd.decode_info(nbd.encode_info_block_size(512, 4096, 1 << 25)) == (
        nbd.INFO_BLOCK_SIZE,
        (512, 4096, 1 << 25),
    )
    assert nbd.decode_info(nbd.encode_info_name("v")) == (nbd.INFO_NAME, "v")
    assert nbd.decode_info(nbd.encode_info_description("d")) == (nbd.INFO_DESCRIPTION, "d")
    with pytest.raises(nbd.NbdProtocolError):
        nbd.decode_info(nbd.encode_info_export(1, 1)[:-1])
    with pytest.raises(nbd.NbdProtocolError):
        nbd.decode_info(b"\x00")


def test_server_entry() -> None:
    assert nbd.decode_server_entry(nbd.encode_server_entry("vol", "disk")) == ("vol", "disk")
    with pytest.raises(nbd.NbdProtocolError):
        nbd.decode_server_entry(b"\x00\x00\x00\x09vol")


def test_export_name_reply_has_zeroes_unless_refused() -> None:
    assert nbd.encode_export_name_reply(4096, 3, no_zeroes=True) == b"\x00" * 6 + b"\x10\x00\x00\x03"
    assert len(nbd.encode_export_name_reply(4096, 3, no_zeroes=False)) == 10 + 124


def test_request_layout_and_refusals() -> None:
    raw = nbd.encode_request(nbd.CMD_WRITE, 0x1122334455667788, 4096, 512, nbd.CMD_FLAG_FUA)
    assert raw == bytes.fromhex("25609513000100011122334455667788000000000000100000000200")
    request = nbd.decode_request(raw)
    assert request == nbd.Request(nbd.CMD_FLAG_FUA, nbd.CMD_WRITE, 0x1122334455667788, 4096, 512)
    assert request.name == "write" and nbd.Request(0, 99, 0, 0, 0).name == "cmd99"
    with pytest.raises(nbd.NbdProtocolError) as caught:
        nbd.decode_request(b"\x25\x60\x95\x14" + raw[4:])
    assert caught.value.code == nbd.BAD_MAGIC
    with pytest.raises(nbd.NbdProtocolError) as caught:
        nbd.decode_request(raw[:27])
    assert caught.value.code == nbd.TRUNCATED
    with pytest.raises(nbd.NbdProtocolError):
        nbd.decode_request(raw + b"\x00")


def test_simple_and_structured_replies() -> None:
    simple = nbd.encode_simple_reply(7, nbd.EPERM)
    assert simple == bytes.fromhex("67446698000000010000000000000007")
    assert nbd.decode_simple_reply(simple) == nbd.ReplyHeader(False, 7, error=nbd.EPERM)
    head = nbd.encode_offset_data_header(9, 8192, 4096)
    assert len(head) == 28
    decoded = nbd.decode_structured_header(head[:20], 8 + 4096)
    assert (decoded.handle, decoded.reply_type, decoded.length, decoded.flags) == (9, 1, 8 + 4096, 1)
    assert nbd.decode_offset(head[20:]) == 8192
    with pytest.raises(nbd.NbdProtocolError) as caught:
        nbd.decode_structured_header(head[:20], 4096)  # the client's bound: a chunk larger than asked for
    assert caught.value.code == nbd.TOO_LONG
    none = nbd.encode_structured_none(3)
    assert nbd.decode_structured_header(none, 0) == nbd.ReplyHeader(True, 3, flags=1, reply_type=0, length=0)
    with pytest.raises(nbd.NbdProtocolError):
        nbd.decode_simple_reply(none[:16])


def test_structured_error_cuts_long_messages() -> None:
    raw = nbd.encode_structured_error(5, nbd.EIO, "x" * 10_000)
    head = nbd.decode_structured_header(raw[:20], 1 << 20)
    assert head.reply_type == nbd.REPLY_TYPE_ERROR and head.length == 6 + nbd.MAX_STRING
    assert nbd.decode_structured_error(raw[20:]) == (nbd.EIO, "x" * nbd.MAX_STRING)
    with pytest.raises(nbd.NbdProtocolError):
        nbd.decode_structured_error(raw[20:30])
    with pytest.raises(nbd.NbdProtocolError):
        nbd.decode_structured_error(b"\x00\x00")
