"""LUKS2 JSON metadata (keysteward.formats.luks.luks2_json): validation, refusals, byte-stable encoding."""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from collections.abc import Callable
from typing import Any

import pytest

from keysteward.formats import luks
from keysteward.formats.luks.errors import REENCRYPTION, UNSUPPORTED, LuksFormatError

pytestmark = pytest.mark.unit

MIB = 1024 * 1024
DATA_OFFSET = 1 * MIB
DEVICE = DATA_OFFSET + 64 * 1024
HDR = 16384
AREA = HDR - 4096

Mutator = Callable[[dict[str, Any]], None]


@pytest.fixture(scope="module")
def base() -> tuple[luks.Luks2Header, dict[str, Any]]:
    rng = random.Random(3).randbytes
    formatted = luks.format_luks2(
        rng(32), b"pw", device_size=DEVICE, data_offset=DATA_OFFSET, kdf_params=luks.new_pbkdf2(rng=rng), rng=rng
    )
    return formatted.header, json.loads(luks.encode_metadata(formatted.header.metadata))


def _area(text: bytes) -> bytes:
    return text + bytes(AREA - len(text))


def _parse(obj: dict[str, Any], device_size: int | None = DEVICE) -> luks.Luks2Metadata:
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) >= AREA:  # too big for a 16 KiB header: parse the text alone
        return luks.parse_metadata(text, device_size=device_size)
    return luks.parse_json_area(_area(text), device_size=device_size)


def _code_of(mutate: Mutator, base: tuple[luks.Luks2Header, dict[str, Any]]) -> str:
    obj = copy.deepcopy(base[1])
    mutate(obj)
    with pytest.raises(LuksFormatError) as info:
        _parse(obj)
    return info.value.code


def _header_read_code(area: bytes, header: luks.Luks2Header) -> str:
    """The same damage wrapped in both header copies with valid checksums: read_luks2 refuses it too."""
    salt = bytes(64)
    image = luks.pack_copy(header, area, seqid=1, secondary=False, salt=salt)
    image += luks.pack_copy(header, area, seqid=1, secondary=True, salt=salt)
    with pytest.raises(LuksFormatError) as info:
        luks.read_luks2(image, device_size=DEVICE)
    return info.value.code


def test_base_parses_and_reencodes_identically(base: tuple[luks.Luks2Header, dict[str, Any]]) -> None:
    header, obj = base
    meta = _parse(obj)
    assert meta == header.metadata
    assert luks.encode_metadata(meta) == json.dumps(obj, separators=(",", ":")).encode()
    assert luks.encode_json_area(meta) == _area(luks.encode_metadata(meta))


@pytest.mark.parametrize(
    "area",
    [
        _area(b"{not json"),
        _area(b"[1,2,3]"),
        _area(b'"just a string"'),
        _area(b"{}"),
        _area(b' {"keyslots":{}}'),
        b"{" + b"x" * (AREA - 1),  # no terminating zero byte
        _area(b"\xff\xfe{}"),
        _area(b'{"a":"\xff"}'),
        bytes(AREA),
        b"",
    ],
    ids=["not-json", "array", "string", "empty-object", "leading-space", "no-nul", "bom", "not-utf8", "zeros", "empty"],
)
def test_areas_that_are_not_luks2_json(area: bytes, base: tuple[luks.Luks2Header, dict[str, Any]]) -> None:
    with pytest.raises(LuksFormatError) as info:
        luks.parse_json_area(area, device_size=DEVICE)
    assert info.value.code == "bad_luks_header"
    if len(area) == AREA:
        assert _header_read_code(area, base[0]) == "bad_luks_header"


@pytest.mark.parametrize("garbage", [b"x", b" ", b"\n", b"\x00x", b"\x00" * 100 + b"\x01", b"}"])
def test_trailing_garbage_in_the_json_area(garbage: bytes, base: tuple[luks.Luks2Header, dict[str, Any]]) -> None:
    text = json.dumps(base[1], separators=(",", ":")).encode()
    area = _area(text + garbage)
    with pytest.raises(LuksFormatError):
        luks.parse_json_area(area, device_size=DEVICE)
    assert _header_read_code(area, base[0]) == "bad_luks_header"


@pytest.mark.parametrize(
    "text",
    [
        b'{"keyslots":{},"keyslots":{}}',
        b'{"a":NaN}',
        b'{"a":Infinity}',
        b'{"a":' + b"1" * 5000 + b"}",
        b'{"a":' + str(2**70).encode() + b"}",
        b'{"a":"\\ud800"}',
        b'{"a":' + b"[" * 100 + b"]" * 100 + b"}",
        b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}",
    ],
    ids=["duplicate-key", "nan", "infinity", "long-number", "huge-int", "lone-surrogate", "deep", "very-deep"],
)
def test_json_that_json_c_would_read_differently(text: bytes) -> None:
    with pytest.raises(LuksFormatError):
        luks.parse_metadata(text)


def _set(path: str, value: Any) -> Mutator:
    def mutate(obj: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        target = obj
        for part in parents:
            target = target[part]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value

    return mutate


_DELETE = object()
KS = "keyslots/0"
SEG = "segments/0"
DIG = "digests/0"


def _second_keyslot(area_offset: str) -> Mutator:
    def mutate(obj: dict[str, Any]) -> None:
        second = copy.deepcopy(obj["keyslots"]["0"])
        second["area"]["offset"] = area_offset
        obj["keyslots"]["1"] = second

    return mutate


BAD_HEADER_CASES: dict[str, Mutator] = {
    "no-keyslots-section": _set("keyslots", _DELETE),
    "no-tokens-section": _set("tokens", _DELETE),
    "segments-not-object": _set("segments", []),
    "no-segments": _set("segments", {}),
    "config-missing": _set("config", _DELETE),
    "keyslot-not-object": _set(KS, "x"),
    "keyslot-key-not-number": lambda o: o["keyslots"].update({"a": o["keyslots"]["0"]}),
    "keyslot-key-leading-zero": lambda o: o["keyslots"].update({"00": o["keyslots"]["0"]}),
    "keyslot-id-32": lambda o: o["keyslots"].update({"32": o["keyslots"]["0"]}),
    "key-size-string": _set(f"{KS}/key_size", "32"),
    "key-size-zero": _set(f"{KS}/key_size", 0),
    "key-size-huge": _set(f"{KS}/key_size", 2**40),
    "key-size-bool": _set(f"{KS}/key_size", True),
    "area-offset-negative": _set(f"{KS}/area/offset", "-1"),
    "area-offset-int": _set(f"{KS}/area/offset", 32768),
    "area-offset-huge": _set(f"{KS}/area/offset", "99999999999999999999999"),
    "area-offset-u64-max": _set(f"{KS}/area/offset", str(2**64 - 1)),
    "area-offset-in-header": _set(f"{KS}/area/offset", "4096"),
    "area-beyond-keyslots": _set(f"{KS}/area/offset", str(DATA_OFFSET - 4096)),
    "area-size-hex": _set(f"{KS}/area/size", "0x1000"),
    "area-too-small": _set(f"{KS}/area/size", "4096"),
    "area-overlap": _second_keyslot("36864"),
    "kdf-extra-field": lambda o: o["keyslots"]["0"]["kdf"].update({"extra": 1}),
    "kdf-salt-short": _set(f"{KS}/kdf/salt", "AAAA"),
    "kdf-salt-not-base64": _set(f"{KS}/kdf/salt", "!" * 44),
    "kdf-iterations-zero": _set(f"{KS}/kdf/iterations", 0),
    "priority-3": _set(f"{KS}/priority", 3),
    "segment-offset-negative": _set(f"{SEG}/offset", "-512"),
    "segment-offset-unaligned": _set(f"{SEG}/offset", str(DATA_OFFSET + 1)),
    "segment-in-keyslots": _set(f"{SEG}/offset", "65536"),
    "segment-beyond-device": _set(f"{SEG}/size", str(DEVICE)),
    "segment-size-zero": _set(f"{SEG}/size", "0"),
    "segment-size-unaligned": _set(f"{SEG}/size", "1000"),
    "segment-sector-size": _set(f"{SEG}/sector_size", 333),
    "segment-sector-size-huge": _set(f"{SEG}/sector_size", 8192),
    "segment-iv-tweak-int": _set(f"{SEG}/iv_tweak", 0),
    "segment-gap-in-ids": lambda o: o["segments"].update({"2": o["segments"].pop("0")}),
    "segment-without-digest": _set(f"{DIG}/segments", []),
    "digest-missing-keyslot": _set(f"{DIG}/keyslots", ["0", "5"]),
    "digest-duplicate-keyslot": _set(f"{DIG}/keyslots", ["0", "0"]),
    "digest-10000-keyslots": _set(f"{DIG}/keyslots", ["0"] * 10000),
    "digest-keyslots-ints": _set(f"{DIG}/keyslots", [0]),
    "digest-short": _set(f"{DIG}/digest", "AAAA"),
    "keyslot-in-two-digests": lambda o: o["digests"].update({"1": copy.deepcopy(o["digests"]["0"])}),
    "token-missing-keyslot": _set("tokens/0", {"type": "x", "keyslots": ["9"]}),
    "token-no-type": _set("tokens/0", {"keyslots": []}),
    "token-10000-keyslots": _set("tokens/0", {"type": "x", "keyslots": ["0"] * 10000}),
    "10000-tokens": _set("tokens", {str(i): {"type": "x", "keyslots": []} for i in range(10000)}),
    "config-flags-10000": _set("config/flags", ["allow-discards"] * 10000),
    "config-flags-not-strings": _set("config/flags", [1]),
    "json-size-mismatch": _set("config/json_size", "28672"),
    "json-size-odd": _set("config/json_size", "12287"),
    "keyslots-size-unaligned": _set("config/keyslots_size", "100"),
    "keyslots-size-huge": _set("config/keyslots_size", str(2**40)),
    "requirements-not-object": _set("config/requirements", []),
}


@pytest.mark.parametrize("name", sorted(BAD_HEADER_CASES))
def test_bad_metadata(name: str, base: tuple[luks.Luks2Header, dict[str, Any]]) -> None:
    assert _code_of(BAD_HEADER_CASES[name], base) == "bad_luks_header"


REFUSED_CASES: dict[str, tuple[Mutator, str]] = {
    "keyslot-type-unknown": (_set(f"{KS}/type", "luks3"), UNSUPPORTED),
    "keyslot-reencrypt": (_set(f"{KS}/type", "reencrypt"), REENCRYPTION),
    "segment-type-unknown": (_set(f"{SEG}/type", "hw-opal"), UNSUPPORTED),
    "segment-linear": (_set(f"{SEG}/type", "linear"), REENCRYPTION),
    "segment-backup-flag": (_set(f"{SEG}/flags", ["backup-previous"]), REENCRYPTION),
    "segment-in-reencryption": (_set(f"{SEG}/flags", ["in-reencryption"]), REENCRYPTION),
    "segment-detached": (_set(f"{SEG}/offset", "0"), UNSUPPORTED),
    "online-reencrypt": (_set("config/requirements", {"mandatory": ["online-reencrypt-v2"]}), REENCRYPTION),
    "offline-reencrypt": (_set("config/requirements", {"mandatory": ["offline-reencrypt"]}), REENCRYPTION),
    "unknown-requirement": (_set("config/requirements", {"mandatory": ["opal"]}), UNSUPPORTED),
    "kdf-unknown": (_set(f"{KS}/kdf", {"type": "scrypt", "salt": "x"}), UNSUPPORTED),
    "af-unknown": (_set(f"{KS}/af/type", "luks2"), UNSUPPORTED),
    "af-stripes": (_set(f"{KS}/af/stripes", 3999), UNSUPPORTED),
    "area-type": (_set(f"{KS}/area/type", "datashift"), UNSUPPORTED),
    "digest-type": (_set(f"{DIG}/type", "hmac"), UNSUPPORTED),
}


@pytest.mark.parametrize("name", sorted(REFUSED_CASES))
def test_refused_metadata(name: str, base: tuple[luks.Luks2Header, dict[str, Any]]) -> None:
    mutate, code = REFUSED_CASES[name]
    assert _code_of(mutate, base) == code
    obj = copy.deepcopy(base[1])
    mutate(obj)
    text = json.dumps(obj, separators=(",", ":")).encode()
    assert _header_read_code(_area(text), base[0]) == code


def test_reencryption_wins_over_other_damage(base: tuple[luks.Luks2Header, dict[str, Any]]) -> None:
    def mutate(obj: dict[str, Any]) -> None:
        obj["config"]["requirements"] = {"mandatory": ["online-reencrypt"]}
        obj["segments"]["0"]["offset"] = "-1"

    assert _code_of(mutate, base) == REENCRYPTION


def test_empty_requirements_and_unknown_fields_survive(base: tuple[luks.Luks2Header, dict[str, Any]]) -> None:
    obj = copy.deepcopy(base[1])
    obj["config"]["requirements"] = {"mandatory": [], "optional": ["x"]}
    obj["config"]["flags"] = ["allow-discards"]
    obj["keyslots"]["0"]["x-note"] = {"a": [1, 2.5, None, True]}
    obj["keyslots"]["0"]["area"]["x-area"] = "kept"
    obj["keyslots"]["0"]["priority"] = 2
    obj["segments"]["0"]["flags"] = ["x-flag"]
    obj["segments"]["0"]["integrity"] = {"type": "hmac(sha256)", "journal_encryption": "none"}
    obj["tokens"]["3"] = {"type": "systemd-tpm2", "keyslots": ["0"], "tpm2-pcrs": [7], "name": "ünïcode/ok"}
    obj["x-top"] = "kept"
    meta = _parse(obj)
    assert meta.keyslots[0].priority == 2
    assert meta.config.flags == ("allow-discards",)
    assert meta.segments[0].flags == ("x-flag",) and meta.segments[0].integrity is not None
    assert meta.tokens[3].type == "systemd-tpm2" and meta.tokens[3].keyslots == (0,)
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    assert luks.encode_metadata(meta) == text
    changed = dataclasses.replace(meta.keyslots[0], priority=None)
    again = json.loads(luks.encode_metadata(dataclasses.replace(meta, keyslots={0: changed})))
    assert (
        "priority" not in again["keyslots"]["0"] and again["keyslots"]["0"]["x-note"] == obj["keyslots"]["0"]["x-note"]
    )


def test_segment_iv_counts_512_byte_units(base: tuple[luks.Luks2Header, dict[str, Any]]) -> None:
    segment = luks.Luks2Segment(DATA_OFFSET, None, sector_size=4096, iv_tweak=100)
    assert [segment.iv_sector(n * 4096) for n in range(3)] == [100, 108, 116]
    assert segment.payload_size(DATA_OFFSET + 3 * 4096 + 100) == 3 * 4096
    assert luks.Luks2Segment(DATA_OFFSET, 8192).payload_size(10**12) == 8192


def test_validate_metadata_catches_code_built_mistakes(base: tuple[luks.Luks2Header, dict[str, Any]]) -> None:
    meta = base[0].metadata
    bad = dataclasses.replace(meta, segments={0: luks.Luks2Segment(4096, None)})
    with pytest.raises(LuksFormatError):
        luks.validate_metadata(bad)
    assert luks.validate_metadata(meta, device_size=DEVICE) == meta
