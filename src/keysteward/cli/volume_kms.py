"""The key manager side of ``keysteward volume``: bound volumes, keys released instead of passphrases,
and the registry verbs (list, status, revoke, destroy).

``volume create PATH --kms URL --key NAME --provider P --bind-account A ...`` registers the volume and
writes a keyslot only a release opens, with its ``keysteward`` token. ``volume read|write|check PATH
--kms URL`` get their key by a release (this instance's evidence, docs/release-protocol.md) instead of
a passphrase file. ``volume list|status|revoke|destroy`` talk to the key manager as an admin (or, for
revoke, a security officer): ``KEYSTEWARD_TOKEN``, ``--kms`` or ``KEYSTEWARD_URL``, and
``KEYSTEWARD_CA_FILE``. Every import of the HTTP client happens inside a verb, so the passphrase verbs
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
from keysteward.cli.volume_args import Opt
from keysteward.volume.errors import option_error

Args = dict[str, Any]

KMS = Opt("--kms", metavar="URL", help="Get the key from this key manager by a release, instead of a passphrase file.")
CA_FILE = Opt("--ca-file", metavar="FILE", envvar="KEYSTEWARD_CA_FILE", help="CA that signed the key manager.")
RELEASE_OPTS = (
    KMS,
    Opt("--identity", metavar="aws-iid|gcp-jwt", default="aws-iid", help="Evidence of this instance's identity."),
    Opt("--metadata", metavar="URL", envvar="KEYSTEWARD_METADATA_URL", help="The instance metadata service."),
    Opt("--audience", help="gcp-jwt: the audience to ask the metadata service for."),
    Opt("--suite", metavar="x25519|mlkem768-x25519", default="x25519", help="HPKE suite of the release."),
    CA_FILE,
)
CREATE_OPTS = (
    KMS,
    Opt("--key", metavar="NAME", help="--kms: the tenant key that wraps the volume's secret."),
    Opt("--name", help="--kms: the volume's name in the key manager (default: the file name)."),
    Opt("--provider", help="--kms: the provider whose instances may receive the key."),
    Opt("--bind-account", metavar="ACCOUNT", help="--kms: only instances of this account."),
    Opt("--bind-instance", metavar="ID", help="--kms: only this instance."),
    Opt("--bind-image", metavar="ID", help="--kms: only instances of this image."),
    Opt("--bind-host", metavar="NAME", help="--kms: only this host of the tenant (the NBD proxy), by its certificate."),
    Opt("--tag", "multi", "--kms: a label k=v recorded in the key manager (repeatable).", metavar="K=V"),
    Opt("--lease-seconds", "int", "--kms: lease length (default 30)."),
    Opt("--renew-seconds", "int", "--kms: renewal interval (default 10)."),
    Opt("--grace-seconds", "int", "--kms: how long a running agent keeps the volume open when the key manager "
        "is unreachable (default: until the lease expires)."),
    Opt("--token", envvar="KEYSTEWARD_TOKEN", help="--kms: an admin API token."),
    CA_FILE,
)  # fmt: skip
ADMIN_OPTS = (
    Opt("--kms", metavar="URL", envvar="KEYSTEWARD_URL", help="The key manager (default: the volume file's token)."),
    Opt("--token", envvar="KEYSTEWARD_TOKEN", help="An API token (admin; security-officer for revoke)."),
    CA_FILE,
)


def uses_kms(args: Args) -> bool:
    if args.get("kms") and args.get("passphrase_file"):
        raise option_error("give --kms or --passphrase-file, not both")
    if not args.get("kms") and not args.get("passphrase_file"):
        raise option_error("give --passphrase-file FILE, or --kms URL to get the key from the key manager")
    return bool(args.get("kms"))


@contextmanager
def released_secret(args: Args, *, writable: bool = False) -> Iterator[bytearray]:
    """The volume's keyslot secret by a release (wiped after; the lease is ended when the verb is done)."""
    from keysteward.agent.kms_volume import kms_passphrase
    from keysteward.agent.unlock import UnlockOptions

    options = UnlockOptions(
        kms_url=args["kms"], identity=args["identity"], metadata_url=args["metadata"], audience=args["audience"],
        suite=args["suite"], ca_file=args["ca_file"], mode="userspace", writable=writable,
    )  # fmt: skip
    with kms_passphrase(args["path"], options) as secret:
        yield secret


def _labels(tags: list[str]) -> dict[str, str]:
    labels = {}
    for tag in tags:
        name, eq, value = tag.partition("=")
        if not eq or not name:
            raise option_error(f"--tag takes k=v, not {tag[:80]!r}")
        labels[name] = value
    return labels


def create_bound(args: Args, options: Any, break_glass: bytearray | None, kdf: Any) -> dict[str, Any]:
    from keysteward.agent.kms_volume import KmsVolumeSpec, create_kms_volume

    needed = ("key", "token") if args.get("bind_host") else ("key", "provider", "bind_account", "token")
    missing = [o for o in needed if not args.get(o)]
    if missing:
        names = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise option_error(f"a volume bound to the key manager needs {names} (a token may be in KEYSTEWARD_TOKEN)")
    if args.get("bind_host") and any(args.get(o) for o in ("provider", "bind_account", "bind_instance", "bind_image")):
        raise option_error("--bind-host binds the volume to a host: it takes no --provider or --bind-* of instances")
    spec = KmsVolumeSpec(
        url=args["kms"], key=args["key"], provider=args["provider"], account=args["bind_account"],
        host=args["bind_host"], name=args["name"], instance_id=args["bind_instance"], image_id=args["bind_image"],
        labels=_labels(args["tag"]), lease_seconds=args["lease_seconds"], renew_seconds=args["renew_seconds"],
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

    ref, url = args["path"], args["kms"]
    if ref and os.path.isfile(ref):
        from keysteward.volume.kms_token import read_token

        token = read_token(ref)
        ref, url = token.ref.volume_id, url or token.ref.url
    if not url:
        raise option_error("give --kms URL (or KEYSTEWARD_URL), or the path of a volume file that has a token")
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
