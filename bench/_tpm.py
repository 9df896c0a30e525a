"""TPM evidence for ``bench/release.py --evidence tpm``: software TPMs, their attestation keys pinned for the
bench's instances, a policy set that requires the TPM, and quotes made in bulk before the timed phase.

Not a bench itself: bench/release.py is, and prints the ``{"bench": "release", "figures": [...]}`` line.

Each TPM is a real ``swtpm socket --tpm2`` on loopback (started as tests/support/swtpm.py does; benches do
not import the tests). Its EK and AK are made by the agent's own driver,
:meth:`keysteward.agent.tpm.TpmDevice.ensure_keys` (tpm2-tools, persistent handles), and an admin pins the
AK for the instances that use that TPM (``PUT /v1/attest/tpm/keys``).

Why the bulk quotes do not go through ``tpm2_quote``: the agent's :meth:`TpmDevice.quote` runs three
tpm2-tools processes per quote (readpublic, quote, flushcontext -t), about 37 ms here, so the ~4,000
bodies of a quick run would take a minute of both cores before the first timed request. A release
carries one quote per nonce, so nothing can be reused. :class:`TpmWire` sends the same TPM2_Quote command
tpm2_quote sends (AK at its persistent handle, password session, qualifying data = the release binding,
the AK's own signing scheme) straight to swtpm's command socket and returns the TPMS_ATTEST and the
TPMT_SIGNATURE as tpm2_quote writes them (``-m``, ``-s`` in tss format): about 2 ms, nearly all of it
the TPM's RSA signature. The quote is the TPM's own; only the client differs. The run's last
end-to-end release carries a quote made by :meth:`TpmDevice.quote` itself, so the agent's path is
checked against the same server and policy.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import random
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from _common import BenchError, Cleanup, stop_process

from keysteward.agent.tpm import TpmDevice
from keysteward.formats import tpm2

if TYPE_CHECKING:
    from _release import Platform, World

    from keysteward.devcloud.provider import Instance

AK_HANDLE: Final = 0x81010002  # where TpmDevice keeps the AK
PCR_BANK: Final = "sha256"
PCR_INDICES: Final = (0, 7)
PCRS: Final = {PCR_BANK: list(PCR_INDICES)}  # what each release quotes; PCR 7 is what the policy checks
POLICY_ID: Final = "bench-tpm-pcr7-required"

_ST_NO_SESSIONS: Final = 0x8001
_ST_SESSIONS: Final = 0x8002
_CC_QUOTE: Final = 0x00000158
_CC_PCR_READ: Final = 0x0000017E
_RS_PW: Final = 0x40000009  # the password session: the AK's auth value is empty
_HEADER: Final = struct.Struct(">HII")  # tag, size, command or response code
_MAX_RESPONSE: Final = 4096
_RC_AGAIN: Final = frozenset({0x922, 0x908, 0x90A})  # TPM_RC_RETRY, TPM_RC_YIELDED, TPM_RC_TESTING
_TRIES: Final = 10
_READY_SECONDS: Final = 10.0
_START_TRIES: Final = 5


def swtpm_binary() -> str:
    for name in ("swtpm", "tpm2_quote", "tpm2_createak"):
        if shutil.which(name) is None:
            raise BenchError(f"{name} is not installed: run `bash scripts/bootstrap.sh` (swtpm, tpm2-tools)")
    return str(shutil.which("swtpm"))


# -- swtpm -----------------------------------------------------------------------------------------


@dataclass
class Swtpm:
    """One ``swtpm socket --tpm2`` on loopback: command port ``port``, control port ``port + 1``."""

    state_dir: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @classmethod
    def start(cls, cleanup: Cleanup, state_dir: Path) -> Swtpm:
        """A fresh TPM (startup-clear, all PCRs zero) on a free port pair, stopped by ``cleanup``."""
        binary = swtpm_binary()
        state_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(_START_TRIES):
            port = _free_port_pair()
            argv = [binary, "socket", "--tpm2", "--tpmstate", f"dir={state_dir.resolve()}"]
            argv += ["--server", f"type=tcp,port={port},bindaddr=127.0.0.1"]
            argv += ["--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1", "--flags", "not-need-init,startup-clear"]
            with open(state_dir / "swtpm.log", "ab") as log:
                process = subprocess.Popen(
                    argv, stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
                )
            tpm = cls(state_dir, port, process)
            cleanup.push(f"stop swtpm {process.pid}", tpm.stop)
            if _ready(process, port):
                return tpm
            tpm.stop()
        raise BenchError(f"swtpm did not start on {state_dir} after {_START_TRIES} tries")

    def stop(self) -> None:
        stop_process(self.process, grace=10.0)


def _free_port_pair() -> int:
    """A port P with P and P+1 both free on loopback right now (swtpm's command and control ports)."""
    for _ in range(200):
        port = random.randrange(20000, 60000, 2)
        with contextlib.ExitStack() as stack:
            try:
                for p in (port, port + 1):
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind(("127.0.0.1", p))
            except OSError:
                continue
            return port
    raise BenchError("no two adjacent free TCP ports on 127.0.0.1 for swtpm")


def _ready(process: subprocess.Popen[bytes], port: int) -> bool:
    deadline = time.monotonic() + _READY_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port + 1), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False


# -- TPM2 commands on swtpm's socket ---------------------------------------------------------------


class TpmWire:
    """TPM2_PCR_Read and TPM2_Quote over swtpm's command socket (raw TPM2 command and response bytes).

    swtpm serves one connection at a time: a second client waits until this one closes, so hold a
    connection for one batch of quotes, not for a process's life.
    """

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.retries = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> TpmWire:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _recv(self, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            chunk = self.sock.recv(size - len(out))
            if not chunk:
                raise BenchError("swtpm closed the connection in the middle of a response")
            out += chunk
        return bytes(out)

    def command(self, tag: int, code: int, body: bytes) -> bytes:
        """The response after its 10-byte header; raises BenchError on a TPM error code.

        The warnings that say "send it again" (TPM_RC_RETRY, YIELDED, TESTING) are retried, as the TSS
        behind tpm2-tools does.
        """
        for _ in range(_TRIES):
            self.sock.sendall(_HEADER.pack(tag, _HEADER.size + len(body), code) + body)
            _, size, rc = _HEADER.unpack(self._recv(_HEADER.size))
            if not _HEADER.size <= size <= _MAX_RESPONSE:
                raise BenchError(f"swtpm answered TPM command 0x{code:x} with a {size}-byte response")
            rest = self._recv(size - _HEADER.size)
            if rc == 0:
                return rest
            if rc not in _RC_AGAIN:
                raise BenchError(f"swtpm answered TPM command 0x{code:x} with error 0x{rc:x}")
            self.retries += 1
        raise BenchError(f"swtpm answered TPM command 0x{code:x} with 0x{rc:x} {_TRIES} times")

    def pcr_read(self, selection: bytes) -> tuple[bytes, ...]:
        """The values of the PCRs in ``selection`` (a TPML_PCR_SELECTION), in selection order."""
        rest = self.command(_ST_NO_SESSIONS, _CC_PCR_READ, selection)
        # pcrUpdateCounter, pcrSelectionOut (what the TPM read), pcrValues
        if rest[4 : 4 + len(selection)] != selection:
            raise BenchError("the TPM did not read every selected PCR (is the sha256 bank allocated?)")
        return tpm2.parse_digest_list(rest[4 + len(selection) :])

    def quote(self, handle: int, qualifying: bytes, selection: bytes) -> tuple[bytes, bytes]:
        """(TPMS_ATTEST, TPMT_SIGNATURE) of TPM2_Quote by the key at ``handle`` with its own scheme."""
        auth = struct.pack(">IHBH", _RS_PW, 0, 0, 0)  # session handle, nonce, attributes, empty password
        body = struct.pack(">II", handle, len(auth)) + auth
        body += struct.pack(">H", len(qualifying)) + qualifying + struct.pack(">H", tpm2.ALG_NULL) + selection
        rest = self.command(_ST_SESSIONS, _CC_QUOTE, body)
        (param_size,) = struct.unpack(">I", rest[:4])
        params = rest[4 : 4 + param_size]
        if len(params) != param_size or param_size < 2:
            raise BenchError("swtpm's TPM2_Quote response is shorter than its parameter size")
        (attest_size,) = struct.unpack(">H", params[:2])
        if 2 + attest_size > param_size:
            raise BenchError("swtpm's TPM2_Quote response holds a TPM2B_ATTEST longer than its parameters")
        return params[2 : 2 + attest_size], params[2 + attest_size :]


def _selection() -> bytes:
    return tpm2.encode_pcr_selection([tpm2.PcrSelection(tpm2.HASH_IDS[PCR_BANK], PCR_INDICES)])


class Quoter:
    """``evidence.tpm`` objects by one swtpm's AK over :data:`PCRS`, for the body-making worker processes.

    The PCR values are read once; every quote's pcrDigest is checked against them (and its qualifying
    data against the binding), so a PCR that moved during the bulk quoting fails the run here instead
    of as a denial in the timed phase.
    """

    def __init__(self, port: int) -> None:
        self.wire = TpmWire(port)
        self.selection = _selection()
        values = self.wire.pcr_read(self.selection)
        self.pcrs = {PCR_BANK: {str(i): v.hex() for i, v in zip(PCR_INDICES, values, strict=True)}}
        self.digest = hashlib.sha256(b"".join(values)).digest()
        self.seconds = 0.0
        self.count = 0

    def close(self) -> None:
        self.wire.close()

    def evidence(self, bound: bytes) -> dict[str, Any]:
        """The platform part of one release body: ``{"tpm": evidence.tpm}`` for the binding ``bound``."""
        started = time.perf_counter()
        attest, signature = self.wire.quote(AK_HANDLE, bound, self.selection)
        self.seconds += time.perf_counter() - started
        self.count += 1
        parsed = tpm2.parse_attest(attest)
        quote = parsed.quote
        if quote is None or not hmac.compare_digest(parsed.extra_data, bound):
            raise BenchError("swtpm answered TPM2_Quote with an attestation that is not a quote of this binding")
        if not hmac.compare_digest(quote.pcr_digest, self.digest):
            raise BenchError("a quoted PCR changed while the bodies were made")
        return {
            "tpm": {
                "type": "tpm2-quote",
                "quote": base64.b64encode(attest).decode(),
                "signature": base64.b64encode(signature).decode(),
                "pcrs": self.pcrs,
            }
        }


# -- the site: TPMs, pinned AKs, the policy ----------------------------------------------------------


@dataclass
class TpmSite:
    """``len(tpms)`` software TPMs; the instance of agent ``k`` uses TPM ``k % len(tpms)``."""

    tpms: list[Swtpm]
    ak_publics: list[bytes]
    ak_names: list[str]  # hex, as the audit record's details.platform.tpm_ak says it
    pcr7: str
    devices: list[TpmDevice]  # the agent's driver on each TPM (tpm2-tools)

    @classmethod
    def start(cls, cleanup: Cleanup, work: Path, count: int) -> TpmSite:
        """``count`` swtpm processes with an EK and an AK each (made by the agent's driver); same PCR 7."""
        tpms, devices, publics, pcr7s = [], [], [], []
        for i in range(count):
            tpm = Swtpm.start(cleanup, work / f"tpm{i}")
            device = TpmDevice(tpm.tcti, ak_handle=AK_HANDLE, workdir=work / f"agent{i}")
            _, ak_public = device.ensure_keys()
            with TpmWire(tpm.port) as wire:
                values = wire.pcr_read(_selection())
            tpms.append(tpm)
            devices.append(device)
            publics.append(ak_public)
            pcr7s.append(values[PCR_INDICES.index(7)].hex())
        if len(set(pcr7s)) != 1:
            raise BenchError(f"the bench's TPMs report different PCR 7 values: {pcr7s}")
        names = [tpm2.parse_public(p).name().hex() for p in publics]
        return cls(tpms, publics, names, pcr7s[0], devices)

    @property
    def ports(self) -> list[int]:
        return [t.port for t in self.tpms]

    def tpm_of(self, agent: int) -> int:
        return agent % len(self.tpms)

    def require(self, world: World, holders: list[str], instance: Instance, volume_id: str) -> str:
        """Pin for the instance of each agent (``holders[k]``: provider/account/instance_id) its TPM's AK, set
        the policy set that requires the TPM, and show that it does: a release of ``volume_id`` by
        ``instance`` (agent 0) without a quote is refused, and so is one with another TPM's genuine quote.
        Returns what was done, for the bench's output."""
        for agent, holder in enumerate(holders):
            ak = base64.b64encode(self.ak_publics[self.tpm_of(agent)]).decode()
            world.admin.call("PUT", "/v1/attest/tpm/keys", {"instance": holder, "ak_public": ak})
        policy = world.admin.call("PUT", "/v1/policy", {"sources": self.policy_sources()})
        refusals: list[tuple[str, Platform | None]] = [("forbidden_by_policy", None)]
        if len(self.tpms) > 1:
            refusals.append(("evidence_invalid", functools.partial(self.agent_evidence, 1)))
        for code, platform in refusals:
            status, answer, _ = world.release(instance, volume_id, platform=platform)
            if status != 403 or answer.get("code") != code:
                raise BenchError(f"a release that the TPM policy must refuse ({code}) answered {status}: {answer}")
        return (
            f"{len(self.tpms)} swtpm, AKs {', '.join(n[:12] + '…' for n in self.ak_names)} pinned for {len(holders)} "
            f"instances; policy version {policy['version']} ({', '.join(policy['policies'])}) requires tee tpm2 "
            f"and PCR 7 = {self.pcr7[:16]}…; refused: a release without a quote"
            + (", one with another TPM's quote" if len(self.tpms) > 1 else "")
        )

    def policy_sources(self) -> dict[str, str]:
        """The built-in binding rule, plus: no release to an instance without a TPM quote showing this PCR 7."""
        binding = resources.files("keysteward.policy").joinpath("binding.cedar").read_text()
        required = (
            f'@id("{POLICY_ID}")\n'
            'forbid (principal is Keysteward::Instance, action == Keysteward::Action::"release", resource)\n'
            "unless {\n"
            '  context.platform.tee == "tpm2" &&\n'
            "  context.platform has pcrs.sha256_7 &&\n"
            f'  context.platform.pcrs.sha256_7 == "{self.pcr7}"\n'
            "};\n"
        )
        return {"binding.cedar": binding, "tpm-pcr7.cedar": required}

    def agent_evidence(self, agent: int, bound: bytes) -> dict[str, Any]:
        """``{"tpm": ...}`` made the agent's way: :meth:`TpmDevice.quote` (tpm2-tools) on the agent's TPM."""
        return {"tpm": self.devices[self.tpm_of(agent)].quote(bound, PCRS)}
