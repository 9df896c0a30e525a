"""TPM 2.0 wire structures (TPM 2.0 Library, Part 2): what a quote, its signature and a key look like.

Pure: bytes in, frozen objects out. Every size field is checked against the TPM's own maximum for that
buffer and against the bytes left before anything is read, and a structure must use its input exactly:
trailing bytes are as wrong as missing ones. Anything else raises :class:`Tpm2FormatError`
(``tpm2_structure_invalid``), whose messages name the structure and field and never carry its bytes.

Parsed here: TPMS_ATTEST (quote and certify bodies; other attestation types keep their body raw),
TPMT_SIGNATURE (RSASSA, RSAPSS, ECDSA), TPM2B_PUBLIC/TPMT_PUBLIC (RSA and ECC keys) with the object
Name, TPML_PCR_SELECTION, TPML_DIGEST and the tpm2-tools credential file. Encoded here: what
MakeCredential produces (TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET, TPMS_ECC_POINT, the credential file)
and the lists, so tests can build structures the way a TPM does.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Final

from keysteward.errors import BadRequest

TPM_GENERATED_VALUE: Final = 0xFF544347
ST_ATTEST_CERTIFY: Final = 0x8017
ST_ATTEST_QUOTE: Final = 0x8018
_ST_ATTEST_OTHER: Final = frozenset({0x8014, 0x8015, 0x8016, 0x8019, 0x801A, 0x801C})

ALG_RSA: Final = 0x0001
ALG_SHA1: Final = 0x0004
ALG_AES: Final = 0x0006
ALG_SHA256: Final = 0x000B
ALG_SHA384: Final = 0x000C
ALG_SHA512: Final = 0x000D
ALG_NULL: Final = 0x0010
ALG_RSASSA: Final = 0x0014
ALG_RSAES: Final = 0x0015
ALG_RSAPSS: Final = 0x0016
ALG_OAEP: Final = 0x0017
ALG_ECDSA: Final = 0x0018
ALG_ECDAA: Final = 0x001A
ALG_ECC: Final = 0x0023
ALG_CFB: Final = 0x0043

HASH_NAMES: Final[dict[int, str]] = {ALG_SHA1: "sha1", ALG_SHA256: "sha256", ALG_SHA384: "sha384", ALG_SHA512: "sha512"}
HASH_SIZES: Final[dict[int, int]] = {ALG_SHA1: 20, ALG_SHA256: 32, ALG_SHA384: 48, ALG_SHA512: 64}
HASH_IDS: Final[dict[str, int]] = {name: alg for alg, name in HASH_NAMES.items()}
ECC_CURVES: Final[dict[int, str]] = {0x0003: "nist_p256", 0x0004: "nist_p384", 0x0005: "nist_p521"}
ECC_SIZES: Final[dict[int, int]] = {0x0003: 32, 0x0004: 48, 0x0005: 66}

# Object attributes (TPMA_OBJECT), Part 2 section 8.3.
FIXED_TPM: Final = 1 << 1
FIXED_PARENT: Final = 1 << 4
SENSITIVE_DATA_ORIGIN: Final = 1 << 5
USER_WITH_AUTH: Final = 1 << 6
ADMIN_WITH_POLICY: Final = 1 << 7
RESTRICTED: Final = 1 << 16
DECRYPT: Final = 1 << 17
SIGN: Final = 1 << 18

# The TPM's own buffer maxima (sizeof the union each TPM2B wraps), so nothing larger is ever read.
MAX_DIGEST: Final = 64
MAX_NAME: Final = 68
MAX_DATA: Final = 66
MAX_RSA_KEY: Final = 512
MAX_ECC_PARAMETER: Final = 66
MAX_PUBLIC: Final = 1024
MAX_ATTEST: Final = 2048
MAX_SIGNATURE: Final = 1024
MAX_ID_OBJECT: Final = 2 + MAX_DIGEST + 2 + MAX_DIGEST
MAX_ENCRYPTED_SECRET: Final = 512
MAX_PCR_BANKS: Final = 16
MAX_PCR_SELECT: Final = 4
MAX_DIGESTS: Final = 8
CREDENTIAL_MAGIC: Final = 0xBADCC0DE
CREDENTIAL_VERSION: Final = 1


class Tpm2FormatError(BadRequest):
    """A TPM structure that does not parse or breaks the TPM's own limits."""

    code = "tpm2_structure_invalid"
    title = "Invalid TPM2 structure"


class _Reader:
    """Big-endian reads that never run past the end and name the structure that was short."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = memoryview(bytes(data))
        self._pos = 0
        self.what = what

    def take(self, count: int, field: str) -> bytes:
        if count > len(self._data) - self._pos:
            raise Tpm2FormatError(f"{self.what}: truncated in {field}")
        out = bytes(self._data[self._pos : self._pos + count])
        self._pos += count
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "big")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "big")

    def u64(self, field: str) -> int:
        return int.from_bytes(self.take(8, field), "big")

    def tpm2b(self, field: str, limit: int) -> bytes:
        """A size-prefixed buffer of at most ``limit`` bytes."""
        size = self.u16(field + " size")
        if size > limit:
            raise Tpm2FormatError(f"{self.what}: {field} is {size} bytes, more than the maximum {limit}")
        return self.take(size, field)

    def rest(self) -> bytes:
        out = bytes(self._data[self._pos :])
        self._pos = len(self._data)
        return out

    def done(self) -> None:
        if self._pos != len(self._data):
            raise Tpm2FormatError(f"{self.what}: {len(self._data) - self._pos} unexpected bytes after the structure")


def _u16(value: int) -> bytes:
    return struct.pack(">H", value)


def _tpm2b(value: bytes, limit: int, field: str) -> bytes:
    if len(value) > limit:
        raise Tpm2FormatError(f"{field} is {len(value)} bytes, more than the maximum {limit}")
    return _u16(len(value)) + value


def _bounded(data: bytes, limit: int, what: str) -> None:
    if len(data) > limit:
        raise Tpm2FormatError(f"{what} is {len(data)} bytes, more than the {limit} accepted")


# --- PCR selections and digest lists ---------------------------------------------------------------


@dataclass(frozen=True)
class PcrSelection:
    """One TPMS_PCR_SELECTION: a bank (hash algorithm) and the PCR indices selected in it, ascending."""

    hash_alg: int
    indices: tuple[int, ...]
    size_of_select: int = 3


def _read_pcr_selections(r: _Reader) -> tuple[PcrSelection, ...]:
    count = r.u32("TPML_PCR_SELECTION count")
    if count > MAX_PCR_BANKS:
        raise Tpm2FormatError(f"{r.what}: {count} PCR banks selected, more than {MAX_PCR_BANKS}")
    out = []
    for _ in range(count):
        hash_alg = r.u16("pcr selection hash")
        size = r.u8("sizeofSelect")
        if size > MAX_PCR_SELECT:
            raise Tpm2FormatError(f"{r.what}: sizeofSelect {size} is more than {MAX_PCR_SELECT}")
        bitmap = r.take(size, "pcrSelect")
        indices = tuple(i for i in range(size * 8) if bitmap[i // 8] >> (i % 8) & 1)
        out.append(PcrSelection(hash_alg, indices, size))
    return tuple(out)


def _write_pcr_selections(selections: tuple[PcrSelection, ...] | list[PcrSelection]) -> bytes:
    out = bytearray(struct.pack(">I", len(selections)))
    for sel in selections:
        if not 0 <= sel.size_of_select <= MAX_PCR_SELECT or any(
            not 0 <= i < sel.size_of_select * 8 for i in sel.indices
        ):
            raise Tpm2FormatError("PCR index outside the selection bitmap")
        bitmap = bytearray(sel.size_of_select)
        for i in sel.indices:
            bitmap[i // 8] |= 1 << (i % 8)
        out += _u16(sel.hash_alg) + bytes([sel.size_of_select]) + bitmap
    return bytes(out)


def parse_pcr_selection(data: bytes) -> tuple[PcrSelection, ...]:
    """A whole TPML_PCR_SELECTION."""
    _bounded(data, 4 + MAX_PCR_BANKS * (3 + MAX_PCR_SELECT), "TPML_PCR_SELECTION")
    r = _Reader(data, "TPML_PCR_SELECTION")
    out = _read_pcr_selections(r)
    r.done()
    return out


def encode_pcr_selection(selections: tuple[PcrSelection, ...] | list[PcrSelection]) -> bytes:
    return _write_pcr_selections(selections)


def parse_digest_list(data: bytes) -> tuple[bytes, ...]:
    """A whole TPML_DIGEST (at most 8 digests, as TPM2_PCR_Read answers)."""
    _bounded(data, 4 + MAX_DIGESTS * (2 + MAX_DIGEST), "TPML_DIGEST")
    r = _Reader(data, "TPML_DIGEST")
    count = r.u32("count")
    if count > MAX_DIGESTS:
        raise Tpm2FormatError(f"TPML_DIGEST: {count} digests, more than {MAX_DIGESTS}")
    out = tuple(r.tpm2b("digest", MAX_DIGEST) for _ in range(count))
    r.done()
    return out


def encode_digest_list(digests: list[bytes] | tuple[bytes, ...]) -> bytes:
    if len(digests) > MAX_DIGESTS:
        raise Tpm2FormatError(f"TPML_DIGEST: {len(digests)} digests, more than {MAX_DIGESTS}")
    return struct.pack(">I", len(digests)) + b"".join(_tpm2b(d, MAX_DIGEST, "digest") for d in digests)


# --- TPMS_ATTEST ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuoteInfo:
    pcr_select: tuple[PcrSelection, ...]
    pcr_digest: bytes


@dataclass(frozen=True)
class CertifyInfo:
    name: bytes
    qualified_name: bytes


@dataclass(frozen=True)
class Attest:
    """TPMS_ATTEST: what the TPM signed. ``quote``/``certify`` is set for those types, else ``attested``."""

    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    quote: QuoteInfo | None = None
    certify: CertifyInfo | None = None
    attested: bytes = b""


def parse_attest(data: bytes) -> Attest:
    """A TPMS_ATTEST as ``tpm2_quote -m`` writes it; the magic must be TPM_GENERATED_VALUE."""
    _bounded(data, MAX_ATTEST, "TPMS_ATTEST")
    r = _Reader(data, "TPMS_ATTEST")
    if r.u32("magic") != TPM_GENERATED_VALUE:
        raise Tpm2FormatError("TPMS_ATTEST: magic is not TPM_GENERATED_VALUE: the TPM did not make this structure")
    kind = r.u16("type")
    signer = r.tpm2b("qualifiedSigner", MAX_NAME)
    extra = r.tpm2b("extraData", MAX_DATA)
    clock, reset, restart = r.u64("clock"), r.u32("resetCount"), r.u32("restartCount")
    safe = r.u8("safe")
    if safe > 1:
        raise Tpm2FormatError("TPMS_ATTEST: clockInfo.safe is not a boolean")
    firmware = r.u64("firmwareVersion")
    quote = certify = None
    attested = b""
    if kind == ST_ATTEST_QUOTE:
        quote = QuoteInfo(_read_pcr_selections(r), r.tpm2b("pcrDigest", MAX_DIGEST))
    elif kind == ST_ATTEST_CERTIFY:
        certify = CertifyInfo(r.tpm2b("name", MAX_NAME), r.tpm2b("qualifiedName", MAX_NAME))
    elif kind in _ST_ATTEST_OTHER:
        attested = r.rest()
    else:
        raise Tpm2FormatError(f"TPMS_ATTEST: unknown attestation type 0x{kind:04x}")
    r.done()
    return Attest(kind, signer, extra, clock, reset, restart, bool(safe), firmware, quote, certify, attested)


def encode_attest(attest: Attest) -> bytes:
    """The bytes a TPM signs for ``attest`` (the inverse of :func:`parse_attest`)."""
    out = struct.pack(">IH", TPM_GENERATED_VALUE, attest.type)
    out += _tpm2b(attest.qualified_signer, MAX_NAME, "qualifiedSigner") + _tpm2b(attest.extra_data, MAX_DATA, "extra")
    out += struct.pack(
        ">QIIBQ", attest.clock, attest.reset_count, attest.restart_count, attest.safe, attest.firmware_version
    )
    if attest.quote is not None:
        out += _write_pcr_selections(attest.quote.pcr_select) + _tpm2b(attest.quote.pcr_digest, MAX_DIGEST, "digest")
    elif attest.certify is not None:
        out += _tpm2b(attest.certify.name, MAX_NAME, "name") + _tpm2b(attest.certify.qualified_name, MAX_NAME, "name")
    else:
        out += attest.attested
    return out


# --- TPMT_SIGNATURE ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """TPMT_SIGNATURE: ``signature`` for RSASSA/RSAPSS, ``r`` and ``s`` (big-endian) for ECDSA."""

    sig_alg: int
    hash_alg: int
    signature: bytes = b""
    r: bytes = b""
    s: bytes = b""


def parse_signature(data: bytes) -> Signature:
    """A TPMT_SIGNATURE as ``tpm2_quote -s`` writes it (tss format)."""
    _bounded(data, MAX_SIGNATURE, "TPMT_SIGNATURE")
    rd = _Reader(data, "TPMT_SIGNATURE")
    alg = rd.u16("sigAlg")
    if alg not in (ALG_RSASSA, ALG_RSAPSS, ALG_ECDSA):
        raise Tpm2FormatError(f"TPMT_SIGNATURE: signature scheme 0x{alg:04x} is not RSASSA, RSAPSS or ECDSA")
    hash_alg = rd.u16("hash")
    if alg == ALG_ECDSA:
        sig = Signature(
            alg, hash_alg, r=rd.tpm2b("signatureR", MAX_ECC_PARAMETER), s=rd.tpm2b("signatureS", MAX_ECC_PARAMETER)
        )
    else:
        sig = Signature(alg, hash_alg, signature=rd.tpm2b("sig", MAX_RSA_KEY))
    rd.done()
    return sig


def encode_signature(sig: Signature) -> bytes:
    out = _u16(sig.sig_alg) + _u16(sig.hash_alg)
    if sig.sig_alg == ALG_ECDSA:
        return out + _tpm2b(sig.r, MAX_ECC_PARAMETER, "r") + _tpm2b(sig.s, MAX_ECC_PARAMETER, "s")
    return out + _tpm2b(sig.signature, MAX_RSA_KEY, "sig")


# --- TPM2B_PUBLIC -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Public:
    """TPMT_PUBLIC of an RSA or ECC key; ``tpmt`` holds its exact bytes (the Name hashes them).

    ``symmetric`` is (algorithm, keyBits, mode) or None; ``scheme`` and ``kdf`` are (algorithm, hash)
    with hash ALG_NULL where the scheme has none. RSA keys fill ``rsa_bits``/``exponent``/``modulus``
    (exponent 0 means 65537); ECC keys ``curve``/``x``/``y``.
    """

    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    symmetric: tuple[int, int, int] | None
    scheme: tuple[int, int]
    tpmt: bytes
    rsa_bits: int = 0
    exponent: int = 0
    modulus: bytes = b""
    curve: int = 0
    kdf: tuple[int, int] = (ALG_NULL, ALG_NULL)
    x: bytes = b""
    y: bytes = b""

    def name(self) -> bytes:
        """The object Name: nameAlg || H_nameAlg(TPMT_PUBLIC)."""
        return _u16(self.name_alg) + hashlib.new(HASH_NAMES[self.name_alg], self.tpmt).digest()

    def has(self, attribute: int) -> bool:
        return bool(self.attributes & attribute)


def _read_scheme(r: _Reader, field: str) -> tuple[int, int]:
    alg = r.u16(field)
    if alg in (ALG_NULL, ALG_RSAES):
        return (alg, ALG_NULL)
    hash_alg = r.u16(field + " hash")
    if alg == ALG_ECDAA:
        r.u16(field + " count")
    return (alg, hash_alg)


def parse_tpmt_public(data: bytes) -> Public:
    """A whole TPMT_PUBLIC of an RSA or ECC key."""
    _bounded(data, MAX_PUBLIC, "TPMT_PUBLIC")
    r = _Reader(data, "TPMT_PUBLIC")
    kind, name_alg, attributes = r.u16("type"), r.u16("nameAlg"), r.u32("objectAttributes")
    if kind not in (ALG_RSA, ALG_ECC):
        raise Tpm2FormatError(f"TPMT_PUBLIC: key type 0x{kind:04x} is not RSA or ECC")
    if name_alg not in HASH_NAMES:
        raise Tpm2FormatError(f"TPMT_PUBLIC: nameAlg 0x{name_alg:04x} is not SHA-1 or SHA-2")
    policy = r.tpm2b("authPolicy", MAX_DIGEST)
    sym_alg = r.u16("symmetric")
    symmetric = None if sym_alg == ALG_NULL else (sym_alg, r.u16("symmetric keyBits"), r.u16("symmetric mode"))
    scheme = _read_scheme(r, "scheme")
    if kind == ALG_RSA:
        bits, exponent = r.u16("keyBits"), r.u32("exponent")
        modulus = r.tpm2b("unique", MAX_RSA_KEY)
        r.done()
        return Public(kind, name_alg, attributes, policy, symmetric, scheme, bytes(data), bits, exponent, modulus)
    curve = r.u16("curveID")
    kdf = _read_scheme(r, "kdf")
    x, y = r.tpm2b("unique.x", MAX_ECC_PARAMETER), r.tpm2b("unique.y", MAX_ECC_PARAMETER)
    r.done()
    return Public(kind, name_alg, attributes, policy, symmetric, scheme, bytes(data), curve=curve, kdf=kdf, x=x, y=y)


def parse_public(data: bytes) -> Public:
    """A TPM2B_PUBLIC as ``tpm2_createak -u``/``tpm2_readpublic -o`` write it."""
    _bounded(data, MAX_PUBLIC + 2, "TPM2B_PUBLIC")
    r = _Reader(data, "TPM2B_PUBLIC")
    inner = r.tpm2b("publicArea", MAX_PUBLIC)
    r.done()
    return parse_tpmt_public(inner)


# --- MakeCredential outputs -------------------------------------------------------------------------


def encode_id_object(integrity_hmac: bytes, enc_identity: bytes) -> bytes:
    """TPM2B_ID_OBJECT: size || TPM2B_DIGEST(integrityHMAC) || encIdentity (already CFB-encrypted)."""
    body = _tpm2b(integrity_hmac, MAX_DIGEST, "integrityHMAC") + enc_identity
    return _tpm2b(body, MAX_ID_OBJECT, "TPM2B_ID_OBJECT")


def encode_encrypted_secret(secret: bytes) -> bytes:
    """TPM2B_ENCRYPTED_SECRET around an RSA-OAEP ciphertext or a TPMS_ECC_POINT."""
    return _tpm2b(secret, MAX_ENCRYPTED_SECRET, "TPM2B_ENCRYPTED_SECRET")


def encode_ecc_point(x: bytes, y: bytes) -> bytes:
    return _tpm2b(x, MAX_ECC_PARAMETER, "x") + _tpm2b(y, MAX_ECC_PARAMETER, "y")


def encode_credential_file(id_object: bytes, encrypted_secret: bytes) -> bytes:
    """The tpm2-tools credential file: magic 0xBADCC0DE, version 1, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET."""
    return struct.pack(">II", CREDENTIAL_MAGIC, CREDENTIAL_VERSION) + id_object + encrypted_secret


@dataclass(frozen=True)
class CredentialFile:
    integrity_hmac: bytes
    enc_identity: bytes
    encrypted_secret: bytes


def parse_credential_file(data: bytes) -> CredentialFile:
    """The inverse of :func:`encode_credential_file` (``tpm2_makecredential -o`` output)."""
    _bounded(data, 8 + 2 + MAX_ID_OBJECT + 2 + MAX_ENCRYPTED_SECRET, "credential file")
    r = _Reader(data, "credential file")
    if r.u32("magic") != CREDENTIAL_MAGIC:
        raise Tpm2FormatError("credential file: magic is not 0xBADCC0DE")
    if r.u32("version") != CREDENTIAL_VERSION:
        raise Tpm2FormatError("credential file: version is not 1")
    inner = _Reader(r.tpm2b("TPM2B_ID_OBJECT", MAX_ID_OBJECT), "TPM2B_ID_OBJECT")
    hmac_value = inner.tpm2b("integrityHMAC", MAX_DIGEST)
    enc_identity = inner.rest()
    secret = r.tpm2b("TPM2B_ENCRYPTED_SECRET", MAX_ENCRYPTED_SECRET)
    r.done()
    return CredentialFile(hmac_value, enc_identity, secret)
