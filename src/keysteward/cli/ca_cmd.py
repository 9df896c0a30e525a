"""keysteward ca init|import|show|issue: the tenant CA for machine identities."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from keysteward.cli.context import JsonFlag, client
from keysteward.cli.output import console, emit
from keysteward.crypto import x509ca

app = typer.Typer(help="The tenant CA that issues agent and host certificates.", no_args_is_help=True)


@app.command("init")
def ca_init(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Make a CA for this tenant (its key is kept wrapped under the root key)."""
    emit(client(ctx).post("/ca/init"), as_json, lambda d: console.print(d["cert_pem"]))


@app.command("import")
def ca_import(
    ctx: typer.Context,
    cert: Annotated[Path, typer.Option(help="The CA certificate (PEM).")],
    key: Annotated[Path | None, typer.Option(help="Its private key (PEM), to let keysteward issue.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Use your own CA (with its key, keysteward can issue; without, it only verifies)."""
    body = {"cert_pem": cert.read_text(), "key_pem": key.read_text() if key else None}
    emit(
        client(ctx).post("/ca/import", body),
        as_json,
        lambda d: console.print(f"CA imported; keysteward can issue: {d['can_issue']}"),
    )


@app.command("show")
def ca_show(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    emit(client(ctx).get("/ca"), as_json, lambda d: console.print(d["cert_pem"]))


@app.command("issue")
def ca_issue(
    ctx: typer.Context,
    name: str,
    role: Annotated[str, typer.Option(help="agent or host.")] = "agent",
    out_dir: Annotated[Path, typer.Option(help="Where to write NAME.pem, NAME.key and ca.pem.")] = Path("."),
    csr: Annotated[Path | None, typer.Option(help="Sign this CSR instead of making a key.")] = None,
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
    as_json: JsonFlag = False,
) -> None:
    """Issue a machine certificate. Without --csr the key pair is made here and written 0600 before the CSR
    is sent; the server only ever sees the CSR, and the key is never printed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key_file = out_dir / f"{name}.key"
    if csr is not None:
        csr_pem = csr.read_text()
    else:
        tenant = client(ctx).get("/whoami")["tenant"]
        key_pem, csr_bytes = x509ca.make_csr(tenant, role, name)
        try:
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(key_pem)
        finally:
            key_pem[:] = bytes(len(key_pem))
        csr_pem = csr_bytes.decode()
    body = {"name": name, "role": role, "days": days, "csr_pem": csr_pem}
    data: dict[str, Any] = client(ctx).post("/ca/issue", body)
    (out_dir / f"{name}.pem").write_text(data["cert_pem"])
    (out_dir / "ca.pem").write_text(data["ca_pem"])
    written = {
        "cert": str(out_dir / f"{name}.pem"),
        "ca": str(out_dir / "ca.pem"),
        "serial": data["serial"],
        "not_after": data["not_after"],
    }
    if csr is None:
        written["key"] = str(key_file)
    emit(written, as_json, lambda d: console.print(f"issued {role} certificate for {name}: {d}"))
