"""Unlocking a volume bound to the key manager: release its secret, check it, open the volume.

:func:`unlock` reads the volume's ``keysteward`` token, runs a release (evidence from the cloud's
metadata service, bound to the challenge and the one-time key), checks that the secret opens the
token's keyslot, and then:

- with a working device-mapper (``/dev/mapper/control`` opens): ``cryptsetup open --key-file=-
  --key-slot N PATH NAME`` with the secret written to cryptsetup's standard input through a pipe
  (:func:`feed_stdin`): no key file ever exists;
- elsewhere: the volume stays open in this process (:class:`~keysteward.volume.LuksVolume`, its key
  in a locked buffer), for the userspace data path.

Either way the secret itself is wiped as soon as the volume is open; what stays is the lease.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from keysteward.agent.client import AgentClient, Evidence
from keysteward.agent.release_answers import Lease, Pending, Released
from keysteward.crypto.hpke import X25519
from keysteward.crypto.secret import SecretBuffer, wipe_bytearray
from keysteward.errors import Conflict, KeystewardError
from keysteward.formats import luks
from keysteward.volume.kms_token import KmsToken, read_token, verify_secret
from keysteward.volume.luks_volume import LuksVolume

DM_CONTROL = "/dev/mapper/control"
IDENTITY_KINDS = ("aws-iid", "gcp-jwt", "host")
"""``host``: a machine of the tenant (the NBD proxy) proves itself by its client certificate alone."""
DEFAULT_METADATA = {"aws-iid": "http://169.254.169.254", "gcp-jwt": "http://metadata.google.internal"}
CRYPTSETUP_FAILED = "cryptsetup_failed"
PENDING = "release_pending"
Mode = Literal["auto", "dm", "userspace"]


@dataclass(frozen=True)
class UnlockOptions:
    """How to reach the key manager and prove who this instance is."""

    name: str | None = None
    """dm name (default: ``ks-`` and the token's volume id)."""
    kms_url: str | None = None
    """Overrides the token's URL."""
    identity: str = "aws-iid"
    metadata_url: str | None = None
    audience: str | None = None
    suite: str = X25519
    ca_file: str | None = None
    timeout: float = 10.0
    mode: Mode = "auto"
    writable: bool = False
    """Userspace mode: hold the volume's write lock (for a data path that writes)."""
    cryptsetup: str = "cryptsetup"
    client_cert: tuple[str, str] | None = None
    """``(certificate, key)`` PEM files for mTLS; required for the ``host`` identity."""
    tpm: str | None = None
    """TCTI of the TPM whose quote goes with each release (``device:/dev/tpmrm0``, ``swtpm:port=2321``)."""
    tpm_pcrs: str = "sha256:0,7"
    """The PCRs the quote covers: ``bank:i,j[+bank:k]``."""
    snp: str | None = None
    """Where SEV-SNP reports come from: ``/dev/sev-guest``, or ``file:DIR`` (a TEST stand-in)."""
    wait_approval: float = 0.0
    """How long a release waiting for approval is asked again before giving up (seconds)."""
    one_shot: bool = False
    """The boot unlock: clients of the standard library's HTTP (:mod:`keysteward.agent.oneshot_http`), not httpx."""

    def __post_init__(self) -> None:
        if self.identity not in IDENTITY_KINDS:
            raise KeystewardError(f"identity {self.identity!r} is not one of {', '.join(IDENTITY_KINDS)}",
                                  code="agent_option")  # fmt: skip
        if self.identity == "host" and self.client_cert is None:
            raise KeystewardError("the host identity needs a client certificate", code="agent_option")

    def client(self, url: str, *, timeout: float | None = None) -> AgentClient:
        """A client of the key manager at ``url`` with this instance's TLS settings."""
        return AgentClient(url, ca_file=self.ca_file, timeout=timeout or self.timeout, client_cert=self.client_cert,
                           one_shot=self.one_shot)  # fmt: skip

    def metadata(self) -> str:
        return self.metadata_url or os.environ.get("KEYSTEWARD_METADATA_URL") or DEFAULT_METADATA[self.identity]

    def evidence(self) -> Evidence:
        """The evidence function of :meth:`AgentClient.release`: this instance's identity document."""
        from keysteward.agent.evidence import collect_identity  # the metadata client, only when releasing

        platform = self.platform_evidence()
        if self.identity == "host":
            return lambda bound: {"identity": {}, **platform(bound)}  # the client certificate is the identity
        url, kind, audience, timeout = self.metadata(), self.identity, self.audience, self.timeout
        return lambda bound: {
            "identity": collect_identity(url, kind, bound, audience=audience, timeout=timeout),
            **platform(bound),
        }

    def platform_evidence(self) -> Callable[[bytes], dict[str, Any]]:
        """The TPM quote and SEV-SNP report for one release binding (nothing when neither is configured).

        A configured source that cannot answer fails the release at once with its reason, before the key
        manager is asked: a policy that needs the evidence would refuse it anyway.
        """
        pcrs = parse_pcrs(self.tpm_pcrs)
        tpm, snp = self.tpm, self.snp

        def collect(bound: bytes) -> dict[str, Any]:
            out: dict[str, Any] = {}
            if tpm is not None:
                from keysteward.agent.tpm import TpmDevice

                out["tpm"] = TpmDevice(tpm, timeout=self.timeout).quote(bound, pcrs)
            if snp is not None:
                from keysteward.agent.snp import collect_snp, snp_source

                out["snp"] = collect_snp(snp_source(snp), bound)
            return out

        return collect


def parse_pcrs(text: str) -> dict[str, list[int]]:
    """``sha256:0,7+sha1:7`` as ``{"sha256": [0, 7], "sha1": [7]}``; bad text raises KeystewardError."""
    out: dict[str, list[int]] = {}
    for part in text.split("+"):
        bank, sep, indexes = part.partition(":")
        try:
            values = sorted({int(i) for i in indexes.split(",")})
        except ValueError:
            values = []
        if not sep or bank not in ("sha1", "sha256", "sha384") or not values or not all(0 <= i < 24 for i in values):
            raise KeystewardError(f"PCR selection {text[:60]!r} is not like sha256:0,7", code="agent_option")
        out[bank] = values
    return out


# -- device-mapper hand-off ----------------------------------------------------------------------


def dm_available(control: str = DM_CONTROL) -> bool:
    """True when the kernel's device-mapper answers (the control node exists *and* opens)."""
    try:
        fd = os.open(control, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def feed_stdin(argv: Sequence[str], data: memoryview, *, timeout: float = 60.0) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` with ``data`` on its standard input through a pipe (unbuffered: no Python copy),
    then EOF. Output is captured; nothing touches a file."""
    proc = subprocess.Popen(
        list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, close_fds=True
    )
    assert proc.stdin is not None
    try:
        fd = proc.stdin.fileno()
        done = 0
        while done < data.nbytes:
            done += os.write(fd, data[done:])
    except BrokenPipeError:
        pass  # the tool stopped reading; its exit status says why
    finally:
        proc.stdin.close()
        proc.stdin = None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise KeystewardError(f"{argv[0]} did not finish in {timeout:.0f} s", code=CRYPTSETUP_FAILED) from None
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def _cryptsetup_failure(done: subprocess.CompletedProcess[bytes], what: str) -> KeystewardError:
    lines = [line for line in done.stderr.decode(errors="replace").splitlines() if line.strip()]
    reason = lines[-1][:300] if lines else f"exit status {done.returncode}"
    if done.returncode == 2:  # cryptsetup: "No key available with this passphrase"
        return luks.LuksWrongPassphrase(f"cryptsetup {what}: {reason}")
    return KeystewardError(f"cryptsetup {what} failed: {reason}", code=CRYPTSETUP_FAILED)


def cryptsetup_open(
    path: str, name: str | None, keyslot: int, secret: SecretBuffer, *, test: bool = False,
    cryptsetup: str = "cryptsetup",
) -> None:  # fmt: skip
    """``cryptsetup open --key-file=- --key-slot N PATH NAME``, the secret on standard input.

    ``test``: ``--test-passphrase`` instead of a mapping (checks the hand-off where there is no dm).
    """
    argv = [cryptsetup, "open", "--type", "luks2", "--key-file=-", "--key-slot", str(keyslot)]
    argv += ["--test-passphrase", path] if test else [path, name or ""]
    if not test and not name:
        raise KeystewardError("a device-mapper name is needed", code="agent_option")
    done = feed_stdin(argv, secret.view())
    if done.returncode != 0:
        raise _cryptsetup_failure(done, "open")


def cryptsetup_close(name: str, *, cryptsetup: str = "cryptsetup") -> None:
    """``cryptsetup close NAME``: the kernel drops the volume key."""
    done = subprocess.run([cryptsetup, "close", name], capture_output=True, timeout=60, check=False)
    if done.returncode != 0:
        raise _cryptsetup_failure(done, "close")


# -- unlocking -------------------------------------------------------------------------------------


@dataclass
class Unlocked:
    """An open volume and its lease. :meth:`close` locks it again and wipes what the agent holds."""

    path: str
    name: str
    token: KmsToken
    url: str
    mode: Literal["dm", "userspace"]
    lease: Lease
    key_version: int
    volume: LuksVolume | None = field(default=None, repr=False)
    cryptsetup: str = "cryptsetup"
    is_open: bool = True

    def close(self, *, wipe_lease: bool = True) -> None:
        """Lock the volume (userspace: wipe its key; dm: ``cryptsetup close``), then wipe the lease token."""
        was_open, self.is_open = self.is_open, False
        try:
            volume, self.volume = self.volume, None
            if volume is not None:
                volume.close()
            if was_open and self.mode == "dm":
                cryptsetup_close(self.name, cryptsetup=self.cryptsetup)
        finally:
            if wipe_lease:
                self.lease.wipe()

    def describe(self) -> dict[str, object]:
        return {
            "path": self.path, "name": self.name, "mode": self.mode, "volume_id": self.token.ref.volume_id,
            "tenant": self.token.ref.tenant, "keyslot": self.token.keyslot, "key_version": self.key_version,
            "lease": {"id": self.lease.id, "expires_at": self.lease.expires_at.isoformat(),
                      "renew_seconds": self.lease.renew_seconds, "grace_seconds": self.lease.grace_seconds},
        }  # fmt: skip


def progress(line: str) -> None:
    """One progress line on stderr, for the operator watching a boot or a command."""
    sys.stderr.write(f"keysteward: {line}\n")
    sys.stderr.flush()


def release_for(
    token: KmsToken, options: UnlockOptions, *, client: AgentClient | None = None, wait_pending: float | None = None
) -> Released:
    """Release the secret of the volume ``token`` names (``options.kms_url`` overrides its URL)."""
    ref = token.ref.with_url(options.kms_url)
    own = client is None
    client = client or options.client(ref.url)
    try:
        deadline = time.monotonic() + (options.wait_approval if wait_pending is None else wait_pending)
        evidence = options.evidence()
        while True:
            result = client.release(ref.tenant, ref.volume_id, evidence, suite=options.suite)
            if not isinstance(result, Pending):
                return result
            if time.monotonic() + result.poll_after_seconds > deadline:
                message = f"the release of volume {ref.volume_id} waits for approval (request {result.request_id})"
                raise Conflict(message, code=PENDING)
            progress(f"waiting for approval of request {result.request_id} (volume {ref.volume_id}): "
                     f"{max(0, int(deadline - time.monotonic()))} s left")  # fmt: skip
            time.sleep(result.poll_after_seconds)
    finally:
        if own:
            client.close()


def unlock(
    path: str,
    options: UnlockOptions,
    *,
    client: AgentClient | None = None,
    clients: dict[str, AgentClient] | None = None,
) -> Unlocked:
    """Release, check and open the volume at ``path`` (see the module doc). On failure nothing stays
    open and the lease is ended when the key manager can be told.

    ``clients``: the caller's clients by key manager URL, one made and added for a URL not there yet (the
    caller closes them): several volumes, and the end of a lease after, share one TLS set-up."""
    token = read_token(path)
    url = token.ref.with_url(options.kms_url).url
    if client is None and clients is not None:
        client = clients.get(url) or clients.setdefault(url, options.client(url))
    own = client is None
    client = client or options.client(url)
    try:
        released = release_for(token, options, client=client)
        try:
            return _open(path, token, url, released, options)
        except BaseException:
            try:
                client.end(released.lease)
            except KeystewardError:
                pass  # the lease runs out on its own
            released.lease.wipe()
            raise
        finally:
            released.secret.wipe()
    finally:
        if own:
            client.close()


def _open(path: str, token: KmsToken, url: str, released: Released, options: UnlockOptions) -> Unlocked:
    name = options.name or f"ks-{token.ref.volume_id}"
    use_dm = options.mode == "dm" or (options.mode == "auto" and dm_available())
    secret = bytearray(released.secret.view())
    try:
        if use_dm:
            verify_secret(path, token, secret)  # before the kernel sees it: a clear error if it does not open
            if not os.path.exists(f"/dev/mapper/{name}"):  # else mapped at boot by `agent unlock`: adopt it
                cryptsetup_open(path, name, token.keyslot, released.secret, cryptsetup=options.cryptsetup)
            return Unlocked(path, name, token, url, "dm", released.lease, released.key_version,
                            cryptsetup=options.cryptsetup)  # fmt: skip
        volume = LuksVolume.open(path, secret, keyslot=token.keyslot, writable=options.writable)
        return Unlocked(path, name, token, url, "userspace", released.lease, released.key_version, volume)
    finally:
        wipe_bytearray(secret)
