"""Parse and validate LUKS2 JSON metadata; encode it back into a JSON area.

Validation follows cryptsetup's (``LUKS2_hdr_validate``) and adds bounds of its own: at most 32
keyslots, tokens and segments and 8 digests, arrays of at most 32 ids, keyslot areas inside the
keyslots area and not overlapping, segments after it and inside the device. Headers keysteward cannot
serve safely are refused with a specific code: any mandatory requirement (``luks_reencryption`` for
``offline-reencrypt`` / ``online-reencrypt*``, ``luks_unsupported`` for the rest), a ``reencrypt``
keyslot, ``linear`` or backup segments (``luks_reencryption``); other keyslot, segment, KDF and digest
types, and detached headers (``luks_unsupported``).
"""

from __future__ import annotations

import itertools

from keysteward.formats.luks._json import (
    JsonObject,
    dumps,
    get_b64,
    get_id_list,
    get_int,
    get_object,
    get_str,
    get_str_list,
    get_u64,
    loads_object,
    object_id,
)
from keysteward.formats.luks.afsplit import MAX_KEY_BYTES, STRIPES, af_size
from keysteward.formats.luks.errors import REENCRYPTION, LuksFormatError, unsupported
from keysteward.formats.luks.kdf import ARGON2_MAX_CPUS, SALT_SIZE, Argon2Params, KdfParams, Pbkdf2Params
from keysteward.formats.luks.luks2_model import (
    BINARY_HEADER_SIZE,
    AntiForensic,
    KeyslotArea,
    Luks2Config,
    Luks2Digest,
    Luks2Keyslot,
    Luks2Metadata,
    Luks2Segment,
    Luks2Token,
    frozen_map,
)

MAX_KEYSLOTS = 32
MAX_TOKENS = 32
MAX_SEGMENTS = 32
MAX_DIGESTS = 8
METADATA_SIZES = (0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000)
"""Allowed sizes of one header copy (binary header + JSON area); also the secondary header's offsets."""
MAX_KEYSLOTS_SIZE = 0x8000000
SECTOR_SIZES = (512, 1024, 2048, 4096)
U32_MAX = 0xFFFFFFFF


def _reencryption(message: str) -> LuksFormatError:
    return LuksFormatError(message, code=REENCRYPTION)


def _is_reencrypt_requirement(name: str) -> bool:
    return name == "offline-reencrypt" or name.startswith("online-reencrypt")


def _section(top: JsonObject, name: str, limit: int) -> list[tuple[int, JsonObject]]:
    section = get_object(top, name, "LUKS2 metadata")
    if len(section) > limit:
        raise LuksFormatError(f"LUKS2 {name} has {len(section)} entries, at most {limit} allowed")
    out: list[tuple[int, JsonObject]] = []
    for key, value in section.items():
        number = object_id(key, f"LUKS2 {name}", limit)
        if not isinstance(value, dict):
            raise LuksFormatError(f"LUKS2 {name} {number} is not an object")
        out.append((number, value))
    return out


# -- refusals first: they must win over any later validation error ---------------------------------


def _refusals(top: JsonObject) -> None:
    config = get_object(top, "config", "LUKS2 metadata")
    if "requirements" in config:
        requirements = get_object(config, "requirements", "LUKS2 config")
        if "mandatory" in requirements:
            mandatory = get_str_list(requirements, "mandatory", "LUKS2 config requirements")
            for name in mandatory:
                if _is_reencrypt_requirement(name):
                    raise _reencryption(
                        f"the volume is in reencryption (requirement {name!r}); finish it with cryptsetup"
                    )
            if mandatory:
                raise unsupported(
                    f"the volume has mandatory requirements keysteward does not implement: {list(mandatory)}"
                )
    for number, keyslot in _section(top, "keyslots", MAX_KEYSLOTS):
        if keyslot.get("type") == "reencrypt":
            raise _reencryption(f"keyslot {number} is a reencryption keyslot; finish the reencryption with cryptsetup")
    for number, segment in _section(top, "segments", MAX_SEGMENTS):
        flags = segment.get("flags")
        if isinstance(flags, list) and any(
            isinstance(f, str) and (f == "in-reencryption" or f.startswith("backup-")) for f in flags
        ):
            raise _reencryption(f"segment {number} is part of a reencryption")
        if segment.get("type") == "linear":
            raise _reencryption(f"segment {number} is a linear (reencryption) segment")


# -- sections ---------------------------------------------------------------------------------------


def _kdf(obj: JsonObject, where: str) -> KdfParams:
    kind = get_str(obj, "type", where)
    if kind == "pbkdf2":
        if set(obj) != {"type", "hash", "iterations", "salt"}:
            raise LuksFormatError(f"{where}: pbkdf2 takes exactly type, hash, iterations, salt")
        return Pbkdf2Params(
            get_str(obj, "hash", where),
            get_int(obj, "iterations", where, 1, U32_MAX),
            get_b64(obj, "salt", where, SALT_SIZE, SALT_SIZE),
        )
    if kind in ("argon2i", "argon2id"):
        if set(obj) != {"type", "time", "memory", "cpus", "salt"}:
            raise LuksFormatError(f"{where}: {kind} takes exactly type, time, memory, cpus, salt")
        cpus = get_int(obj, "cpus", where, 1, ARGON2_MAX_CPUS)
        return Argon2Params(
            "argon2id" if kind == "argon2id" else "argon2i",
            get_int(obj, "time", where, 1, U32_MAX),
            get_int(obj, "memory", where, 8 * cpus, U32_MAX),
            cpus,
            get_b64(obj, "salt", where, SALT_SIZE, SALT_SIZE),
        )
    raise unsupported(f"{where}: kdf type {kind!r} is not supported")


def _keyslot(number: int, obj: JsonObject) -> Luks2Keyslot:
    where = f"LUKS2 keyslot {number}"
    kind = get_str(obj, "type", where)
    if kind != "luks2":
        raise unsupported(f"{where}: keyslot type {kind!r} is not supported")
    key_size = get_int(obj, "key_size", where, 1, MAX_KEY_BYTES)
    af_obj = get_object(obj, "af", where)
    if get_str(af_obj, "type", f"{where} af") != "luks1":
        raise unsupported(f"{where}: af type {af_obj['type']!r} is not supported")
    af = AntiForensic(
        get_str(af_obj, "hash", f"{where} af"), get_int(af_obj, "stripes", f"{where} af", 1, U32_MAX), raw=af_obj
    )
    if af.stripes != STRIPES:
        raise unsupported(f"{where}: {af.stripes} AF stripes (LUKS2 always uses {STRIPES})")
    area_obj = get_object(obj, "area", where)
    if get_str(area_obj, "type", f"{where} area") != "raw":
        raise unsupported(f"{where}: area type {area_obj['type']!r} is not supported")
    area = KeyslotArea(
        get_u64(area_obj, "offset", f"{where} area"),
        get_u64(area_obj, "size", f"{where} area"),
        get_str(area_obj, "encryption", f"{where} area"),
        get_int(area_obj, "key_size", f"{where} area", 1, MAX_KEY_BYTES),
        raw=area_obj,
    )
    if area.size < af_size(key_size, af.stripes):
        raise LuksFormatError(f"{where}: area of {area.size} bytes cannot hold {af_size(key_size, af.stripes)}")
    priority = get_int(obj, "priority", where, 0, 2) if "priority" in obj else None
    return Luks2Keyslot(key_size, area, _kdf(get_object(obj, "kdf", where), f"{where} kdf"), af, priority, raw=obj)


def _segment(number: int, obj: JsonObject) -> Luks2Segment:
    where = f"LUKS2 segment {number}"
    kind = get_str(obj, "type", where)
    if kind != "crypt":
        raise unsupported(f"{where}: segment type {kind!r} is not supported")
    offset = get_u64(obj, "offset", where)
    size_text = get_str(obj, "size", where)
    size = None if size_text == "dynamic" else get_u64(obj, "size", where)
    sector_size = get_int(obj, "sector_size", where, 512, 4096)
    if sector_size not in SECTOR_SIZES:
        raise LuksFormatError(f"{where}: sector_size {sector_size} is not one of {SECTOR_SIZES}")
    if offset % 512:
        raise LuksFormatError(f"{where}: offset {offset} is not a multiple of 512")
    if size is not None and (size == 0 or size % sector_size):
        raise LuksFormatError(f"{where}: size {size} is zero or not a multiple of the sector size {sector_size}")
    integrity = get_object(obj, "integrity", where) if "integrity" in obj else None
    flags = get_str_list(obj, "flags", where) if "flags" in obj else ()
    return Luks2Segment(
        offset, size, get_str(obj, "encryption", where), sector_size, get_u64(obj, "iv_tweak", where), flags,
        integrity, raw=obj,
    )  # fmt: skip


def _digest(number: int, obj: JsonObject) -> Luks2Digest:
    where = f"LUKS2 digest {number}"
    kind = get_str(obj, "type", where)
    if kind != "pbkdf2":
        raise unsupported(f"{where}: digest type {kind!r} is not supported")
    return Luks2Digest(
        get_id_list(obj, "keyslots", where, MAX_KEYSLOTS),
        get_id_list(obj, "segments", where, MAX_SEGMENTS),
        get_str(obj, "hash", where),
        get_int(obj, "iterations", where, 1, U32_MAX),
        get_b64(obj, "salt", where, SALT_SIZE, SALT_SIZE),
        get_b64(obj, "digest", where, 20, 64),
        raw=obj,
    )


def _token(number: int, obj: JsonObject) -> Luks2Token:
    where = f"LUKS2 token {number}"
    return Luks2Token(get_str(obj, "type", where), get_id_list(obj, "keyslots", where, MAX_KEYSLOTS), data=obj)


def _config(obj: JsonObject) -> Luks2Config:
    where = "LUKS2 config"
    json_size = get_u64(obj, "json_size", where)
    keyslots_size = get_u64(obj, "keyslots_size", where)
    if json_size + BINARY_HEADER_SIZE not in METADATA_SIZES:
        raise LuksFormatError(f"{where}: json_size {json_size} gives an unsupported header size")
    if keyslots_size % 4096 or keyslots_size > MAX_KEYSLOTS_SIZE:
        raise LuksFormatError(f"{where}: keyslots_size {keyslots_size} is not 4 KiB aligned or beyond 128 MiB")
    flags = get_str_list(obj, "flags", where) if "flags" in obj else ()
    return Luks2Config(json_size, keyslots_size, flags, raw=obj)


# -- cross-checks -----------------------------------------------------------------------------------


def _check_layout(meta: Luks2Metadata, device_size: int | None) -> None:
    start, end = meta.keyslots_offset, meta.keyslots_end
    areas = sorted((ks.area.offset, ks.area.offset + ks.area.size, n) for n, ks in meta.keyslots.items())
    for offset, stop, number in areas:
        if offset < start or stop > end:
            raise LuksFormatError(f"LUKS2 keyslot {number}: area [{offset}, {stop}) is outside the keyslots area")
    for (_, stop, first), (offset, _, second) in itertools.pairwise(areas):
        if offset < stop:
            raise LuksFormatError(f"LUKS2 keyslots {first} and {second} have overlapping areas")
    ids = sorted(meta.segments)
    if ids != list(range(len(ids))):
        raise LuksFormatError("LUKS2 segments are not numbered 0..n-1")
    ordered = sorted(meta.segments.items(), key=lambda item: item[1].offset)
    for index, (number, segment) in enumerate(ordered):
        if segment.offset == 0:
            raise unsupported("LUKS2 with a detached header (data offset 0) is not supported")
        if segment.offset < end:
            raise LuksFormatError(
                f"LUKS2 segment {number} at {segment.offset} overlaps the header or keyslots (end {end})"
            )
        if segment.size is None and number != ids[-1]:
            raise LuksFormatError(f"LUKS2 segment {number} is dynamic but not the last segment")
        if index + 1 < len(ordered):
            following, after = ordered[index + 1]
            if segment.size is None or segment.offset + segment.size > after.offset:
                raise LuksFormatError(f"LUKS2 segments {number} and {following} overlap")
        stop = segment.offset + (segment.size or 0)
        if device_size is not None and stop > device_size:
            raise LuksFormatError(f"LUKS2 segment {number} ends at {stop}, beyond the device ({device_size} bytes)")
    if device_size is not None and end > device_size:
        raise LuksFormatError(f"LUKS2 header and keyslots need {end} bytes, the device has {device_size}")


def _check_references(meta: Luks2Metadata) -> None:
    bound: dict[int, int] = {}
    for number, digest in meta.digests.items():
        for keyslot in digest.keyslots:
            if keyslot not in meta.keyslots:
                raise LuksFormatError(f"LUKS2 digest {number} names missing keyslot {keyslot}")
            if keyslot in bound:
                raise LuksFormatError(f"LUKS2 keyslot {keyslot} is bound to digests {bound[keyslot]} and {number}")
            bound[keyslot] = number
            if meta.keyslots[keyslot].key_size < 1:
                raise LuksFormatError(f"LUKS2 keyslot {keyslot} has no key size")
        for segment in digest.segments:
            if segment not in meta.segments:
                raise LuksFormatError(f"LUKS2 digest {number} names missing segment {segment}")
    for number in meta.segments:
        if not any(number in d.segments for d in meta.digests.values()):
            raise LuksFormatError(f"LUKS2 segment {number} has no digest")
    for number, token in meta.tokens.items():
        for keyslot in token.keyslots:
            if keyslot not in meta.keyslots:
                raise LuksFormatError(f"LUKS2 token {number} names missing keyslot {keyslot}")


# -- public -----------------------------------------------------------------------------------------


def metadata_from_json(top: JsonObject, *, device_size: int | None = None) -> Luks2Metadata:
    """Validate a parsed JSON object and build :class:`Luks2Metadata`."""
    _refusals(top)
    digests = _section(top, "digests", MAX_DIGESTS)
    segments = _section(top, "segments", MAX_SEGMENTS)
    if not segments:
        raise LuksFormatError("LUKS2 metadata has no segment")
    meta = Luks2Metadata(
        keyslots=frozen_map({n: _keyslot(n, o) for n, o in _section(top, "keyslots", MAX_KEYSLOTS)}),
        tokens=frozen_map({n: _token(n, o) for n, o in _section(top, "tokens", MAX_TOKENS)}),
        segments=frozen_map({n: _segment(n, o) for n, o in segments}),
        digests=frozen_map({n: _digest(n, o) for n, o in digests}),
        config=_config(get_object(top, "config", "LUKS2 metadata")),
        raw=top,
    )
    _check_references(meta)
    _check_layout(meta, device_size)
    return meta


def parse_metadata(text: bytes, *, device_size: int | None = None) -> Luks2Metadata:
    """Parse the JSON text (no padding) of a LUKS2 header."""
    return metadata_from_json(loads_object(text), device_size=device_size)


def parse_json_area(area: bytes, *, device_size: int | None = None) -> Luks2Metadata:
    """Parse a whole JSON area: a JSON object starting at byte 0, then only zero bytes to the end."""
    if not area or area[:1] != b"{":
        raise LuksFormatError("LUKS2 JSON area does not start with '{'")
    end = area.find(b"\x00")
    if end < 0:
        raise LuksFormatError("LUKS2 JSON area has no terminating zero byte")
    if area.count(0, end) != len(area) - end:
        raise LuksFormatError(f"LUKS2 JSON area has non-zero bytes after the JSON text (which ends at {end})")
    top = loads_object(area[:end])
    _refusals(top)
    json_size = get_u64(get_object(top, "config", "LUKS2 metadata"), "json_size", "LUKS2 config")
    if json_size != len(area):
        raise LuksFormatError(f"LUKS2 config json_size {json_size} differs from the JSON area size {len(area)}")
    return metadata_from_json(top, device_size=device_size)


def encode_metadata(meta: Luks2Metadata) -> bytes:
    """The JSON text of ``meta``, exactly as cryptsetup writes it."""
    return dumps(meta.to_json())


def encode_json_area(meta: Luks2Metadata) -> bytes:
    """The JSON text padded with zeros to ``config.json_size`` (room for at least one zero byte)."""
    text = encode_metadata(meta)
    size = meta.config.json_size
    if len(text) >= size:
        raise LuksFormatError(f"LUKS2 metadata needs {len(text) + 1} bytes, the JSON area has {size}")
    return text + bytes(size - len(text))


def validate_metadata(meta: Luks2Metadata, *, device_size: int | None = None) -> Luks2Metadata:
    """Re-check metadata built or changed in code by encoding and parsing it again; returns the parsed copy."""
    return parse_metadata(encode_metadata(meta), device_size=device_size)
