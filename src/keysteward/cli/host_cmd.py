"""keysteward host run|check|enroll-tpm|report-tpm|status: the agent of a hypervisor host (docs/hosts.md)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from keysteward.cli.context import JsonFlag
from keysteward.cli.output import console, emit, fields

app = typer.Typer(help="The hypervisor host agent: starts VMs only with keys released to this attested host.",
                  no_args_is_help=True)  # fmt: skip
Config = Annotated[str, typer.Option("--config", metavar="FILE", help="The host agent's TOML file.")]


@app.command("run")
def run(config: Config) -> None:
    """Carry out this host's VM orders and keep the VMs' leases (SIGTERM stops every VM and wipes its keys)."""
    from keysteward.host.agent import HostAgent
    from keysteward.host.config import load_config
    from keysteward.logs import json_logging, quiet_http_clients

    settings = load_config(config)
    json_logging(settings.log_level)
    quiet_http_clients()
    HostAgent(settings).run()


@app.command("check")
def check(config: Config, as_json: JsonFlag = False) -> None:
    """Read the config and this host's hardware facts; asks the key manager nothing, starts nothing."""
    from keysteward.host.agent import host_identity
    from keysteward.host.config import load_config
    from keysteward.host.hardware import read_hardware

    settings = load_config(config)
    tenant, name = host_identity(settings.kms.cert_file)
    data = {
        "host": name, "tenant": tenant, "kms": settings.url, "tpm": settings.tpm, "accel": settings.accel,
        "hardware": read_hardware(), "state_dir": settings.state_dir, "snapshot_dir": settings.snapshot_dir,
    }  # fmt: skip
    emit(data, as_json, lambda d: fields(d))


def _tpm_machine(config: str) -> tuple[Any, str, Any]:
    """This machine's host configuration (it must name a TPM), its tenant and the options to reach the manager."""
    from keysteward.agent.unlock import UnlockOptions
    from keysteward.errors import KeystewardError
    from keysteward.host.config import load_config

    settings = load_config(config)
    if settings.tpm is None:
        raise KeystewardError(f"{config} names no TPM ([tpm] tcti)", code="host_config")
    tenant = _machine_tenant(settings.kms.cert_file)
    options = UnlockOptions(identity="host", client_cert=(settings.kms.cert_file, settings.kms.key_file),
                            ca_file=settings.kms.ca_file, timeout=settings.kms.timeout)  # fmt: skip
    return settings, tenant, options


@app.command("enroll-tpm")
def enroll_tpm(config: Config, as_json: JsonFlag = False) -> None:
    """Enroll this host's (or KMIP hypervisor's) TPM attestation key; its certificate is its identity."""
    from keysteward.agent.tpm_enroll import enroll

    settings, tenant, options = _tpm_machine(config)
    holder = enroll(settings.url, tenant, settings.tpm, options)
    emit({"holder": holder}, as_json, lambda d: console.print(f"TPM attestation key enrolled for {d['holder']}"))


@app.command("report-tpm")
def report_tpm(config: Config, as_json: JsonFlag = False) -> None:
    """Send a fresh TPM quote of this machine's [tpm] pcrs (enroll its AK first): a KMIP hypervisor's policy facts.

    The key manager verifies it with the enrolled AK and keeps it as ``context.platform`` of this machine's KMIP
    operations for ``[kmip] platform_max_age`` seconds (docs/kmip.md): run it at boot and periodically."""
    from keysteward.agent.tpm_enroll import report_quote
    from keysteward.agent.unlock import parse_pcrs

    settings, tenant, options = _tpm_machine(config)
    done = report_quote(settings.url, tenant, settings.tpm, parse_pcrs(settings.tpm_pcrs), options)
    emit(done, as_json, lambda d: fields(d, ["holder", "platform"]))


@app.command("status")
def status(
    status_file: Annotated[str, typer.Option("--status-file", metavar="FILE", help="The host agent's status file.")]
    = "/run/keysteward/host.json",
    as_json: JsonFlag = False,
) -> None:  # fmt: skip
    """The VMs this host runs (from its status file): lease, accelerator, QEMU's pid."""
    from keysteward.daemon_status import read_status

    emit(read_status(status_file, "host"), as_json, lambda d: fields(d))


def _machine_tenant(cert_file: str) -> str:
    """The tenant of a host or hypervisor certificate (its identity URI; the key manager verifies it)."""
    from keysteward.crypto.x509identity import peek_identity, pem_to_der
    from keysteward.errors import KeystewardError

    try:
        with open(cert_file, encoding="ascii", errors="replace") as f:
            identity = peek_identity(pem_to_der(f.read()))
    except OSError as exc:
        raise KeystewardError(f"cannot read {cert_file}: {exc.strerror}", code="host_config") from None
    if identity.role not in ("host", "hypervisor"):
        raise KeystewardError(f"{cert_file} is a {identity.role} certificate, not a host's or hypervisor's",
                              code="host_config")  # fmt: skip
    return identity.tenant
