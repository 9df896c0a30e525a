"""The NBD wire protocol (fixed newstyle handshake, transmission phase), as pure encode/decode functions.

Bytes in, frozen dataclasses out; no sockets. The server (:mod:`keysteward.proxy.server`) reads the
fixed-size parts of each message itself, asks this module how long the variable part is (checked against
a bound *before* anything is read or allocated), then hands the bytes back here to decode. A malformed
message raises :class:`NbdProtocolError` whose ``code`` says what was wrong; the server answers with the
protocol's error where the protocol has one, and drops the connection where it does not.

Reference: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md. Only what keysteward
serves is named here (no block status, no extended headers, no resize).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from keysteward.errors import BadRequest

# -- magic numbers and limits ----------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

MAX_STRING = 4096
"""NBD_MAX_STRING: the longest export name or description a peer has to accept."""
MAX_OPTION_LENGTH = 4 + MAX_STRING + 2 + 2 * 64
"""The longest option payload this server reads: a GO/INFO request with a maximal name and 64 info
requests. Longer options are answered NBD_REP_ERR_TOO_BIG and the connection is dropped (the data is
never read, so it costs no memory)."""

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# option reply types
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_PLATFORM = (1 << 31) + 4
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
REP_ERR_TOO_BIG = (1 << 31) + 9

# info types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8

# commands and command flags
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
COMMAND_NAMES = {
    CMD_READ: "read",
    CMD_WRITE: "write",
    CMD_DISC: "disc",
    CMD_FLUSH: "flush",
    CMD_TRIM: "trim",
    CMD_CACHE: "cache",
    CMD_WRITE_ZEROES: "write_zeroes",
    CMD_BLOCK_STATUS: "block_status",
}
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply chunk types and flags
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# error values (the protocol's, which happen to be Linux errno numbers)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

GREETING_SIZE = 18
CLIENT_FLAGS_SIZE = 4
OPTION_HEADER_SIZE = 16
OPTION_REPLY_HEADER_SIZE = 20
REQUEST_SIZE = 28
SIMPLE_REPLY_SIZE = 16
STRUCTURED_REPLY_HEADER_SIZE = 20
EXPORT_NAME_REPLY_SIZE = 10
EXPORT_NAME_ZEROES = 124

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_GREETING = struct.Struct(">QQH")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_STRUCTURED = struct.Struct(">IHHQI")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_OFFSET = struct.Struct(">Q")
_ERROR = struct.Struct(">IH")


class NbdProtocolError(BadRequest):
    """A message that does not follow the NBD protocol; ``code`` says how (never echoes payload bytes)."""

    code = "nbd_protocol"
    title = "NBD protocol error"


BAD_MAGIC = "nbd_bad_magic"
TRUNCATED = "nbd_truncated"
TOO_LONG = "nbd_too_long"
BAD_STRING = "nbd_bad_string"
BAD_FLAGS = "nbd_bad_flags"


def _need(data: bytes | bytearray | memoryview, size: int, what: str) -> None:
    if len(data) != size:
        raise NbdProtocolError(f"{what} must be {size} bytes, got {len(data)}", code=TRUNCATED)


def _name(raw: bytes | bytearray | memoryview, what: str) -> str:
    if len(raw) > MAX_STRING:
        raise NbdProtocolError(f"{what} of {len(raw)} bytes exceeds {MAX_STRING}", code=TOO_LONG)
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NbdProtocolError(f"{what} is not UTF-8", code=BAD_STRING) from exc


# -- handshake -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptionHeader:
    """An option's fixed part: which option and how many bytes of data follow."""

    option: int
    length: int


@dataclass(frozen=True)
class InfoRequest:
    """The data of NBD_OPT_INFO / NBD_OPT_GO: an export name and the information types asked for."""

    name: str
    info_types: tuple[int, ...]


def encode_greeting(flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> bytes:
    return _GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def decode_greeting(data: bytes | bytearray | memoryview) -> int:
    """The server's handshake flags; raises on a peer that is not a newstyle NBD server."""
    _need(data, GREETING_SIZE, "greeting")
    magic, opt_magic, flags = _GREETING.unpack(data)
    if magic != NBDMAGIC or opt_magic != IHAVEOPT:
        raise NbdProtocolError("not a newstyle NBD greeting", code=BAD_MAGIC)
    return int(flags)


def decode_client_flags(data: bytes | bytearray | memoryview) -> int:
    """The client's flags; a client that sets a flag the server did not offer is refused (spec: drop)."""
    _need(data, CLIENT_FLAGS_SIZE, "client flags")
    (flags,) = _U32.unpack(data)
    if flags & ~CLIENT_FLAGS_KNOWN:
        raise NbdProtocolError(f"unknown client flags {flags:#x}", code=BAD_FLAGS)
    return int(flags)


def encode_option(option: int, data: bytes = b"") -> bytes:
    return _OPTION.pack(IHAVEOPT, option, len(data)) + data


def decode_option_header(data: bytes | bytearray | memoryview) -> OptionHeader:
    """The option header; its length is checked against :data:`MAX_OPTION_LENGTH` by the caller
    (which must answer NBD_REP_ERR_TOO_BIG), since the option itself is still valid."""
    _need(data, OPTION_HEADER_SIZE, "option header")
    magic, option, length = _OPTION.unpack(data)
    if magic != IHAVEOPT:
        raise NbdProtocolError("option without IHAVEOPT magic", code=BAD_MAGIC)
    return OptionHeader(int(option), int(length))


def encode_info_request(name: str, info_types: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return _U32.pack(len(raw)) + raw + _U16.pack(len(info_types)) + b"".join(_U16.pack(t) for t in info_types)


def decode_info_request(data: bytes | bytearray | memoryview) -> InfoRequest:
    """Decode the data of NBD_OPT_INFO / NBD_OPT_GO; every length is checked against what is there."""
    if len(data) > MAX_OPTION_LENGTH:
        raise NbdProtocolError(f"option data of {len(data)} bytes", code=TOO_LONG)
    if len(data) < 6:
        raise NbdProtocolError("INFO/GO data shorter than 6 bytes", code=TRUNCATED)
    view = memoryview(data)
    (name_len,) = _U32.unpack_from(view, 0)
    if name_len > MAX_STRING:
        raise NbdProtocolError(f"export name of {name_len} bytes exceeds {MAX_STRING}", code=TOO_LONG)
    if 4 + name_len + 2 > len(view):
        raise NbdProtocolError("export name runs past the option data", code=TRUNCATED)
    name = _name(view[4 : 4 + name_len], "export name")
    (count,) = _U16.unpack_from(view, 4 + name_len)
    rest = view[4 + name_len + 2 :]
    if len(rest) != 2 * count:
        raise NbdProtocolError(f"{count} info requests need {2 * count} bytes, got {len(rest)}", code=TRUNCATED)
    types = tuple(int(_U16.unpack_from(rest, 2 * i)[0]) for i in range(count))
    return InfoRequest(name, types)


def decode_export_name(data: bytes | bytearray | memoryview) -> str:
    """The data of NBD_OPT_EXPORT_NAME: the name, unframed."""
    return _name(data, "export name")


@dataclass(frozen=True)
class OptionReply:
    """One reply to an option (decoded by clients and tests; the server only encodes)."""

    option: int
    reply: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.reply & (1 << 31))


def encode_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def decode_option_reply_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """``(option, reply type, data length)`` of an option reply header."""
    _need(data, OPTION_REPLY_HEADER_SIZE, "option reply header")
    magic, option, reply, length = _OPTION_REPLY.unpack(data)
    if magic != OPTION_REPLY_MAGIC:
        raise NbdProtocolError("option reply without its magic", code=BAD_MAGIC)
    if length > MAX_OPTION_LENGTH:
        raise NbdProtocolError(f"option reply of {length} bytes", code=TOO_LONG)
    return int(option), int(reply), int(length)


def encode_server_entry(name: str, description: str = "") -> bytes:
    """The data of one NBD_REP_SERVER (answer to NBD_OPT_LIST)."""
    raw = name.encode()
    return _U32.pack(len(raw)) + raw + description.encode()


def decode_server_entry(data: bytes | bytearray | memoryview) -> tuple[str, str]:
    if len(data) < 4:
        raise NbdProtocolError("NBD_REP_SERVER shorter than 4 bytes", code=TRUNCATED)
    (length,) = _U32.unpack_from(data, 0)
    if length > len(data) - 4:
        raise NbdProtocolError("export name runs past NBD_REP_SERVER", code=TRUNCATED)
    return _name(memoryview(data)[4 : 4 + length], "export name"), _name(memoryview(data)[4 + length :], "description")


def encode_info_export(size: int, flags: int) -> bytes:
    return _INFO_EXPORT.pack(INFO_EXPORT, size, flags)


def encode_info_name(name: str) -> bytes:
    return _U16.pack(INFO_NAME) + name.encode()


def encode_info_description(description: str) -> bytes:
    return _U16.pack(INFO_DESCRIPTION) + description.encode()


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return _INFO_BLOCK_SIZE.pack(INFO_BLOCK_SIZE, minimum, preferred, maximum)


@dataclass(frozen=True)
class ExportInfo:
    """What NBD_INFO_EXPORT tells a client: the size and the transmission flags."""

    size: int
    flags: int


def decode_info(data: bytes | bytearray | memoryview) -> tuple[int, object]:
    """``(info type, value)`` of an NBD_REP_INFO: ExportInfo, a name, a description, or (min, pref, max)."""
    if len(data) < 2:
        raise NbdProtocolError("NBD_REP_INFO shorter than 2 bytes", code=TRUNCATED)
    (kind,) = _U16.unpack_from(data, 0)
    if kind == INFO_EXPORT:
        _need(data, _INFO_EXPORT.size, "NBD_INFO_EXPORT")
        _, size, flags = _INFO_EXPORT.unpack(data)
        return INFO_EXPORT, ExportInfo(int(size), int(flags))
    if kind == INFO_BLOCK_SIZE:
        _need(data, _INFO_BLOCK_SIZE.size, "NBD_INFO_BLOCK_SIZE")
        _, lo, pref, hi = _INFO_BLOCK_SIZE.unpack(data)
        return INFO_BLOCK_SIZE, (int(lo), int(pref), int(hi))
    if kind in (INFO_NAME, INFO_DESCRIPTION):
        return int(kind), _name(memoryview(data)[2:], "info string")
    return int(kind), bytes(data[2:])


def encode_export_name_reply(size: int, flags: int, *, no_zeroes: bool) -> bytes:
    """The answer to NBD_OPT_EXPORT_NAME (there is no option reply header)."""
    return _EXPORT_NAME_REPLY.pack(size, flags) + (b"" if no_zeroes else bytes(EXPORT_NAME_ZEROES))


# -- transmission ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One command. ``length`` is not bounded here: the server checks it against the export's limits
    before it reads a write's payload."""

    flags: int
    command: int
    handle: int
    offset: int
    length: int

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.command, f"cmd{self.command}")


def encode_request(command: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return _REQUEST.pack(REQUEST_MAGIC, flags, command, handle, offset, length)


def decode_request(data: bytes | bytearray | memoryview) -> Request:
    _need(data, REQUEST_SIZE, "request")
    magic, flags, command, handle, offset, length = _REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise NbdProtocolError("request without NBD_REQUEST_MAGIC", code=BAD_MAGIC)
    return Request(int(flags), int(command), int(handle), int(offset), int(length))


def encode_simple_reply(handle: int, error: int = 0) -> bytes:
    """A simple reply header (a successful read's data follows it)."""
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def encode_structured_header(handle: int, reply_type: int, length: int, *, done: bool) -> bytes:
    return _STRUCTURED.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, reply_type, handle, length)


def encode_offset_data_header(handle: int, offset: int, data_length: int, *, done: bool = True) -> bytes:
    """NBD_REPLY_TYPE_OFFSET_DATA's header and offset; ``data_length`` bytes of data follow."""
    return encode_structured_header(handle, REPLY_TYPE_OFFSET_DATA, 8 + data_length, done=done) + _OFFSET.pack(offset)


def encode_structured_none(handle: int) -> bytes:
    return encode_structured_header(handle, REPLY_TYPE_NONE, 0, done=True)


def encode_structured_error(handle: int, error: int, message: str = "") -> bytes:
    """A final NBD_REPLY_TYPE_ERROR chunk; the message is cut to :data:`MAX_STRING` bytes."""
    raw = message.encode()[:MAX_STRING]
    body = _ERROR.pack(error, len(raw)) + raw
    return encode_structured_header(handle, REPLY_TYPE_ERROR, len(body), done=True) + body


@dataclass(frozen=True)
class ReplyHeader:
    """A simple reply (``structured`` false: ``error`` set, ``length`` 0) or a structured chunk header."""

    structured: bool
    handle: int
    error: int = 0
    flags: int = 0
    reply_type: int = 0
    length: int = 0


def decode_simple_reply(data: bytes | bytearray | memoryview) -> ReplyHeader:
    _need(data, SIMPLE_REPLY_SIZE, "simple reply")
    magic, error, handle = _SIMPLE_REPLY.unpack(data)
    if magic != SIMPLE_REPLY_MAGIC:
        raise NbdProtocolError("simple reply without its magic", code=BAD_MAGIC)
    return ReplyHeader(False, int(handle), error=int(error))


def decode_structured_header(data: bytes | bytearray | memoryview, max_length: int) -> ReplyHeader:
    """A structured chunk header whose payload length must not exceed ``max_length``."""
    _need(data, STRUCTURED_REPLY_HEADER_SIZE, "structured reply header")
    magic, flags, reply_type, handle, length = _STRUCTURED.unpack(data)
    if magic != STRUCTURED_REPLY_MAGIC:
        raise NbdProtocolError("structured reply without its magic", code=BAD_MAGIC)
    if length > max_length:
        raise NbdProtocolError(f"structured chunk of {length} bytes exceeds {max_length}", code=TOO_LONG)
    return ReplyHeader(True, int(handle), flags=int(flags), reply_type=int(reply_type), length=int(length))


def decode_structured_error(data: bytes | bytearray | memoryview) -> tuple[int, str]:
    """``(error, message)`` of an NBD_REPLY_TYPE_ERROR chunk's payload."""
    if len(data) < _ERROR.size:
        raise NbdProtocolError("error chunk shorter than 6 bytes", code=TRUNCATED)
    error, length = _ERROR.unpack_from(data, 0)
    if length > len(data) - _ERROR.size:
        raise NbdProtocolError("error message runs past its chunk", code=TRUNCATED)
    return int(error), _name(memoryview(data)[_ERROR.size : _ERROR.size + length], "error message")


def decode_offset(data: bytes | bytearray | memoryview) -> int:
    if len(data) < 8:
        raise NbdProtocolError("offset chunk shorter than 8 bytes", code=TRUNCATED)
    return int(_OFFSET.unpack_from(data, 0)[0])
