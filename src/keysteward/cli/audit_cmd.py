"""keysteward audit list|verify|export: read and check the tenant's hash-chained audit log."""

from __future__ import annotations

import fnmatch
import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keysteward.audit import chain, checkpoint
from keysteward.cli.client import Client
from keysteward.cli.context import JsonFlag, client
from keysteward.cli.output import cell, console, emit, fail, fields, table
from keysteward.cli.typer_values import since_option
from keysteward.errors import BadRequest

app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)
PAGE = 1000


def _pages(api: Client) -> tuple[str, str, Iterator[dict[str, Any]]]:
    first = api.get("/audit", params={"after": 0, "limit": PAGE})

    def records() -> Iterator[dict[str, Any]]:
        page = first
        while True:
            yield from page["records"]
            if len(page["records"]) < PAGE:
                return
            page = api.get("/audit", params={"after": page["records"][-1]["seq"], "limit": PAGE})

    return first["public_key"], first["tenant_id"], records()


def _link(r: dict[str, Any]) -> chain.Link:
    sig = r.get("signature")
    return chain.Link(r["tenant_id"], int(r["seq"]), r["body"], r["hash"], bytes.fromhex(sig) if sig else None)


@app.command("list")
def audit_list(
    ctx: typer.Context,
    as_json: JsonFlag = False,
    last: Annotated[int, typer.Option(help="Show the last N matching records (0 = all).")] = 50,
    outcome: Annotated[
        list[str] | None,
        typer.Option(help=f"Only records with this outcome ({', '.join(chain.OUTCOMES)}); repeatable."),
    ] = None,
    actor: Annotated[
        list[str] | None,
        typer.Option(help="Only records whose actor matches this shell pattern (e.g. 'token:ops*'); repeatable."),
    ] = None,
    action: Annotated[
        list[str] | None,
        typer.Option(help="Only records whose action matches this shell pattern (e.g. 'volume.*'); repeatable."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            metavar="TIME",
            help="Only records from this time on: ISO 8601 (2026-12-04T10:00:00Z; no zone = UTC) or a duration "
            "ago (90m, 12h, 7d).",
        ),
    ] = None,
    kms_request_id: Annotated[
        str | None, typer.Option("--kms-request-id", help="Only the records of this AWS KMS request (XKS calls).")
    ] = None,
) -> None:
    """List records, newest last; filters apply before --last, so a flood of one kind hides nothing else."""
    bad = sorted(set(outcome or []) - set(chain.OUTCOMES))
    if bad:
        fail(f"--outcome {bad[0]!r} is not one of {', '.join(chain.OUTCOMES)}")
    start = since_option(since) if since is not None else None
    _, _, records = _pages(client(ctx))
    rows = [
        row
        for row in (dict(json.loads(r["body"]), signed=r["signature"] is not None) for r in records)
        if _matches(row, outcome, actor, action)
        and (start is None or _at_or_after(row, start))
        and (kms_request_id is None or (row.get("details") or {}).get("kms_request_id") == kms_request_id)
    ]
    rows = rows[-last:] if last else rows
    emit(rows, as_json, lambda d: table(d, ["seq", "ts", "actor", "action", "target", "outcome", "reason", "signed"]))


def _matches(
    row: dict[str, Any], outcomes: list[str] | None, actors: list[str] | None, actions: list[str] | None = None
) -> bool:
    if outcomes and row.get("outcome") not in outcomes:
        return False
    if actions and not any(fnmatch.fnmatchcase(str(row.get("action", "")), pattern) for pattern in actions):
        return False
    return not actors or any(fnmatch.fnmatchcase(str(row.get("actor", "")), pattern) for pattern in actors)


def _at_or_after(row: dict[str, Any], start: datetime) -> bool:
    """Whether the record's time (ISO 8601, UTC) is ``start`` or later; a record without a readable time is
    kept (a filter must not hide what it cannot judge)."""
    try:
        ts = datetime.fromisoformat(str(row.get("ts")))
    except ValueError:
        return True
    return (ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)) >= start


@app.command("show")
def audit_show(
    ctx: typer.Context,
    seq: Annotated[int, typer.Argument(min=1, help="The record's sequence number (audit list shows it).")],
    as_json: JsonFlag = False,
) -> None:
    """One record whole: its fields and details, its hash, the previous hash it links to, its signature."""
    page = client(ctx).get("/audit", params={"after": seq - 1, "limit": 1})
    found = [r for r in page["records"] if r["seq"] == seq]
    if not found:
        fail(f"no audit record {seq} in this tenant's chain", code=1)
    link = found[0]
    record = dict(json.loads(link["body"]), hash=link["hash"], signature=link["signature"])

    def human(d: dict[str, Any]) -> None:
        details = d.pop("details", None) or {}
        fields(d, [k for k in ("seq", "ts", "actor", "action", "target", "outcome", "reason", "prev", "hash",
                               "signature") if k in d])  # fmt: skip
        for key in sorted(details):
            console.print(f"  details.{key}: {cell(details[key])}", markup=False, highlight=False)

    emit(record, as_json, human)


@app.command("export")
def audit_export(
    ctx: typer.Context, output: Annotated[Path | None, typer.Option(help="File to write (default: stdout).")] = None
) -> None:
    """Write every record as one JSON line: tenant_id, seq, body, hash, signature."""
    _, _, records = _pages(client(ctx))
    out = output.open("w") if output else sys.stdout
    try:
        for r in records:
            out.write(json.dumps(r, sort_keys=True) + "\n")
    finally:
        if output:
            out.close()


@app.command("verify")
def audit_verify(
    ctx: typer.Context,
    public_key: Annotated[str | None, typer.Option(help="Pin the audit public key (hex, from init).")] = None,
    file: Annotated[Path | None, typer.Option(help="Verify an export offline instead.")] = None,
    checkpoint_file: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            help="Signed head checkpoints (JSON lines, from a file sink): the log must reach and agree with "
            "every one of this chain's. Needs --public-key.",
        ),
    ] = None,
    allow_unsigned_tail: Annotated[
        bool,
        typer.Option(help="Accept newest records without a signature (only while the server is sealed)."),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Check the whole chain: names the first modified, deleted, inserted or reordered record.

    Fails when the newest records are unsigned (unless --allow-unsigned-tail), and with --checkpoint
    when the log ends before a published head or disagrees with it.
    """
    if checkpoint_file is not None and not public_key:
        fail("--checkpoint needs --public-key: checkpoints are checked against the pinned audit key")
    if file is not None:
        if not public_key:
            fail("verifying an export needs --public-key")
        key_hex = public_key or ""
        tenant_id = _first_tenant(file)
        links = _export_links(file)
    else:
        key_hex, tenant_id, records = _pages(client(ctx))
        if public_key and public_key.lower() != key_hex:
            fail("the server's audit public key differs from the pinned one")
        if not public_key:
            sys.stderr.write(
                "warning: verified against the audit key the server itself reports; a server that rewrote its log "
                "could report another. Pin the key you recorded at init with --public-key.\n"
            )
        links = (_link(r) for r in records)
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(key_hex))
    except ValueError:
        fail("the audit public key must be 64 hex digits (32 bytes)")
        return
    observer = checkpoint.Observer({})
    try:
        if checkpoint_file is not None:
            observer = checkpoint.Observer(_checkpoints(checkpoint_file, key, tenant_id))
        report = chain.verify(observer.links(links), key, tenant_id=tenant_id)
        if not allow_unsigned_tail:
            chain.require_signed_head(report)
        newest = observer.check(report)
    except chain.ChainBroken as exc:
        _broken(exc.code, exc.message, as_json, seq=exc.seq, human=f"audit chain broken at record {exc.seq}")
        return
    except checkpoint.CheckpointError as exc:
        _broken(exc.code, exc.message, as_json, human="audit log fails its checkpoints")
        return
    data = {
        "ok": True,
        "records": report.records,
        "signed": report.signed,
        "head_seq": report.head_seq,
        "head_hash": report.head_hash,
        "unsigned_tail": report.unsigned_tail,
        "checkpoints": len(observer.checkpoints),
        "checkpoint_seq": newest.seq if newest else None,
        "checkpoint_ts": newest.ts if newest else None,
    }
    emit(
        data,
        as_json,
        lambda d: console.print(
            f"[green]audit chain intact[/green]: {d['records']} records, head {d['head_seq']} {d['head_hash'][:16]}…"
            + (f" ({d['unsigned_tail']} newest records not yet signed)" if d["unsigned_tail"] else "")
            + (
                f"; reaches and agrees with {d['checkpoints']} checkpoint(s), newest record {d['checkpoint_seq']}"
                f" at {d['checkpoint_ts']}"
                if d["checkpoints"]
                else ""
            )
        ),
    )


def _broken(code: str, message: str, as_json: bool, *, human: str, seq: int | None = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps({"ok": False, "code": code, "first_bad_seq": seq, "detail": message}) + "\n")
        raise SystemExit(1)
    fail(f"{human}: {message} ({code})")


def _first_tenant(file: Path) -> str | None:
    """Whose chain an export holds (its first record names it), so checkpoints of other chains are skipped."""
    for link in _export_links(file):
        return link.tenant_id
    return None


def _export_links(file: Path) -> Iterator[chain.Link]:
    with file.open(encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield _link(json.loads(line))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise BadRequest(f"line {number} of {file} is not an audit export record", code="bad_export") from exc


def _checkpoints(path: Path, key: Ed25519PublicKey, tenant_id: str | None) -> dict[int, checkpoint.Checkpoint]:
    with path.open("rb") as fh:
        mine = checkpoint.read(_bounded_lines(fh), key, tenant_id or "")
    if not mine:
        raise checkpoint.CheckpointMissing(
            f"{path} holds no checkpoint of this chain (tenant id {tenant_id or 'unknown'}): wrong file, or the "
            "server publishes to another sink"
        )
    return mine


def _bounded_lines(fh: BinaryIO) -> Iterator[bytes]:
    """Lines of at most one byte over the codec's limit: a longer one is refused by the codec, not read whole."""
    while True:
        line = fh.readline(checkpoint.MAX_LINE + 2)
        if not line:
            return
        if len(line) > checkpoint.MAX_LINE + 1 or (len(line) == checkpoint.MAX_LINE + 1 and not line.endswith(b"\n")):
            yield line  # refused by parse as oversized
            return
        yield line
