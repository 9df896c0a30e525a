"""AAD rules for every wrap in the key hierarchy, and the cache of unwrapped KEK versions.

root key  ──wraps──> KEK version   AAD "keysteward/v1/kek|tenant|key id|version"
KEK version ─wraps─> stored DEK    AAD "keysteward/v1/dek|tenant|key id|version|dek id"
KEK version ─seals─> envelope data AAD "keysteward/v1/envelope|tenant|key id|version|context"
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping

from keysteward.crypto.aead import AeadKey
from keysteward.crypto.secret import SecretBuffer
from keysteward.errors import BadRequest

MAX_CONTEXT_BYTES = 8192


def kek_aad(tenant_id: str, key_id: str, version: int) -> bytes:
    return f"keysteward/v1/kek|{tenant_id}|{key_id}|{version}".encode()


def dek_aad(tenant_id: str, key_id: str, version: int, dek_id: str) -> bytes:
    return f"keysteward/v1/dek|{tenant_id}|{key_id}|{version}|{dek_id}".encode()


def canonical_context(context: Mapping[str, str] | None) -> bytes:
    if not context:
        return b"{}"
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in context.items()):
        raise BadRequest("encryption context must map strings to strings", code="bad_context")
    try:
        text = json.dumps(dict(context), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:
        raise BadRequest("encryption context must be valid Unicode text", code="bad_context") from exc
    if len(text) > MAX_CONTEXT_BYTES:
        raise BadRequest("encryption context is larger than 8 KiB", code="bad_context")
    return text


def envelope_aad(tenant_id: str, key_id: str, version: int, context: Mapping[str, str] | None) -> bytes:
    return f"keysteward/v1/envelope|{tenant_id}|{key_id}|{version}|".encode() + canonical_context(context)


class KekCache:
    """Unwrapped KEK versions, in locked buffers, dropped on seal, on destroy, and when they get old.

    The age limit matters when another server destroys a version: this server drops its copy at
    the next use of that version, or at the latest when :meth:`sweep` finds it older than the limit.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, int], tuple[SecretBuffer, AeadKey]] = {}
        self._born: dict[tuple[str, int], float] = {}

    def sweep(self, max_age: float) -> None:
        """Drop every entry unwrapped more than ``max_age`` seconds ago."""
        limit = time.monotonic() - max_age
        with self._lock:
            old = [k for k, born in self._born.items() if born < limit]
            entries = [self._entries.pop(k) for k in old if k in self._entries]
            for k in old:
                self._born.pop(k, None)
        for buf, _ in entries:
            buf.wipe()  # an operation that holds the AeadKey right now still finishes; the next one unwraps again

    def get(self, key_id: str, version: int) -> AeadKey | None:
        entry = self._entries.get((key_id, version))
        return entry[1] if entry else None

    def put(self, key_id: str, version: int, material: bytearray) -> AeadKey:
        """Keep ``material`` (zeroed here) as this version's KEK and return it, or the copy another thread put
        first. A version's material never changes, so the first copy stays: replacing it dropped the key that
        concurrent operations were using, and each of them failed with ``key_dropped`` (after a sweep, every
        request that found the version gone unwrapped it and put its own copy)."""
        buf = SecretBuffer.from_bytes(material)
        with self._lock:
            kept = self._entries.get((key_id, version))
            if kept is None:
                aead_key = AeadKey(buf.view())
                self._entries[(key_id, version)] = (buf, aead_key)
                self._born[(key_id, version)] = time.monotonic()
                return aead_key
        buf.wipe()
        return kept[1]

    def evict(self, key_id: str, version: int | None = None) -> None:
        with self._lock:
            doomed = [k for k in self._entries if k[0] == key_id and (version is None or k[1] == version)]
            entries = [self._entries.pop(k) for k in doomed]
        for buf, aead_key in entries:
            aead_key.drop()
            buf.wipe()
        with self._lock:
            for k in doomed:
                self._born.pop(k, None)

    def clear(self) -> None:
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
            self._born.clear()
        for buf, aead_key in entries:
            aead_key.drop()
            buf.wipe()
