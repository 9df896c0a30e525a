"""Pure LUKS2 and LUKS1 codecs: bytes in, objects out; no files, sockets or clocks.

The volume layer reads a device's first bytes, hands them here with the device size, and applies the
:class:`Write` s that come back. Modules, all re-exported here:

- ``luks2_header``: the two binary header copies, checksums, recovery, serialization
- ``luks2_json`` / ``luks2_model``: the JSON metadata, parsed into frozen dataclasses and encoded back
  byte-stably
- ``afsplit``: the anti-forensic splitter; ``kdf``: PBKDF2 / Argon2; ``areacipher``: aes-xts-plain64
- ``keyslot``: LUKS2 keyslots and digests; ``luks2_format``: a new LUKS2 volume
- ``luks1``: LUKS1 header, keyslots and format
- ``errors``: :class:`LuksFormatError` (``bad_luks_header``, ``luks_checksum``, ``luks_unsupported``,
  ``luks_reencryption``, ``luks_argon2_memory``, ``luks_full``) and :class:`LuksWrongPassphrase`

The names load their module on first use: opening a LUKS2 volume does not import the LUKS1 codec or
the code that formats new volumes (``keysteward volume read`` is timed with its start-up).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keysteward.formats.luks.afsplit import af_merge, af_sectors, af_size, af_split
    from keysteward.formats.luks.areacipher import AreaCipher, check_area_encryption, xts_area_cipher
    from keysteward.formats.luks.common import RandomSource, Write
    from keysteward.formats.luks.errors import LuksFormatError, LuksWrongPassphrase
    from keysteward.formats.luks.kdf import (
        DEFAULT_MAX_MEMORY_KIB,
        Argon2Params,
        Kdf,
        KdfParams,
        Pbkdf2Params,
        check_memory,
        derive_key,
        new_argon2,
        new_pbkdf2,
    )
    from keysteward.formats.luks.keyslot import (
        Reader,
        Unlocked,
        add_keyslot,
        allocate_area,
        decrypt_keyslot,
        keyslot_span,
        make_digest,
        make_keyslot,
        open_keyslot,
        remove_keyslot,
        unlock,
        verify_digest,
    )
    from keysteward.formats.luks.luks1 import (
        Luks1Formatted,
        Luks1Header,
        Luks1Keyslot,
        format_luks1,
        open_luks1_keyslot,
        parse_luks1,
        remove_luks1_keyslot,
        serialize_luks1,
        set_luks1_keyslot,
        unlock_luks1,
        verify_luks1_key,
    )
    from keysteward.formats.luks.luks2_format import Formatted, format_luks2
    from keysteward.formats.luks.luks2_header import (
        MAX_SPAN,
        Luks2BinaryHeader,
        Luks2Header,
        new_header,
        pack_copy,
        parse_binary_header,
        peek_seqid,
        read_luks2,
        required_span,
        serialize_luks2,
    )
    from keysteward.formats.luks.luks2_json import (
        encode_json_area,
        encode_metadata,
        parse_json_area,
        parse_metadata,
        validate_metadata,
    )
    from keysteward.formats.luks.luks2_model import (
        AntiForensic,
        KeyslotArea,
        Luks2Config,
        Luks2Digest,
        Luks2Keyslot,
        Luks2Metadata,
        Luks2Segment,
        Luks2Token,
    )

_HOMES = {
    "af_merge": "afsplit",
    "af_sectors": "afsplit",
    "af_size": "afsplit",
    "af_split": "afsplit",
    "AreaCipher": "areacipher",
    "check_area_encryption": "areacipher",
    "xts_area_cipher": "areacipher",
    "RandomSource": "common",
    "Write": "common",
    "LuksFormatError": "errors",
    "LuksWrongPassphrase": "errors",
    "Argon2Params": "kdf",
    "DEFAULT_MAX_MEMORY_KIB": "kdf",
    "Kdf": "kdf",
    "KdfParams": "kdf",
    "Pbkdf2Params": "kdf",
    "check_memory": "kdf",
    "derive_key": "kdf",
    "new_argon2": "kdf",
    "new_pbkdf2": "kdf",
    "Reader": "keyslot",
    "Unlocked": "keyslot",
    "add_keyslot": "keyslot",
    "allocate_area": "keyslot",
    "decrypt_keyslot": "keyslot",
    "keyslot_span": "keyslot",
    "make_digest": "keyslot",
    "make_keyslot": "keyslot",
    "open_keyslot": "keyslot",
    "remove_keyslot": "keyslot",
    "unlock": "keyslot",
    "verify_digest": "keyslot",
    "Luks1Formatted": "luks1",
    "Luks1Header": "luks1",
    "Luks1Keyslot": "luks1",
    "format_luks1": "luks1",
    "open_luks1_keyslot": "luks1",
    "parse_luks1": "luks1",
    "remove_luks1_keyslot": "luks1",
    "serialize_luks1": "luks1",
    "set_luks1_keyslot": "luks1",
    "unlock_luks1": "luks1",
    "verify_luks1_key": "luks1",
    "Formatted": "luks2_format",
    "format_luks2": "luks2_format",
    "Luks2BinaryHeader": "luks2_header",
    "Luks2Header": "luks2_header",
    "MAX_SPAN": "luks2_header",
    "new_header": "luks2_header",
    "pack_copy": "luks2_header",
    "parse_binary_header": "luks2_header",
    "peek_seqid": "luks2_header",
    "read_luks2": "luks2_header",
    "required_span": "luks2_header",
    "serialize_luks2": "luks2_header",
    "encode_json_area": "luks2_json",
    "encode_metadata": "luks2_json",
    "parse_json_area": "luks2_json",
    "parse_metadata": "luks2_json",
    "validate_metadata": "luks2_json",
    "AntiForensic": "luks2_model",
    "KeyslotArea": "luks2_model",
    "Luks2Config": "luks2_model",
    "Luks2Digest": "luks2_model",
    "Luks2Keyslot": "luks2_model",
    "Luks2Metadata": "luks2_model",
    "Luks2Segment": "luks2_model",
    "Luks2Token": "luks2_model",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # the next look-up is a plain attribute
    return value


def detect_version(first_block: bytes) -> int | None:
    """1 or 2 for a LUKS1 / LUKS2 primary header (magic and version only), else None."""
    if len(first_block) < 8 or first_block[:6] != b"LUKS\xba\xbe":
        return None
    version = int.from_bytes(first_block[6:8], "big")
    return version if version in (1, 2) else None


__all__ = [
    "DEFAULT_MAX_MEMORY_KIB",
    "MAX_SPAN",
    "AntiForensic",
    "AreaCipher",
    "Argon2Params",
    "Formatted",
    "Kdf",
    "KdfParams",
    "KeyslotArea",
    "Luks1Formatted",
    "Luks1Header",
    "Luks1Keyslot",
    "Luks2BinaryHeader",
    "Luks2Config",
    "Luks2Digest",
    "Luks2Header",
    "Luks2Keyslot",
    "Luks2Metadata",
    "Luks2Segment",
    "Luks2Token",
    "LuksFormatError",
    "LuksWrongPassphrase",
    "Pbkdf2Params",
    "RandomSource",
    "Reader",
    "Unlocked",
    "Write",
    "add_keyslot",
    "af_merge",
    "af_sectors",
    "af_size",
    "af_split",
    "allocate_area",
    "check_area_encryption",
    "check_memory",
    "decrypt_keyslot",
    "derive_key",
    "detect_version",
    "encode_json_area",
    "encode_metadata",
    "format_luks1",
    "format_luks2",
    "keyslot_span",
    "make_digest",
    "make_keyslot",
    "new_argon2",
    "new_header",
    "new_pbkdf2",
    "open_keyslot",
    "open_luks1_keyslot",
    "pack_copy",
    "parse_binary_header",
    "parse_json_area",
    "parse_luks1",
    "parse_metadata",
    "peek_seqid",
    "read_luks2",
    "remove_keyslot",
    "remove_luks1_keyslot",
    "required_span",
    "serialize_luks1",
    "serialize_luks2",
    "set_luks1_keyslot",
    "unlock",
    "unlock_luks1",
    "validate_metadata",
    "verify_digest",
    "verify_luks1_key",
    "xts_area_cipher",
]
