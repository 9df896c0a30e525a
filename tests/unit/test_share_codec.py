"""Text form of unseal shares (keysteward.formats.share): every bad input is an InvalidShare."""

from __future__ import annotations

import hashlib
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keysteward.errors import BadRequest, InvalidShare
from keysteward.formats import share as codec
from keysteward.formats.share import Share

pytestmark = pytest.mark.unit

BOUNDED = settings(max_examples=300, deadline=None)

CLUSTER = bytes.fromhex("0123456789abcdef")
SHARE = Share(CLUSTER, 7, bytes(range(32)))
SHARE_ALPHABET = string.ascii_lowercase + string.digits + "-ABCDEF \t\n"


def _with_check(body: str) -> str:
    return f"{body}-{hashlib.sha256(body.encode()).digest()[:4].hex()}"


shares = st.builds(
    Share,
    cluster=st.binary(min_size=8, max_size=8),
    index=st.integers(1, 255),
    value=st.binary(min_size=1, max_size=256),
)


def _decode_or_invalid(text: str) -> Share | None:
    """Decode, allowing only InvalidShare as the failure (anything else propagates and fails the test)."""
    try:
        return codec.decode(text)
    except InvalidShare as exc:
        assert exc.code == "invalid_share"
        assert exc.status == 400
        return None


# --- round trip ------------------------------------------------------------------------------


def test_known_text() -> None:
    text = codec.encode(SHARE)
    body = f"kss1-0123456789abcdef-7-{bytes(range(32)).hex()}"
    assert text == _with_check(body)
    assert codec.decode(text) == SHARE


@BOUNDED
@given(shares)
def test_round_trip(share: Share) -> None:
    text = codec.encode(share)
    assert text.startswith("kss1-")
    assert len(text) <= codec.MAX_TEXT
    decoded = codec.decode(text)
    assert decoded == share
    assert (decoded.cluster, decoded.index, decoded.value) == (share.cluster, share.index, share.value)


def test_surrounding_whitespace_is_ignored() -> None:
    text = codec.encode(SHARE)
    assert codec.decode(f"  {text}\n") == SHARE
    assert codec.decode(f"\t{text}\r\n") == SHARE


def test_repr_hides_the_share_value() -> None:
    share = Share(CLUSTER, 3, bytes.fromhex("deadbeefcafebabe"))
    assert "deadbeef" not in repr(share)
    assert "cafebabe" not in repr(share)
    assert "0123456789abcdef" in repr(share)
    assert "index=3" in repr(share)


@pytest.mark.parametrize(
    "share",
    [Share(b"\x00" * 7, 1, b"x"), Share(b"\x00" * 9, 1, b"x"), Share(CLUSTER, 0, b"x"), Share(CLUSTER, 256, b"x")],
)
def test_encode_rejects_bad_shares(share: Share) -> None:
    with pytest.raises(ValueError):
        codec.encode(share)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "kss2" + codec.encode(SHARE)[4:],
        "KSS1" + codec.encode(SHARE)[4:],
        "kss-" + codec.encode(SHARE)[4:],
        "x" + codec.encode(SHARE),
        codec.encode(SHARE)[5:],
        "kss10123456789abcdef",
    ],
)
def test_wrong_prefix(text: str) -> None:
    with pytest.raises(InvalidShare):
        codec.decode(text)


def test_bad_checksum() -> None:
    text = codec.encode(SHARE)
    body, check = text.rsplit("-", 1)
    wrong = f"{(int(check, 16) ^ 1):08x}"
    with pytest.raises(InvalidShare, match="checksum"):
        codec.decode(f"{body}-{wrong}")


def test_one_character_typo_anywhere_is_caught() -> None:
    text = codec.encode(Share(CLUSTER, 42, bytes.fromhex("00112233445566778899aabbccddeeff")))
    replacements = string.hexdigits + "-gxz O"
    tried = 0
    for pos in range(len(text)):
        for ch in replacements:
            if ch == text[pos]:
                continue
            typo = text[:pos] + ch + text[pos + 1 :]
            with pytest.raises(InvalidShare):
                codec.decode(typo)
            tried += 1
    assert tried > 1000


def test_swapped_adjacent_characters_are_caught() -> None:
    text = codec.encode(SHARE)
    for pos in range(len(text) - 1):
        if text[pos] == text[pos + 1]:
            continue
        swapped = text[:pos] + text[pos + 1] + text[pos] + text[pos + 2 :]
        with pytest.raises(InvalidShare):
            codec.decode(swapped)


def test_dropped_or_doubled_character_is_caught() -> None:
    text = codec.encode(SHARE)
    for pos in range(len(text)):
        with pytest.raises(InvalidShare):
            codec.decode(text[:pos] + text[pos + 1 :])
        with pytest.raises(InvalidShare):
            codec.decode(text[:pos] + text[pos] + text[pos:])


def test_truncated_at_every_length() -> None:
    text = codec.encode(SHARE)
    for length in range(len(text)):
        with pytest.raises(InvalidShare):
            codec.decode(text[:length])


def test_oversized_text() -> None:
    with pytest.raises(InvalidShare, match="too long"):
        codec.decode("kss1-" + "a" * codec.MAX_TEXT)
    with pytest.raises(InvalidShare):
        codec.decode("x" * 10_000_000)
    # a valid share padded beyond the limit is refused before stripping
    with pytest.raises(InvalidShare, match="too long"):
        codec.decode(codec.encode(SHARE) + " " * codec.MAX_TEXT)


def test_value_longer_than_256_bytes_is_refused_even_with_a_good_checksum() -> None:
    body = f"kss1-{CLUSTER.hex()}-1-{'ab' * 257}"
    with pytest.raises(InvalidShare):
        codec.decode(_with_check(body))


@pytest.mark.parametrize(
    "body",
    [
        f"kss1-{CLUSTER.hex()}-1-abc",  # odd number of hex digits
        f"kss1-{CLUSTER.hex()}-1-ABCD",  # uppercase hex
        f"kss1-{CLUSTER.hex()}-1-zz",  # not hex
        f"kss1-{CLUSTER.hex()}-1-",  # empty value
        f"kss1-{CLUSTER.hex()}-1-a",  # one hex digit
        f"kss1-{CLUSTER.hex()[:-1]}-1-abcd",  # short cluster
        f"kss1-{CLUSTER.hex()}0-1-abcd",  # long cluster
        f"kss1-{CLUSTER.hex().upper()}-1-abcd",  # uppercase cluster
        f"kss1-{CLUSTER.hex()}-x-abcd",  # non-numeric index
        f"kss1-{CLUSTER.hex()}--1-abcd",  # negative index
        f"kss1-{CLUSTER.hex()}-1000-abcd",  # four-digit index
        f"kss1-{CLUSTER.hex()}-\u0661-abcd",  # ARABIC-INDIC DIGIT ONE is not an index
        f"kss1-{CLUSTER.hex()}-1-ab cd",  # space inside
        f"kss1-{CLUSTER.hex()}-1-abcd-extra",  # extra field
    ],
)
def test_malformed_shares_with_valid_checksums(body: str) -> None:
    with pytest.raises(InvalidShare):
        codec.decode(_with_check(body))


@pytest.mark.parametrize("index", ["0", "00", "000", "256", "999"])
def test_index_out_of_range_with_valid_checksum(index: str) -> None:
    with pytest.raises(InvalidShare):
        codec.decode(_with_check(f"kss1-{CLUSTER.hex()}-{index}-abcd"))


def test_uppercase_checksum_is_refused() -> None:
    text = codec.encode(SHARE)
    body, check = text.rsplit("-", 1)
    if check.upper() != check:
        with pytest.raises(InvalidShare):
            codec.decode(f"{body}-{check.upper()}")


def test_invalid_share_is_a_bad_request() -> None:
    with pytest.raises(BadRequest) as info:
        codec.decode("nonsense")
    assert info.value.code == "invalid_share"
    assert info.value.diagnostics().startswith("invalid_share: ")


# --- fuzz ------------------------------------------------------------------------------------


@BOUNDED
@given(st.text(max_size=2000))
def test_fuzz_arbitrary_text(text: str) -> None:
    result = _decode_or_invalid(text)
    if result is not None:
        assert codec.encode(result) == text.strip()


@BOUNDED
@given(st.text(alphabet=SHARE_ALPHABET, max_size=600))
def test_fuzz_share_like_text(text: str) -> None:
    _decode_or_invalid("kss1-" + text)


@BOUNDED
@given(shares, st.data())
def test_fuzz_mutations_of_a_valid_share(share: Share, data: st.DataObject) -> None:
    text = codec.encode(share)
    chars = list(text)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["replace", "insert", "delete", "truncate"]))
        pos = data.draw(st.integers(0, max(len(chars) - 1, 0)))
        if op == "replace" and chars:
            chars[pos] = data.draw(st.characters(codec="utf-8"))
        elif op == "insert":
            chars.insert(pos, data.draw(st.characters(codec="utf-8")))
        elif op == "delete" and chars:
            del chars[pos]
        else:
            del chars[pos:]
    mutated = "".join(chars)
    result = _decode_or_invalid(mutated)
    if result is not None:
        # The only mutations that may survive leave the share text itself intact (e.g. added whitespace).
        assert result == share
        assert mutated.strip() == text
