"""The devcloud provider: signing key, instances and signed identities (pure logic, no sockets).

State lives in one directory: ``signing-key.pem`` (0600), ``signing-cert.pem`` and ``instances.json``.
Changes are made under an exclusive ``flock`` and written atomically (temporary file, then rename),
so a running metadata service never reads half a file; it re-reads ``instances.json`` when it changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from keysteward.errors import BadRequest, Conflict, KeystewardError, NotFound

KEY_FILE: Final = "signing-key.pem"
CERT_FILE: Final = "signing-cert.pem"
INSTANCES_FILE: Final = "instances.json"
LOCK_FILE: Final = ".lock"
URL_FILE: Final = "server.url"
ISSUER: Final = "https://devcloud.keysteward.invalid"
TOKEN_SECONDS: Final = 3600
CERT_DAYS: Final = 5 * 365
_IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_INSTANCE_ID = re.compile(r"i-[0-9a-f]{17}")
_NONCE = re.compile(r"[0-9a-f]{64}")
State = Literal["running", "terminated"]


class DevCloudError(KeystewardError):
    code = "devcloud_error"
    status = 500
    title = "Devcloud error"


@dataclass(frozen=True)
class Instance:
    id: str
    account: str
    image_id: str
    region: str
    zone: str
    launched_at: datetime
    state: State = "running"
    cloned_from: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["launched_at"] = _rfc3339(self.launched_at)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Instance:
        return cls(**{**data, "launched_at": datetime.fromisoformat(data["launched_at"])})


def _rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _check_ident(value: str, what: str) -> str:
    if not _IDENT.fullmatch(value):
        raise BadRequest(f"{what} must be 1-128 letters, digits, '.', '_', ':' or '-'", code="bad_request")
    return value


def check_nonce(nonce_hex: str) -> str:
    if not isinstance(nonce_hex, str) or not _NONCE.fullmatch(nonce_hex):
        raise BadRequest("nonce must be 64 lowercase hex digits (a sha256 binding)", code="bad_nonce")
    return nonce_hex


def gcp_zone(instance: Instance) -> str:
    """The zone in GCP's spelling: ``dev-east-1a`` (AWS-style, region + letter) becomes ``dev-east-1-a``."""
    suffix = instance.zone.removeprefix(instance.region)
    if suffix != instance.zone and len(suffix) == 1 and suffix.isalpha():
        return f"{instance.region}-{suffix}"
    return instance.zone


class DevCloud:
    """One devcloud state directory."""

    def __init__(self, state: Path) -> None:
        self.state = Path(state)
        if not (self.state / KEY_FILE).is_file() or not (self.state / INSTANCES_FILE).is_file():
            raise NotFound(f"no devcloud in {self.state}: run 'keysteward devcloud init --state {self.state}'")
        self._key = serialization.load_pem_private_key((self.state / KEY_FILE).read_bytes(), password=None)
        if not isinstance(self._key, rsa.RSAPrivateKey):
            raise DevCloudError(f"{self.state / KEY_FILE} does not hold an RSA key")
        self.certificate = x509.load_pem_x509_certificate((self.state / CERT_FILE).read_bytes())
        self._cache: tuple[int, dict[str, Instance]] | None = None
        self._cache_lock = threading.Lock()

    # --- set-up -------------------------------------------------------------------------------

    @classmethod
    def init(cls, state: Path, *, now: datetime | None = None) -> DevCloud:
        """Make a new provider: an RSA-2048 key, its self-signed certificate, no instances."""
        state = Path(state)
        state.mkdir(parents=True, exist_ok=True)
        with _locked(state):
            if (state / KEY_FILE).exists() or (state / INSTANCES_FILE).exists():
                raise Conflict(f"{state} already holds a devcloud", code="devcloud_exists")
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            now = now or _utcnow()
            name = x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keysteward devcloud"),
                    x509.NameAttribute(NameOID.COMMON_NAME, f"devcloud identity signer {secrets.token_hex(4)}"),
                ]
            )
            cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(days=1))
                .not_valid_after(now + timedelta(days=CERT_DAYS))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=True,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        key_cert_sign=False,
                        crl_sign=False,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    critical=True,
                )
                .sign(key, hashes.SHA256())
            )
            key_pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            _atomic_write(state / KEY_FILE, key_pem, mode=0o600)
            _atomic_write(state / CERT_FILE, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
            _atomic_write(state / INSTANCES_FILE, _dump({}), mode=0o644)
        return cls(state)

    def certificate_pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")

    # --- instances ----------------------------------------------------------------------------

    def instances(self) -> list[Instance]:
        return list(self._load().values())

    def get(self, instance_id: str) -> Instance:
        found = self._load().get(instance_id)
        if found is None:
            raise NotFound(f"no instance {instance_id!r} in this devcloud", code="instance_not_found")
        return found

    def running(self, instance_id: str) -> Instance:
        """The instance if it exists and runs: what the metadata service answers for."""
        instance = self.get(instance_id)
        if instance.state != "running":
            raise NotFound(f"instance {instance_id!r} is terminated", code="instance_not_found")
        return instance

    def create(
        self,
        *,
        account: str | None = None,
        image_id: str | None = None,
        region: str | None = None,
        zone: str | None = None,
        now: datetime | None = None,
    ) -> Instance:
        region = _check_ident("dev-east-1" if region is None else region, "region")
        instance = Instance(
            id=self._new_id(),
            account=_check_ident(f"{secrets.randbelow(10**12):012d}" if account is None else account, "account"),
            image_id=_check_ident(f"ami-{secrets.token_hex(8)}" if image_id is None else image_id, "image"),
            region=region,
            zone=_check_ident(f"{region}a" if zone is None else zone, "zone"),
            launched_at=now or _utcnow(),
        )
        with self._mutate() as instances:
            instances[instance.id] = instance
        return instance

    def clone(self, instance_id: str, *, now: datetime | None = None) -> Instance:
        """A new instance booted from a copy of another one: same account, image and place, a new id."""
        with self._mutate() as instances:
            source = instances.get(instance_id)
            if source is None:
                raise NotFound(f"no instance {instance_id!r} in this devcloud", code="instance_not_found")
            clone = replace(
                source, id=self._new_id(), launched_at=now or _utcnow(), state="running", cloned_from=source.id
            )
            instances[clone.id] = clone
        return clone

    def terminate(self, instance_id: str) -> Instance:
        with self._mutate() as instances:
            source = instances.get(instance_id)
            if source is None:
                raise NotFound(f"no instance {instance_id!r} in this devcloud", code="instance_not_found")
            instances[instance_id] = replace(source, state="terminated")
        return instances[instance_id]

    # --- signed identities --------------------------------------------------------------------

    def aws_document(self, instance: Instance, nonce_hex: str) -> tuple[bytes, bytes]:
        """The AWS-shaped identity document (JSON bytes) and its PKCS#7 signature (DER, document attached)."""
        self._check_signable(instance)
        document = {
            "accountId": instance.account,
            "architecture": "x86_64",
            "availabilityZone": instance.zone,
            "billingProducts": None,
            "devpayProductCodes": None,
            "marketplaceProductCodes": None,
            "imageId": instance.image_id,
            "instanceId": instance.id,
            "instanceType": "dev.small",
            "kernelId": None,
            "nonce": check_nonce(nonce_hex),
            "pendingTime": _rfc3339(instance.launched_at),
            "ramdiskId": None,
            "region": instance.region,
            "version": "2017-09-30",
        }
        body = json.dumps(document, indent=2).encode("utf-8")
        signature = (
            pkcs7.PKCS7SignatureBuilder()
            .set_data(body)
            .add_signer(self.certificate, self._rsa_key(), hashes.SHA256(), rsa_padding=padding.PKCS1v15())
            .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.NoCerts, pkcs7.PKCS7Options.Binary])
        )
        return body, signature

    def gcp_token(self, instance: Instance, audience: str, nonce_hex: str, now: datetime, *, full: bool = True) -> str:
        """A GCP-shaped identity token (RS256 JWT) for ``audience``, valid for an hour from ``now``."""
        self._check_signable(instance)
        if not isinstance(audience, str) or not 0 < len(audience) <= 1024:
            raise BadRequest("audience must be 1-1024 characters", code="bad_audience")
        iat = int(now.timestamp())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "sub": instance.id,
            "aud": audience,
            "azp": instance.id,
            "iat": iat,
            "exp": iat + TOKEN_SECONDS,
            "nonce": check_nonce(nonce_hex),
        }
        if full:
            claims["google"] = {
                "compute_engine": {
                    "project_id": instance.account,
                    "project_number": int(instance.account) if instance.account.isdigit() else 0,
                    "instance_id": instance.id,
                    "instance_name": instance.id,
                    "zone": gcp_zone(instance),
                    "instance_creation_timestamp": int(instance.launched_at.timestamp()),
                    "image_id": instance.image_id,
                }
            }
        kid = self.certificate.fingerprint(hashes.SHA256()).hex()[:40]
        return jwt.encode(claims, self._rsa_key(), algorithm="RS256", headers={"kid": kid})

    # --- internals ----------------------------------------------------------------------------

    def _rsa_key(self) -> rsa.RSAPrivateKey:
        assert isinstance(self._key, rsa.RSAPrivateKey)
        return self._key

    def _check_signable(self, instance: Instance) -> None:
        if instance.state != "running":
            raise NotFound(f"instance {instance.id!r} is terminated", code="instance_not_found")

    def _new_id(self) -> str:
        return "i-" + secrets.token_hex(9)[:17]

    def _load(self) -> dict[str, Instance]:
        path = self.state / INSTANCES_FILE
        with self._cache_lock:
            stat = path.stat()
            stamp = stat.st_mtime_ns ^ (stat.st_ino << 1) ^ (stat.st_size << 2)
            if self._cache is None or self._cache[0] != stamp:
                self._cache = (stamp, _parse(path.read_bytes(), path))
            return dict(self._cache[1])

    @contextlib.contextmanager
    def _mutate(self) -> Iterator[dict[str, Instance]]:
        """Read, change and atomically rewrite instances.json under the state's lock."""
        with _locked(self.state):
            path = self.state / INSTANCES_FILE
            instances = _parse(path.read_bytes(), path)
            yield instances
            _atomic_write(path, _dump(instances), mode=0o644)


def _parse(raw: bytes, path: Path) -> dict[str, Instance]:
    try:
        data = json.loads(raw)
        return {i["id"]: Instance.from_json(i) for i in data["instances"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise DevCloudError(f"{path} is damaged: {exc}", code="devcloud_state_damaged") from exc


def _dump(instances: dict[str, Instance]) -> bytes:
    return (json.dumps({"instances": [i.to_json() for i in instances.values()]}, indent=2) + "\n").encode()


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[None]:
    fd = os.open(state / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file (the served URL) so that readers see all of it or none."""
    _atomic_write(Path(path), text.encode(), mode=0o644)


def _atomic_write(path: Path, data: bytes, *, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
