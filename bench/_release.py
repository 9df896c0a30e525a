"""Shared pieces of bench/release.py and bench/leases.py: a tenant with a key and a trusted devcloud,
instances and volumes, release requests with evidence made the way an instance makes it (made in bulk
in worker processes, with a TPM quote each when asked), and the audit log read back through the API.

Not a bench itself: the two benches that use it end, as every bench does, with the line
``{"bench": NAME, "figures": [...]}``.

Everything goes through the public API (docs/release-protocol.md) of a real server process; the
devcloud signs identity documents in this process, as the cloud's metadata service would for an
instance.
"""

from __future__ import annotations

import asyncio
import base64
import json
import multiprocessing
import os
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from _common import BenchError, KeystewardServer
from _tpm import Quoter

from keysteward.attest.binding import binding
from keysteward.crypto.hpke import X25519, OneTimeKey
from keysteward.devcloud.provider import DevCloud, Instance
from keysteward.formats.release_wire import PROTOCOL, TOKEN_SIZE, ReleaseWireError, seal_info, split_secret

TENANT = "acme"
KEY = "volumes"
PROVIDER = "devcloud"
ACCOUNT = "111122223333"
IMAGE = "img-bench"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def raw_nonce(nonce: str) -> bytes:
    return base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))


def unpack(plain: bytearray) -> tuple[bytes, bytes]:
    """A KSR1 plaintext -> (secret, token)."""
    try:
        secret_at, token_at = split_secret(plain)
    except ReleaseWireError as exc:
        raise BenchError("the sealed answer does not hold a KSR1 secret and lease token") from exc
    return bytes(plain[secret_at]), bytes(plain[token_at])


Platform = Callable[[bytes], dict[str, Any]]  # binding -> more evidence, e.g. {"tpm": evidence.tpm}


def release_body(
    cloud: DevCloud,
    instance: Instance,
    volume_id: str,
    nonce: str,
    suite: str = X25519,
    platform: Platform | None = None,
) -> tuple[dict[str, Any], OneTimeKey]:
    """What an agent sends: a one-time HPKE key and the instance's identity document bound to it and the nonce
    (and ``platform(binding)``'s evidence bound to the same, when given)."""
    otk = OneTimeKey.generate(suite)
    bound = binding(raw_nonce(nonce), otk.public_bytes)
    document, signature = cloud.aws_document(instance, bound.hex())
    evidence: dict[str, Any] = {"identity": {"type": "aws-iid", "document": b64(document), "signature": b64(signature)}}
    if platform is not None:
        evidence.update(platform(bound))
    body = {
        "protocol": PROTOCOL,
        "tenant": TENANT,
        "volume_id": volume_id,
        "nonce": nonce,
        "suite": suite,
        "public_key": b64(otk.public_bytes),
        "evidence": evidence,
    }
    return body, otk


def open_released(answer: dict[str, Any], otk: OneTimeKey, volume_id: str) -> tuple[bytes, str, bytes]:
    """(secret, lease id, lease token) from a ``released`` answer."""
    lease_id = str(answer["lease"]["id"])
    plain = otk.open(base64.b64decode(answer["sealed"]), seal_info(TENANT, volume_id, lease_id))
    secret, token = unpack(plain)
    return secret, lease_id, token


def bulk_instances(cloud: DevCloud, count: int, account: str = ACCOUNT, image_id: str = IMAGE) -> list[Instance]:
    """``count`` running instances, written to the devcloud's instances.json in one go.

    ``DevCloud.create`` rewrites (and fsyncs) the whole file for each instance, which is quadratic for
    thousands; this adds them all in one rewrite through the same locked, atomic path.
    """
    template = cloud.create(account=account, image_id=image_id)
    made = [template]
    with cloud._mutate() as instances:  # the devcloud has no public bulk create
        for _ in range(count - 1):
            instance = Instance(
                id=cloud._new_id(),
                account=template.account,
                image_id=template.image_id,
                region=template.region,
                zone=template.zone,
                launched_at=template.launched_at,
            )
            instances[instance.id] = instance
            made.append(instance)
    if len({i.id for i in made}) != count:
        raise BenchError("devcloud gave two instances the same id")
    return made


class Api:
    """A keep-alive HTTPS client of the server, with a bearer token."""

    def __init__(self, server: KeystewardServer, token: str = "") -> None:
        self.server = server
        self.token = token
        self.ssl = ssl.create_default_context(cafile=server.ca_file)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=server.url, verify=self.ssl, headers=headers, timeout=60.0)

    def close(self) -> None:
        self.client.close()

    def call(self, method: str, path: str, body: Any = None, *, expect: tuple[int, ...] = (200, 201, 204)) -> Any:
        r = self.client.request(method, path, json=body) if body is not None else self.client.request(method, path)
        if r.status_code not in expect:
            raise BenchError(f"{method} {path} answered {r.status_code}: {r.text[:500]}")
        return r.json() if r.content else None

    def post(self, path: str, body: Any, *, expect: tuple[int, ...] = (200, 201, 204)) -> Any:
        return self.call("POST", path, body, expect=expect)

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def audit(self, after: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        """(seq, record body) of the tenant's audit chain after ``after``, in order."""
        while True:
            page = self.get(f"/v1/audit?after={after}&limit=5000")["records"]
            for rec in page:
                yield int(rec["seq"]), json.loads(rec["body"])
            if len(page) < 5000:
                return
            after = int(page[-1]["seq"])

    def last_seq(self) -> int:
        last = 0
        for seq, _ in self.audit():
            last = seq
        return last


@dataclass
class World:
    """A tenant ``acme`` with the key ``volumes``, and a devcloud registered as its provider ``devcloud``."""

    server: KeystewardServer
    admin: Api
    public: Api  # no credentials: what an instance uses
    cloud: DevCloud

    @classmethod
    def make(cls, server: KeystewardServer, state: Path) -> World:
        root = Api(server, server.root_token)
        try:
            tenant = root.post("/v1/tenants", {"name": TENANT})
        finally:
            root.close()
        admin = Api(server, tenant["admin_token"]["token"])
        admin.post("/v1/keys", {"name": KEY})
        cloud = DevCloud.init(state)
        admin.post("/v1/providers", {"name": PROVIDER, "kind": "aws-iid", "certificates_pem": cloud.certificate_pem()})
        return cls(server, admin, Api(server), cloud)

    def volume_request(self, name: str, public_key: bytes, lease_seconds: int = 30, renew_seconds: int = 10) -> Any:
        return {
            "name": name,
            "key": KEY,
            "binding": {"provider": PROVIDER, "account": ACCOUNT},
            "lease_seconds": lease_seconds,
            "renew_seconds": renew_seconds,
            "suite": X25519,
            "public_key": b64(public_key),
        }

    def create_volume(self, name: str, **kw: Any) -> tuple[str, bytes]:
        """(volume id, the volume's secret, opened from the creation answer)."""
        otk = OneTimeKey.generate()
        created = self.admin.post("/v1/volumes", self.volume_request(name, otk.public_bytes, **kw))
        volume_id = str(created["volume"]["id"])
        plain = otk.open(base64.b64decode(created["sealed"]), seal_info(TENANT, volume_id, "create"))
        secret, token = unpack(plain)
        if token != bytes(TOKEN_SIZE) or len(secret) != 32:
            raise BenchError("the volume creation answer does not hold a 32-byte secret and a zero token")
        return volume_id, secret

    def close(self) -> None:
        self.admin.close()
        self.public.close()

    def challenge(self) -> str:
        return str(self.public.post("/v1/release/challenge", {})["nonce"])

    def release(
        self, instance: Instance, volume_id: str, platform: Platform | None = None
    ) -> tuple[int, Any, OneTimeKey]:
        """One release as an agent makes it: challenge, evidence, request; (status, answer, one-time key)."""
        body, otk = release_body(self.cloud, instance, volume_id, self.challenge(), platform=platform)
        r = self.public.client.post("/v1/release", json=body)
        return r.status_code, r.json(), otk


def fetch_nonces(server: KeystewardServer, count: int, concurrency: int = 32) -> list[str]:
    """``count`` challenge nonces, fetched over ``concurrency`` keep-alive connections."""

    async def run() -> list[str]:
        pool = HttpPool(server.url, server.ca_file, concurrency)

        async def one() -> str:
            status, answer = await pool.request("POST", "/v1/release/challenge", {})
            if status != 200:
                raise BenchError(f"POST /v1/release/challenge answered {status}: {answer}")
            return str(answer["nonce"])

        try:
            return list(await asyncio.gather(*(one() for _ in range(count))))
        finally:
            await pool.close()

    return asyncio.run(run())


# -- request bodies in bulk, made in worker processes ------------------------------------------

_worker: dict[str, Any] = {}
CHUNK = 500  # bodies per job (identity only)
TPM_CHUNK = 250  # bodies per job with quotes: a job holds its swtpm's only connection while it runs


@dataclass
class BodyStats:
    seconds: float  # wall time: nonces, evidence, bodies written
    quotes: int = 0
    quote_seconds: float = 0.0  # summed over the workers: time spent waiting for TPM2_Quote answers


def _init_worker(state: str, instances: list[dict[str, Any]], volume_ids: list[str], tpm_ports: list[int]) -> None:
    _worker["cloud"] = DevCloud(Path(state))
    _worker["instances"] = [Instance.from_json(i) for i in instances]
    _worker["volumes"] = volume_ids
    _worker["tpm_ports"] = tpm_ports


def _make_bodies(job: tuple[int | None, list[tuple[int, str]]]) -> tuple[list[str], int, float]:
    """JSON lines for ``(agent, nonce)`` pairs, quoted by TPM ``job[0]`` (None: identity only)."""
    tpm, items = job
    cloud, instances, volumes = _worker["cloud"], _worker["instances"], _worker["volumes"]
    quoter = Quoter(_worker["tpm_ports"][tpm]) if tpm is not None else None
    try:
        platform = quoter.evidence if quoter is not None else None
        lines = []
        for agent, nonce in items:
            body, _ = release_body(cloud, instances[agent], volumes[agent], nonce, platform=platform)
            lines.append(json.dumps(body, separators=(",", ":")))
    finally:
        if quoter is not None:
            quoter.close()
    return lines, (quoter.count if quoter else 0), (quoter.seconds if quoter else 0.0)


def _jobs(nonces: list[str], agents: int, tpms: int) -> list[tuple[int | None, list[tuple[int, str]]]]:
    """Nonce k goes to agent k mod ``agents``; with TPMs, each job holds the agents of one TPM
    (agent mod ``tpms``), and jobs alternate between TPMs so that the workers quote on all of them at once."""
    pairs = [(k % agents, nonce) for k, nonce in enumerate(nonces)]
    if not tpms:
        return [(None, pairs[i : i + CHUNK]) for i in range(0, len(pairs), CHUNK)]
    per_tpm = [[p for p in pairs if p[0] % tpms == t] for t in range(tpms)]
    chunked = [
        [(t, group[i : i + TPM_CHUNK]) for i in range(0, len(group), TPM_CHUNK)] for t, group in enumerate(per_tpm)
    ]
    jobs: list[tuple[int | None, list[tuple[int, str]]]] = []
    for row in range(max(len(c) for c in chunked)):
        jobs += [c[row] for c in chunked if row < len(c)]
    return jobs


def make_bodies(
    world: World, instances: list[Instance], volume_ids: list[str], count: int, path: Path, tpm_ports: list[int]
) -> BodyStats:
    """``count`` release bodies in ``path``, one JSON per line, each with a fresh nonce and, when
    ``tpm_ports`` names swtpm command ports, a quote by the TPM of its agent (agent k uses port k mod n)."""
    started = time.monotonic()
    nonces = fetch_nonces(world.server, count)
    stats = BodyStats(0.0)
    ctx = multiprocessing.get_context("spawn")  # not fork: a fork while threads hold locks can hang the child
    with ctx.Pool(
        os.cpu_count() or 1,
        initializer=_init_worker,
        initargs=(str(world.cloud.state), [i.to_json() for i in instances], volume_ids, tpm_ports),
    ) as pool:
        with path.open("w") as out:
            for lines, quotes, quote_seconds in pool.imap(_make_bodies, _jobs(nonces, len(instances), len(tpm_ports))):
                out.write("\n".join(lines) + "\n")
                stats.quotes += quotes
                stats.quote_seconds += quote_seconds
    stats.seconds = time.monotonic() - started
    return stats


# -- a small HTTP/1.1 keep-alive client on asyncio streams -------------------------------------


class HttpPool:
    """``size`` keep-alive HTTPS connections (HTTP/1.1, TLS verified against the server's CA).

    A request waits for a free connection, so at most ``size`` are in flight. httpx's asyncio client
    spends several times the CPU per request of this one (measured here: under 500 requests/s on
    one core), and the client shares the machine with the server it measures.
    """

    def __init__(self, url: str, ca_file: str, size: int, token: str = "") -> None:
        parsed = httpx.URL(url)
        self.host, self.port = str(parsed.host), int(parsed.port or 443)
        self.ssl = ssl.create_default_context(cafile=ca_file)
        self.size = size
        self.auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self._free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = asyncio.Queue()
        for _ in range(size):
            self._free.put_nowait(None)  # opened on first use
        self.opened = 0

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.opened += 1
        return await asyncio.open_connection(self.host, self.port, ssl=self.ssl, server_hostname=self.host)

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, decoded JSON answer or None); raises OSError/asyncio errors on a broken connection."""
        data = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{self.auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        ).encode()
        conn = await self._free.get()
        keep = False
        try:
            for attempt in (1, 2):
                reused = conn is not None
                if conn is None:
                    conn = await self._open()
                reader, writer = conn
                writer.write(head + data)
                status_line = await reader.readline()
                if status_line:
                    break
                conn[1].close()
                conn = None
                if not reused or attempt == 2:  # an idle connection the server closed is retried once
                    raise ConnectionResetError("the server closed the connection")
            status = int(status_line.split()[1])
            length, keep = 0, True
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection" and value.strip().lower() == "close":
                    keep = False
                elif name == "transfer-encoding":
                    raise BenchError(f"unexpected Transfer-Encoding {value.strip()} from the server")
            payload = await reader.readexactly(length) if length else b""
            return status, json.loads(payload) if payload else None
        finally:
            if not keep and conn is not None:
                conn[1].close()
                conn = None
            self._free.put_nowait(conn)

    async def close(self) -> None:
        while not self._free.empty():
            conn = self._free.get_nowait()
            if conn is not None:
                conn[1].close()
