"""The instance's TPM, driven through tpm2-tools: enrollment keys, credential activation and quotes.

Every step is one tpm2-tools process with ``TPM2TOOLS_TCTI`` set to the device's TCTI. There is no
resource manager between us and the TPM (swtpm in tests, often a bare /dev/tpm0), so keys live at
persistent handles and ``tpm2_flushcontext -t`` runs after each step: a transient object left behind
would fill the TPM's few slots and make the next step fail.

:meth:`TpmDevice.quote` returns the ``evidence.tpm`` object of keysteward-release/1. It reports the PCR
values that tpm2_quote read alongside the quote, and checks them against the signed pcrDigest before it
returns: a PCR extended between the read and the quote would make the server reject the evidence, so the
agent quotes again instead (a few times) and fails with a reason if the PCRs keep moving.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from keysteward.agent.evidence import EvidenceUnavailable
from keysteward.errors import BadRequest
from keysteward.formats import tpm2

EK_CERT_INDEX: Final[dict[str, int]] = {"rsa": 0x01C00002, "ecc": 0x01C0000A}
_AK_SCHEMES: Final[dict[int, str]] = {tpm2.ALG_RSASSA: "rsassa", tpm2.ALG_RSAPSS: "rsapss", tpm2.ALG_ECDSA: "ecdsa"}
_AK_CREATE: Final[dict[str, tuple[str, str]]] = {"rsa": ("rsa", "rsassa"), "ecc": ("ecc", "ecdsa")}
QUOTE_TRIES: Final = 3
MAX_PCR: Final = 24
_CERTINFO = re.compile(r"^certinfodata:([0-9a-fA-F]{2,128})$", re.MULTILINE)


class TpmCommandFailed(EvidenceUnavailable):
    """A tpm2-tools step failed or answered something unexpected; the message names the step."""

    code = "tpm_command_failed"
    title = "TPM command failed"


class TpmDevice:
    """One TPM reached through ``tcti`` (e.g. ``swtpm:host=127.0.0.1,port=2321`` or ``device:/dev/tpmrm0``).

    The EK and AK are kept at the persistent handles ``ek_handle`` and ``ak_handle``; scratch files
    (public areas, contexts, the quote) go to private temporary directories under ``workdir``.
    """

    def __init__(
        self,
        tcti: str,
        ek_handle: int = 0x81010001,
        ak_handle: int = 0x81010002,
        workdir: str | Path | None = None,
        *,
        ek_algorithm: str = "rsa",
        ak_algorithm: str = "rsa",
        timeout: float = 60.0,
    ) -> None:
        if ek_algorithm not in EK_CERT_INDEX or ak_algorithm not in _AK_CREATE:
            raise BadRequest("TPM key algorithms are 'rsa' or 'ecc'")
        self.tcti = tcti
        self.ek_handle = ek_handle
        self.ak_handle = ak_handle
        self.workdir = Path(workdir) if workdir is not None else None
        self.ek_algorithm = ek_algorithm
        self.ak_algorithm = ak_algorithm
        self.timeout = timeout
        self._env = {**os.environ, "TPM2TOOLS_TCTI": tcti}

    # --- plumbing ---------------------------------------------------------------------------------

    def _run(self, argv: Sequence[str], step: str) -> str:
        try:
            done = subprocess.run(list(argv), env=self._env, capture_output=True, timeout=self.timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TpmCommandFailed(f"TPM step {step!r}: cannot run {argv[0]}: {exc}") from exc
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.decode(errors="replace").splitlines() if ln.strip()]
            reason = lines[-1][:300] if lines else "no message"
            raise TpmCommandFailed(f"TPM step {step!r} failed ({argv[0]} exited {done.returncode}): {reason}")
        return done.stdout.decode(errors="replace")

    def _flush_transient(self) -> None:
        self._run(["tpm2_flushcontext", "-t"], "flush transient objects")

    def _scratch(self) -> tempfile.TemporaryDirectory[str]:
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(prefix="tpm-", dir=self.workdir)

    def _persistent(self) -> set[int]:
        out = self._run(["tpm2_getcap", "handles-persistent"], "list persistent handles")
        return {int(m, 16) for m in re.findall(r"0x[0-9a-fA-F]{8}", out)}

    def _read_public(self, handle: int, tmp: str) -> bytes:
        path = os.path.join(tmp, f"{handle:08x}.pub")
        self._run(["tpm2_readpublic", "-c", hex(handle), "-o", path], f"read public key {handle:#x}")
        return Path(path).read_bytes()

    # --- enrollment -------------------------------------------------------------------------------

    def ensure_keys(self) -> tuple[bytes, bytes]:
        """Create (once) and return the EK's and the AK's TPM2B_PUBLIC; idempotent across calls and restarts."""
        with self._scratch() as tmp:
            present = self._persistent()
            if self.ek_handle not in present:
                ek_pub = os.path.join(tmp, "ek.pub")
                argv = ["tpm2_createek", "-c", hex(self.ek_handle), "-G", self.ek_algorithm, "-u", ek_pub]
                self._run(argv, "create the EK")
                self._flush_transient()
            if self.ak_handle not in present:
                alg, scheme = _AK_CREATE[self.ak_algorithm]
                ctx, pub = os.path.join(tmp, "ak.ctx"), os.path.join(tmp, "ak.pub")
                argv = ["tpm2_createak", "-C", hex(self.ek_handle), "-c", ctx, "-G", alg, "-g", "sha256", "-s", scheme]
                self._run([*argv, "-u", pub, "-f", "tss"], "create the AK")
                try:
                    self._run(["tpm2_evictcontrol", "-c", ctx, hex(self.ak_handle)], "persist the AK")
                finally:
                    self._flush_transient()
            return self._read_public(self.ek_handle, tmp), self._read_public(self.ak_handle, tmp)

    def ek_certificate(self, index: int | None = None) -> bytes | None:
        """The EK certificate (DER) from its NV index (0x01c00002 for an RSA EK), or None if there is none."""
        nv_index = EK_CERT_INDEX[self.ek_algorithm] if index is None else index
        listed = self._run(["tpm2_getcap", "handles-nv-index"], "list NV indices")
        if nv_index not in {int(m, 16) for m in re.findall(r"0x[0-9a-fA-F]{7,8}", listed)}:
            return None
        with self._scratch() as tmp:
            path = os.path.join(tmp, "ekcert.der")
            self._run(["tpm2_nvread", hex(nv_index), "-C", "o", "-o", path], "read the EK certificate")
            data = Path(path).read_bytes()
        return _der_prefix(data)

    def activate(self, credential: bytes) -> bytes:
        """TPM2_ActivateCredential of a tpm2-tools credential file with the EK and the AK: the secret.

        The EK's authPolicy is PolicySecret(endorsement), so a policy session satisfying it is started,
        used once and flushed, whatever happens.
        """
        tpm2.parse_credential_file(credential)
        with self._scratch() as tmp:
            cred, session = os.path.join(tmp, "cred.bin"), os.path.join(tmp, "session.ctx")
            Path(cred).write_bytes(credential)
            self._run(["tpm2_startauthsession", "--policy-session", "-S", session], "start the EK policy session")
            try:
                self._run(["tpm2_policysecret", "-S", session, "-c", "e"], "satisfy the EK policy")
                argv = ["tpm2_activatecredential", "-c", hex(self.ak_handle), "-C", hex(self.ek_handle), "-i", cred]
                out = self._run([*argv, "-P", f"session:{session}"], "activate the credential")
            finally:
                self._run(["tpm2_flushcontext", session], "flush the EK policy session")
                self._flush_transient()
        match = _CERTINFO.search(out)
        if match is None:
            raise TpmCommandFailed("tpm2_activatecredential did not print the activated secret")
        return bytes.fromhex(match.group(1))

    # --- quotes -----------------------------------------------------------------------------------

    def _ak_scheme(self, tmp: str) -> tuple[str, str]:
        ak = tpm2.parse_public(self._read_public(self.ak_handle, tmp))
        if ak.scheme[0] in _AK_SCHEMES:
            return _AK_SCHEMES[ak.scheme[0]], tpm2.HASH_NAMES.get(ak.scheme[1], "sha256")
        return ("ecdsa" if ak.type == tpm2.ALG_ECC else "rsassa"), "sha256"

    def quote(self, binding: bytes, pcrs: Mapping[str, Sequence[int]]) -> dict[str, Any]:
        """A quote by the AK over ``pcrs`` ({"sha256": [0, 7]}) with qualifying data ``binding``."""
        if len(binding) != 32:
            raise BadRequest("the binding must be 32 bytes (sha256 of nonce and public key)")
        selection = _selection(pcrs)
        with self._scratch() as tmp:
            scheme, hash_name = self._ak_scheme(tmp)
            msg, sig, values = (os.path.join(tmp, n) for n in ("quote.msg", "quote.sig", "pcrs.bin"))
            argv = ["tpm2_quote", "-c", hex(self.ak_handle), "-l", selection, "-q", binding.hex(), "-m", msg, "-s", sig]
            argv += ["-o", values, "-F", "values", "--scheme", scheme, "-g", hash_name]
            for _ in range(QUOTE_TRIES):
                try:
                    self._run(argv, "quote")
                finally:
                    self._flush_transient()
                quote_bytes = Path(msg).read_bytes()
                reported = _quoted_values(quote_bytes, Path(values).read_bytes(), binding, hash_name)
                if reported is not None:
                    return {
                        "type": "tpm2-quote",
                        "quote": base64.b64encode(quote_bytes).decode("ascii"),
                        "signature": base64.b64encode(Path(sig).read_bytes()).decode("ascii"),
                        "pcrs": reported,
                    }
        raise TpmCommandFailed(f"the PCRs changed during each of {QUOTE_TRIES} quotes: try again later")

    def extend(self, pcr: int, data_hex: str, bank: str = "sha256") -> None:
        """Extend PCR ``pcr`` of ``bank`` with the digest ``data_hex`` (tests and measured-boot tooling)."""
        size = tpm2.HASH_SIZES.get(tpm2.HASH_IDS.get(bank, 0))
        if size is None or not 0 <= pcr < MAX_PCR or not re.fullmatch(f"[0-9a-fA-F]{{{2 * size}}}", data_hex):
            raise BadRequest(
                "extend takes a PCR 0-23, a bank sha1/sha256/sha384/sha512 and a digest of its size in hex"
            )
        self._run(["tpm2_pcrextend", f"{pcr}:{bank}={data_hex.lower()}"], f"extend PCR {pcr}")


def _selection(pcrs: Mapping[str, Sequence[int]]) -> str:
    """tpm2-tools' PCR list (``sha256:0,7+sha1:0``), after checking banks and indices."""
    parts = []
    for bank, indices in pcrs.items():
        if bank not in tpm2.HASH_IDS or not indices or any(not 0 <= i < MAX_PCR for i in indices):
            raise BadRequest("PCR selections name banks sha1/sha256/sha384/sha512 and PCRs 0-23")
        parts.append(f"{bank}:{','.join(str(i) for i in sorted(set(indices)))}")
    if not parts:
        raise BadRequest("a quote needs at least one PCR")
    return "+".join(parts)


def _quoted_values(quote: bytes, values: bytes, binding: bytes, hash_name: str) -> dict[str, dict[str, str]] | None:
    """The PCR values as evidence reports them, or None if they do not hash to the quote's pcrDigest."""
    attest = tpm2.parse_attest(quote)
    if attest.quote is None or not hmac.compare_digest(attest.extra_data, binding):
        raise TpmCommandFailed("tpm2_quote wrote an attestation that is not a quote of this binding")
    out: dict[str, dict[str, str]] = {}
    pos = 0
    for sel in attest.quote.pcr_select:
        size = tpm2.HASH_SIZES.get(sel.hash_alg)
        if size is None:
            raise TpmCommandFailed(f"the quote selects an unsupported PCR bank 0x{sel.hash_alg:04x}")
        for index in sel.indices:
            out.setdefault(tpm2.HASH_NAMES[sel.hash_alg], {})[str(index)] = values[pos : pos + size].hex()
            pos += size
    if pos != len(values):
        raise TpmCommandFailed("tpm2_quote wrote PCR values that do not fit the quoted selection")
    if not hmac.compare_digest(hashlib.new(hash_name, values).digest(), attest.quote.pcr_digest):
        return None
    return out


def _der_prefix(data: bytes) -> bytes:
    """The DER certificate at the start of an NV index (some are padded to a fixed size)."""
    if len(data) >= 4 and data[0] == 0x30 and data[1] == 0x82:
        return data[: 4 + int.from_bytes(data[2:4], "big")]
    if len(data) >= 3 and data[0] == 0x30 and data[1] == 0x81:
        return data[: 3 + data[2]]
    raise TpmCommandFailed("the EK certificate NV index does not hold a DER certificate")
