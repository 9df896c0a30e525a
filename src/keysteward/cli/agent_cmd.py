"""keysteward agent unlock|run: the instance agent that opens volumes bound to the key manager.

``unlock PATH...`` is the one shot for boot: with device-mapper each volume is handed to ``cryptsetup
open`` and stays mapped (its lease runs until ``agent run`` takes the volume over with a lease of its
own); without device-mapper the release and the keyslot are checked and the volume closed again (a
volume opened in userspace lives only as long as the process holding it: that is ``agent run``).
``run --config FILE`` is the daemon (docs/agent.md).

This module imports typer only; the agent's modules load when a command runs. ``keysteward agent
unlock ...`` itself does not come here: it runs without typer (:mod:`keysteward.cli.agent_unlock_cmd`,
which this group's ``unlock`` calls too, for global options before the group).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from typing import Annotated, Any

import typer

from keysteward.errors import KeystewardError

app = typer.Typer(
    name="agent",
    help="The instance agent: unlock volumes bound to the key manager, renew their leases.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

UrlOpt = Annotated[
    str | None,
    typer.Option("--url", metavar="URL", envvar="KEYSTEWARD_URL", help="Key manager URL (default: the token's)."),
]
OldUrlOpt = Annotated[str | None, typer.Option("--kms", metavar="URL", hidden=True, help="Old spelling of --url.")]
IdentityOpt = Annotated[str, typer.Option("--identity", metavar="aws-iid|gcp-jwt", help="Identity evidence kind.")]
MetadataOpt = Annotated[
    str | None,
    typer.Option("--metadata", metavar="URL", envvar="KEYSTEWARD_METADATA_URL", help="Metadata service URL."),
]
AudienceOpt = Annotated[str | None, typer.Option("--audience", help="The key manager's audience (gcp-jwt).")]
SuiteOpt = Annotated[str, typer.Option("--suite", metavar="x25519|mlkem768-x25519", help="HPKE suite.")]
CaOpt = Annotated[
    str | None,
    typer.Option("--ca-file", metavar="FILE", envvar="KEYSTEWARD_CA_FILE", help="CA that signed the key manager."),
]


TpmOpt = Annotated[
    str | None, typer.Option("--tpm", metavar="TCTI", help="Send a TPM quote (e.g. device:/dev/tpmrm0).")
]
PcrsOpt = Annotated[str, typer.Option("--tpm-pcrs", metavar="BANK:I,J", help="The PCRs the quote covers.")]
SnpOpt = Annotated[str | None, typer.Option("--snp", metavar="SOURCE", help="Send an SEV-SNP report (/dev/sev-guest).")]
WaitOpt = Annotated[
    float, typer.Option("--wait-approval", metavar="SECONDS", help="Wait this long for a release held for approval.")
]


def _url(ctx: typer.Context, url: str | None, old: str | None) -> str | None:
    """The key manager: ``--url`` (or its old spelling ``--kms``), ``KEYSTEWARD_URL``, or the global
    ``keysteward --url U agent ...``; None leaves it to each volume's token."""
    from keysteward.cli.typer_values import renamed

    url = renamed(ctx, "url", url, old, "--url", "--kms")
    root = ctx.find_root().obj
    return url or (getattr(root, "given", None) or {}).get("url")


def _print(data: Any, as_json: bool, text: str) -> None:
    sys.stdout.write(json.dumps(data) + "\n" if as_json else text)
    sys.stdout.flush()


@app.command()
def unlock(
    ctx: typer.Context,
    paths: Annotated[list[str], typer.Argument(metavar="PATH...", help="Volumes bound to the key manager.")],
    name: Annotated[str | None, typer.Option("--name", help="device-mapper name (one PATH only).")] = None,
    url: UrlOpt = None,
    kms: OldUrlOpt = None,
    identity: IdentityOpt = "aws-iid",
    metadata: MetadataOpt = None,
    audience: AudienceOpt = None,
    suite: SuiteOpt = "x25519",
    ca_file: CaOpt = None,
    mode: Annotated[str, typer.Option("--mode", metavar="auto|dm|userspace", help="Hand-off.")] = "auto",
    tpm: TpmOpt = None,
    tpm_pcrs: PcrsOpt = "sha256:0,7",
    snp: SnpOpt = None,
    wait_approval: WaitOpt = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Release each volume's key and open it (one shot, for boot)."""
    from keysteward.cli.agent_unlock_cmd import unlock_volumes

    values = {
        "name": name, "kms_url": _url(ctx, url, kms), "identity": identity, "metadata": metadata,
        "audience": audience, "suite": suite, "ca_file": ca_file, "mode": mode, "tpm": tpm, "tpm_pcrs": tpm_pcrs,
        "snp": snp, "wait_approval": wait_approval, "json": as_json,
    }  # fmt: skip
    if unlock_volumes(paths, values):
        raise typer.Exit(1)


@app.command()
def run(
    config: Annotated[str, typer.Option("--config", metavar="FILE", help="Volume list (crypttab-style).")] = (
        "/etc/keysteward/volumes"
    ),
    status_file: Annotated[
        str, typer.Option("--status-file", metavar="FILE", help="JSON status, per volume (never key bytes).")
    ] = "/run/keysteward/agent.json",
    ca_file: CaOpt = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning, error.")] = "info",
) -> None:
    """Unlock the configured volumes and keep them open while their leases live (daemon)."""
    import logging

    from keysteward.agent.config import read_config
    from keysteward.agent.daemon import run_agent
    from keysteward.logs import quiet_http_clients

    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise KeystewardError(f"--log-level {log_level!r} is not debug, info, warning or error", code="agent_option")
    root = logging.getLogger()
    root.setLevel(level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.handlers[:] = [handler]
    quiet_http_clients()
    entries = read_config(config)
    if ca_file:
        entries = [e if e.options.ca_file else replace(e, options=replace(e.options, ca_file=ca_file)) for e in entries]
    if not entries:
        raise KeystewardError(f"{config} lists no volumes", code="agent_config")
    run_agent(entries, os.path.abspath(status_file), config=os.path.abspath(config))


@app.command()
def status(
    status_file: Annotated[
        str, typer.Option("--status-file", metavar="FILE", help="The running agent's status file.")
    ] = "/run/keysteward/agent.json",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """The running agent's volumes: open or locked, why, lease expiry, last action (from its status file)."""
    from keysteward.daemon_status import read_status, status_lines

    data = read_status(status_file, "agent")
    _print(data, as_json, status_lines(data, "agent", "volumes"))


@app.command("enroll-tpm")
def enroll_tpm(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Option("--tenant", help="The tenant this instance belongs to.")],
    tpm: Annotated[str, typer.Option("--tpm", metavar="TCTI", help="The TPM (e.g. device:/dev/tpmrm0).")],
    url: Annotated[
        str | None, typer.Option("--url", metavar="URL", envvar="KEYSTEWARD_URL", help="Key manager URL. [required]")
    ] = None,
    kms: OldUrlOpt = None,
    identity: IdentityOpt = "aws-iid",
    metadata: MetadataOpt = None,
    audience: AudienceOpt = None,
    ca_file: CaOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Enroll this instance's TPM attestation key: the key manager checks it against the EK by
    MakeCredential, the TPM recovers the credential, and its quotes count in release decisions from then on."""
    from keysteward.agent.tpm_enroll import enroll
    from keysteward.agent.unlock import UnlockOptions

    kms_url = _url(ctx, url, kms)
    if not kms_url:
        raise typer.BadParameter("give the key manager: --url URL or KEYSTEWARD_URL", param_hint="'--url'")
    options = UnlockOptions(identity=identity, metadata_url=metadata, audience=audience, ca_file=ca_file)
    instance = enroll(kms_url, tenant, tpm, options)
    _print({"instance": instance}, as_json, f"TPM attestation key enrolled for {instance}\n")
