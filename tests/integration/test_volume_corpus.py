"""A corpus of damaged volumes through the real CLI: one line on stderr, a non-zero exit, no traceback,
and the file's bytes unchanged (sha256 before and after), for every ``keysteward volume`` verb.

Damaged LUKS2 copies keep valid checksums (the codec's ``pack_copy``), so that each case reaches the
check it is about instead of stopping at the checksum. Each verb runs on its own copy of the damaged
file, all of them at once (they are independent), to keep the corpus fast.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from keysteward.formats import luks
from tests.integration.test_volume_tools import KEYSTEWARD, MIB, assert_one_line_error, ks, sha256

pytestmark = pytest.mark.integration

DATA_OFFSET = MIB
DEVICE = DATA_OFFSET + 64 * 1024
PASSPHRASE = b"corpus"
HDR = 16384


def _rng() -> luks.RandomSource:
    return random.Random(11).randbytes


def _apply(size: int, writes: tuple[luks.Write, ...] | list[luks.Write]) -> bytearray:
    image = bytearray(size)
    for write in writes:
        image[write.offset : write.end] = write.data
    return image


BASE2 = _apply(
    DEVICE,
    luks.format_luks2(
        _rng()(64),
        PASSPHRASE,
        device_size=DEVICE,
        data_offset=DATA_OFFSET,
        label="corpus",
        kdf_params=luks.new_pbkdf2(iterations=1000, rng=_rng()),
        rng=_rng(),
    ).writes,
)
_LUKS1 = luks.format_luks1(_rng()(32), PASSPHRASE, device_size=4 * MIB, iterations=1000, rng=_rng())
BASE1 = _apply(4 * MIB, _LUKS1.writes)
HEADER2 = luks.read_luks2(bytes(BASE2[: luks.MAX_SPAN]), device_size=DEVICE)
BIG_HDR, BIG_DATA_OFFSET = 512 * 1024, 4 * MIB  # room in the JSON area for 10,000-entry arrays
BIG = _apply(
    BIG_DATA_OFFSET + 64 * 1024,
    luks.format_luks2(
        _rng()(64),
        PASSPHRASE,
        device_size=BIG_DATA_OFFSET + 64 * 1024,
        data_offset=BIG_DATA_OFFSET,
        metadata_size=BIG_HDR,
        kdf_params=luks.new_pbkdf2(iterations=1000, rng=_rng()),
        rng=_rng(),
    ).writes,
)
BIG_HEADER = luks.read_luks2(bytes(BIG[: luks.MAX_SPAN]), device_size=len(BIG))


def _with_json(edit: Callable[[dict[str, Any]], Any], *, raw: bytes | None = None, big: bool = False) -> bytearray:
    """A base volume whose two copies carry the edited JSON (or ``raw`` JSON area bytes), checksums valid."""
    header, image = (BIG_HEADER, bytearray(BIG)) if big else (HEADER2, bytearray(BASE2))
    size = header.hdr_size
    if raw is None:
        tree = json.loads(luks.encode_metadata(header.metadata))
        result = edit(tree)
        raw = json.dumps(tree if result is None else result, separators=(",", ":")).encode()
    assert len(raw) < size - 4096, "the edited JSON does not fit the JSON area"
    area = raw.ljust(size - 4096, b"\x00")
    for secondary, salt in ((False, header.salt_primary), (True, header.salt_secondary)):
        assert salt is not None
        copy = luks.pack_copy(header, area, seqid=header.seqid, secondary=secondary, salt=salt)
        image[size if secondary else 0 : (size if secondary else 0) + size] = copy
    return image


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(tree: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node = tree
        for part in parents:
            node = node[part]
        node[last] = value

    return edit


def _flip(image: bytearray, offset: int) -> bytearray:
    out = bytearray(image)
    out[offset] ^= 0x40
    return out


def _luks1(offset: int, fmt: str, value: int) -> bytearray:
    out = bytearray(BASE1)
    struct.pack_into(fmt, out, offset, value)
    return out


def _keyslot_area_beyond_file() -> bytearray:
    # a keyslots area (and a keyslot in it) that ends past the file, with the segment pushed after it
    def edit(tree: dict[str, Any]) -> None:
        tree["config"]["keyslots_size"] = str(4 * MIB)
        tree["keyslots"]["0"]["area"]["offset"] = str(3 * MIB)
        tree["segments"]["0"]["offset"] = str(8 * MIB)

    return _with_json(edit)


def _many(count: int) -> Callable[[dict[str, Any]], None]:
    def edit(tree: dict[str, Any]) -> None:
        tree["digests"]["0"]["keyslots"] = [str(i % 32) for i in range(count)]

    return edit


def _many_keyslots(tree: dict[str, Any]) -> None:
    tree["keyslots"] = {str(i): {"type": "luks2"} for i in range(10_000)}


def _overlap(tree: dict[str, Any]) -> None:
    tree["keyslots"]["1"] = json.loads(json.dumps(tree["keyslots"]["0"]))
    tree["digests"]["0"]["keyslots"] = ["0", "1"]


CASES: dict[str, Callable[[], bytearray]] = {
    # truncated files
    "empty": lambda: bytearray(),
    "truncated-100": lambda: BASE2[:100],
    "truncated-4095": lambda: BASE2[:4095],
    "truncated-in-json": lambda: BASE2[:10000],
    "truncated-primary-only": lambda: BASE2[:HDR],
    "truncated-in-secondary": lambda: BASE2[: HDR + 5000],
    "truncated-in-keyslot-area": lambda: BASE2[: 2 * HDR + 10000],
    "truncated-before-data": lambda: BASE2[: DATA_OFFSET - 4096],
    # magic and checksums
    "wrong-magic-both": lambda: _flip(_flip(BASE2, 0), HDR),
    "not-luks": lambda: bytearray(b"\x7fELF" + bytes(DEVICE - 4)),
    "bad-checksum-both": lambda: _flip(_flip(BASE2, 5000), HDR + 5000),
    "bad-version": lambda: _flip(_flip(BASE2, 7), HDR + 7),
    # the JSON area
    "json-not-json": lambda: _with_json(lambda t: None, raw=b"{not json at all}"),
    "json-not-object": lambda: _with_json(lambda t: None, raw=b"[1,2,3]"),
    "json-trailing-garbage": lambda: _with_json(
        lambda t: None, raw=luks.encode_metadata(HEADER2.metadata) + b"\x00garbage"
    ),
    "json-two-objects": lambda: _with_json(lambda t: None, raw=luks.encode_metadata(HEADER2.metadata) + b"{}"),
    "json-deep-nesting": lambda: _with_json(lambda t: None, raw=b"[" * 5000 + b"]" * 5000),
    "json-not-utf8": lambda: _with_json(lambda t: None, raw=b'{"keyslots":"\xff\xfe"}'),
    "json-duplicate-keys": lambda: _with_json(lambda t: None, raw=b'{"config":{},"config":{}}'),
    # offsets
    "segment-offset-negative": lambda: _with_json(_set("segments/0/offset", "-1048576")),
    "segment-offset-huge": lambda: _with_json(_set("segments/0/offset", "18446744073709551615")),
    "segment-offset-beyond-u64": lambda: _with_json(_set("segments/0/offset", "99999999999999999999999")),
    "segment-size-beyond-file": lambda: _with_json(_set("segments/0/size", str(64 * MIB))),
    "segment-overlaps-keyslots": lambda: _with_json(_set("segments/0/offset", str(2 * HDR))),
    "area-offset-negative": lambda: _with_json(_set("keyslots/0/area/offset", "-4096")),
    "area-offset-huge": lambda: _with_json(_set("keyslots/0/area/offset", "18446744073709547520")),
    "areas-overlap": lambda: _with_json(_overlap),
    "keyslot-area-beyond-file": _keyslot_area_beyond_file,
    "keyslots-size-huge": lambda: _with_json(_set("config/keyslots_size", "18446744073709547520")),
    "json-size-mismatch": lambda: _with_json(_set("config/json_size", "4096")),
    "sector-size-odd": lambda: _with_json(_set("segments/0/sector_size", 1000)),
    "iv-tweak-near-overflow": lambda: _with_json(_set("segments/0/iv_tweak", "18446744073709551615")),
    # types
    "unknown-segment-type": lambda: _with_json(_set("segments/0/type", "mystery")),
    "unknown-keyslot-type": lambda: _with_json(_set("keyslots/0/type", "luks3")),
    "unknown-kdf": lambda: _with_json(_set("keyslots/0/kdf/type", "scrypt")),
    "unknown-cipher": lambda: _with_json(_set("segments/0/encryption", "serpent-cbc-essiv:sha256")),
    "in-reencryption": lambda: _with_json(_set("config/requirements", {"mandatory": ["online-reencrypt-v2"]})),
    "keyslot-not-object": lambda: _with_json(_set("keyslots/0", [])),
    # big arrays and objects
    "array-10000": lambda: _with_json(_many(10_000), big=True),
    "keyslots-10000": lambda: _with_json(_many_keyslots, big=True),
    "flags-10000": lambda: _with_json(_set("config/flags", ["allow-discards"] * 10_000), big=True),
    # LUKS1
    "luks1-truncated": lambda: BASE1[:300],
    "luks1-keyslot-beyond-file": lambda: _luks1(208 + 40, ">I", 0x7FFFFFF0),
    "luks1-payload-beyond-file": lambda: _luks1(104, ">I", 0x7FFFFFF0),
    "luks1-key-bytes-zero": lambda: _luks1(108, ">I", 0),
    "luks1-bad-slot-state": lambda: _luks1(208, ">I", 0x12345678),
    "luks1-stripes": lambda: _luks1(208 + 44, ">I", 7),
    "luks1-slots-overlap": lambda: _luks1(208 + 48 + 40, ">I", struct.unpack_from(">I", BASE1, 208 + 40)[0]),
}


DESCRIBABLE = {"unknown-cipher", "iv-tweak-near-overflow"}
"""Valid LUKS2 headers whose payload keysteward cannot serve: the verbs that leave the payload alone work
(``dump`` shows why the payload is not served); read and write refuse, remove-key refuses the last slot."""
WORKS_ON_DESCRIBABLE = ("dump", "check", "add-key")


def _verbs(image: Path, pw: Path, new_pw: Path, data: Path) -> dict[str, list[str]]:
    base = [KEYSTEWARD, "volume"]
    return {
        "dump": [*base, "dump", str(image), "--json"],
        "check": [*base, "check", str(image), "--passphrase-file", str(pw)],
        "read": [*base, "read", str(image), "--passphrase-file", str(pw), "--offset", "4095", "--length", "9"],
        "write": [*base, "write", str(image), "--passphrase-file", str(pw), "--offset", "1", "--input", str(data)],
        "add-key": [
            *base,
            "add-key",
            str(image),
            "--passphrase-file",
            str(pw),
            "--new-passphrase-file",
            str(new_pw),
            "--kdf",
            "pbkdf2",
            "--pbkdf-iterations",
            "1000",
        ],
        "remove-key": [*base, "remove-key", str(image), "--slot", "0", "--passphrase-file", str(pw)],
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_volume_is_refused_and_left_alone(tmp_path: Path, case: str) -> None:
    content = bytes(CASES[case]())
    pw, new_pw, data = tmp_path / "pw", tmp_path / "new", tmp_path / "data"
    pw.write_bytes(PASSPHRASE)
    new_pw.write_bytes(b"new")
    data.write_bytes(b"x" * 5000)
    copies: dict[str, Path] = {}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for verb in ("dump", "check", "read", "write", "add-key", "remove-key"):
        copies[verb] = tmp_path / f"{verb}.img"
        copies[verb].write_bytes(content)
        argv = _verbs(copies[verb], pw, new_pw, data)[verb]
        procs[verb] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    before = sha256(copies["dump"])
    for verb, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if case in DESCRIBABLE and verb in WORKS_ON_DESCRIBABLE:
            assert done.returncode == 0, err
            if verb == "dump":
                assert "unsupported" in json.loads(out)["payload"]
            if verb == "add-key":
                continue
        else:
            assert_one_line_error(done, "error:")
        assert sha256(copies[verb]) == before, f"{verb} changed the file"


def test_damaged_primary_opens_from_the_secondary_and_writing_repairs_it(tmp_path: Path) -> None:
    for name, damage in {"checksum": 5000, "magic": 0}.items():
        image, pw = tmp_path / f"{name}.img", tmp_path / "pw"
        pw.write_bytes(PASSPHRASE)
        image.write_bytes(_flip(BASE2, damage))
        before = sha256(image)
        info = json.loads(ks("dump", image, "--json").stdout)
        assert info["header_copy_used"] == "secondary" and info["needs_repair"] and info["problems"]
        assert json.loads(ks("check", image, "--passphrase-file", pw, "--json").stdout)["keyslot"] == 0
        ks("read", image, "--passphrase-file", pw, "--length", 4096)
        assert sha256(image) == before, "reading never repairs (or changes) the header"
        new_pw = tmp_path / "new"
        new_pw.write_bytes(b"second")
        ks("add-key", image, "--passphrase-file", pw, "--new-passphrase-file", new_pw, "--kdf", "pbkdf2",
           "--pbkdf-iterations", "1000")  # fmt: skip
        info = json.loads(ks("dump", image, "--json").stdout)
        assert info["header_copy_used"] == "primary" and not info["needs_repair"] and len(info["keyslots"]) == 2
        ks("check", image, "--passphrase-file", new_pw)


def test_the_corpus_bases_are_valid(tmp_path: Path) -> None:
    for name, content in {"luks2": BASE2, "luks1": BASE1}.items():
        image, pw = tmp_path / f"{name}.img", tmp_path / "pw"
        image.write_bytes(content)
        pw.write_bytes(PASSPHRASE)
        ks("check", image, "--passphrase-file", pw)
        ks("write", image, "--passphrase-file", pw, "--offset", "1", input=b"y" * 5000)
        assert ks("read", image, "--passphrase-file", pw, "--offset", "1", "--length", "5000").stdout == b"y" * 5000
    shutil.rmtree(tmp_path, ignore_errors=True)
