"""keysteward audit list|verify|export: read and check the tenant's hash-chained audit log."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keysteward.audit import chain
from keysteward.cli.client import Client
from keysteward.cli.context import JsonFlag, client
from keysteward.cli.output import console, emit, fail, table

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
    last: Annotated[int, typer.Option(help="Show the last N records (0 = all).")] = 50,
) -> None:
    _, _, records = _pages(client(ctx))
    rows = [dict(json.loads(r["body"]), signed=r["signature"] is not None) for r in records]
    rows = rows[-last:] if last else rows
    emit(rows, as_json, lambda d: table(d, ["seq", "ts", "actor", "action", "target", "outcome", "reason", "signed"]))


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
    as_json: JsonFlag = False,
) -> None:
    """Check the whole chain: names the first modified, deleted, inserted or reordered record."""
    if file is not None:
        if not public_key:
            fail("verifying an export needs --public-key")
        key_hex, tenant_id = public_key or "", None
        lines = (json.loads(line) for line in file.read_text().splitlines() if line.strip())
        links = (_link(r) for r in lines)
    else:
        key_hex, tenant_id, records = _pages(client(ctx))
        if public_key and public_key.lower() != key_hex:
            fail("the server's audit public key differs from the pinned one")
        links = (_link(r) for r in records)
    try:
        report = chain.verify(links, Ed25519PublicKey.from_public_bytes(bytes.fromhex(key_hex)), tenant_id=tenant_id)
    except chain.ChainBroken as exc:
        if as_json:
            sys.stdout.write(json.dumps({"ok": False, "first_bad_seq": exc.seq, "detail": exc.message}) + "\n")
            raise SystemExit(1) from None
        fail(f"audit chain broken at record {exc.seq}: {exc.message}")
        return
    data = {
        "ok": True,
        "records": report.records,
        "signed": report.signed,
        "head_seq": report.head_seq,
        "head_hash": report.head_hash,
        "unsigned_tail": report.unsigned_tail,
    }
    emit(
        data,
        as_json,
        lambda d: console.print(
            f"[green]audit chain intact[/green]: {d['records']} records, head {d['head_seq']} {d['head_hash'][:16]}…"
            + (f" ({d['unsigned_tail']} newest records not yet signed)" if d["unsigned_tail"] else "")
        ),
    )
