"""keysteward ca init|import|show|issue|renew|revoke|rotate: the tenant CA for machine identities."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from keysteward.cli.confirm import confirm
from keysteward.cli.context import CliState, JsonFlag, client
from keysteward.cli.output import cell, console, emit, fields
from keysteward.crypto import x509csr, x509identity

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
        lambda d: console.print(f"CA imported; keysteward can issue: {cell(d['can_issue'])}"),
    )


@app.command("show")
def ca_show(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    emit(client(ctx).get("/ca"), as_json, lambda d: console.print(d["cert_pem"]))


@app.command("issue")
def ca_issue(
    ctx: typer.Context,
    name: str,
    role: Annotated[str, typer.Option(help="agent, host or hypervisor (a KMIP client).")] = "agent",
    out_dir: Annotated[Path, typer.Option(help="Where to write NAME.pem, NAME.key and ca.pem.")] = Path("."),
    csr: Annotated[Path | None, typer.Option(help="Sign this CSR instead of making a key.")] = None,
    days: Annotated[int, typer.Option(help="Validity in days (at most 90: machines renew with 'ca renew').")] = 90,
    p12_passphrase_file: Annotated[
        Path | None,
        typer.Option(help="Also write NAME.p12 (PKCS#12: key, certificate, CA) encrypted with this file's passphrase."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Issue a machine certificate. Without --csr the key pair is made here and written 0600 before the CSR
    is sent; the server only ever sees the CSR, and the key is never printed."""
    if p12_passphrase_file is not None and csr is not None:
        raise typer.BadParameter("a PKCS#12 bundle holds the key: it is made without --csr")
    out_dir.mkdir(parents=True, exist_ok=True)
    key_file = out_dir / f"{name}.key"
    if csr is not None:
        csr_pem = csr.read_text()
    else:
        tenant = client(ctx).get("/whoami")["tenant"]
        csr_pem = _new_key(key_file, tenant, role, name)
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
    if p12_passphrase_file is not None:
        written["p12"] = str(_write_p12(out_dir, name, key_file, data, p12_passphrase_file))
    emit(written, as_json, lambda d: _show(f"issued {role} certificate for {name}:", d))


@app.command("sign-csr")
def ca_sign_csr(
    ctx: typer.Context,
    csr: Annotated[
        Path, typer.Argument(help="The PEM CSR the machine made (vCenter: 'New Certificate Signing Request').")
    ],
    name: Annotated[str, typer.Option(help="The machine's name: the CSR's common name.")],
    role: Annotated[str, typer.Option(help="agent, host or hypervisor (a KMIP client).")] = "hypervisor",
    out_dir: Annotated[Path, typer.Option(help="Where to write NAME.pem and ca.pem.")] = Path("."),
    days: Annotated[int, typer.Option(help="Validity in days (at most 90).")] = 90,
    as_json: JsonFlag = False,
) -> None:
    """Sign a CSR a machine made (its key never leaves it): the same as 'ca issue NAME --csr FILE'."""
    ca_issue(ctx, name, role=role, out_dir=out_dir, csr=csr, days=days, as_json=as_json)


def _write_p12(out_dir: Path, name: str, key_file: Path, issued: dict[str, Any], passphrase_file: Path) -> Path:
    """NAME.p12 (0600): the key, the certificate and the tenant CA, for clients that import one bundle."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    passphrase = passphrase_file.read_bytes().strip()
    if len(passphrase) < 8:
        raise typer.BadParameter("the PKCS#12 passphrase is at least 8 characters")
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    bundle = pkcs12.serialize_key_and_certificates(
        name.encode(), key, x509.load_pem_x509_certificate(issued["cert_pem"].encode()),  # type: ignore[arg-type]
        [x509.load_pem_x509_certificate(issued["ca_pem"].encode())],
        serialization.BestAvailableEncryption(passphrase),
    )  # fmt: skip
    path = out_dir / f"{name}.p12"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(bundle)
    return path


def _new_key(key_file: Path, tenant: str, role: str, name: str) -> str:
    """A key pair made here, written 0600 to ``key_file`` (wiped from memory); the CSR to send."""
    key_pem, csr_bytes = x509csr.make_csr(tenant, role, name)
    try:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key_pem)
    finally:
        key_pem[:] = bytes(len(key_pem))
    return csr_bytes.decode()


@app.command("renew")
def ca_renew(
    ctx: typer.Context,
    out_dir: Annotated[
        Path | None, typer.Option(help="Write NAME.pem and NAME.key here instead of replacing --cert and --key.")
    ] = None,
    days: Annotated[int, typer.Option(help="Validity in days (at most 90).")] = 90,
    as_json: JsonFlag = False,
) -> None:
    """Renew this machine's certificate before it expires: connect with it (the global --cert and --key), send a
    CSR for the same identity from a new key pair made here, and replace both files (the key written 0600)."""
    state: CliState = ctx.ensure_object(CliState)
    options = state.options
    if options is None or not options.cert or not options.key:
        raise typer.BadParameter("give the certificate to renew and its key: keysteward --cert C --key K ca renew")
    current = x509identity.peek_identity(x509identity.pem_to_der(Path(options.cert).read_text()))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        cert_file, key_file = out_dir / f"{current.name}.pem", out_dir / f"{current.name}.key"
    else:
        cert_file, key_file = Path(options.cert), Path(options.key)
    fresh_key = key_file.with_name(f".{key_file.name}.new")
    csr_pem = _new_key(fresh_key, current.tenant, current.role, current.name)
    try:
        data: dict[str, Any] = client(ctx).post("/ca/renew", {"csr_pem": csr_pem, "days": days})
    except BaseException:
        fresh_key.unlink(missing_ok=True)
        raise
    staged = cert_file.with_name(f".{cert_file.name}.new")
    staged.write_text(data["cert_pem"])
    staged.replace(cert_file)
    fresh_key.replace(key_file)
    done = {"cert": str(cert_file), "key": str(key_file), "serial": data["serial"], "not_after": data["not_after"],
            "renewed": current.serial}  # fmt: skip
    emit(done, as_json, lambda d: _show(f"renewed {current.role}:{current.name}:", d))


@app.command("revoke")
def ca_revoke(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="A certificate serial (hex), or a machine: ROLE:NAME (host:proxy-1).")],
    role: Annotated[str | None, typer.Option(help="agent, host or hypervisor: TARGET is then a machine NAME.")] = None,
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")] = "",
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask (required when stdin is not a terminal).")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Revoke a certificate, or every unexpired certificate of a machine; every server refuses it within a second,
    and NBD proxies at their next revocation-list fetch (every second)."""
    if role is not None:
        if role not in ("agent", "host", "hypervisor") or ":" in target:
            raise typer.BadParameter("--role is agent, host or hypervisor, and TARGET then a bare machine NAME")
        target = f"{role}:{target}"
    confirm(f"Revoke {target}: every server and proxy refuses it from now on?", yes=yes)
    data = client(ctx).post("/ca/revoke", {"target": target, "reason": reason})
    emit(data, as_json, lambda d: console.print(f"revoked {d['target']}: {', '.join(d['revoked']) or 'already'}"))


@app.command("rotate")
def ca_rotate(
    ctx: typer.Context,
    retire: Annotated[
        bool, typer.Option("--retire", help="Finish the rotation: stop trusting the previous CA.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask (required when stdin is not a terminal).")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Put a new CA beside the current one (both trusted; new certificates come from the new one; machines move
    with 'ca renew'), then, with --retire, stop trusting the old one."""
    if retire:
        confirm("Retire the previous CA: certificates it issued are refused from now on?", yes=yes)
        emit(client(ctx).post("/ca/retire"), as_json, lambda d: console.print("previous CA retired"))
    else:
        emit(client(ctx).post("/ca/rotate"), as_json, lambda d: console.print(d["cert_pem"]))


def _show(headline: str, data: dict[str, Any]) -> None:
    console.print(headline, markup=False, highlight=False)
    fields(data)
