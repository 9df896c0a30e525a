"""The audit hash chain (keysteward.audit.chain): every tampering is detected and named by its first record."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import string
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from keysteward.audit import chain
from keysteward.audit.chain import GENESIS, ChainBroken, Link
from keysteward.errors import KeystewardError

pytestmark = pytest.mark.unit

BOUNDED = settings(max_examples=200, deadline=None)
N = 20

KEY = Ed25519PrivateKey.generate()
PUB = KEY.public_key()
OTHER_KEY = Ed25519PrivateKey.generate()


def make_link(
    tenant: str,
    seq: int,
    prev: str,
    *,
    key: Ed25519PrivateKey | None = KEY,
    action: str = "key.decrypt",
    outcome: str = "ok",
    details: dict[str, object] | None = None,
) -> Link:
    body = chain.make_body(
        seq=seq,
        prev=prev,
        ts=f"2025-01-01T00:00:{seq % 60:02d}Z",
        actor=f"user-{seq % 3}",
        action=action,
        target=f"{tenant}/key-{seq}",
        outcome=outcome,
        reason="" if outcome == "ok" else "policy_denied",
        details=details if details is not None else {"n": seq, "note": "café ✓"},
    )
    digest = chain.link_hash(body)
    signature = chain.sign(key, tenant, seq, digest) if key is not None else None
    return Link(tenant, seq, body, digest, signature)


def build(
    n: int = N,
    tenant: str = "tenant-a",
    *,
    signed: Callable[[int], bool] = lambda seq: True,
    start_seq: int = 1,
    start_prev: str = GENESIS,
) -> list[Link]:
    links: list[Link] = []
    prev = start_prev
    for seq in range(start_seq, start_seq + n):
        link = make_link(tenant, seq, prev, key=KEY if signed(seq) else None)
        links.append(link)
        prev = link.hash
    return links


def rehash(link: Link, body: str, *, key: Ed25519PrivateKey | None = None) -> Link:
    """What an attacker with database access (but without the audit key) can write."""
    digest = chain.link_hash(body)
    signature = chain.sign(key, link.tenant_id, link.seq, digest) if key is not None else None
    return dataclasses.replace(link, body=body, hash=digest, signature=signature)


def edit_body(link: Link, **changes: object) -> str:
    body = json.loads(link.body)
    body.update(changes)
    return chain.canonical(body)


def broken_at(links: list[Link], **kwargs: object) -> int:
    with pytest.raises(ChainBroken) as info:
        chain.verify(links, PUB, **kwargs)  # type: ignore[arg-type]
    assert info.value.code == "audit_chain_broken"
    assert info.value.status == 409
    assert str(info.value.seq) in info.value.message
    return info.value.seq


MIDDLE = [2, 7, 10, 19]  # 1-based seq numbers to attack (not the last one unless stated)


# --- the intact chain ------------------------------------------------------------------------


def test_intact_chain_verifies_and_reports_counts() -> None:
    links = build()
    report = chain.verify(links, PUB)
    assert report.records == N
    assert report.signed == N
    assert report.head_seq == N
    assert report.head_hash == links[-1].hash
    assert report.unsigned_tail == 0


def test_links_are_chained_by_hash() -> None:
    links = build()
    assert json.loads(links[0].body)["prev"] == GENESIS
    for before, after in itertools.pairwise(links):
        assert json.loads(after.body)["prev"] == before.hash
    assert all(len(link.hash) == 64 for link in links)


def test_empty_chain() -> None:
    report = chain.verify([], PUB)
    assert (report.records, report.signed, report.head_seq, report.head_hash, report.unsigned_tail) == (
        0,
        0,
        0,
        GENESIS,
        0,
    )


def test_verify_a_later_page_from_a_known_head() -> None:
    links = build()
    report = chain.verify(links[10:], PUB, start_seq=11, start_prev=links[9].hash)
    assert report.records == N - 10
    assert report.head_seq == N
    # the same page against the wrong head is refused
    assert broken_at(links[10:], start_seq=11, start_prev=links[8].hash) == 11
    assert broken_at(links[10:], start_seq=10, start_prev=links[9].hash) == 10


def test_verify_accepts_a_generator() -> None:
    assert chain.verify(iter(build()), PUB).records == N


def test_body_is_canonical_json() -> None:
    link = make_link("t", 1, GENESIS)
    body = json.loads(link.body)
    assert chain.canonical(body) == link.body
    assert set(body) == {"seq", "prev", "ts", "actor", "action", "target", "outcome", "reason", "details"}
    assert "café ✓" in link.body  # ensure_ascii=False: the hash is over the UTF-8 text


def test_make_body_rejects_unknown_outcome() -> None:
    with pytest.raises(ValueError):
        make_link("t", 1, GENESIS, outcome="maybe")


def test_signed_message_binds_tenant_seq_and_hash() -> None:
    base = chain.signed_message("t", 1, "ab" * 32)
    assert base.startswith(chain.SIGNING_CONTEXT + b"|")
    assert chain.signed_message("u", 1, "ab" * 32) != base
    assert chain.signed_message("t", 2, "ab" * 32) != base
    assert chain.signed_message("t", 1, "cd" * 32) != base


# --- attacks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seq", [1, *MIDDLE, N])
def test_body_modified_hash_left(seq: int) -> None:
    links = build()
    i = seq - 1
    links[i] = dataclasses.replace(links[i], body=edit_body(links[i], outcome="denied"))
    assert broken_at(links) == seq


@pytest.mark.parametrize("seq", [1, *MIDDLE, N])
def test_body_and_hash_modified_on_a_signed_link(seq: int) -> None:
    links = build()
    i = seq - 1
    links[i] = rehash(links[i], edit_body(links[i], actor="someone-else"))
    links[i] = dataclasses.replace(links[i], signature=build()[i].signature)  # keep the old signature
    assert broken_at(links) == seq


@pytest.mark.parametrize("seq", [1, *MIDDLE])
def test_body_and_hash_modified_on_an_unsigned_link_breaks_the_next_link(seq: int) -> None:
    links = build(signed=lambda s: s != seq)
    i = seq - 1
    links[i] = rehash(links[i], edit_body(links[i], outcome="ok", action="policy.change"))
    assert broken_at(links) == seq + 1


def test_signature_stripped_and_body_rewritten_breaks_the_next_link() -> None:
    links = build()
    links[6] = rehash(links[6], edit_body(links[6], actor="root"))  # no signature at all
    assert broken_at(links) == 8


@pytest.mark.parametrize("seq", [2, *MIDDLE, N])
def test_record_deleted(seq: int) -> None:
    links = build()
    del links[seq - 1]
    if seq == N:
        # deleting the newest record is a valid shorter chain: the head (kept apart, in audit_head) is what catches it
        report = chain.verify(links, PUB)
        assert report.head_seq == N - 1
        assert report.head_hash != build()[-1].hash
    else:
        assert broken_at(links) == seq


def test_record_deleted_at_the_start() -> None:
    links = build()
    assert broken_at(links[1:]) == 1
    assert broken_at(links[5:]) == 1


def test_several_records_deleted_and_renumbered() -> None:
    links = build()
    kept = links[:4] + links[6:]
    renumbered = [dataclasses.replace(link, seq=n) for n, link in enumerate(kept, start=1)]
    assert broken_at(renumbered) == 5


@pytest.mark.parametrize("after", [1, 5, 10, N - 1])
def test_record_inserted_unsigned(after: int) -> None:
    links = build()
    forged = make_link("tenant-a", after + 1, links[after - 1].hash, key=None, action="key.export")
    tampered = [*links[:after], forged, *links[after:]]
    # The forged link itself is well formed and unsigned (unsigned links are legal while sealed); the chain
    # breaks where the displaced original follows it: that record's position is named.
    assert broken_at(tampered) == after + 2


@pytest.mark.parametrize("after", [1, 5, 10, N - 1])
def test_record_inserted_and_the_rest_renumbered_and_rehashed(after: int) -> None:
    links = build()
    forged = make_link("tenant-a", after + 1, links[after - 1].hash, key=None, action="key.export")
    rest: list[Link] = []
    prev = forged.hash
    for link in links[after:]:
        moved = rehash(dataclasses.replace(link, seq=link.seq + 1), edit_body(link, seq=link.seq + 1, prev=prev))
        moved = dataclasses.replace(moved, signature=link.signature)
        rest.append(moved)
        prev = moved.hash
    # the original signatures cover the original (tenant, seq, hash): the first moved signed link fails
    assert broken_at([*links[:after], forged, *rest]) == after + 2


@pytest.mark.parametrize("after", [0, 5, N - 1])
def test_record_inserted_signed_by_another_key(after: int) -> None:
    links = build()
    prev = links[after - 1].hash if after else GENESIS
    forged = make_link("tenant-a", after + 1, prev, key=OTHER_KEY)
    assert broken_at([*links[:after], forged, *links[after:]]) == after + 1


def test_record_appended_signed_by_another_key() -> None:
    links = build()
    forged = make_link("tenant-a", N + 1, links[-1].hash, key=OTHER_KEY)
    assert broken_at([*links, forged]) == N + 1


@pytest.mark.parametrize("seq", [1, *MIDDLE])
def test_two_records_swapped(seq: int) -> None:
    links = build(N + 1)
    i = seq - 1
    links[i], links[i + 1] = links[i + 1], links[i]
    assert broken_at(links) == seq


def test_two_records_swapped_and_renumbered() -> None:
    links = build()
    a, b = links[4], links[5]
    links[4], links[5] = dataclasses.replace(b, seq=5), dataclasses.replace(a, seq=6)
    assert broken_at(links) == 5


def test_reversed_chain() -> None:
    assert broken_at(list(reversed(build()))) == 1


@pytest.mark.parametrize("seq", [1, *MIDDLE, N])
def test_signature_forged_by_another_key(seq: int) -> None:
    links = build()
    i = seq - 1
    links[i] = dataclasses.replace(links[i], signature=chain.sign(OTHER_KEY, "tenant-a", seq, links[i].hash))
    assert broken_at(links) == seq


def test_chain_checked_against_another_public_key() -> None:
    with pytest.raises(ChainBroken) as info:
        chain.verify(build(), OTHER_KEY.public_key())
    assert info.value.seq == 1


def test_signature_copied_from_another_record() -> None:
    links = build()
    links[7] = dataclasses.replace(links[7], signature=links[6].signature)
    assert broken_at(links) == 8


@pytest.mark.parametrize("signature", [b"", b"\x00", b"\x00" * 63, b"\x00" * 64, b"\xff" * 64, b"\x00" * 65])
def test_garbage_signature(signature: bytes) -> None:
    links = build()
    links[3] = dataclasses.replace(links[3], signature=signature)
    assert broken_at(links) == 4


@pytest.mark.parametrize("seq", MIDDLE)
def test_link_from_another_tenants_chain_spliced_in(seq: int) -> None:
    links = build()
    other = build(tenant="tenant-b", signed=lambda s: True)
    links[seq - 1] = other[seq - 1]
    assert broken_at(links) == seq


@pytest.mark.parametrize("seq", MIDDLE)
def test_link_from_another_tenant_relabelled(seq: int) -> None:
    links = build()
    other = build(tenant="tenant-b")
    links[seq - 1] = dataclasses.replace(other[seq - 1], tenant_id="tenant-a")
    assert broken_at(links) == seq


def test_other_tenants_link_relabelled_with_a_matching_prev_fails_on_signature() -> None:
    links = build()
    theirs = make_link("tenant-b", 5, links[3].hash)  # signed by the same server key, for tenant-b
    links[4] = dataclasses.replace(theirs, tenant_id="tenant-a")
    assert broken_at(links) == 5


def test_link_from_another_tenant_spliced_in_at_the_start() -> None:
    links = build()
    links[0] = build(tenant="tenant-b")[0]
    assert broken_at(links, tenant_id="tenant-a") == 1


# --- unsigned links --------------------------------------------------------------------------


def test_unsigned_links_are_accepted_and_counted_as_tail() -> None:
    links = build(signed=lambda seq: seq <= 15)
    report = chain.verify(links, PUB)
    assert report.records == N
    assert report.signed == 15
    assert report.unsigned_tail == 5
    assert report.head_hash == links[-1].hash


def test_a_signed_link_ends_the_unsigned_tail() -> None:
    links = build(signed=lambda seq: seq <= 10 or seq == N)
    report = chain.verify(links, PUB)
    assert report.signed == 11
    assert report.unsigned_tail == 0
    assert chain.verify(links[:-1], PUB).unsigned_tail == 9


def test_all_unsigned_chain() -> None:
    report = chain.verify(build(signed=lambda seq: False), PUB)
    assert (report.records, report.signed, report.unsigned_tail) == (N, 0, N)


def test_next_signed_link_covers_rewritten_unsigned_links() -> None:
    # records 11..19 written while sealed; an attacker rewrites 13..20 consistently (hashes and prev)
    links = build(signed=lambda seq: seq <= 10 or seq == N)
    prev = links[11].hash
    for i in range(12, N):
        new = rehash(links[i], edit_body(links[i], actor="nobody", prev=prev))
        if links[i].signature is not None:
            new = dataclasses.replace(new, signature=links[i].signature)
        links[i] = new
        prev = new.hash
    # record 20's signature covers its hash, which covers its prev: the rewrite is caught there
    assert broken_at(links) == N


def test_rewriting_an_unsigned_tail_is_visible_only_as_unsigned_tail() -> None:
    # The limit of what verify() alone can prove: records after the last signature (or with their
    # signatures stripped) are covered by no key, so a consistent rewrite verifies and is reported
    # only through unsigned_tail; the CLI prints it and the head in audit_head is the other check.
    links = build()
    prev = links[14].hash
    for i in range(15, N):
        links[i] = rehash(links[i], edit_body(links[i], actor="nobody", prev=prev))
        prev = links[i].hash
    report = chain.verify(links, PUB)
    assert report.signed == 15
    assert report.unsigned_tail == 5
    assert report.head_hash != build()[-1].hash


# --- malformed bodies ------------------------------------------------------------------------


@pytest.mark.parametrize("body", ["not json", "", "{", "[1, 2]", "null", "42", '"text"', "{'seq': 1}"])
def test_body_that_is_not_a_json_object(body: str) -> None:
    links = build()
    links[5] = rehash(links[5], body)
    assert broken_at(links) == 6


def test_body_naming_another_sequence_number() -> None:
    links = build()
    links[5] = rehash(links[5], edit_body(links[5], seq=7), key=KEY)
    assert broken_at(links) == 6


def test_body_without_prev() -> None:
    links = build()
    body = json.loads(links[5].body)
    del body["prev"]
    links[5] = rehash(links[5], chain.canonical(body), key=KEY)
    assert broken_at(links) == 6


def test_link_seq_changed_without_the_body() -> None:
    links = build()
    links[5] = dataclasses.replace(links[5], seq=7)
    assert broken_at(links) == 6


def test_chain_broken_is_a_keysteward_error() -> None:
    exc = ChainBroken("record 3 was modified", 3)
    assert isinstance(exc, KeystewardError)
    assert exc.seq == 3
    assert exc.diagnostics() == "audit_chain_broken: record 3 was modified"


def test_body_with_a_lone_surrogate_is_chain_broken() -> None:
    links = build()
    exported = json.dumps({"body": links[5].body.replace("key.decrypt", "key.decrypt\ud800")})
    links[5] = dataclasses.replace(links[5], body=json.loads(exported)["body"])
    assert broken_at(links) == 6


# --- fuzz ------------------------------------------------------------------------------------


@BOUNDED
@given(
    st.integers(0, N - 1),
    st.sampled_from(["tenant_id", "seq", "body", "hash", "signature"]),
    st.data(),
)
def test_fuzz_any_single_field_change_is_detected_at_or_before_that_record(
    index: int, field: str, data: st.DataObject
) -> None:
    links = build()
    original = links[index]
    value: Any
    if field == "tenant_id":
        value = data.draw(st.text(max_size=20).filter(lambda t: t != original.tenant_id))
    elif field == "seq":
        value = data.draw(st.integers(-5, 100).filter(lambda s: s != original.seq))
    elif field == "body":
        value = data.draw(st.text(max_size=300).filter(lambda t: t != original.body))
    elif field == "hash":
        value = data.draw(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64))
        if value == original.hash:
            return
    else:
        value = data.draw(st.binary(max_size=80).filter(lambda s: s != original.signature))
    links[index] = dataclasses.replace(original, **{field: value})
    with pytest.raises(ChainBroken) as info:
        chain.verify(links, PUB, tenant_id=original.tenant_id)
    assert info.value.seq <= original.seq


@BOUNDED
@given(st.permutations(list(range(8))))
def test_fuzz_any_reordering_is_detected(order: list[int]) -> None:
    links = build(8)
    shuffled = [links[i] for i in order]
    if order == sorted(order):
        assert chain.verify(shuffled, PUB).records == 8
    else:
        first_moved = next(i for i, j in enumerate(order) if i != j)
        assert broken_at(shuffled) == first_moved + 1


@BOUNDED
@given(
    st.lists(
        st.builds(
            Link,
            tenant_id=st.text(max_size=10),
            seq=st.integers(-2, 30),
            body=st.text(max_size=200),
            hash=st.text(max_size=70),
            signature=st.none() | st.binary(max_size=80),
        ),
        max_size=5,
    )
)
def test_fuzz_garbage_links_only_raise_chain_broken(links: list[Link]) -> None:
    try:
        chain.verify(links, PUB)
    except ChainBroken as exc:
        assert isinstance(exc.seq, int)
    else:
        assert links == []


def test_foreign_link_with_another_seq_is_named_by_its_position() -> None:
    links = build()
    links[4] = build(30, tenant="tenant-b")[25]
    assert broken_at(links) == 5


def test_a_body_made_of_parts_is_the_canonical_json_of_its_fields() -> None:
    """The writer makes a body's parts before it takes the lock and joins them with ``seq`` and ``prev`` under
    it: the result must be exactly :func:`chain.canonical` of the whole record, whatever the values hold."""
    rng = random.Random(7)

    def text() -> str:
        return "".join(rng.choice(string.printable + 'é€\u2028"\\\x00') for _ in range(rng.randrange(12)))

    for _ in range(2000):
        details = {
            text(): rng.choice([text(), rng.randrange(-(10**12), 10**12), rng.random(), True, None, [1, "a"], {"z": 1}])
            for _ in range(rng.randrange(5))
        }
        fields = {"ts": text(), "actor": text(), "action": text(), "target": text(),
                  "outcome": rng.choice(sorted(chain.OUTCOMES)), "reason": text()}  # fmt: skip
        seq, prev = rng.randrange(1, 10**9), f"{rng.getrandbits(256):064x}"
        want = chain.canonical({"seq": seq, "prev": prev, "details": details, **fields})
        assert chain.join_body(chain.body_parts(details=details, **fields), seq, prev) == want
