"""Shamir secret sharing over GF(2^8) (keysteward.crypto.shamir).

Besides round trips, the field tables and the interpolation are checked against a reference
written here from first principles (carry-less multiplication mod 0x11b), so a wrong table
cannot hide behind a split/combine pair that share it.
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keysteward.crypto import shamir

pytestmark = pytest.mark.unit

BOUNDED = settings(max_examples=150, deadline=None)


# --- reference GF(2^8), independent of the module's tables ---------------------------------


def ref_mul(a: int, b: int) -> int:
    """Carry-less multiplication reduced mod x^8 + x^4 + x^3 + x + 1 (0x11b)."""
    product = 0
    while b:
        if b & 1:
            product ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11B
        b >>= 1
    return product


def ref_pow(a: int, n: int) -> int:
    result = 1
    for _ in range(n):
        result = ref_mul(result, a)
    return result


def ref_inv(a: int) -> int:
    assert a != 0
    return ref_pow(a, 254)  # a^(2^8 - 2) = a^-1 in the multiplicative group of order 255


def ref_eval(coefficients: list[int], x: int) -> int:
    acc = 0
    for power, c in enumerate(coefficients):
        acc ^= ref_mul(c, ref_pow(x, power))
    return acc


def ref_interpolate_at_zero(points: list[tuple[int, int]]) -> int:
    """Lagrange interpolation at x = 0: sum_j y_j * prod_{m != j} x_m / (x_m - x_j)."""
    total = 0
    for j, (xj, yj) in enumerate(points):
        num, den = 1, 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                num = ref_mul(num, xm)
                den = ref_mul(den, xm ^ xj)
        total ^= ref_mul(yj, ref_mul(num, ref_inv(den)))
    return total


def ref_combine(shares: list[tuple[int, bytes]]) -> bytes:
    length = len(shares[0][1])
    return bytes(ref_interpolate_at_zero([(x, y[i]) for x, y in shares]) for i in range(length))


# --- the field -------------------------------------------------------------------------------


def test_reference_multiplication_matches_known_aes_values() -> None:
    # FIPS-197 section 4.2: {57} x {83} = {c1}, {57} x {13} = {fe}
    assert ref_mul(0x57, 0x83) == 0xC1
    assert ref_mul(0x57, 0x13) == 0xFE


def test_tables_agree_with_reference_multiplication_for_all_pairs() -> None:
    for a in range(256):
        for b in range(256):
            assert shamir._mul(a, b) == ref_mul(a, b), (a, b)


def test_every_nonzero_element_has_an_inverse() -> None:
    for a in range(1, 256):
        inverse = shamir._div(1, a)
        assert shamir._mul(a, inverse) == 1, a
        assert inverse == ref_inv(a), a
        assert shamir._div(a, a) == 1


def test_field_axioms() -> None:
    rng = random.Random(1234)
    for _ in range(2000):
        a, b, c = (rng.randrange(256) for _ in range(3))
        assert shamir._mul(a, b) == shamir._mul(b, a)
        assert shamir._mul(shamir._mul(a, b), c) == shamir._mul(a, shamir._mul(b, c))
        assert shamir._mul(a, b ^ c) == shamir._mul(a, b) ^ shamir._mul(a, c)
        assert shamir._mul(a, 1) == a
        assert shamir._mul(a, 0) == 0
        if b:
            assert shamir._mul(shamir._div(a, b), b) == a


def test_generator_has_order_255() -> None:
    assert len({shamir._EXP[i] for i in range(255)}) == 255
    assert 0 not in shamir._EXP[:255]


def test_division_by_zero_raises() -> None:
    with pytest.raises(ZeroDivisionError):
        shamir._div(7, 0)
    assert shamir._div(0, 7) == 0


# --- split / combine -------------------------------------------------------------------------


@st.composite
def secret_and_scheme(draw: st.DrawFn) -> tuple[bytes, int, int]:
    secret = draw(st.binary(min_size=1, max_size=64))
    count = draw(st.integers(min_value=2, max_value=6))
    threshold = draw(st.integers(min_value=2, max_value=count))
    return secret, threshold, count


@BOUNDED
@given(secret_and_scheme(), st.randoms(use_true_random=False))
def test_every_threshold_subset_in_any_order_recovers(scheme: tuple[bytes, int, int], rng: random.Random) -> None:
    secret, threshold, count = scheme
    shares = shamir.split(secret, threshold, count)
    assert [x for x, _ in shares] == list(range(1, count + 1))
    assert all(len(y) == len(secret) for _, y in shares)
    for subset in itertools.combinations(shares, threshold):
        ordered = list(subset)
        rng.shuffle(ordered)
        assert bytes(shamir.combine(ordered)) == secret
    # more than threshold shares also recover
    assert bytes(shamir.combine(shares)) == secret


@BOUNDED
@given(st.binary(min_size=16, max_size=64), st.integers(min_value=3, max_value=6))
def test_threshold_minus_one_shares_do_not_recover(secret: bytes, threshold: int) -> None:
    # 16+ byte secrets: the chance that k-1 shares interpolate to the secret by luck is 2^-128
    shares = shamir.split(secret, threshold, threshold + 1)
    for subset in itertools.combinations(shares, threshold - 1):
        assert bytes(shamir.combine(list(subset))) != secret


def test_single_share_is_refused() -> None:
    shares = shamir.split(b"secret", 2, 3)
    with pytest.raises(ValueError):
        shamir.combine(shares[:1])
    with pytest.raises(ValueError):
        shamir.combine([])


def test_shares_leak_nothing_per_byte() -> None:
    # One share of a 2-of-n split of a constant secret takes every byte value: it carries no information.
    seen = set()
    for _ in range(6000):
        (_, y), _ = shamir.split(b"\x00", 2, 2)
        seen.add(y[0])
    assert len(seen) == 256


@BOUNDED
@given(secret_and_scheme(), st.data())
def test_flipped_byte_in_a_share_changes_the_result(scheme: tuple[bytes, int, int], data: st.DataObject) -> None:
    secret, threshold, count = scheme
    shares = shamir.split(secret, threshold, count)[:threshold]
    which = data.draw(st.integers(0, threshold - 1))
    pos = data.draw(st.integers(0, len(secret) - 1))
    flip = data.draw(st.integers(1, 255))
    x, y = shares[which]
    bad = bytearray(y)
    bad[pos] ^= flip
    tampered = [*shares[:which], (x, bad), *shares[which + 1 :]]
    result = shamir.combine(tampered)
    assert bytes(result) != secret
    # only the tampered byte position changes
    assert [i for i in range(len(secret)) if result[i] != secret[i]] == [pos]


@BOUNDED
@given(secret_and_scheme())
def test_split_matches_reference_interpolation(scheme: tuple[bytes, int, int]) -> None:
    secret, threshold, count = scheme
    shares = [(x, bytes(y)) for x, y in shamir.split(secret, threshold, count)]
    assert ref_combine(shares[:threshold]) == secret
    assert ref_combine(shares[-threshold:]) == secret


@BOUNDED
@given(
    st.lists(st.integers(0, 255), min_size=2, max_size=6).flatmap(
        lambda coeffs: st.tuples(
            st.just(coeffs),
            st.lists(st.integers(1, 255), min_size=len(coeffs), max_size=len(coeffs), unique=True),
        )
    )
)
def test_combine_matches_reference_on_random_polynomials(case: tuple[list[int], list[int]]) -> None:
    coefficients, xs = case
    shares = [(x, bytes([ref_eval(coefficients, x)])) for x in xs]
    assert ref_interpolate_at_zero([(x, y[0]) for x, y in shares]) == coefficients[0]
    assert bytes(shamir.combine(shares)) == bytes([coefficients[0]])


@BOUNDED
@given(
    st.integers(2, 8).flatmap(
        lambda n: st.tuples(
            st.lists(st.integers(1, 255), min_size=n, max_size=n, unique=True),
            st.lists(st.binary(min_size=4, max_size=4), min_size=n, max_size=n),
        )
    )
)
def test_combine_matches_reference_on_arbitrary_points(case: tuple[list[int], list[bytes]]) -> None:
    xs, ys = case
    shares = list(zip(xs, ys, strict=True))
    assert bytes(shamir.combine(shares)) == ref_combine(shares)


def test_known_vector() -> None:
    # f(x) = 0x42 + 0x17 x over GF(2^8): f(1) = 0x55, f(2) = 0x42 ^ (0x17*2) = 0x42 ^ 0x2e = 0x6c
    assert bytes(shamir.combine([(1, b"\x55"), (2, b"\x6c")])) == b"\x42"
    assert bytes(shamir.combine([(2, b"\x6c"), (1, b"\x55")])) == b"\x42"


def test_max_share_count() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, 255)
    assert shares[-1][0] == 255
    assert bytes(shamir.combine([shares[0], shares[127], shares[254]])) == secret


def test_accepts_bytearray_and_memoryview_secrets() -> None:
    for secret in (bytearray(b"abc"), memoryview(b"abc")):
        shares = shamir.split(secret, 2, 2)
        assert bytes(shamir.combine(shares)) == b"abc"


def test_split_returns_bytearrays_that_can_be_wiped() -> None:
    for _, y in shamir.split(b"key", 2, 3):
        assert isinstance(y, bytearray)
    assert isinstance(shamir.combine(shamir.split(b"key", 2, 3)), bytearray)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("threshold", "count"),
    [(1, 1), (1, 3), (0, 3), (3, 2), (2, 256), (-1, 5), (256, 256)],
)
def test_split_rejects_bad_schemes(threshold: int, count: int) -> None:
    with pytest.raises(ValueError):
        shamir.split(b"secret", threshold, count)


def test_split_rejects_empty_secret() -> None:
    with pytest.raises(ValueError):
        shamir.split(b"", 2, 3)


def test_combine_rejects_duplicate_indexes() -> None:
    shares = shamir.split(b"secret", 2, 3)
    with pytest.raises(ValueError):
        shamir.combine([shares[0], shares[0]])
    with pytest.raises(ValueError):
        shamir.combine([shares[0], (shares[0][0], shares[1][1])])


@pytest.mark.parametrize("bad_index", [0, 256, -1, 1000])
def test_combine_rejects_out_of_range_indexes(bad_index: int) -> None:
    shares = shamir.split(b"secret", 2, 3)
    with pytest.raises(ValueError):
        shamir.combine([shares[0], (bad_index, shares[1][1])])


def test_combine_rejects_mismatched_lengths() -> None:
    shares = shamir.split(b"secret", 2, 3)
    with pytest.raises(ValueError):
        shamir.combine([shares[0], (shares[1][0], shares[1][1][:-1])])
    with pytest.raises(ValueError):
        shamir.combine([shares[0], (shares[1][0], shares[1][1] + b"\x00")])


# --- evaluate at any point, share commitments -------------------------------------------------


@BOUNDED
@given(secret=st.binary(min_size=1, max_size=48), k=st.integers(2, 6), extra=st.integers(0, 4), seed=st.integers())
def test_any_quorum_regenerates_every_share(secret: bytes, k: int, extra: int, seed: int) -> None:
    n = k + extra
    shares = shamir.split(secret, k, n)
    quorum = random.Random(seed).sample(shares, k)
    assert shamir.evaluate(quorum, 0) == bytearray(secret) == shamir.combine(quorum)
    for x, y in shares:
        assert shamir.evaluate(quorum, x) == y
    beyond = shamir.evaluate(quorum, n + 1)  # a point never handed out: consistent with the same polynomials
    assert shamir.combine([*quorum[: k - 1], (n + 1, beyond)]) == bytearray(secret)


def test_evaluate_refuses_bad_points() -> None:
    shares = shamir.split(b"\x01" * 16, 2, 3)
    for bad in (-1, 256):
        with pytest.raises(ValueError):
            shamir.evaluate(shares, bad)
    with pytest.raises(ValueError):
        shamir.evaluate([shares[0], shares[0]], 1)
    with pytest.raises(ValueError):
        shamir.evaluate([shares[0], (2, b"\x00")], 1)


def test_commitment_matches_an_independent_encoding() -> None:
    import hashlib

    context, x, y = bytes.fromhex("0123456789abcdef"), 3, bytes(range(32))
    expected = hashlib.sha256(
        b"keysteward/v1/shamir-share-commitment" + bytes([len(context)]) + context + bytes([x]) + b"\x00\x20" + y
    ).digest()
    assert shamir.commitment(context, x, y) == expected
    assert shamir.commitment(context, x, bytearray(y)) == shamir.commitment(context, x, memoryview(y))


def test_commitment_binds_context_index_and_value() -> None:
    y = bytes(32)
    base = shamir.commitment(b"ctx", 1, y)
    assert shamir.commitment(b"ctx2", 1, y) != base
    assert shamir.commitment(b"ctx", 2, y) != base
    assert shamir.commitment(b"ctx", 1, b"\x01" + y[1:]) != base
    assert shamir.commitment(b"ctx", 1, y + b"\x00") != base  # lengths are part of the input
    assert shamir.commitment(b"ct", 1, b"x" + y) != shamir.commitment(b"ctx", 1, y)
    for bad_x in (0, 256, -1):
        with pytest.raises(ValueError):
            shamir.commitment(b"ctx", bad_x, y)
    with pytest.raises(ValueError):
        shamir.commitment(b"c" * 256, 1, y)
