"""A volume header described for people and scripts (``keysteward volume dump``).

Only layout and parameters: never key material, and neither salts nor digest values nor the
contents of tokens (a token may carry wrapped keys); tokens show their type and keyslots.
"""

from __future__ import annotations

from typing import Any

from keysteward.formats import luks
from keysteward.formats.luks.errors import LuksFormatError
from keysteward.volume.header_io import VolumeHeader
from keysteward.volume.kdf import describe_kdf


def describe(header: VolumeHeader) -> dict[str, Any]:
    """The header as a JSON-ready dict."""
    out: dict[str, Any] = {"version": header.version, "uuid": header.uuid, "device_size": header.device_size}
    if header.luks2 is not None:
        out.update(_luks2(header.luks2, header.device_size))
    else:
        out.update(_luks1(header.v1, header.device_size))
    try:
        geometry = header.geometry()
        out["payload"] = {"offset": geometry.data_offset, "size": geometry.payload_size}
    except LuksFormatError as exc:  # describable, but not served by the data path
        out["payload"] = {"unsupported": exc.message}
    return out


def _luks2(header: luks.Luks2Header, device_size: int) -> dict[str, Any]:
    meta = header.metadata
    return {
        "label": header.label,
        "subsystem": header.subsystem,
        "seqid": header.seqid,
        "header_size": header.hdr_size,
        "checksum": header.checksum_alg,
        "header_copy_used": header.source,
        "needs_repair": header.needs_repair,
        "problems": list(header.problems),
        "config": {
            "json_size": meta.config.json_size,
            "keyslots_size": meta.config.keyslots_size,
            "flags": list(meta.config.flags),
        },
        "keyslots": [
            {
                "id": number,
                "type": "luks2",
                "key_bits": slot.key_size * 8,
                "priority": {0: "ignore", 1: "normal", 2: "prefer"}.get(
                    slot.priority if slot.priority is not None else 1, "normal"
                ),
                "kdf": describe_kdf(slot.kdf),
                "af": {"type": "luks1", "stripes": slot.af.stripes, "hash": slot.af.hash},
                "area": {
                    "offset": slot.area.offset,
                    "size": slot.area.size,
                    "encryption": slot.area.encryption,
                    "key_bits": slot.area.key_size * 8,
                },
                "digest": meta.digest_of_keyslot(number),
            }
            for number, slot in meta.keyslots.items()
        ],
        "tokens": [{"id": n, "type": t.type, "keyslots": list(t.keyslots)} for n, t in meta.tokens.items()],
        "segments": [
            {
                "id": number,
                "type": "crypt",
                "offset": seg.offset,
                "size": "dynamic" if seg.size is None else seg.size,
                "payload_size": seg.payload_size(device_size),
                "encryption": seg.encryption,
                "sector_size": seg.sector_size,
                "iv_tweak": seg.iv_tweak,
                "flags": list(seg.flags),
            }
            for number, seg in meta.segments.items()
        ],
        "digests": [
            {
                "id": number,
                "type": "pbkdf2",
                "hash": d.hash,
                "iterations": d.iterations,
                "keyslots": list(d.keyslots),
                "segments": list(d.segments),
            }
            for number, d in meta.digests.items()
        ],
    }


def _luks1(header: luks.Luks1Header, device_size: int) -> dict[str, Any]:
    return {
        "encryption": header.encryption,
        "hash": header.hash_spec,
        "key_bits": header.key_bytes * 8,
        "payload_offset": header.data_offset,
        "digest_iterations": header.mk_digest_iterations,
        "keyslots": [
            {
                "id": number,
                "type": "luks1",
                "kdf": {"type": "pbkdf2", "hash": header.hash_spec, "iterations": slot.iterations},
                "material_offset": header.keyslot_span(number)[0],
                "material_size": header.keyslot_span(number)[1],
                "stripes": slot.stripes,
            }
            for number, slot in enumerate(header.keyslots)
            if slot.active
        ],
    }


def render(info: dict[str, Any]) -> str:
    """``describe``'s dict as readable text, one fact per line."""
    lines = [f"LUKS{info['version']} volume {info['uuid']}"]
    if info["version"] == 2:
        lines.append(f"label: {info['label'] or '(none)'}  subsystem: {info['subsystem'] or '(none)'}")
        lines.append(
            f"header: {info['header_size']} bytes x 2, seqid {info['seqid']}, copy used: {info['header_copy_used']}"
            + (" (needs repair)" if info["needs_repair"] else "")
        )
        lines += [f"  problem: {p}" for p in info["problems"]]
        lines.append(f"keyslots area: {info['config']['keyslots_size']} bytes")
    else:
        lines.append(f"cipher: {info['encryption']}  hash: {info['hash']}  key: {info['key_bits']} bits")
    payload = info["payload"]
    if "unsupported" in payload:
        lines.append(f"payload: not served here ({payload['unsupported']})")
    else:
        lines.append(f"payload: {payload['size']} bytes at offset {payload['offset']}")
    for seg in info.get("segments", []):
        lines.append(
            f"segment {seg['id']}: {seg['encryption']}, {seg['sector_size']}-byte sectors, offset {seg['offset']}, "
            f"size {seg['size']}, iv_tweak {seg['iv_tweak']}"
        )
    for slot in info["keyslots"]:
        kdf = ", ".join(f"{k} {v}" for k, v in slot["kdf"].items() if k != "type")
        bits = f", {slot['key_bits']}-bit key" if "key_bits" in slot else ""
        lines.append(f"keyslot {slot['id']}: {slot['kdf']['type']} ({kdf}){bits}")
    for token in info.get("tokens", []):
        lines.append(f"token {token['id']}: {token['type']}, keyslots {token['keyslots']}")
    for digest in info.get("digests", []):
        lines.append(
            f"digest {digest['id']}: pbkdf2 {digest['hash']} x{digest['iterations']}, keyslots {digest['keyslots']}, "
            f"segments {digest['segments']}"
        )
    return "\n".join(lines) + "\n"
