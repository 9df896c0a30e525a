"""keysteward agent unlock PATH...: the boot unlock, parsed and run without typer.

``keysteward agent unlock`` runs at boot, before the volumes it opens can be mounted: every
millisecond of its start-up is a millisecond of boot. ``cli/main.py`` sends ``keysteward agent unlock
...`` here before typer is imported; this module parses the command line with
:mod:`keysteward.cli.volume_args` (click's rules and messages, the same options and environment
variables as the typer command in :mod:`keysteward.cli.agent_cmd`, which calls :func:`unlock_volumes`
too, for ``keysteward --url U agent unlock ...``) and imports only what a release and an open need:
no typer, click, rich or pydantic (docs/agent.md, "Boot unlock: where the time goes").
"""

from __future__ import annotations

import json
import sys
from typing import Any

from keysteward.cli.volume_args import Opt, UsageError, Verb, exit_status, parse_verb
from keysteward.errors import KeystewardError

PROG = "keysteward agent"
MODES = ("auto", "dm", "userspace")

OPTIONS = (
    Opt("--name", help="device-mapper name (one PATH only)."),
    Opt(
        "--url",
        metavar="URL",
        envvar="KEYSTEWARD_URL",
        help="Key manager URL (default: the token's).",
        aliases=("--kms",),
    ),
    Opt("--identity", metavar="aws-iid|gcp-jwt", default="aws-iid", help="Identity evidence kind."),
    Opt("--metadata", metavar="URL", envvar="KEYSTEWARD_METADATA_URL", help="Metadata service URL."),
    Opt("--audience", help="The key manager's audience (gcp-jwt)."),
    Opt("--suite", metavar="x25519|mlkem768-x25519", default="x25519", help="HPKE suite."),
    Opt("--ca-file", metavar="FILE", envvar="KEYSTEWARD_CA_FILE", help="CA that signed the key manager."),
    Opt("--mode", metavar="auto|dm|userspace", default="auto", help="Hand-off."),
    Opt("--tpm", metavar="TCTI", help="Send a TPM quote (e.g. device:/dev/tpmrm0)."),
    Opt("--tpm-pcrs", metavar="BANK:I,J", default="sha256:0,7", help="The PCRs the quote covers."),
    Opt("--snp", metavar="SOURCE", help="Send an SEV-SNP report (/dev/sev-guest)."),
    Opt("--wait-approval", metavar="SECONDS", default="0", help="Wait this long for a release held for approval."),
    Opt("--json", "flag", "Print JSON for scripts."),
)


def unlock_volumes(paths: list[str], values: dict[str, Any]) -> int:
    """Release each volume's key and open it; print one line (or the JSON) per volume; 1 if any failed.

    ``values``: the options by their ``dest`` names (``kms_url`` for ``--url``). One client per key manager
    URL serves every release of the run and the end of each checked volume's lease (one TLS set-up).
    """
    from dataclasses import replace

    from keysteward.agent.unlock import UnlockOptions, unlock
    from keysteward.crypto.secret import disable_core_dumps

    name = values.get("name")
    if name is not None and len(paths) != 1:
        raise KeystewardError("--name takes one PATH only", code="agent_option")
    if values["mode"] not in MODES:
        raise KeystewardError(f"--mode {values['mode']!r} is not auto, dm or userspace", code="agent_option")
    disable_core_dumps()
    options = UnlockOptions(
        name=name, kms_url=values.get("kms_url"), identity=values["identity"], metadata_url=values.get("metadata"),
        audience=values.get("audience"), suite=values["suite"], ca_file=values.get("ca_file"), mode=values["mode"],
        tpm=values.get("tpm"), tpm_pcrs=values["tpm_pcrs"], snp=values.get("snp"),
        wait_approval=values["wait_approval"], one_shot=True,
    )  # fmt: skip
    results: list[dict[str, Any]] = []
    clients: dict[str, Any] = {}
    try:
        for path in paths:
            try:
                opened = unlock(path, options if name else replace(options, name=None), clients=clients)
            except KeystewardError as exc:
                results.append({"path": path, "ok": False, "code": exc.code, "error": exc.message})
                continue
            info: dict[str, Any] = {"ok": True, **opened.describe()}
            if opened.mode == "userspace":
                opened.close(wipe_lease=False)
                try:
                    clients[opened.url].end(opened.lease)
                finally:
                    opened.lease.wipe()
                info["state"] = "checked"
            else:
                opened.lease.wipe()
                info["state"] = "open"
            results.append(info)
    finally:
        for client in clients.values():
            client.close()
    _report(results, bool(values.get("json")))
    return 1 if any(not r["ok"] for r in results) else 0


def _report(results: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps({"volumes": results}) + "\n")
        sys.stdout.flush()
        return
    for r in results:
        if r["ok"]:
            where = f"/dev/mapper/{r['name']}" if r["state"] == "open" else "userspace: checked and closed"
            sys.stdout.write(f"{r['path']}: unlocked with keyslot {r['keyslot']} ({where})\n")
        else:
            sys.stderr.write(f"{r['path']}: {r['error']} ({r['code']})\n")
    sys.stdout.flush()
    sys.stderr.flush()


def _run(values: dict[str, Any]) -> int:
    try:
        values["wait_approval"] = float(values["wait_approval"])
    except ValueError:
        raise UsageError(f"Invalid value for '--wait-approval': {values['wait_approval']!r} is not a number",
                         f"{PROG} unlock") from None  # fmt: skip
    values["kms_url"] = values.pop("url")
    return unlock_volumes(values.pop("paths"), values)


VERB = Verb(
    "unlock", "Release each volume's key and open it (one shot, for boot).", OPTIONS, _run,
    path_help="Volumes bound to the key manager.", many=True,
)  # fmt: skip


def main(args: list[str]) -> int:
    """Run ``keysteward agent unlock ARGS``: every outcome an exit status, every failure one line on stderr."""
    return exit_status("agent unlock", lambda: VERB.run(parse_verb(PROG, VERB, args)), _os_error)


def _os_error(exc: OSError) -> str:
    return f"{exc.strerror or exc}: {getattr(exc, 'filename', '') or ''}".rstrip(": ")
