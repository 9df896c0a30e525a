"""keysteward volume create|dump|check|read|write|add-key|remove-key: LUKS2 (and LUKS1) volumes in userspace.

Offsets and lengths are bytes of the decrypted payload. Passphrase files are read as bytes, like
cryptsetup's ``--key-file`` (no newline stripping; ``-`` is standard input).

``keysteward volume ...`` is dispatched by ``cli/main.py`` before typer is imported: this group parses
its command line with :mod:`keysteward.cli.volume_args` (click's rules and messages) and loads, per
verb, only the volume modules it runs, so that a ``volume read`` of a cached volume is not dominated by
start-up. ``keysteward --help`` lists the group through a pass-through typer command (``cli/main.py``).

Where a verb's key comes from is one function, :func:`key_source`: today the bytes of
``--passphrase-file``; a key released by the key manager can be added there.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from keysteward.cli import volume_kms
from keysteward.cli.data_dir import server_defaults
from keysteward.cli.volume_args import Opt, Verb, exit_status, parse_group
from keysteward.cli.volume_files import fd_sink, open_input, open_output
from keysteward.volume.errors import io_error, option_error

PROG = "keysteward volume"
ABOUT = "LUKS2 (and LUKS1) volumes on files and block devices: create, inspect, read and write them."
PROGRESS_MIN = 256 * 1024 * 1024
STDIN = "-"

PASSPHRASE = Opt(
    "--passphrase-file", metavar="FILE", required=True,
    help="File whose bytes are the passphrase (no newline stripping; - = stdin).",
)  # fmt: skip
KEY_SOURCE = (
    PASSPHRASE._replace(required=False, help=PASSPHRASE.help + " Without it the key comes by a release."),
    *volume_kms.RELEASE_OPTS,
)
JSON = Opt("--json", "flag", "Print JSON for scripts.")
YES_OPT = Opt("--yes", "flag", "Do not ask (required when stdin is not a terminal).")
KDF_OPTS = (
    Opt("--pbkdf", metavar="pbkdf2|argon2id", help="KDF of the new keyslot.", aliases=("--kdf",)),
    Opt(
        "--pbkdf-force-iterations",
        "int",
        "PBKDF2 iterations or Argon2 time cost (default: about 2 s / 4).",
        aliases=("--pbkdf-iterations",),
    ),
    Opt("--iter-time", "int", "pbkdf2: as many iterations as take this many milliseconds here (default 2000)."),
    Opt("--pbkdf-memory", "int", "Argon2 memory in KiB (default: 1 GiB or less)."),
    Opt("--pbkdf-parallel", "int", "Argon2 lanes (default: up to 4)."),
)
GROUP_OPTS = (
    Opt(
        "--argon2-memory-limit", metavar="SIZE", envvar="KEYSTEWARD_ARGON2_MEMORY_LIMIT",
        help="Most memory an Argon2 keyslot may use here (default: half the available memory, at most 4G).",
    ),
)  # fmt: skip

Args = dict[str, Any]
VOLUME_REF = "The volume: its name or id in the key manager, or a volume file with a keysteward token."


# -- the key source ----------------------------------------------------------------------------------


def key_source(args: Args, option: str = "passphrase_file") -> bytearray:
    """The secret that opens the volume, as a bytearray the caller wipes: the bytes of the passphrase file.

    This is the one place a verb's key comes from (a key released by the key manager goes here too).
    """
    from keysteward.volume.keyfile import read_key_file

    return read_key_file(args[option])


@contextmanager
def _secret(args: Args, option: str = "passphrase_file", *, writable: bool = False) -> Iterator[bytearray]:
    """The key of a verb that takes ``--passphrase-file`` or (read, write, check) gets it by a release."""
    if option == "passphrase_file" and "identity" in args and volume_kms.uses_release(args):
        with volume_kms.released_secret(args, writable=writable) as released:
            yield released
        return
    data = key_source(args, option)
    try:
        yield data
    finally:
        data[:] = bytes(len(data))


# -- helpers -----------------------------------------------------------------------------------------


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


def _kdf(args: Args) -> Any:
    from keysteward.volume.kdf import KdfChoice

    return KdfChoice(
        args["pbkdf"], args["pbkdf_force_iterations"], args["pbkdf_memory"], args["pbkdf_parallel"],
        iter_time_ms=args["iter_time"],
    )  # fmt: skip


# -- verbs -------------------------------------------------------------------------------------------


def create(args: Args) -> None:
    from keysteward.volume.create import CreateOptions, create_volume
    from keysteward.volume.sizes import parse_size

    options = CreateOptions(
        size=parse_size(args["size"], "--size"), sector_size=args["sector_size"], key_bits=args["key_size"],
        kdf=_kdf(args), label=args["label"], luks1=args["luks1"], force=args["force"],
    )  # fmt: skip
    if volume_kms.bound(args):
        glass = key_source(args) if args["passphrase_file"] is not None else None
        try:
            made_kms = volume_kms.create_bound(args, options, glass, _kdf(args))
        finally:
            if glass is not None:
                glass[:] = bytes(len(glass))
        volume, glass_slot = made_kms["volume"], made_kms["break_glass_keyslot"]
        _print(
            made_kms,
            args["json"],
            f"created LUKS2 volume {made_kms['uuid']} at {made_kms['path']}, bound to the key manager as "
            f"{volume['name']} ({volume['id']}): keyslot {made_kms['kms_keyslot']} opens by release only"
            + (f", break-glass keyslot {glass_slot}" if glass_slot is not None else "")
            + "\n",
        )
        return
    secret = key_source(args) if args["passphrase_file"] is not None else _prompt_new_passphrase()
    try:
        made = create_volume(args["path"], secret, options, max_memory_kib=args["limit"])
    finally:
        secret[:] = bytes(len(secret))
    data = {
        "path": made.path, "version": made.version, "uuid": made.uuid, "keyslot": made.keyslot,
        "data_offset": made.data_offset, "payload_size": made.payload_size, "sector_size": made.sector_size,
        "key_bits": made.key_bits, "kdf": made.kdf, "new_file": made.new_file,
    }  # fmt: skip
    _print(
        data,
        args["json"],
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


def dump(args: Args) -> None:
    from keysteward.volume.device import Device
    from keysteward.volume.dump import describe, render
    from keysteward.volume.header_io import read_header

    with Device.open(args["path"]) as device:
        info = describe(read_header(device))
    info["path"] = args["path"]
    _print(info, args["json"], render(info))


def check(args: Args) -> None:
    from keysteward.volume.luks_volume import check_passphrase

    with _secret(args) as secret:
        slot = check_passphrase(args["path"], secret, max_memory_kib=args["limit"])
    data = {"path": args["path"], "keyslot": slot, "ok": True}
    _print(data, args["json"], f"keyslot {slot} opens with this passphrase\n")


def read(args: Args) -> None:
    from keysteward.volume.luks_volume import LuksVolume

    offset, length, output = args["offset"], args["length"], args["output"]
    with _secret(args) as secret, LuksVolume.open(args["path"], secret, max_memory_kib=args["limit"]) as vol:
        if length is None:
            length = max(0, vol.payload_size - offset) if offset >= 0 else 0
        vol.check_range(offset, length)
        fd = open_output(output, vol.device.fd)
        try:
            with _progress(length, "reading") as progress:
                vol.read_to(offset, length, fd_sink(fd, output or "standard output"), progress)
        finally:
            if output is not None:
                os.close(fd)


def write(args: Args) -> None:
    from keysteward.volume.luks_volume import LuksVolume

    input_file = args["input"]
    if input_file is None and args["passphrase_file"] == STDIN:
        raise option_error("standard input cannot hold both the passphrase and the data; use --input")
    fd, known = open_input(input_file, args["path"])
    try:
        with (
            _secret(args, writable=True) as secret,
            LuksVolume.open(args["path"], secret, writable=True, max_memory_kib=args["limit"]) as vol,
        ):
            vol.check_range(args["offset"], known or 0)
            name = input_file or "standard input"

            def read_into(view: memoryview) -> int:
                try:
                    return os.readv(fd, [view])
                except OSError as exc:
                    raise io_error(exc, "read", name) from exc

            with _progress(known or 0, "writing") as progress:
                vol.write_from(args["offset"], read_into, length=known, progress=progress)
            if args["fsync"]:
                vol.flush()
    finally:
        if input_file is not None:
            os.close(fd)


def add_key(args: Args) -> None:
    from keysteward.volume.keyslots import add_key

    if args["passphrase_file"] == STDIN and args["new_passphrase_file"] == STDIN:
        raise option_error("standard input can hold only one of the passphrases")
    with _secret(args) as old, _secret(args, "new_passphrase_file") as new:
        added = add_key(args["path"], old, new, kdf=_kdf(args), keyslot=args["slot"], max_memory_kib=args["limit"])
    data = {"path": args["path"], "keyslot": added.keyslot, "opened_with": added.opened_with, "kdf": added.kdf}
    _print(data, args["json"], f"added keyslot {added.keyslot} ({added.kdf['type']})\n")


def remove_key(args: Args) -> None:
    from keysteward.volume.keyslots import remove_key

    slot = args["slot"]
    with _secret(args) as secret:
        other = remove_key(args["path"], slot, secret, max_memory_kib=args["limit"])
    _print({"path": args["path"], "removed": slot, "opened_with": other}, args["json"], f"removed keyslot {slot}\n")


VERBS = (
    Verb("create", "Create a volume at PATH (a new file, an existing file, or a block device).", (
        Opt("--size", metavar="SIZE", required=True, help="Payload size, like 64M or 1G."),
        Opt("--passphrase-file", metavar="FILE", help="Passphrase bytes (default: prompt)."),
        Opt("--sector-size", "int", "512 or 4096.", default=4096),
        Opt("--key-size", "int", "256 (AES-128-XTS) or 512 (AES-256-XTS).", default=512),
        KDF_OPTS[0],
        Opt("--label", help="LUKS2 label.", default=""),
        Opt("--luks1", "flag", "LUKS1, for QEMU (pbkdf2, 512-byte sectors)."),
        Opt("--force", "flag", "Overwrite an existing LUKS header."),
        *KDF_OPTS[1:], *volume_kms.CREATE_OPTS, JSON,
    ), create),
    Verb("dump", "Show the header: keyslots, tokens, segments, digests (never key material).", (JSON,), dump),
    Verb("check", "Exit 0 if the passphrase (or the key a release gives) opens a keyslot of PATH.",
         (*KEY_SOURCE, JSON), check),
    Verb("read", "Decrypt payload bytes to FILE or stdout (the whole payload by default).", (
        *KEY_SOURCE,
        Opt("--offset", "int", "Payload offset in bytes.", default=0),
        Opt("--length", "int", "Bytes to read (default: to the end)."),
        Opt("--output", metavar="FILE", help="Write here (default: stdout)."),
    ), read),
    Verb("write", "Encrypt FILE or stdin and write it at payload offset N.", (
        *KEY_SOURCE,
        Opt("--offset", "int", "Payload offset in bytes.", default=0),
        Opt("--input", metavar="FILE", help="Read here (default: stdin)."),
        Opt("--fsync", "flag", "Flush the written data to the disk before reporting success (default: the data "
            "is handed to the kernel, as cat or dd without conv=fsync do)."),
    ), write),
    Verb("add-key", "Add a keyslot for a new passphrase; an existing passphrase opens the volume key.", (
        PASSPHRASE,
        Opt("--new-passphrase-file", metavar="FILE", required=True, help="The new keyslot's passphrase bytes."),
        KDF_OPTS[0],
        Opt("--slot", "int", "Keyslot number (default: first free)."),
        *KDF_OPTS[1:], JSON,
    ), add_key),
    Verb("remove-key", "Remove keyslot N; the passphrase must open another keyslot. The last keyslot is never "
         "removed.", (Opt("--slot", "int", "Keyslot to remove.", required=True), PASSPHRASE, JSON), remove_key),
    Verb("list", "Volumes registered in the key manager.", (*volume_kms.ADMIN_OPTS, JSON), volume_kms.listing,
         path_help=""),
    Verb("status", "A registered volume and its leases.", (*volume_kms.ADMIN_OPTS, JSON), volume_kms.status,
         path_help=VOLUME_REF),
    Verb("revoke", "Revoke a volume: its agents lock it at their next renewal and no release gives its key.", (
        Opt("--shred", "flag", "Also make the agents remove the keysteward keyslot and token from the header."),
        Opt("--reason", default="", help="Why (kept in the audit log)."), YES_OPT,
        *volume_kms.ADMIN_OPTS, JSON,
    ), volume_kms.revoke, path_help=VOLUME_REF),
    Verb("destroy", "Destroy the volume's key in the key manager (crypto-shredding; cannot be undone).", (
        Opt("--reason", default="", help="Why (kept in the audit log)."), YES_OPT, *volume_kms.ADMIN_OPTS, JSON,
    ), volume_kms.destroy, path_help=VOLUME_REF),
)  # fmt: skip


# -- running -----------------------------------------------------------------------------------------


def _run(args: list[str]) -> None:
    group, verb, values = parse_group(PROG, ABOUT, GROUP_OPTS, VERBS, args)
    limit = group["argon2_memory_limit"]
    if limit is not None:
        from keysteward.volume.sizes import parse_size

        limit = parse_size(limit, "Argon2 memory limit") // 1024
    values["limit"] = limit
    if "ca_file" in values and not values["ca_file"]:  # the CA of the server whose data dir is set, if any
        values["ca_file"] = server_defaults()[1]
    verb.run(values)


def main(args: list[str]) -> int:
    """Run ``keysteward volume ARGS``; every outcome is an exit status, every failure one line on stderr."""
    return exit_status("volume", lambda: _run(args), _os_error)


def _os_error(exc: OSError) -> str:
    error = io_error(exc, "use", getattr(exc, "filename", None) or "a file")
    return f"{error.message} ({error.code})"
