"""keysteward crypto generate-data-key|encrypt|decrypt|re-encrypt (envelope operations)."""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from keysteward.cli.context import JsonFlag, client
from keysteward.cli.output import emit, fields

app = typer.Typer(help="Envelope operations for applications.", no_args_is_help=True)
ContextOpt = Annotated[list[str] | None, typer.Option("--context", "-c", help="Encryption context KEY=VALUE.")]


def _context(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise typer.BadParameter(f"--context takes KEY=VALUE, not {item!r}")
        out[k] = v
    return out


def _read(value: str | None, path: Path | None) -> bytes:
    if path is not None:
        return path.read_bytes() if str(path) != "-" else sys.stdin.buffer.read()
    if value is None:
        raise typer.BadParameter("give the value or a file")
    return value.encode()


@app.command("generate-data-key")
def generate_data_key(
    ctx: typer.Context,
    key: str,
    context: ContextOpt = None,
    key_spec: Annotated[str, typer.Option(help="AES_256 or AES_128.")] = "AES_256",
    as_json: JsonFlag = False,
) -> None:
    """A fresh data key: plaintext (use, then forget) and ciphertext (store beside your data)."""
    data = client(ctx).post(f"/keys/{key}/generate-data-key", {"key_spec": key_spec, "context": _context(context)})
    emit(data, as_json, lambda d: fields(d, ["key", "version", "plaintext", "ciphertext"]))


@app.command()
def encrypt(
    ctx: typer.Context,
    key: str,
    plaintext: Annotated[str | None, typer.Option(help="Text to encrypt.")] = None,
    input_file: Annotated[Path | None, typer.Option("--input", help="File to encrypt ('-' = stdin).")] = None,
    context: ContextOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Encrypt up to 4 KiB under KEY's primary version."""
    body = {"plaintext": base64.b64encode(_read(plaintext, input_file)).decode(), "context": _context(context)}
    emit(client(ctx).post(f"/keys/{key}/encrypt", body), as_json, lambda d: fields(d, ["key", "version", "ciphertext"]))


@app.command()
def decrypt(
    ctx: typer.Context,
    ciphertext: Annotated[str | None, typer.Option(help="Base64 ciphertext.")] = None,
    input_file: Annotated[Path | None, typer.Option("--input", help="File with the base64 ciphertext.")] = None,
    context: ContextOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="Write the plaintext bytes to stdout.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Decrypt a ciphertext of encrypt or generate-data-key (the key and version are read from it)."""
    text = _read(ciphertext, input_file).decode().strip()
    data: dict[str, Any] = client(ctx).post("/decrypt", {"ciphertext": text, "context": _context(context)})
    if raw:
        sys.stdout.buffer.write(base64.b64decode(data["plaintext"]))
        return
    emit(data, as_json, lambda d: fields(d, ["key", "version", "plaintext"]))


@app.command("re-encrypt")
def re_encrypt(
    ctx: typer.Context,
    ciphertext: Annotated[str, typer.Option(help="Base64 ciphertext.")],
    context: ContextOpt = None,
    destination_key: Annotated[str | None, typer.Option(help="Move to this key.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Seal again under the newest version (or another key) without the plaintext leaving the server."""
    body = {"ciphertext": ciphertext, "context": _context(context), "destination_key": destination_key}
    emit(client(ctx).post("/re-encrypt", body), as_json, lambda d: fields(d, ["key", "version", "ciphertext"]))
