"""keysteward volume create|dump|check|read|write|add-key|remove-key: LUKS2 (and LUKS1) volumes in userspace.

Offsets and lengths are bytes of the decrypted payload. Passphrase files are read as bytes, like
cryptsetup's ``--key-file`` (no newline stripping; ``-`` is standard input). This module imports only
typer and :mod:`keysteward.volume` at load time: ``keysteward volume ...`` starts through a fast path
in ``cli/main.py`` that loads this group alone (no HTTP client, no database, no rich until needed).
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, ParamSpec, TypeVar

import typer

from keysteward.errors import KeystewardError
from keysteward.volume.device import Device
from keysteward.volume.errors import io_error, option_error
from keysteward.volume.kdf import KdfChoice
from keysteward.volume.keyfile import read_key_file
from keysteward.volume.luks_volume import LuksVolume, check_passphrase
from keysteward.volume.sizes import parse_size

log = logging.getLogger(__name__)

app = typer.Typer(
    name="volume",
    help="LUKS2 (and LUKS1) volumes on files and block devices: create, inspect, read and write them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

P = ParamSpec("P")
R = TypeVar("R")
PROGRESS_MIN = 256 * 1024 * 1024
STDIN = "-"

PathArg = Annotated[str, typer.Argument(help="Volume: a file or block device.", metavar="PATH")]
PassphraseFile = Annotated[
    str,
    typer.Option(
        "--passphrase-file",
        metavar="FILE",
        help="File whose bytes are the passphrase (no newline stripping; - = stdin).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
KdfOpt = Annotated[str | None, typer.Option("--kdf", metavar="pbkdf2|argon2id", help="KDF of the new keyslot.")]
IterationsOpt = Annotated[
    int | None,
    typer.Option("--pbkdf-iterations", help="PBKDF2 iterations or Argon2 time cost (default: about 2 s / 4)."),
]
MemoryOpt = Annotated[int | None, typer.Option("--pbkdf-memory", help="Argon2 memory in KiB (default: 1 GiB or less).")]
ParallelOpt = Annotated[int | None, typer.Option("--pbkdf-parallel", help="Argon2 lanes (default: up to 4).")]


@app.callback()
def volume(
    ctx: typer.Context,
    argon2_memory_limit: Annotated[
        str | None,
        typer.Option(
            envvar="KEYSTEWARD_ARGON2_MEMORY_LIMIT",
            metavar="SIZE",
            help="Most memory an Argon2 keyslot may use here (default: half the available memory, at most 4G).",
        ),
    ] = None,
) -> None:
    """LUKS2 (and LUKS1) volumes on files and block devices: create, inspect, read and write them."""
    limit = None if argon2_memory_limit is None else parse_size(argon2_memory_limit, "Argon2 memory limit") // 1024
    ctx.meta["keysteward.volume.argon2_limit_kib"] = limit


def _limit(ctx: typer.Context) -> int | None:
    value = ctx.meta.get("keysteward.volume.argon2_limit_kib")
    return value if isinstance(value, int) else None


def _guarded(func: Callable[P, R]) -> Callable[P, R]:
    """Every failure leaves as a KeystewardError (one line from main()); a bug adds a debug log record.

    Also turns the garbage collector back on: main() keeps it off while the CLI starts up.
    """

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        gc.enable()
        try:
            return func(*args, **kwargs)
        except (KeystewardError, typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
            raise
        except OSError as exc:
            raise io_error(exc, "use", getattr(exc, "filename", None) or "a file") from exc
        except Exception as exc:
            log.debug("unexpected error in keysteward volume", exc_info=True)
            raise KeystewardError(f"unexpected {type(exc).__name__}: {exc}") from exc

    return wrapper


@contextmanager
def _passphrase(path: str) -> Iterator[bytearray]:
    data = read_key_file(path)
    try:
        yield data
    finally:
        data[:] = bytes(len(data))


def _print(data: dict[str, Any], as_json: bool, text: str) -> None:
    sys.stdout.write(json.dumps(data) + "\n" if as_json else text)
    sys.stdout.flush()


@contextmanager
def _progress(total: int, what: str) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on a terminal's stderr for long transfers; None otherwise."""
    if total < PROGRESS_MIN or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import Progress  # only on a terminal: rich costs start-up time

    with Progress(transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda done: bar.update(task, completed=done)


def _kdf(kind: str | None, iterations: int | None, memory: int | None, parallel: int | None) -> KdfChoice:
    return KdfChoice(kind, iterations, memory, parallel)


# -- commands ------------------------------------------------------------------------------------


@app.command()
@_guarded
def create(
    ctx: typer.Context,
    path: PathArg,
    size: Annotated[str, typer.Option("--size", metavar="SIZE", help="Payload size, like 64M or 1G.")],
    passphrase_file: Annotated[
        str | None, typer.Option("--passphrase-file", metavar="FILE", help="Passphrase bytes (default: prompt).")
    ] = None,
    sector_size: Annotated[int, typer.Option("--sector-size", help="512 or 4096.")] = 4096,
    key_size: Annotated[int, typer.Option("--key-size", help="256 (AES-128-XTS) or 512 (AES-256-XTS).")] = 512,
    kdf: KdfOpt = None,
    label: Annotated[str, typer.Option("--label", help="LUKS2 label.")] = "",
    luks1: Annotated[bool, typer.Option("--luks1", help="LUKS1, for QEMU (pbkdf2, 512-byte sectors).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing LUKS header.")] = False,
    pbkdf_iterations: IterationsOpt = None,
    pbkdf_memory: MemoryOpt = None,
    pbkdf_parallel: ParallelOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a volume at PATH (a new file, an existing file, or a block device)."""
    from keysteward.volume.create import CreateOptions, create_volume

    options = CreateOptions(
        size=parse_size(size, "--size"), sector_size=sector_size, key_bits=key_size,
        kdf=_kdf(kdf, pbkdf_iterations, pbkdf_memory, pbkdf_parallel), label=label, luks1=luks1, force=force,
    )  # fmt: skip
    secret = read_key_file(passphrase_file) if passphrase_file is not None else _prompt_new_passphrase()
    try:
        made = create_volume(path, secret, options, max_memory_kib=_limit(ctx))
    finally:
        secret[:] = bytes(len(secret))
    data = {
        "path": made.path, "version": made.version, "uuid": made.uuid, "keyslot": made.keyslot,
        "data_offset": made.data_offset, "payload_size": made.payload_size, "sector_size": made.sector_size,
        "key_bits": made.key_bits, "kdf": made.kdf, "new_file": made.new_file,
    }  # fmt: skip
    _print(
        data,
        as_json,
        f"created LUKS{made.version} volume {made.uuid} at {made.path}: {made.payload_size} bytes of payload, "
        f"{made.sector_size}-byte sectors, keyslot {made.keyslot} ({made.kdf['type']})\n",
    )


def _prompt_new_passphrase() -> bytearray:
    if not sys.stdin.isatty():
        raise option_error("give --passphrase-file (standard input is not a terminal to ask on)")
    import getpass

    first = getpass.getpass("New passphrase: ")
    if first != getpass.getpass("Same passphrase again: "):
        raise option_error("the passphrases differ")
    return bytearray(first.encode())


@app.command()
@_guarded
def dump(path: PathArg, as_json: JsonOpt = False) -> None:
    """Show the header: keyslots, tokens, segments, digests (never key material)."""
    from keysteward.volume.dump import describe, render
    from keysteward.volume.header_io import read_header

    with Device.open(path) as device:
        info = describe(read_header(device))
    info["path"] = path
    _print(info, as_json, render(info))


@app.command()
@_guarded
def check(ctx: typer.Context, path: PathArg, passphrase_file: PassphraseFile, as_json: JsonOpt = False) -> None:
    """Exit 0 if the passphrase opens a keyslot of PATH."""
    with _passphrase(passphrase_file) as secret:
        slot = check_passphrase(path, secret, max_memory_kib=_limit(ctx))
    _print({"path": path, "keyslot": slot, "ok": True}, as_json, f"keyslot {slot} opens with this passphrase\n")


@app.command()
@_guarded
def read(
    ctx: typer.Context,
    path: PathArg,
    passphrase_file: PassphraseFile,
    offset: Annotated[int, typer.Option("--offset", help="Payload offset in bytes.")] = 0,
    length: Annotated[int | None, typer.Option("--length", help="Bytes to read (default: to the end).")] = None,
    output: Annotated[
        str | None, typer.Option("--output", metavar="FILE", help="Write here (default: stdout).")
    ] = None,
) -> None:
    """Decrypt payload bytes to FILE or stdout (the whole payload by default)."""
    with _passphrase(passphrase_file) as secret, LuksVolume.open(path, secret, max_memory_kib=_limit(ctx)) as vol:
        if length is None:
            length = max(0, vol.payload_size - offset) if offset >= 0 else 0
        vol.check_range(offset, length)
        fd = _open_output(output, vol.device)
        try:
            with _progress(length, "reading") as progress:
                vol.read_to(offset, length, _fd_sink(fd, output or "standard output"), progress)
        finally:
            if output is not None:
                os.close(fd)


@app.command()
@_guarded
def write(
    ctx: typer.Context,
    path: PathArg,
    passphrase_file: PassphraseFile,
    offset: Annotated[int, typer.Option("--offset", help="Payload offset in bytes.")] = 0,
    input_file: Annotated[
        str | None, typer.Option("--input", metavar="FILE", help="Read here (default: stdin).")
    ] = None,
) -> None:
    """Encrypt FILE or stdin and write it at payload offset N."""
    if input_file is None and passphrase_file == STDIN:
        raise option_error("standard input cannot hold both the passphrase and the data; use --input")
    fd, known = _open_input(input_file, path)
    try:
        with (
            _passphrase(passphrase_file) as secret,
            LuksVolume.open(path, secret, writable=True, max_memory_kib=_limit(ctx)) as vol,
        ):
            vol.check_range(offset, known or 0)

            def read_into(view: memoryview) -> int:
                try:
                    return os.readv(fd, [view])
                except OSError as exc:
                    raise io_error(exc, "read", input_file or "standard input") from exc

            with _progress(known or 0, "writing") as progress:
                vol.write_from(offset, read_into, length=known, progress=progress)
            vol.flush()
    finally:
        if input_file is not None:
            os.close(fd)


@app.command("add-key")
@_guarded
def add_key_cmd(
    ctx: typer.Context,
    path: PathArg,
    passphrase_file: PassphraseFile,
    new_passphrase_file: Annotated[
        str, typer.Option("--new-passphrase-file", metavar="FILE", help="The new keyslot's passphrase bytes.")
    ],
    kdf: KdfOpt = None,
    slot: Annotated[int | None, typer.Option("--slot", help="Keyslot number (default: first free).")] = None,
    pbkdf_iterations: IterationsOpt = None,
    pbkdf_memory: MemoryOpt = None,
    pbkdf_parallel: ParallelOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a keyslot for a new passphrase; an existing passphrase opens the volume key."""
    from keysteward.volume.keyslots import add_key

    if passphrase_file == STDIN and new_passphrase_file == STDIN:
        raise option_error("standard input can hold only one of the passphrases")
    with _passphrase(passphrase_file) as old, _passphrase(new_passphrase_file) as new:
        added = add_key(
            path, old, new, kdf=_kdf(kdf, pbkdf_iterations, pbkdf_memory, pbkdf_parallel), keyslot=slot,
            max_memory_kib=_limit(ctx),
        )  # fmt: skip
    data = {"path": path, "keyslot": added.keyslot, "opened_with": added.opened_with, "kdf": added.kdf}
    _print(data, as_json, f"added keyslot {added.keyslot} ({added.kdf['type']})\n")


@app.command("remove-key")
@_guarded
def remove_key_cmd(
    ctx: typer.Context,
    path: PathArg,
    slot: Annotated[int, typer.Option("--slot", help="Keyslot to remove.")],
    passphrase_file: PassphraseFile,
    as_json: JsonOpt = False,
) -> None:
    """Remove keyslot N; the passphrase must open another keyslot. The last keyslot is never removed."""
    from keysteward.volume.keyslots import remove_key

    with _passphrase(passphrase_file) as secret:
        other = remove_key(path, slot, secret, max_memory_kib=_limit(ctx))
    _print({"path": path, "removed": slot, "opened_with": other}, as_json, f"removed keyslot {slot}\n")


# -- files -----------------------------------------------------------------------------------------


def _same_file(fd: int, device: Device) -> bool:
    mine, theirs = os.fstat(fd), os.fstat(device.fd)
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino) or (
        stat.S_ISBLK(mine.st_mode) and mine.st_rdev == theirs.st_rdev
    )


def _open_output(output: str | None, device: Device) -> int:
    if output is None:
        fd = sys.stdout.fileno()
    else:
        try:
            info = os.stat(output)
            if (info.st_dev, info.st_ino) == (os.fstat(device.fd).st_dev, os.fstat(device.fd).st_ino):
                raise option_error("--output is the volume itself")
        except FileNotFoundError:
            pass
        try:
            fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise io_error(exc, "open", output) from exc
    if _same_file(fd, device):
        raise option_error("the output is the volume itself")
    return fd


def _fd_sink(fd: int, name: str) -> Callable[[memoryview], None]:
    def sink(view: memoryview) -> None:
        while view.nbytes:
            try:
                n = os.write(fd, view)
            except OSError as exc:
                raise io_error(exc, "write", name) from exc
            view = view[n:]

    return sink


def _open_input(input_file: str | None, volume_path: str) -> tuple[int, int | None]:
    """The input's descriptor and, when it is a regular file, how many bytes are left in it."""
    if input_file is None:
        fd = sys.stdin.fileno()
    else:
        try:
            fd = os.open(input_file, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise io_error(exc, "open", input_file) from exc
    try:
        info = os.fstat(fd)
        try:
            volume = os.stat(volume_path)
        except OSError as exc:
            raise io_error(exc, "open", volume_path) from exc
        if (info.st_dev, info.st_ino) == (volume.st_dev, volume.st_ino):
            raise option_error("the input is the volume itself")
        if stat.S_ISDIR(info.st_mode):
            raise option_error(f"{input_file} is a directory")
        known = info.st_size - os.lseek(fd, 0, os.SEEK_CUR) if stat.S_ISREG(info.st_mode) else None
    except BaseException:
        if input_file is not None:
            os.close(fd)
        raise
    return fd, known
