"""The root of trust: the sealed root key and the three ways to unseal it.

``shamir``  the unseal key is split k-of-n; the server starts sealed until k distinct shares
            are given (one per call, any order). Shares are printed once at init, never stored;
            a SHA-256 commitment to each is (``seal_params["commitments"]``), so every share is
            checked on its own when it is given and a forged one never enters the custodians'
            progress. A cluster initialised before commitments existed gets them written at its
            next successful unseal (any k good shares fix all n).
``pkcs11``  the root key is sealed by a non-extractable AES key in an HSM; unsealed at start.
``dev``     the unseal key lies in a local file: demo only, refused unless asked for, shown as
            insecure in status.

The root key wraps tenant KEKs, tenant CA keys and the audit signing key. ``seal()`` wipes
it and tells every listener to drop what it derived from it.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from sqlalchemy import insert, select, update

from keysteward.crypto import aead, shamir
from keysteward.crypto.secret import SecretBuffer, wipe_bytearray
from keysteward.errors import BadRequest, Conflict, InvalidShare, KeystewardError, Sealed, Unavailable
from keysteward.formats import share as share_codec
from keysteward.keys.hsm import HsmKey
from keysteward.settings import SealSettings
from keysteward.store.db import Database
from keysteward.store.models import Cluster

log = logging.getLogger("keysteward.seal")
SEAL_TYPES = ("shamir", "pkcs11", "dev")
DEV_WARNING = "dev seal: the root key unseals from a local file; for demos only, never for real keys"


def root_aad(cluster_id: str) -> bytes:
    return b"keysteward/v1/root|" + cluster_id.encode()


def audit_key_aad(cluster_id: str) -> bytes:
    return b"keysteward/v1/audit-signing-key|" + cluster_id.encode()


def share_commitments(cluster_id: str, shares: list[tuple[int, bytearray]]) -> dict[str, str]:
    """``{"index": hex}``: the commitment to each share, as stored in the cluster's seal parameters."""
    context = bytes.fromhex(cluster_id)
    return {str(x): shamir.commitment(context, x, y).hex() for x, y in shares}


@dataclass
class InitResult:
    cluster_id: str
    seal_type: str
    shares: list[str] = field(default_factory=list)
    threshold: int = 0
    audit_public_key: str = ""

    def __repr__(self) -> str:
        return f"InitResult(cluster_id={self.cluster_id}, seal_type={self.seal_type})"


def _pin(settings: SealSettings) -> str:
    pin = os.environ.get("KEYSTEWARD_PKCS11_PIN")
    if pin is None and settings.pkcs11_pin_file:
        try:
            pin = Path(settings.pkcs11_pin_file).read_text().strip()
        except OSError as exc:
            raise BadRequest(f"cannot read the HSM PIN file: {exc.strerror}", code="hsm_pin_file") from exc
    if not pin:
        raise BadRequest(
            "the pkcs11 seal needs a PIN: set KEYSTEWARD_PKCS11_PIN or seal.pkcs11_pin_file",
            code="hsm_pin_missing",
        )
    return pin


def _hsm(settings: SealSettings, *, create: bool = False) -> HsmKey:
    args = (settings.pkcs11_module, settings.pkcs11_token_label, settings.pkcs11_key_label, _pin(settings))
    return HsmKey.create(*args) if create else HsmKey(*args)


def initialize(
    db: Database,
    seal_type: str,
    seal_settings: SealSettings,
    *,
    dev_key_file: Path | None = None,
    threshold: int = 3,
    share_count: int = 5,
) -> InitResult:
    """Create the root key and the audit signing key, seal them, and store the cluster row."""
    if seal_type not in SEAL_TYPES:
        raise BadRequest(f"seal type must be one of {', '.join(SEAL_TYPES)}", code="bad_seal_type")
    with db.read() as conn:
        if conn.execute(select(Cluster.id)).first() is not None:
            raise Conflict("this database already holds an initialised key manager", code="already_initialized")
    cluster_id = secrets.token_hex(8)
    root = SecretBuffer.from_bytes(aead.random_key())
    result = InitResult(cluster_id=cluster_id, seal_type=seal_type)
    params: dict[str, object] = {}
    try:
        if seal_type == "shamir":
            if not 2 <= threshold <= share_count <= 16:
                raise BadRequest("need 2 <= threshold <= shares <= 16", code="bad_shamir_parameters")
            with SecretBuffer.from_bytes(aead.random_key()) as unseal_key:
                sealed_root = aead.seal(unseal_key.view(), root.view(), root_aad(cluster_id))
                split = shamir.split(unseal_key.view(), threshold, share_count)
                for x, y in split:
                    result.shares.append(share_codec.encode(share_codec.Share(bytes.fromhex(cluster_id), x, bytes(y))))
                commitments = share_commitments(cluster_id, split)
                for _, y in split:
                    wipe_bytearray(y)
            params = {"threshold": threshold, "shares": share_count, "commitments": commitments}
            result.threshold = threshold
        elif seal_type == "dev":
            if dev_key_file is None:
                raise BadRequest("the dev seal needs a key file path", code="bad_seal_parameters")
            with SecretBuffer.from_bytes(aead.random_key()) as unseal_key:
                sealed_root = aead.seal(unseal_key.view(), root.view(), root_aad(cluster_id))
                dev_key_file.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(dev_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(unseal_key.view())
            params = {"dev_key_file": str(dev_key_file)}
        else:
            copy = bytearray(root.view())  # python-pkcs11 takes bytes; wipe our copy afterwards
            try:
                with _hsm(seal_settings, create=True) as hsm:
                    sealed_root = hsm.seal(copy, root_aad(cluster_id))
            finally:
                wipe_bytearray(copy)
            params = {
                "module": seal_settings.pkcs11_module,
                "token_label": seal_settings.pkcs11_token_label,
                "key_label": seal_settings.pkcs11_key_label,
            }
        signing = Ed25519PrivateKey.generate()
        raw_private = bytearray(signing.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))
        public = signing.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        wrapped_signing = aead.seal(root.view(), raw_private, audit_key_aad(cluster_id))
        raw_private[:] = bytes(len(raw_private))
        with db.write() as conn:
            conn.execute(
                insert(Cluster).values(
                    id=1,
                    cluster_id=cluster_id,
                    seal_type=seal_type,
                    seal_params=json.dumps(params),
                    sealed_root=sealed_root,
                    audit_public_key=public,
                    audit_private_wrapped=wrapped_signing,
                    created_at=datetime.now(UTC),
                )
            )
        result.audit_public_key = public.hex()
    finally:
        root.wipe()
    return result


Listener = Callable[[], None]


class RootOfTrust:
    """Holds the root key while unsealed. Thread-safe."""

    def __init__(self, db: Database, seal_settings: SealSettings) -> None:
        self.db = db
        self.seal_settings = seal_settings
        self._lock = threading.RLock()
        self._root: SecretBuffer | None = None
        self._aead: aead.AeadKey | None = None
        self._pending: dict[int, bytes] = {}
        self._on_unseal: list[Callable[[RootOfTrust], None]] = []
        self._on_seal: list[Listener] = []
        row = self._cluster()
        self.cluster_id: str = row.cluster_id
        self.seal_type: str = row.seal_type
        self.params: dict[str, object] = json.loads(row.seal_params)

    def _cluster(self) -> Cluster:
        with self.db.read() as conn:
            row = conn.execute(select(Cluster.__table__)).one_or_none()
        if row is None:
            raise Unavailable(
                "the key manager is not initialised: run 'keysteward server init'", code="not_initialized"
            )
        return row  # type: ignore[return-value]

    # -- listeners ---------------------------------------------------------------------------
    def on_unseal(self, fn: Callable[[RootOfTrust], None]) -> None:
        self._on_unseal.append(fn)

    def on_seal(self, fn: Listener) -> None:
        self._on_seal.append(fn)

    # -- state -------------------------------------------------------------------------------
    @property
    def sealed(self) -> bool:
        return self._root is None

    @property
    def threshold(self) -> int:
        return int(str(self.params.get("threshold", 0)))

    @property
    def progress(self) -> int:
        return len(self._pending)

    @property
    def insecure(self) -> bool:
        return self.seal_type == "dev"

    def root(self) -> aead.AeadKey:
        key = self._aead
        if key is None:
            raise Sealed("the key manager is sealed; unseal it first")
        return key

    def derive(self, label: bytes, length: int = 32) -> bytearray:
        """A key for one purpose (``label``), derived from the root key with HKDF-SHA256; the caller wipes it."""
        with self._lock:
            if self._root is None:
                raise Sealed("the key manager is sealed; unseal it first")
            return bytearray(
                HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=b"keysteward/" + label).derive(
                    self._root.view()
                )
            )

    # -- unsealing ---------------------------------------------------------------------------
    def auto_unseal(self) -> None:
        """Unseal from the dev key file or the HSM; a no-op for shamir."""
        if self.seal_type == "shamir" or not self.sealed:
            return
        row = self._cluster()
        if self.seal_type == "dev":
            path = Path(str(self.params["dev_key_file"]))
            try:
                with SecretBuffer.from_bytes(bytearray(path.read_bytes())) as unseal_key:
                    root = aead.open_(unseal_key.view(), row.sealed_root, root_aad(self.cluster_id))
            except OSError as exc:
                raise Unavailable(f"cannot read the dev unseal key file {path}", code="dev_key_unreadable") from exc
        else:
            with _hsm(self.seal_settings) as hsm:
                root = hsm.unseal(row.sealed_root, root_aad(self.cluster_id))
        self._install(root, row)

    @property
    def share_commitments(self) -> bool:
        """True when each share is checked on its own (always, except on a cluster from before commitments)."""
        return bool(self._commitments())

    def _commitments(self) -> dict[int, bytes]:
        raw = self.params.get("commitments")
        if not raw and self.seal_type == "shamir":
            # another server on the same database may have written them since this one started
            self.params = json.loads(self._cluster().seal_params)
            raw = self.params.get("commitments")
        if not raw:
            return {}
        try:
            if not isinstance(raw, dict):
                raise TypeError("not a map")
            parsed = {int(x): bytes.fromhex(c) for x, c in raw.items()}
            if any(len(c) != 32 or not 1 <= x <= 255 for x, c in parsed.items()):
                raise ValueError("bad commitment")
        except (TypeError, ValueError) as exc:
            raise Unavailable(
                "the unseal share commitments stored in the database are damaged; no share can be checked",
                code="share_commitments_damaged",
            ) from exc
        return parsed

    def _checked(self, text: str) -> tuple[share_codec.Share, bool]:
        """Decode one share and check it against its commitment; also says whether a commitment existed."""
        if self.seal_type != "shamir":
            raise Conflict(f"this server uses the {self.seal_type} seal, which takes no shares", code="not_shamir")
        share = share_codec.decode(text)
        if share.cluster.hex() != self.cluster_id:
            raise InvalidShare("this share belongs to another keysteward server", code="share_wrong_server")
        commitments = self._commitments()
        if not commitments:
            return share, False
        expected = commitments.get(share.index)
        if expected is None:
            raise InvalidShare(f"this server made no share with index {share.index}", code="share_unknown_index")
        actual = shamir.commitment(share.cluster, share.index, share.value)
        if not hmac.compare_digest(actual, expected):
            raise InvalidShare(
                f"this is not the share {share.index} made at init (forged or corrupted); progress is unchanged",
                code="share_rejected",
            )
        return share, True

    def verify_share(self, text: str) -> int:
        """Check one share on its own without counting it; returns its index. Needs stored commitments."""
        share, verified = self._checked(text)
        if not verified:
            raise InvalidShare(
                "this server has no share commitments yet (initialised before them): use the root token",
                code="share_unverifiable",
            )
        return share.index

    def submit_share(self, text: str) -> int:
        """Take one unseal share; returns the number still needed (0 once unsealed)."""
        share, verified = self._checked(text)
        with self._lock:
            if not self.sealed:
                return 0
            if share.index in self._pending:
                raise InvalidShare(f"share {share.index} was already given", code="share_duplicate")
            self._pending[share.index] = share.value
            if len(self._pending) < self.threshold:
                return self.threshold - len(self._pending)
            shares = list(self._pending.items())
            self._pending.clear()
            try:
                unseal_key = SecretBuffer.from_bytes(shamir.combine(shares))
            except ValueError as exc:
                raise InvalidShare("the shares given do not fit together", code="shares_inconsistent") from exc
            row = self._cluster()
            with unseal_key:
                try:
                    root = aead.open_(unseal_key.view(), row.sealed_root, root_aad(self.cluster_id))
                except aead.AuthenticationFailed as exc:
                    raise InvalidShare(
                        "the shares given do not open the root key (a wrong or corrupted share); start again",
                        code="unseal_failed",
                    ) from exc
            if not verified:
                try:
                    self._write_commitments(shares)
                except KeystewardError as exc:  # unsealing matters more; the next unseal tries again
                    log.warning("could not write unseal share commitments: %s", exc.code)
            self._install(root, row)
            return 0

    def _write_commitments(self, shares: list[tuple[int, bytes]]) -> None:
        """A cluster from before share commitments: the quorum just proved good fixes every share; commit to all."""
        count = int(str(self.params.get("shares", 0)))
        every = [(x, shamir.evaluate(shares, x)) for x in range(1, count + 1)]
        try:
            commitments = share_commitments(self.cluster_id, every)
        finally:
            for _, y in every:
                wipe_bytearray(y)
        params = {**self.params, "commitments": commitments}
        with self.db.write() as conn:
            current = json.loads(conn.execute(select(Cluster.seal_params)).scalar_one())
            if not current.get("commitments"):
                conn.execute(update(Cluster).values(seal_params=json.dumps(params)))
        self.params = params
        log.info("unseal share commitments written for cluster %s (it predates them)", self.cluster_id)

    def reset_progress(self) -> None:
        with self._lock:
            self._pending.clear()

    def _install(self, root: bytearray, row: Cluster) -> None:
        with self._lock:
            buf = SecretBuffer.from_bytes(root)
            key = aead.AeadKey(buf.view())
            raw = key.open(row.audit_private_wrapped, audit_key_aad(self.cluster_id))
            signer = Ed25519PrivateKey.from_private_bytes(bytes(raw))
            raw[:] = bytes(len(raw))
            self._root, self._aead, self.signer = buf, key, signer
            for fn in self._on_unseal:
                fn(self)
        log.info("event=unsealed cluster=%s seal=%s", self.cluster_id, self.seal_type)

    signer: Ed25519PrivateKey | None = None

    def seal(self) -> None:
        """Drop all key material held in memory at once."""
        with self._lock:
            self._pending.clear()
            for fn in self._on_seal:
                fn()
            if self._aead is not None:
                self._aead.drop()
            if self._root is not None:
                self._root.wipe()
            self._root, self._aead, self.signer = None, None, None
        log.warning("event=sealed cluster=%s seal=%s", self.cluster_id, self.seal_type)
