"""The key manager side of ``keysteward volume``: bound volumes, keys released instead of passphrases,
and the registry verbs (list, status, revoke, destroy).

``volume create PATH --url URL --key-name NAME --provider P --bind-account A ...`` registers the volume
and writes a keyslot only a release opens, with its ``keysteward`` token. ``volume read|write|check PATH``
without ``--passphrase-file`` get their key by a release (this instance's evidence,
docs/release-protocol.md) from ``--url``, ``KEYSTEWARD_URL`` or the URL in the volume's token.
``volume list|status|revoke|destroy`` talk to the key manager as an admin (or, for revoke, a security
officer): ``KEYSTEWARD_TOKEN``, ``--url`` or ``KEYSTEWARD_URL`` (else the volume file's token), and
``--ca-file`` or ``KEYSTEWARD_CA_FILE``. The older spellings (``--kms``, ``--key``, ``--tag``) are hidden
aliases (docs/cli.md). Every import of the HTTP client happens inside a verb, so the passphrase verbs
start as fast as before.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from keysteward.cli.confirm import confirm
from keysteward.cli.data_dir import server_defaults
from keysteward.cli.values import ValueProblem, parse_labels
from keysteward.cli.volume_args import Opt
from keysteward.volume.errors import option_error

Args = dict[str, Any]

URL_ENV = "KEYSTEWARD_URL"
RELEASE_URL = Opt(
    "--url", metavar="URL", aliases=("--kms",),
    help=f"Get the key by a release from this key manager (default: ${URL_ENV}, else the URL in the volume's "
    "token), instead of a passphrase file.",
)  # fmt: skip
CA_FILE = Opt("--ca-file", metavar="FILE", envvar="KEYSTEWARD_CA_FILE", help="CA that signed the key manager.")
RELEASE_OPTS = (
    RELEASE_URL,
    Opt("--identity", metavar="aws-iid|gcp-jwt", default="aws-iid", help="Evidence of this instance's identity."),
    Opt("--metadata", metavar="URL", envvar="KEYSTEWARD_METADATA_URL", help="The instance metadata service."),
    Opt("--audience", help="gcp-jwt: the audience to ask the metadata service for."),
    Opt("--suite", metavar="x25519|mlkem768-x25519", default="x25519", help="HPKE suite of the release."),
    CA_FILE,
)
CREATE_OPTS = (
    Opt("--url", metavar="URL", aliases=("--kms",), help=f"Bind the volume to this key manager (default with "
        f"--key-name: ${URL_ENV})."),
    Opt("--key-name", metavar="NAME", aliases=("--key",), help="Bound: the tenant key that wraps the volume's secret."),
    Opt("--name", help="Bound: the volume's name in the key manager (default: the file name)."),
    Opt("--provider", help="Bound: the provider whose instances may receive the key."),
    Opt("--bind-account", metavar="ACCOUNT", help="Bound: only instances of this account."),
    Opt("--bind-instance", metavar="ID", help="Bound: only this instance."),
    Opt("--bind-image", metavar="ID", help="Bound: only instances of this image."),
    Opt("--bind-host", metavar="NAME", help="Bound: only this host of the tenant (the NBD proxy), by its certificate."),
    Opt("--kms-label", "multi", "Bound: a label recorded in the key manager, which policies read (repeatable; "
        "--label is the LUKS2 header's label, as in cryptsetup).", metavar="K=V", aliases=("--tag",)),
    Opt("--lease-seconds", "int", "Bound: lease length (default 30)."),
    Opt("--renew-seconds", "int", "Bound: renewal interval (default 10)."),
    Opt("--grace-seconds", "int", "Bound: how long a running agent keeps the volume open when the key manager "
        "is unreachable (default: until the lease expires)."),
    Opt("--token", envvar="KEYSTEWARD_TOKEN", help="Bound: an admin API token."),
    CA_FILE,
)  # fmt: skip
ADMIN_OPTS = (
    Opt("--url", metavar="URL", envvar=URL_ENV, aliases=("--kms",),
        help="The key manager (default: the volume file's token)."),
    Opt("--token", envvar="KEYSTEWARD_TOKEN", help="An API token (admin; security-officer for revoke)."),
    CA_FILE,
)  # fmt: skip


def uses_release(args: Args) -> bool:
    """Whether the verb's key comes by a release: no ``--passphrase-file``. Sets ``args["url"]`` to the key
    manager to ask (None: the one the volume's token names)."""
    if args.get("passphrase_file"):
        if args.get("url"):
            raise option_error("give --url or --passphrase-file, not both")
        return False
    args["url"] = args.get("url") or os.environ.get(URL_ENV) or None
    from keysteward.volume.errors import VolumeRequestError
    from keysteward.volume.kms_token import NO_TOKEN, read_token

    try:
        read_token(args["path"])  # a header read: a volume no release can open is told apart before any request
    except VolumeRequestError as exc:
        if exc.code != NO_TOKEN:
            raise
        raise option_error(
            f"give --passphrase-file FILE: {args['path']} has no keysteward token, so no key manager releases its key"
        ) from None
    return True


@contextmanager
def released_secret(args: Args, *, writable: bool = False) -> Iterator[bytearray]:
    """The volume's keyslot secret by a release (wiped after; the lease is ended when the verb is done)."""
    from keysteward.agent.kms_volume import kms_passphrase
    from keysteward.agent.unlock import UnlockOptions

    options = UnlockOptions(
        kms_url=args["url"], identity=args["identity"], metadata_url=args["metadata"], audience=args["audience"],
        suite=args["suite"], ca_file=args["ca_file"], mode="userspace", writable=writable,
    )  # fmt: skip
    with kms_passphrase(args["path"], options) as secret:
        yield secret


BOUND_ONLY = ("provider", "bind_account", "bind_instance", "bind_image", "bind_host", "kms_label", "name")


def bound(args: Args) -> bool:
    """Whether ``volume create`` binds the volume to a key manager: ``--url`` or ``--key-name`` given (the
    URL then defaults to ``KEYSTEWARD_URL``)."""
    if not (args.get("url") or args.get("key_name")):
        stray = [o for o in BOUND_ONLY if args.get(o)]
        if stray:
            raise option_error(f"--{stray[0].replace('_', '-')} is for a volume bound to the key manager: "
                               "give --key-name NAME (and --url URL or $KEYSTEWARD_URL)")  # fmt: skip
        return False
    args["url"] = args.get("url") or os.environ.get(URL_ENV) or server_defaults()[0]
    if not args["url"]:
        raise option_error(f"a volume bound to the key manager needs --url URL (or ${URL_ENV})")
    return True


def create_bound(args: Args, options: Any, break_glass: bytearray | None, kdf: Any) -> dict[str, Any]:
    from keysteward.agent.kms_volume import KmsVolumeSpec, create_kms_volume

    needed = ("key_name", "token") if args.get("bind_host") else ("key_name", "provider", "bind_account", "token")
    missing = [o for o in needed if not args.get(o)]
    if missing:
        names = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise option_error(f"a volume bound to the key manager needs {names} (a token may be in KEYSTEWARD_TOKEN)")
    if args.get("bind_host") and any(args.get(o) for o in ("provider", "bind_account", "bind_instance", "bind_image")):
        raise option_error("--bind-host binds the volume to a host: it takes no --provider or --bind-* of instances")
    try:
        labels = parse_labels(args["kms_label"], "--kms-label")
    except ValueProblem as exc:
        raise option_error(str(exc)) from None
    spec = KmsVolumeSpec(
        url=args["url"], key=args["key_name"], provider=args["provider"], account=args["bind_account"],
        host=args["bind_host"], name=args["name"], instance_id=args["bind_instance"], image_id=args["bind_image"],
        labels=labels, lease_seconds=args["lease_seconds"], renew_seconds=args["renew_seconds"],
        grace_seconds=args["grace_seconds"],
    )  # fmt: skip
    return create_kms_volume(
        args["path"], spec, options, admin_token=args["token"], ca_file=args["ca_file"],
        break_glass=break_glass, break_glass_kdf=kdf, max_memory_kib=args["limit"],
    )  # fmt: skip


# -- registry verbs ---------------------------------------------------------------------------------


def _admin(args: Args) -> tuple[Any, str]:
    """An API client and the volume reference: a volume file's token gives the id (and URL), else a name or id."""
    from keysteward.cli.client import Client, ClientOptions

    ref, url = args["path"], args["url"]
    if ref and os.path.isfile(ref):
        from keysteward.volume.kms_token import read_token

        token = read_token(ref)
        ref, url = token.ref.volume_id, url or token.ref.url
    url = url or server_defaults()[0]
    if not url:
        raise option_error(f"give --url URL (or ${URL_ENV}), or the path of a volume file that has a token")
    return Client(ClientOptions(url, args["token"], args["ca_file"], None, None)), ref


def _show(data: Any, as_json: bool, text: str) -> None:
    sys.stdout.write(json.dumps(data) + "\n" if as_json else text)


def _line(v: dict[str, Any]) -> str:
    bind = ",".join(f"{k}={v}" for k, v in sorted(v["binding"].items()))
    return f"{v['name']}  {v['id']}  {v['state']}  key {v['key']} v{v['key_version']}  bound to {bind}\n"


def status(args: Args) -> None:
    client, ref = _admin(args)
    volume = client.get(f"/volumes/{ref}")
    leases = client.get("/leases", params={"volume": volume["id"]})
    live = [lease for lease in leases if lease["state"] == "active"]
    holder = f"held by {live[0]['holder']} until {live[0]['expires_at']}\n" if live else "no live lease\n"
    _show({"volume": volume, "leases": leases}, args["json"], _line(volume) + holder)


def listing(args: Args) -> None:
    client, _ = _admin(dict(args, path=None))
    volumes = client.get("/volumes")
    _show(volumes, args["json"], "".join(_line(v) for v in volumes) or "no volumes\n")


def revoke(args: Args) -> None:
    confirm(
        f"Revoke volume {args['path']}" + (" and shred its keyslot" if args["shred"] else "") + "?", yes=args["yes"]
    )
    client, ref = _admin(args)
    volume = client.post(f"/volumes/{ref}/revoke", {"shred": args["shred"], "reason": args["reason"]})
    what = "revoked and marked for shredding" if args["shred"] else "revoked"
    _show(volume, args["json"], f"volume {volume['name']} {what}: its agents lock it at their next renewal\n")


def destroy(args: Args) -> None:
    confirm(f"Destroy the key of volume {args['path']} for good (crypto-shredding)?", yes=args["yes"])
    client, ref = _admin(args)
    volume = client.post(f"/volumes/{ref}/destroy", {"reason": args["reason"]})
    _show(volume, args["json"], f"volume {volume['name']}: its key is destroyed; no release can give it again\n")
