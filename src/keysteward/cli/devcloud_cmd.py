"""keysteward devcloud init|serve|instance|certificate: a local stand-in for a cloud provider."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from keysteward.cli.context import JsonFlag
from keysteward.cli.output import console, emit, table

app = typer.Typer(
    help="A local cloud provider for the demo and tests: signing key, instances, metadata service.",
    no_args_is_help=True,
)
instance_app = typer.Typer(help="Create, clone, terminate and list devcloud instances.", no_args_is_help=True)
app.add_typer(instance_app, name="instance")

StateDir = Annotated[
    Path, typer.Option("--state", envvar="KEYSTEWARD_DEVCLOUD_STATE", help="Devcloud state directory.")
]
DEFAULT_STATE = Path("devcloud")


def _cloud(state: Path) -> Any:
    from keysteward.devcloud.provider import DevCloud

    return DevCloud(state)


def _metadata_prefix(state: Path, instance_id: str) -> str | None:
    """The instance's metadata URL prefix, when a metadata service of this state is (or was) serving."""
    from keysteward.devcloud.provider import URL_FILE

    try:
        url = (state / URL_FILE).read_text().strip()
    except OSError:
        return None
    return f"{url}/{instance_id}" if url else None


def _instance_json(state: Path, instance: Any) -> dict[str, Any]:
    data: dict[str, Any] = instance.to_json()
    data["metadata_url"] = _metadata_prefix(state, instance.id)
    return data


def _print_instance(d: dict[str, Any]) -> None:
    console.print(d["id"], highlight=False)
    if d.get("metadata_url"):
        console.print(d["metadata_url"], highlight=False, soft_wrap=True)


@app.command("init")
def init(state: StateDir = DEFAULT_STATE, as_json: JsonFlag = False) -> None:
    """Make a provider: an RSA-2048 signing key (0600) and its self-signed certificate."""
    from keysteward.devcloud.provider import CERT_FILE, DevCloud

    cloud = DevCloud.init(state)
    data = {
        "state": str(state),
        "certificate": str(state / CERT_FILE),
        "subject": cloud.certificate.subject.rfc4514_string(),
    }
    emit(
        data, as_json, lambda d: console.print(f"devcloud initialised in {d['state']}; certificate {d['certificate']}")
    )


@app.command("serve")
def serve(
    state: StateDir = DEFAULT_STATE,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free port).")] = 0,
    port_file: Annotated[Path | None, typer.Option(help="Write the bound URL to this file.")] = None,
) -> None:
    """Run the metadata service until interrupted; prints the bound URL on its first line."""
    from keysteward.devcloud.provider import URL_FILE, write_text_atomic
    from keysteward.devcloud.server import MetadataServer

    server = MetadataServer(_cloud(state), host, port)
    url = server.url
    written = [state / URL_FILE] + ([port_file] if port_file else [])

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        for path in written:
            write_text_atomic(path, url + "\n")
        sys.stdout.write(url + "\n")
        sys.stdout.flush()
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        for path in written:
            with contextlib.suppress(OSError):
                if path.read_text().strip() == url:
                    os.unlink(path)


@instance_app.command("create")
def instance_create(
    state: StateDir = DEFAULT_STATE,
    account: Annotated[str | None, typer.Option(help="Account (default: 12 random digits).")] = None,
    image: Annotated[str | None, typer.Option(help="Image id (default: a random ami-...).")] = None,
    region: Annotated[str | None, typer.Option(help="Region (default: dev-east-1).")] = None,
    zone: Annotated[str | None, typer.Option(help="Zone (default: the region + 'a').")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Launch an instance; prints its id and, when the service runs, its metadata URL prefix."""
    instance = _cloud(state).create(account=account, image_id=image, region=region, zone=zone)
    emit(_instance_json(state, instance), as_json, _print_instance)


@instance_app.command("clone")
def instance_clone(instance_id: str, state: StateDir = DEFAULT_STATE, as_json: JsonFlag = False) -> None:
    """Boot a copy of an instance (same account, image and zone; a new id): what a cloner would do."""
    emit(_instance_json(state, _cloud(state).clone(instance_id)), as_json, _print_instance)


@instance_app.command("terminate")
def instance_terminate(instance_id: str, state: StateDir = DEFAULT_STATE, as_json: JsonFlag = False) -> None:
    """Terminate an instance: the metadata service answers 404 for it from now on."""
    instance = _cloud(state).terminate(instance_id)
    emit(_instance_json(state, instance), as_json, lambda d: console.print(f"terminated {d['id']}"))


@instance_app.command("list")
def instance_list(state: StateDir = DEFAULT_STATE, as_json: JsonFlag = False) -> None:
    rows = [_instance_json(state, i) for i in _cloud(state).instances()]
    columns = ["id", "state", "account", "image_id", "region", "zone", "launched_at", "cloned_from"]

    def human(d: list[dict[str, Any]]) -> None:
        table([{k: "" if v is None else v for k, v in r.items()} for r in d], columns, title="devcloud instances")

    emit(rows, as_json, human)


@app.command("certificate")
def certificate(state: StateDir = DEFAULT_STATE, as_json: JsonFlag = False) -> None:
    """Print the signing certificate (PEM): register it with the key manager as a provider."""
    pem = _cloud(state).certificate_pem()

    def human(d: dict[str, str]) -> None:
        sys.stdout.write(d["certificate_pem"])

    emit({"certificate_pem": pem}, as_json, human)
