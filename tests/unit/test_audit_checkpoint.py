"""Signed audit checkpoints (keysteward.audit.checkpoint): codec, signatures, bad input, and the log check."""

from __future__ import annotations

import dataclasses
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from keysteward.audit import chain, checkpoint
from keysteward.audit.checkpoint import (
    Checkpoint,
    CheckpointConflict,
    CheckpointError,
    CheckpointForged,
    CheckpointInvalid,
    CheckpointMismatch,
    LogTruncated,
)
from keysteward.errors import KeystewardError
from tests.support.fuzz import edits, mutate
from tests.unit.test_audit_chain import KEY, PUB, build

pytestmark = pytest.mark.unit

BOUNDED = settings(max_examples=300, deadline=None)
TENANT = "tenant-a"
TS = "2025-06-01T12:00:00.123456+00:00"
OTHER = Ed25519PrivateKey.generate()


def cp_of(link: chain.Link, key: Ed25519PrivateKey = KEY, ts: str = TS) -> Checkpoint:
    return checkpoint.sign(key, link.tenant_id, link.seq, link.hash, ts)


def line_of(link: chain.Link, **kw: object) -> str:
    return checkpoint.encode(cp_of(link, **kw))  # type: ignore[arg-type]


def verify_with(links: list[chain.Link], lines: list[str]) -> Checkpoint | None:
    observer = checkpoint.Observer(checkpoint.read(lines, PUB, TENANT))
    report = chain.verify(observer.links(links), PUB, tenant_id=TENANT)
    return observer.check(report)


# --- round trip --------------------------------------------------------------------------------


def test_sign_encode_parse_verify_round_trip() -> None:
    link = build(3)[-1]
    line = line_of(link)
    assert "\n" not in line and line.isascii() and len(line) <= checkpoint.MAX_LINE
    obj = json.loads(line)
    assert obj == {
        "v": 1,
        "type": "keysteward.audit.checkpoint",
        "tenant_id": TENANT,
        "seq": 3,
        "hash": link.hash,
        "ts": TS,
        "sig": obj["sig"],
    }
    assert list(obj) == sorted(obj)  # canonical: sorted keys, no spaces
    parsed = checkpoint.parse(line)
    assert parsed == cp_of(link)
    assert checkpoint.parse(line.encode()) == parsed
    checkpoint.verify(parsed, PUB)
    assert checkpoint.as_dict(parsed) == obj


def test_checkpoint_signature_is_not_a_record_signature() -> None:
    """A record's signature over (tenant, seq, hash) cannot be passed off as a checkpoint, and back."""
    link = build(1)[0]
    cp = cp_of(link)
    assert link.signature is not None
    with pytest.raises(CheckpointForged):
        checkpoint.verify(dataclasses.replace(cp, sig=link.signature), PUB)
    forged_link = dataclasses.replace(link, signature=cp.sig)
    with pytest.raises(chain.ChainBroken):
        chain.verify([forged_link], PUB)


def test_signed_message_binds_every_field() -> None:
    cp = cp_of(build(2)[-1])
    for change in (
        {"tenant_id": "tenant-b"},
        {"seq": cp.seq + 1},
        {"hash": "0" * 64},
        {"ts": "2025-06-01T12:00:01.123456+00:00"},
    ):
        with pytest.raises(CheckpointForged) as info:
            checkpoint.verify(dataclasses.replace(cp, **change), PUB)  # type: ignore[arg-type]
        assert info.value.code == "audit_checkpoint_bad_signature"


def test_wrong_key() -> None:
    line = line_of(build(2)[-1], key=OTHER)
    with pytest.raises(CheckpointForged) as info:
        checkpoint.read([line], PUB, TENANT)
    assert "line 1" in info.value.message and "pinned audit key" in info.value.message


def test_sign_refuses_what_parse_would_refuse() -> None:
    with pytest.raises(CheckpointInvalid):
        checkpoint.sign(KEY, "a|b", 1, "0" * 64, TS)
    with pytest.raises(CheckpointInvalid):
        checkpoint.sign(KEY, TENANT, 0, "0" * 64, TS)
    with pytest.raises(CheckpointInvalid):
        checkpoint.sign(KEY, TENANT, 1, "0" * 64, "yesterday")


# --- bad input -----------------------------------------------------------------------------------


def _good() -> dict[str, object]:
    return checkpoint.as_dict(cp_of(build(2)[-1]))


@pytest.mark.parametrize(
    "change",
    [
        {"v": 2},
        {"v": True},
        {"type": "keysteward.audit.record"},
        {"tenant_id": ""},
        {"tenant_id": "x" * 65},
        {"tenant_id": "a|1"},
        {"tenant_id": 7},
        {"seq": 0},
        {"seq": -1},
        {"seq": 2**63},
        {"seq": True},
        {"seq": 2.0},
        {"seq": "2"},
        {"hash": "A" * 64},
        {"hash": "0" * 63},
        {"hash": None},
        {"ts": "2025-06-01T12:00:00Z"},
        {"ts": "2025-13-01T12:00:00+00:00"},
        {"ts": "2025-06-01T12:00:00+02:00"},
        {"ts": 1_700_000_000},
        {"sig": "00" * 63},
        {"sig": "ZZ" * 64},
        {"sig": ["00"]},
    ],
)
def test_bad_field(change: dict[str, object]) -> None:
    obj = {**_good(), **change}
    with pytest.raises(CheckpointInvalid) as info:
        checkpoint.parse(json.dumps(obj))
    assert info.value.code == "audit_checkpoint_invalid"


def test_missing_and_unknown_fields() -> None:
    obj = _good()
    del obj["ts"]
    with pytest.raises(CheckpointInvalid, match="missing: ts"):
        checkpoint.parse(json.dumps(obj))
    with pytest.raises(CheckpointInvalid, match="unknown"):
        checkpoint.parse(json.dumps({**_good(), "extra": 1}))


@pytest.mark.parametrize("text", ["", "null", "[]", "1", '"x"', "{", "{}" * 2, "\x00", "{" * 5000 + "}" * 5000])
def test_not_a_checkpoint(text: str) -> None:
    with pytest.raises(CheckpointInvalid):
        checkpoint.parse(text)


def test_truncated_at_every_length() -> None:
    line = line_of(build(2)[-1])
    for n in range(len(line)):
        with pytest.raises(CheckpointInvalid):
            checkpoint.parse(line[:n])


def test_oversized() -> None:
    obj = {**_good(), "tenant_id": "x" * 2000}
    with pytest.raises(CheckpointInvalid, match="at most 1024 bytes"):
        checkpoint.parse(json.dumps(obj))
    with pytest.raises(CheckpointInvalid, match="at most 1024 bytes"):
        checkpoint.parse(b" " * (checkpoint.MAX_LINE + 1))
    with pytest.raises(CheckpointInvalid, match="at most 1024 bytes"):  # 600 characters, 1200 bytes
        checkpoint.parse("é" * 600)


def test_not_ascii_bytes() -> None:
    with pytest.raises(CheckpointInvalid, match="ASCII"):
        checkpoint.parse(line_of(build(1)[0]).encode()[:-2] + b"\xff}")


@BOUNDED
@given(changes=edits(max_position=400))
def test_fuzzed_line_is_refused_or_fails_its_signature(changes: list[tuple[int, int, int]]) -> None:
    """Damage never passes: the line does not parse, or its signature fails, or it is the same checkpoint."""
    original = line_of(build(2)[-1]).encode()
    damaged = mutate(original, changes)
    try:
        cp = checkpoint.parse(damaged)
        checkpoint.verify(cp, PUB)
    except CheckpointError as exc:
        assert isinstance(exc, CheckpointInvalid | CheckpointForged)
        return
    assert cp == checkpoint.parse(original)  # only harmless edits (whitespace) can survive


@BOUNDED
@given(data=st.binary(max_size=2048) | st.text(max_size=1200))
def test_arbitrary_input_raises_only_checkpoint_invalid(data: bytes | str) -> None:
    try:
        checkpoint.parse(data)
    except CheckpointInvalid:
        return
    except KeystewardError as exc:  # pragma: no cover - a failure message
        pytest.fail(f"unexpected {exc!r}")


# --- the log against its checkpoints ---------------------------------------------------------------


def test_log_that_reaches_its_checkpoints() -> None:
    links = build(10)
    lines = [line_of(links[3]), line_of(links[9], ts="2025-06-01T12:01:00.000000+00:00")]
    newest = verify_with(links, lines)
    assert newest is not None and newest.seq == 10


def test_log_extended_past_its_checkpoints_is_fine() -> None:
    links = build(10)
    assert verify_with(links, [line_of(links[4])]) == cp_of(links[4])


def test_shortened_log() -> None:
    links = build(10)
    with pytest.raises(LogTruncated) as info:
        verify_with(links[:7], [line_of(links[4]), line_of(links[9])])
    assert info.value.code == "audit_log_truncated"
    assert "ends at record 7" in info.value.message and "record 10" in info.value.message


def test_emptied_log() -> None:
    links = build(3)
    with pytest.raises(LogTruncated, match="ends at record 0"):
        verify_with([], [line_of(links[2])])


def test_shortened_then_regrown_log_disagrees() -> None:
    """The newest records deleted, the head reset, new records written on top: a hash mismatch."""
    links = build(10)
    others = [
        dataclasses.replace(link, body=link.body.replace('"n":', '"m":'))
        for link in build(4, start_seq=7, start_prev=links[5].hash)
    ]
    regrown = links[:6] + _rechain(others, links[5].hash)
    assert chain.verify(regrown, PUB).head_seq == 10  # a well-formed, signed chain of the same length
    with pytest.raises(CheckpointMismatch) as info:
        verify_with(regrown, [line_of(links[9])])
    assert info.value.code == "audit_checkpoint_mismatch" and "record 10" in info.value.message


def _rechain(links: list[chain.Link], prev: str) -> list[chain.Link]:
    out = []
    for link in links:
        body = json.loads(link.body)
        body["prev"] = prev
        text = chain.canonical(body)
        digest = chain.link_hash(text)
        out.append(
            dataclasses.replace(link, body=text, hash=digest, signature=chain.sign(KEY, TENANT, link.seq, digest))
        )
        prev = digest
    return out


def test_checkpoints_of_other_chains_are_checked_then_skipped() -> None:
    links = build(5)
    others = build(9, tenant="tenant-b")
    assert verify_with(links, [line_of(others[8]), line_of(links[2])]) == cp_of(links[2])
    with pytest.raises(CheckpointForged, match="line 1"):
        checkpoint.read([line_of(others[8], key=OTHER), line_of(links[2])], PUB, TENANT)


def test_conflicting_checkpoints() -> None:
    links = build(5)
    fork = dataclasses.replace(links[4], hash="f" * 64)
    with pytest.raises(CheckpointConflict, match="line 2"):
        checkpoint.read([line_of(links[4]), line_of(fork)], PUB, TENANT)


def test_blank_lines_and_newlines() -> None:
    links = build(3)
    lines = ["", line_of(links[0]) + "\n", "  \n", line_of(links[2]) + "\r\n"]
    assert sorted(checkpoint.read(lines, PUB, TENANT)) == [1, 3]
    assert sorted(checkpoint.read([line.encode() for line in lines], PUB, TENANT)) == [1, 3]


def test_a_bad_line_names_its_number() -> None:
    links = build(3)
    with pytest.raises(CheckpointInvalid, match="checkpoint line 2"):
        checkpoint.read([line_of(links[0]), line_of(links[1])[:-9]], PUB, TENANT)


# --- the unsigned tail ---------------------------------------------------------------------------


def test_unsigned_tail_is_refused_by_require_signed_head() -> None:
    links = build(8, signed=lambda seq: seq <= 5)
    report = chain.verify(links, PUB)
    with pytest.raises(chain.UnsignedTail) as info:
        chain.require_signed_head(report)
    assert info.value.code == "audit_unsigned_tail" and info.value.seq == 6
    assert "from record 6" in info.value.message


def test_unsigned_record_in_the_middle_is_covered_by_the_next_signed_one() -> None:
    links = build(8, signed=lambda seq: seq != 4)
    chain.require_signed_head(chain.verify(links, PUB))
    chain.require_signed_head(chain.verify([], PUB))
