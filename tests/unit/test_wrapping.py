"""AAD rules and the KEK cache (keysteward.keys.wrapping): a wrapped value moved to another row does not open."""

from __future__ import annotations

import json
import os
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keysteward.crypto.aead import AeadKey, AuthenticationFailed
from keysteward.errors import BadRequest, Unavailable
from keysteward.keys import wrapping
from keysteward.keys.wrapping import KekCache, canonical_context, dek_aad, envelope_aad, kek_aad

pytestmark = pytest.mark.unit

BOUNDED = settings(max_examples=200, deadline=None)

TENANT = str(uuid.UUID(int=1))
OTHER_TENANT = str(uuid.UUID(int=2))
KEY_ID = str(uuid.UUID(int=10))
OTHER_KEY_ID = str(uuid.UUID(int=11))
DEK_ID = str(uuid.UUID(int=100))
OTHER_DEK_ID = str(uuid.UUID(int=101))

uuid_strings = st.uuids().map(str)
versions = st.integers(1, 2**32 - 1)
contexts = st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=6)


# --- AADs ------------------------------------------------------------------------------------


def test_aad_formats() -> None:
    assert kek_aad("t", "k", 3) == b"keysteward/v1/kek|t|k|3"
    assert dek_aad("t", "k", 3, "d") == b"keysteward/v1/dek|t|k|3|d"
    assert envelope_aad("t", "k", 3, None) == b"keysteward/v1/envelope|t|k|3|{}"
    assert envelope_aad("t", "k", 3, {"b": "2", "a": "1"}) == b'keysteward/v1/envelope|t|k|3|{"a":"1","b":"2"}'


@pytest.mark.parametrize(
    "moved_to",
    [
        (OTHER_TENANT, KEY_ID, 1, DEK_ID),
        (TENANT, OTHER_KEY_ID, 1, DEK_ID),
        (TENANT, KEY_ID, 2, DEK_ID),
        (TENANT, KEY_ID, 1, OTHER_DEK_ID),
    ],
)
def test_wrapped_dek_moved_to_another_row_does_not_open(moved_to: tuple[str, str, int, str]) -> None:
    kek = AeadKey(os.urandom(32))
    dek = os.urandom(32)
    wrapped = kek.seal(dek, dek_aad(TENANT, KEY_ID, 1, DEK_ID))
    assert kek.open(wrapped, dek_aad(TENANT, KEY_ID, 1, DEK_ID)) == dek
    with pytest.raises(AuthenticationFailed):
        kek.open(wrapped, dek_aad(*moved_to))


@pytest.mark.parametrize(
    "moved_to",
    [(OTHER_TENANT, KEY_ID, 1), (TENANT, OTHER_KEY_ID, 1), (TENANT, KEY_ID, 2)],
)
def test_wrapped_kek_moved_to_another_row_does_not_open(moved_to: tuple[str, str, int]) -> None:
    root = AeadKey(os.urandom(32))
    kek = os.urandom(32)
    wrapped = root.seal(kek, kek_aad(TENANT, KEY_ID, 1))
    assert root.open(wrapped, kek_aad(TENANT, KEY_ID, 1)) == kek
    with pytest.raises(AuthenticationFailed):
        root.open(wrapped, kek_aad(*moved_to))


def test_envelope_does_not_open_under_another_tenant_key_version_or_context() -> None:
    kek = AeadKey(os.urandom(32))
    context = {"volume": "vol-1", "instance": "i-123"}
    sealed = kek.seal(b"payload", envelope_aad(TENANT, KEY_ID, 1, context))
    assert kek.open(sealed, envelope_aad(TENANT, KEY_ID, 1, dict(reversed(list(context.items()))))) == b"payload"
    for aad in (
        envelope_aad(OTHER_TENANT, KEY_ID, 1, context),
        envelope_aad(TENANT, OTHER_KEY_ID, 1, context),
        envelope_aad(TENANT, KEY_ID, 2, context),
        envelope_aad(TENANT, KEY_ID, 1, {"volume": "vol-2", "instance": "i-123"}),
        envelope_aad(TENANT, KEY_ID, 1, {"volume": "vol-1"}),
        envelope_aad(TENANT, KEY_ID, 1, None),
    ):
        with pytest.raises(AuthenticationFailed):
            kek.open(sealed, aad)


def test_wrap_kinds_are_domain_separated() -> None:
    # a KEK wrapped by the root cannot be passed off as a DEK or an envelope under the same ids
    kek_kind = kek_aad(TENANT, KEY_ID, 1)
    dek_kind = dek_aad(TENANT, KEY_ID, 1, DEK_ID)
    env_kind = envelope_aad(TENANT, KEY_ID, 1, None)
    assert len({kek_kind, dek_kind, env_kind}) == 3
    assert not dek_kind.startswith(kek_kind)
    key = AeadKey(os.urandom(32))
    sealed = key.seal(b"x" * 32, kek_kind)
    for aad in (dek_kind, env_kind):
        with pytest.raises(AuthenticationFailed):
            key.open(sealed, aad)


@BOUNDED
@given(
    st.tuples(uuid_strings, uuid_strings, versions, uuid_strings),
    st.tuples(uuid_strings, uuid_strings, versions, uuid_strings),
)
def test_dek_aads_differ_for_different_rows(a: tuple[str, str, int, str], b: tuple[str, str, int, str]) -> None:
    assert (dek_aad(*a) == dek_aad(*b)) == (a == b)
    assert (kek_aad(*a[:3]) == kek_aad(*b[:3])) == (a[:3] == b[:3])


@BOUNDED
@given(
    st.tuples(uuid_strings, uuid_strings, versions, contexts),
    st.tuples(uuid_strings, uuid_strings, versions, contexts),
)
def test_envelope_aads_differ_for_different_rows_or_contexts(
    a: tuple[str, str, int, dict[str, str]], b: tuple[str, str, int, dict[str, str]]
) -> None:
    assert (envelope_aad(*a) == envelope_aad(*b)) == (a == b)


# --- canonical_context -----------------------------------------------------------------------


@pytest.mark.parametrize("empty", [None, {}])
def test_empty_context(empty: dict[str, str] | None) -> None:
    assert canonical_context(empty) == b"{}"


def test_context_is_compact_sorted_utf8_json() -> None:
    text = canonical_context({"z": "1", "a": "é", "m": '"quoted"'})
    assert text == '{"a":"é","m":"\\"quoted\\"","z":"1"}'.encode()
    assert json.loads(text) == {"z": "1", "a": "é", "m": '"quoted"'}


@BOUNDED
@given(contexts, st.randoms(use_true_random=False))
def test_context_is_order_independent(context: dict[str, str], rng: object) -> None:
    items = list(context.items())
    rng.shuffle(items)  # type: ignore[attr-defined]
    assert canonical_context(dict(items)) == canonical_context(context)
    if context:
        assert json.loads(canonical_context(context)) == context


@pytest.mark.parametrize(
    "context",
    [
        {"a": 1},
        {"a": None},
        {"a": ["x"]},
        {"a": {"b": "c"}},
        {"a": b"bytes"},
        {"a": True},
        {1: "a"},
        {("t",): "a"},
        {"ok": "fine", "bad": 2.5},
    ],
)
def test_context_rejects_non_string_values(context: dict[object, object]) -> None:
    with pytest.raises(BadRequest) as info:
        canonical_context(context)  # type: ignore[arg-type]
    assert info.value.code == "bad_context"
    assert info.value.status == 400


def test_context_size_limit() -> None:
    overhead = len(b'{"k":""}')
    at_limit = {"k": "v" * (wrapping.MAX_CONTEXT_BYTES - overhead)}
    assert len(canonical_context(at_limit)) == wrapping.MAX_CONTEXT_BYTES
    with pytest.raises(BadRequest) as info:
        canonical_context({"k": "v" * (wrapping.MAX_CONTEXT_BYTES - overhead + 1)})
    assert info.value.code == "bad_context"
    with pytest.raises(BadRequest):
        canonical_context({f"key-{i}": "x" * 100 for i in range(100)})
    with pytest.raises(BadRequest):
        envelope_aad(TENANT, KEY_ID, 1, {"k": "v" * 10_000})


def test_context_size_counts_utf8_bytes() -> None:
    # 3000 euro signs are 3000 characters but 9000 bytes
    with pytest.raises(BadRequest) as info:
        canonical_context({"k": "€" * 3000})
    assert info.value.code == "bad_context"


def test_context_with_a_lone_surrogate_is_bad_context() -> None:
    with pytest.raises(BadRequest):
        canonical_context({"k": "\ud800"})


# --- KekCache --------------------------------------------------------------------------------


def _put(cache: KekCache, key_id: str, version: int) -> tuple[AeadKey, bytes]:
    material = bytearray(os.urandom(32))
    raw = bytes(material)
    key = cache.put(key_id, version, material)
    assert material == bytearray(32)  # the caller's copy is wiped on the way in
    return key, raw


def test_put_and_get() -> None:
    cache = KekCache()
    key, raw = _put(cache, KEY_ID, 1)
    assert cache.get(KEY_ID, 1) is key
    assert cache.get(KEY_ID, 2) is None
    assert cache.get(OTHER_KEY_ID, 1) is None
    sealed = key.seal(b"dek", b"aad")
    assert AeadKey(raw).open(sealed, b"aad") == b"dek"
    buf, _ = cache._entries[(KEY_ID, 1)]
    assert buf.locked or os.geteuid() != 0
    assert buf.bytes() == raw
    cache.clear()


def test_a_second_put_of_a_version_keeps_the_first_copy_and_an_operation_using_it_goes_on() -> None:
    """Two requests that both found the version missing (after a sweep) unwrap it and put it: the second must
    not drop the key the first is using (that answered ``key_dropped`` to requests under load)."""
    cache = KekCache()
    first, raw = _put(cache, KEY_ID, 1)
    first_buf, _ = cache._entries[(KEY_ID, 1)]
    sealed = first.seal(b"dek", b"aad")
    again = bytearray(raw)
    assert cache.put(KEY_ID, 1, again) is first
    assert again == bytearray(32)  # the second copy is wiped, not kept
    assert cache._entries[(KEY_ID, 1)][0] is first_buf and not first_buf.closed
    assert first.open(sealed, b"aad") == b"dek"
    cache.clear()


def test_evict_one_version_wipes_and_drops_it() -> None:
    cache = KekCache()
    v1, _ = _put(cache, KEY_ID, 1)
    v2, _ = _put(cache, KEY_ID, 2)
    other, _ = _put(cache, OTHER_KEY_ID, 1)
    buf1, _ = cache._entries[(KEY_ID, 1)]
    sealed = v1.seal(b"dek", b"aad")
    cache.evict(KEY_ID, 1)
    assert cache.get(KEY_ID, 1) is None
    assert buf1.closed
    with pytest.raises(ValueError):
        buf1.view()
    with pytest.raises(Unavailable):
        v1.seal(b"dek", b"aad")
    with pytest.raises(Unavailable):
        v1.open(sealed, b"aad")
    # the other entries stay usable
    assert cache.get(KEY_ID, 2) is v2
    assert cache.get(OTHER_KEY_ID, 1) is other
    v2.seal(b"x", b"aad")
    other.seal(b"x", b"aad")
    cache.clear()


def test_evict_all_versions_of_a_key() -> None:
    cache = KekCache()
    keys = [_put(cache, KEY_ID, v)[0] for v in (1, 2, 3)]
    other, _ = _put(cache, OTHER_KEY_ID, 1)
    bufs = [cache._entries[(KEY_ID, v)][0] for v in (1, 2, 3)]
    cache.evict(KEY_ID)
    for v, key, buf in zip((1, 2, 3), keys, bufs, strict=True):
        assert cache.get(KEY_ID, v) is None
        assert buf.closed
        with pytest.raises(Unavailable):
            key.seal(b"x", b"aad")
    assert cache.get(OTHER_KEY_ID, 1) is other
    cache.clear()


def test_evict_unknown_is_a_no_op() -> None:
    cache = KekCache()
    key, _ = _put(cache, KEY_ID, 1)
    cache.evict(OTHER_KEY_ID)
    cache.evict(KEY_ID, 2)
    assert cache.get(KEY_ID, 1) is key
    cache.clear()


def test_clear_wipes_and_drops_everything() -> None:
    cache = KekCache()
    keys = [_put(cache, k, v)[0] for k in (KEY_ID, OTHER_KEY_ID) for v in (1, 2)]
    bufs = [buf for buf, _ in cache._entries.values()]
    cache.clear()
    assert cache._entries == {}
    assert all(buf.closed for buf in bufs)
    for key in keys:
        with pytest.raises(Unavailable):
            key.seal(b"x", b"aad")
    assert cache.get(KEY_ID, 1) is None
    cache.clear()  # idempotent


def test_sweep_drops_old_material_but_lets_inflight_operations_finish() -> None:
    cache = KekCache()
    held = cache.put("k1", 1, bytearray(b"\x07" * 32))
    buf = cache._entries[("k1", 1)][0]
    cache.sweep(max_age=3600)
    assert cache.get("k1", 1) is held  # young entries stay
    cache.sweep(max_age=0)
    assert cache.get("k1", 1) is None and buf.closed  # the locked copy is wiped
    assert held.open(held.seal(b"x", b"aad"), b"aad") == bytearray(b"x")  # an operation holding it completes
