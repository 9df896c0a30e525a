"""Bounded fuzzing of the LUKS2 codec: any damage either parses or raises LuksFormatError, nothing else.

Mutations that only break checksums are caught early, so most strategies here re-wrap the damaged
JSON or binary fields in header copies with valid checksums to reach the parsers and validators
behind them. Whatever parses is then re-encoded, re-serialized and unlocked (with a bounded KDF cost).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keysteward.formats import luks
from keysteward.formats.luks.errors import LuksFormatError

pytestmark = pytest.mark.unit

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MIB = 1024 * 1024
DATA_OFFSET = MIB
DEVICE = DATA_OFFSET + 64 * 1024
HDR = 16384
AREA = HDR - 4096


class Base:
    def __init__(self) -> None:
        rng = random.Random(21).randbytes
        self.key = rng(32)
        formatted = luks.format_luks2(
            self.key, b"pass", device_size=DEVICE, data_offset=DATA_OFFSET, rng=rng,
            kdf_params=luks.Pbkdf2Params("sha256", 1000, rng(32)),
        )  # fmt: skip
        image = bytearray(DEVICE)
        for write in formatted.writes:
            image[write.offset : write.end] = write.data
        self.image = bytes(image)
        self.header = formatted.header
        self.text = luks.encode_metadata(formatted.header.metadata)
        self.obj: dict[str, Any] = json.loads(self.text)

    def wrap(self, area: bytes, seqid: int = 1) -> bytes:
        """Both header copies around ``area`` with valid checksums, then the rest of the device."""
        area = area[:AREA] + bytes(max(0, AREA - len(area)))
        salt = bytes(64)
        head = luks.pack_copy(self.header, area, seqid=seqid, secondary=False, salt=salt)
        head += luks.pack_copy(self.header, area, seqid=seqid, secondary=True, salt=salt)
        return head + self.image[2 * HDR :]


@pytest.fixture(scope="module")
def base() -> Base:
    return Base()


def _affordable(meta: luks.Luks2Metadata) -> bool:
    for keyslot in meta.keyslots.values():
        kdf = keyslot.kdf
        if isinstance(kdf, luks.Pbkdf2Params) and kdf.iterations > 20_000:
            return False
        if isinstance(kdf, luks.Argon2Params) and (kdf.time > 4 or kdf.memory_kib > 65536 or kdf.cpus > 4):
            return False
    return all(d.iterations <= 20_000 for d in meta.digests.values())


def _exercise(image: bytes, device_size: int = DEVICE) -> luks.Luks2Header | None:
    """Read; if it parses, encode, serialize and unlock too. Only LUKS errors may come out."""
    try:
        header = luks.read_luks2(image[: min(len(image), luks.MAX_SPAN)], device_size=device_size)
    except LuksFormatError as exc:
        assert exc.code.startswith(("bad_luks_header", "luks_")) and exc.status == 400
        assert "\n" not in exc.message
        return None
    try:
        luks.serialize_luks2(header)
        luks.encode_metadata(header.metadata)
        if _affordable(header.metadata):
            luks.unlock(header.metadata, lambda o, n: image[o : o + n], b"pass", max_memory_kib=65536)
    except (LuksFormatError, luks.LuksWrongPassphrase):
        pass
    return header


def test_base_parses(base: Base) -> None:
    header = _exercise(base.wrap(luks.encode_json_area(base.header.metadata)))
    assert header is not None and header.metadata == base.header.metadata


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 2 * HDR - 1), st.integers(1, 255)), min_size=1, max_size=8))
def test_fuzz_byte_flips(base: Base, flips: list[tuple[int, int]]) -> None:
    image = bytearray(base.image)
    for offset, mask in flips:
        image[offset] ^= mask
    _exercise(bytes(image))


_edits = st.lists(
    st.tuples(
        st.sampled_from(["replace", "insert", "delete", "truncate"]),
        st.integers(0, 2000),
        st.integers(0, 40),
        st.binary(min_size=1, max_size=40),
    ),
    min_size=1,
    max_size=4,
)


@FUZZ
@given(edits=_edits)
def test_fuzz_json_text_edits_with_valid_checksums(base: Base, edits: list[tuple[str, int, int, bytes]]) -> None:
    text = bytearray(base.text)
    for op, position, length, data in edits:
        position %= max(1, len(text))
        if op == "replace":
            text[position : position + len(data)] = data
        elif op == "insert":
            text[position:position] = data
        elif op == "delete":
            del text[position : position + length]
        else:
            del text[position:]
    _exercise(base.wrap(bytes(text)))


_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["0", "512", "4096", "32768", "dynamic", "-1", str(2**64), "crypt", "luks2", "raw", "luks1"])
    | st.sampled_from(["pbkdf2", "argon2i", "argon2id", "sha256", "sha1", "aes-xts-plain64", "reencrypt", "linear"])
    | st.text(max_size=12)
)
_json = st.recursive(
    _leaves, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out += _paths(item, (*prefix, index))
    return out


@FUZZ
@given(data=st.data())
def test_fuzz_json_tree_mutations(base: Base, data: st.DataObject) -> None:
    obj = copy.deepcopy(base.obj)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(obj)[1:]
        path = data.draw(st.sampled_from(paths))
        parent: Any = obj
        for part in path[:-1]:
            parent = parent[part]
        op = data.draw(st.sampled_from(["set", "delete", "duplicate", "number"]))
        if op == "delete":
            del parent[path[-1]]
        elif op == "duplicate" and isinstance(parent, dict):
            parent[data.draw(st.sampled_from(["1", "2", "31", "x"]))] = copy.deepcopy(parent[path[-1]])
        elif op == "number":
            parent[path[-1]] = data.draw(
                st.sampled_from([str(n) for n in (0, 1, 511, 4096, 2**63, 2**64 - 1)] + [0, -5])
            )
        else:
            parent[path[-1]] = data.draw(_json)
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    _exercise(base.wrap(text))


@FUZZ
@given(
    hdr_size=st.sampled_from([0, 4096, 16384, 32768, 2**63, 2**64 - 1]),
    seqid=st.integers(0, 2**64 - 1),
    hdr_offset=st.sampled_from([0, 16384, 4096, 2**64 - 1]),
    label=st.binary(max_size=48),
    alg=st.sampled_from([b"sha256", b"sha1", b"sha512", b"md5", b"", b"\xff"]),
    which=st.sampled_from([0, HDR]),
)
def test_fuzz_binary_fields_with_valid_checksums(
    base: Base, hdr_size: int, seqid: int, hdr_offset: int, label: bytes, alg: bytes, which: int
) -> None:
    image = bytearray(base.image)
    struct.pack_into(">QQ48s32s", image, which + 8, hdr_size, seqid, label, alg)
    struct.pack_into(">Q", image, which + 256, hdr_offset)
    name = alg.decode("ascii", "replace")
    if name in ("sha256", "sha1", "sha512"):
        image[which + 448 : which + 512] = bytes(64)
        span = min(hdr_size, HDR) if hdr_size >= 4096 else 4096
        digest = hashlib.new(name, bytes(image[which : which + span])).digest()
        image[which + 448 : which + 448 + len(digest)] = digest
    _exercise(bytes(image))


@FUZZ
@given(data=st.binary(max_size=5000), device_size=st.integers(0, 2**40))
def test_fuzz_random_headers(data: bytes, device_size: int) -> None:
    for magic in (b"LUKS\xba\xbe\x00\x02", b"SKUL\xba\xbe\x00\x02"):
        blob = magic + data
        try:
            luks.read_luks2(blob[:device_size], device_size=device_size)
        except LuksFormatError:
            pass
        luks.required_span(blob, max(device_size, 1))
        luks.peek_seqid(blob)
