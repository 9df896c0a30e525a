"""Signed checkpoints of an audit chain head, as pure functions: sign, encode, parse, verify, compare.

A checkpoint says "at time ``ts`` the chain of ``tenant_id`` ended at record ``seq`` whose hash was
``hash``". The server publishes them outside its database (see :mod:`keysteward.audit.sinks`), so a
thief of the database who deletes the newest records and resets the head cannot also take back what
was published. One checkpoint is one line of canonical JSON, ASCII, at most :data:`MAX_LINE` bytes::

    {"hash":<64 hex>,"seq":n,"sig":<128 hex>,"tenant_id":...,"ts":<ISO 8601, UTC>,
     "type":"keysteward.audit.checkpoint","v":1}                                     (on one line)

``sig = Ed25519(b"keysteward-audit-checkpoint-v1" | tenant_id | seq | hash | ts)`` by the audit signing
key, the key that signs the records (:mod:`keysteward.audit.chain`), under its own context string, so a
record's signature is never a checkpoint's and the other way round.

Checks raise; nothing returns a bool::

    CheckpointError (audit_checkpoint_*)        base, KeystewardError
    ├── CheckpointInvalid    audit_checkpoint_invalid        a line that does not parse (bounded, named)
    ├── CheckpointForged     audit_checkpoint_bad_signature  a checkpoint the pinned key did not sign
    ├── CheckpointConflict   audit_checkpoint_conflict       two signed checkpoints disagree on one record
    ├── CheckpointMissing    audit_checkpoint_missing        no checkpoint of the chain being verified
    ├── LogTruncated         audit_log_truncated             the log ends before a checkpointed head
    └── CheckpointMismatch   audit_checkpoint_mismatch       the log's record at a checkpointed seq differs
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from keysteward.audit.chain import Link, VerifyReport, canonical
from keysteward.errors import KeystewardError

SIGNING_CONTEXT = b"keysteward-audit-checkpoint-v1"
TYPE = "keysteward.audit.checkpoint"
VERSION = 1
MAX_LINE = 1024
MAX_SEQ = 2**63 - 1
_FIELDS = frozenset({"v", "type", "tenant_id", "seq", "hash", "ts", "sig"})
_TENANT = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_HASH = re.compile(r"[0-9a-f]{64}")
_SIG = re.compile(r"[0-9a-f]{128}")
_TS = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]{8,15}\+00:00")


class CheckpointError(KeystewardError):
    code = "audit_checkpoint_error"
    status = 409
    title = "Audit checkpoint check failed"


class CheckpointInvalid(CheckpointError):
    code = "audit_checkpoint_invalid"
    status = 400


class CheckpointForged(CheckpointError):
    code = "audit_checkpoint_bad_signature"


class CheckpointConflict(CheckpointError):
    code = "audit_checkpoint_conflict"


class CheckpointMissing(CheckpointError):
    code = "audit_checkpoint_missing"


class LogTruncated(CheckpointError):
    code = "audit_log_truncated"


class CheckpointMismatch(CheckpointError):
    code = "audit_checkpoint_mismatch"


@dataclass(frozen=True)
class Checkpoint:
    tenant_id: str
    seq: int
    hash: str
    ts: str
    sig: bytes


def signed_message(tenant_id: str, seq: int, hash_hex: str, ts: str) -> bytes:
    return b"|".join([SIGNING_CONTEXT, tenant_id.encode(), str(seq).encode(), hash_hex.encode(), ts.encode()])


def _check_fields(tenant_id: object, seq: object, hash_hex: object, ts: object) -> None:
    if not isinstance(tenant_id, str) or not _TENANT.fullmatch(tenant_id):
        raise CheckpointInvalid("tenant_id must be 1 to 64 letters, digits or . _ : -")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= MAX_SEQ:
        raise CheckpointInvalid("seq must be an integer from 1 to 2**63-1")
    if not isinstance(hash_hex, str) or not _HASH.fullmatch(hash_hex):
        raise CheckpointInvalid("hash must be 64 lowercase hex digits")
    if not isinstance(ts, str) or not _TS.fullmatch(ts):
        raise CheckpointInvalid("ts must be an ISO 8601 UTC time (YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00)")
    try:
        datetime.fromisoformat(ts)
    except ValueError as exc:
        raise CheckpointInvalid("ts is not a valid time") from exc


def sign(key: Ed25519PrivateKey, tenant_id: str, seq: int, hash_hex: str, ts: str) -> Checkpoint:
    """A signed checkpoint of ``tenant_id``'s head; refuses fields that :func:`parse` would refuse."""
    _check_fields(tenant_id, seq, hash_hex, ts)
    return Checkpoint(tenant_id, seq, hash_hex, ts, key.sign(signed_message(tenant_id, seq, hash_hex, ts)))


def encode(cp: Checkpoint) -> str:
    """One line of canonical JSON, without the newline."""
    return canonical(
        {
            "v": VERSION,
            "type": TYPE,
            "tenant_id": cp.tenant_id,
            "seq": cp.seq,
            "hash": cp.hash,
            "ts": cp.ts,
            "sig": cp.sig.hex(),
        }
    )


def as_dict(cp: Checkpoint) -> dict[str, object]:
    parsed: dict[str, object] = json.loads(encode(cp))
    return parsed


def parse(line: str | bytes) -> Checkpoint:
    """Parse one checkpoint line (its signature is checked by :func:`verify`, not here)."""
    if len(line) > MAX_LINE:
        raise CheckpointInvalid(f"a checkpoint line is at most {MAX_LINE} bytes (this one has {len(line)})")
    if isinstance(line, bytes):
        try:
            line = line.decode("ascii")
        except UnicodeDecodeError as exc:
            raise CheckpointInvalid("a checkpoint line is ASCII text") from exc
    if len(line.encode("utf-8")) > MAX_LINE:
        raise CheckpointInvalid(f"a checkpoint line is at most {MAX_LINE} bytes")
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise CheckpointInvalid("a checkpoint line is not JSON (truncated?)") from exc
    if not isinstance(obj, dict):
        raise CheckpointInvalid("a checkpoint is a JSON object")
    if set(obj) != _FIELDS:
        missing, extra = sorted(_FIELDS - set(obj)), sorted(set(obj) - _FIELDS)
        raise CheckpointInvalid(
            "a checkpoint has exactly the fields v, type, tenant_id, seq, hash, ts, sig"
            + (f" (missing: {', '.join(missing)})" if missing else "")
            + (f" (unknown: {', '.join(repr(k)[:40] for k in extra[:5])})" if extra else "")
        )
    if obj["v"] != VERSION or isinstance(obj["v"], bool) or obj["type"] != TYPE:
        raise CheckpointInvalid(f"not a version {VERSION} keysteward audit checkpoint")
    _check_fields(obj["tenant_id"], obj["seq"], obj["hash"], obj["ts"])
    if not isinstance(obj["sig"], str) or not _SIG.fullmatch(obj["sig"]):
        raise CheckpointInvalid("sig must be 128 lowercase hex digits (an Ed25519 signature)")
    return Checkpoint(obj["tenant_id"], obj["seq"], obj["hash"], obj["ts"], bytes.fromhex(obj["sig"]))


def verify(cp: Checkpoint, public_key: Ed25519PublicKey) -> None:
    """Raise :class:`CheckpointForged` unless the audit key ``public_key`` signed ``cp``."""
    try:
        public_key.verify(cp.sig, signed_message(cp.tenant_id, cp.seq, cp.hash, cp.ts))
    except InvalidSignature as exc:
        raise CheckpointForged(
            f"the checkpoint of record {cp.seq} ({cp.ts}) is not signed by the pinned audit key"
        ) from exc


def read(lines: Iterable[str | bytes], public_key: Ed25519PublicKey, tenant_id: str) -> dict[int, Checkpoint]:
    """Parse and verify every line (blank lines skipped); keep ``tenant_id``'s checkpoints by seq.

    Every line must parse and carry a good signature, whichever chain it names: a file with a forged
    or damaged line is not trusted for any chain. Two signed checkpoints naming different hashes for one
    record of one chain raise :class:`CheckpointConflict` (the signing key signed a fork).
    """
    mine: dict[int, Checkpoint] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            cp = parse(line.rstrip(b"\r\n") if isinstance(line, bytes) else line.rstrip("\r\n"))
            verify(cp, public_key)
        except CheckpointError as exc:
            raise type(exc)(f"checkpoint line {number}: {exc.message}") from exc
        if cp.tenant_id != tenant_id:
            continue
        known = mine.get(cp.seq)
        if known is not None and known.hash != cp.hash:
            raise CheckpointConflict(
                f"checkpoint line {number}: record {cp.seq} has two signed checkpoints with different hashes"
            )
        if known is None or cp.ts < known.ts:
            mine[cp.seq] = cp
    return mine


class Observer:
    """Pass links through to :func:`keysteward.audit.chain.verify`, noting the hashes at checkpointed seqs."""

    def __init__(self, checkpoints: Mapping[int, Checkpoint]) -> None:
        self.checkpoints = checkpoints
        self.seen: dict[int, str] = {}

    def links(self, links: Iterable[Link]) -> Iterator[Link]:
        for link in links:
            if link.seq in self.checkpoints:
                self.seen[link.seq] = link.hash
            yield link

    def check(self, report: VerifyReport) -> Checkpoint | None:
        """After the chain verified: raise unless the log reaches and agrees with every checkpoint.

        Returns the newest checkpoint (None when there was none to compare with).
        """
        for seq in sorted(self.checkpoints):
            cp = self.checkpoints[seq]
            if seq > report.head_seq:
                newest = self.checkpoints[max(self.checkpoints)]
                raise LogTruncated(
                    f"the log ends at record {report.head_seq} but a signed checkpoint of {newest.ts} puts its head "
                    f"at record {newest.seq}: records were deleted from the end"
                )
            if self.seen.get(seq) != cp.hash:
                raise CheckpointMismatch(
                    f"record {seq} is not the record the signed checkpoint of {cp.ts} names (its hash differs): "
                    "the log was rewritten from there"
                )
        return self.checkpoints[max(self.checkpoints)] if self.checkpoints else None
