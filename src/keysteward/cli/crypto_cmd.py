"""keysteward crypto generate-data-key|encrypt|decrypt|re-encrypt (envelope operations)."""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from keysteward.cli.context import JsonFlag, client
from keysteward.cli.output import emit, fields
from keysteward.cli.typer_values import labels_option

app = typer.Typer(help="Envelope operations for applications.", no_args_is_help=True)
ContextOpt = Annotated[
    list[str] | None, typer.Option("--context", metavar="K=V", help="Encryption context (repeatable).")
]
OldContextOpt = Annotated[list[str] | None, typer.Option("-c", hidden=True, help="Old spelling of --context.")]


def _context(items: list[str] | None, old: list[str] | None = None) -> dict[str, str] | None:
    """``--context K=V`` (and its old spelling ``-c``; both may be given, each key once) as a dict."""
    given = [*(items or []), *(old or [])]
    return labels_option(given, "--context") if given else None


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
    old_context: OldContextOpt = None,
    key_spec: Annotated[str, typer.Option(help="AES_256 or AES_128.")] = "AES_256",
    as_json: JsonFlag = False,
) -> None:
    """A fresh data key: plaintext (use, then forget) and ciphertext (store beside your data)."""
    data = client(ctx).post(
        f"/keys/{key}/generate-data-key", {"key_spec": key_spec, "context": _context(context, old_context)}
    )
    emit(data, as_json, lambda d: fields(d, ["key", "version", "plaintext", "ciphertext"]))


@app.command()
def encrypt(
    ctx: typer.Context,
    key: str,
    plaintext: Annotated[str | None, typer.Option(help="Text to encrypt.")] = None,
    input_file: Annotated[Path | None, typer.Option("--input", help="File to encrypt ('-' = stdin).")] = None,
    context: ContextOpt = None,
    old_context: OldContextOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Encrypt up to 4 KiB under KEY's primary version."""
    body = {
        "plaintext": base64.b64encode(_read(plaintext, input_file)).decode(),
        "context": _context(context, old_context),
    }
    emit(client(ctx).post(f"/keys/{key}/encrypt", body), as_json, lambda d: fields(d, ["key", "version", "ciphertext"]))


@app.command()
def decrypt(
    ctx: typer.Context,
    ciphertext: Annotated[str | None, typer.Option(help="Base64 ciphertext.")] = None,
    input_file: Annotated[Path | None, typer.Option("--input", help="File with the base64 ciphertext.")] = None,
    context: ContextOpt = None,
    old_context: OldContextOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="Write the plaintext bytes to stdout.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Decrypt a ciphertext of encrypt or generate-data-key (the key and version are read from it)."""
    text = _read(ciphertext, input_file).decode().strip()
    data: dict[str, Any] = client(ctx).post("/decrypt", {"ciphertext": text, "context": _context(context, old_context)})
    if raw:
        sys.stdout.buffer.write(base64.b64decode(data["plaintext"]))
        return
    emit(data, as_json, lambda d: fields(d, ["key", "version", "plaintext"]))


@app.command("re-encrypt")
def re_encrypt(
    ctx: typer.Context,
    ciphertext: Annotated[str, typer.Option(help="Base64 ciphertext.")],
    context: ContextOpt = None,
    old_context: OldContextOpt = None,
    destination_key: Annotated[str | None, typer.Option(help="Move to this key.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Seal again under the newest version (or another key) without the plaintext leaving the server."""
    body = {"ciphertext": ciphertext, "context": _context(context, old_context), "destination_key": destination_key}
    emit(client(ctx).post("/re-encrypt", body), as_json, lambda d: fields(d, ["key", "version", "ciphertext"]))
