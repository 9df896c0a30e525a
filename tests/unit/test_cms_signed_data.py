"""The CMS SignedData codec (keysteward.formats.cms_signed_data): it reads what asn1crypto's spec layer reads,
from DER and BER; malformed input is a CmsError (never another exception, never with content bytes in it)."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from asn1crypto import cms, core, parser
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from hypothesis import given, settings
from hypothesis import strategies as st

from keysteward.formats.cms_signed_data import (
    CONTENT_TYPE,
    DATA,
    MAX_ELEMENTS,
    MAX_OCTET_STRING_DEPTH,
    MESSAGE_DIGEST,
    SIGNED_DATA,
    CmsError,
    NotSignedData,
    SignedData,
    oid,
    parse_signed_data,
)
from tests.support.fuzz import edits as fuzz_edits
from tests.support.fuzz import mutate
from tests.support.identity import Signer

pytestmark = pytest.mark.unit

FUZZ = settings(max_examples=150, deadline=None)
MARKER = "SECRETMARKER"
DOCUMENT = f'{{"instanceId": "i-0123456789abcdef0", "note": "{MARKER}", "pad": "{"x" * 200}"}}'.encode()
SHA256 = oid("2.16.840.1.101.3.4.2.1")
RSA = oid("1.2.840.113549.1.1.1")
SHAPES = [
    (detached, certs, attributes)
    for detached in (False, True)
    for certs in (False, True)
    for attributes in (True, False)
]


# --- encoding helpers (DER by hand, BER by re-wrapping) -----------------------------------------------


def tlv(ident: int, *parts: bytes) -> bytes:
    """A definite-length element (DER length form)."""
    contents = b"".join(parts)
    n = len(contents)
    if n < 0x80:
        return bytes([ident, n]) + contents
    width = (n.bit_length() + 7) // 8
    return bytes([ident, 0x80 | width]) + n.to_bytes(width) + contents


def indefinite(ident: int, *parts: bytes) -> bytes:
    return bytes([ident, 0x80]) + b"".join(parts) + b"\x00\x00"


def elements(contents: bytes) -> list[bytes]:
    out = []
    while contents:
        n = parser.peek(contents)
        out.append(contents[:n])
        contents = contents[n:]
    return out


def inner(element: bytes) -> bytes:
    return bytes(parser.parse(element, strict=True)[4])


def ber(der: bytes) -> bytes:
    """``der`` with ContentInfo, its [0], SignedData, encapContentInfo and eContent [0] re-encoded with
    indefinite lengths, and the content as a constructed (indefinite) OCTET STRING of two chunks."""
    content_type, explicit = elements(inner(der))
    (signed_data,) = elements(inner(explicit))
    version, digests, encap, *rest = elements(inner(signed_data))
    e_type, *e_content = elements(inner(encap))
    if e_content:
        data = inner(inner(e_content[0]))
        chunks = indefinite(0x24, tlv(0x04, data[:10]), tlv(0x04, data[10:]))
        e_content = [indefinite(0xA0, chunks)]
    signed = indefinite(0x30, version, digests, indefinite(0x30, e_type, *e_content), *rest)
    return indefinite(0x30, content_type, indefinite(0xA0, signed))


def bump_length(data: bytes, at: int, by: int = 1) -> bytes:
    """``data`` with the definite length of the element whose header starts at ``at`` made ``by`` larger."""
    first = data[at + 1]
    if first < 0x80:
        assert first + by < 0x80
        return data[: at + 1] + bytes([first + by]) + data[at + 2 :]
    width = first & 0x7F
    n = int.from_bytes(data[at + 2 : at + 2 + width]) + by
    return data[: at + 2] + n.to_bytes(width) + data[at + 2 + width :]


def last_child_offsets(data: bytes, depth: int) -> list[int]:
    """Header offsets of the outer element, its last child, that one's last child, ... (``depth`` of them)."""
    offsets, pos, element = [0], 0, data
    for _ in range(depth - 1):
        _, _, _, header, contents, _ = parser.parse(element, strict=True)
        last = elements(contents)[-1]
        pos += len(header) + len(contents) - len(last)
        offsets.append(pos)
        element = last
    return offsets


def oid_tlv(dotted: str) -> bytes:
    return tlv(0x06, oid(dotted))


EXTRA = tlv(0x02, b"\x07")
DATA_OID = oid_tlv("1.2.840.113549.1.7.1")
ALG_SHA256 = tlv(0x30, oid_tlv("2.16.840.1.101.3.4.2.1"), b"\x05\x00")
ALG_RSA = tlv(0x30, oid_tlv("1.2.840.113549.1.1.1"), b"\x05\x00")
ISSUER_AND_SERIAL = tlv(0x30, tlv(0x30), tlv(0x02, b"\x01"))
ATTRIBUTES = tlv(0x30, oid_tlv("1.2.840.113549.1.9.3"), tlv(0x31, DATA_OID))


def signer_info(
    *,
    sid: bytes = ISSUER_AND_SERIAL,
    digest: bytes = ALG_SHA256,
    attrs: bytes | None = None,
    signature: bytes = tlv(0x04, b"sig"),
    after: bytes = b"",
) -> bytes:
    return tlv(0x30, tlv(0x02, b"\x01"), sid, digest, attrs or b"", ALG_RSA, signature, after)


def content_info(
    *,
    encap: bytes | None = None,
    signers: bytes | None = None,
    middle: bytes = b"",
    sd_after: bytes = b"",
    explicit_after: bytes = b"",
    ci_after: bytes = b"",
) -> bytes:
    """A hand-made ContentInfo; ``middle`` goes between encapContentInfo and signerInfos (certificates, crls)."""
    encap = encap or tlv(0x30, DATA_OID, tlv(0xA0, tlv(0x04, b"hello")))
    signers = signers or tlv(0x31, signer_info())
    sd = tlv(0x30, tlv(0x02, b"\x01"), tlv(0x31, ALG_SHA256), encap, middle, signers, sd_after)
    return tlv(0x30, oid_tlv("1.2.840.113549.1.7.2"), tlv(0xA0, sd, explicit_after), ci_after)


# --- the reference: asn1crypto's spec layer ------------------------------------------------------------


def dotted(contents: bytes) -> str:
    return str(core.ObjectIdentifier.load(tlv(0x06, contents)).dotted)


def raw(value: Any) -> tuple[int, int, int, bytes]:
    value = value.chosen if isinstance(value, core.Choice) else value
    return value.class_, value.method, value.tag, value.contents


def reference(data: bytes, *, values: bool = True) -> dict[str, Any]:
    sd = cms.ContentInfo.load(data, strict=True)["content"]
    encap = sd["encap_content_info"]
    signers = []
    for si in sd["signer_infos"]:
        attrs = si["signed_attrs"]
        absent = isinstance(attrs, core.Void)
        signers.append(
            {
                "digest": si["digest_algorithm"]["algorithm"].dotted,
                "signature_algorithm": si["signature_algorithm"]["algorithm"].dotted,
                "signature": si["signature"].native,
                "signed_bytes": None if absent else b"\x31" + attrs.dump()[1:],
                "attributes": None
                if absent or not values
                else [(a["type"].dotted, [raw(v) for v in a["values"]]) for a in attrs],
            }
        )
    content = encap["content"]
    return {
        "content_type": encap["content_type"].dotted,
        "content": None if isinstance(content, core.Void) else content.native,
        "digests": [a["algorithm"].dotted for a in sd["digest_algorithms"]],
        "signers": signers,
    }


def ours(sd: SignedData, *, values: bool = True) -> dict[str, Any]:
    signers = []
    for si in sd.signer_infos:
        attrs = si.signed_attributes
        signers.append(
            {
                "digest": dotted(si.digest_algorithm),
                "signature_algorithm": dotted(si.signature_algorithm),
                "signature": si.signature,
                "signed_bytes": None if attrs is None else attrs.signed_bytes,
                "attributes": None
                if attrs is None or not values
                else [(dotted(t), list(vs)) for t, vs in attrs.attributes],
            }
        )
    return {
        "content_type": dotted(sd.content_type),
        "content": sd.content,
        "digests": [dotted(d) for d in sd.digest_algorithms],
        "signers": signers,
    }


def shape_name(detached: bool, certs: bool, attributes: bool) -> str:
    return "-".join(
        ("detached" if detached else "attached", "certs" if certs else "nocerts", "attrs" if attributes else "noattrs")
    )


def sign(signer: Signer, *, detached: bool, certs: bool, attributes: bool) -> bytes:
    options = [pkcs7.PKCS7Options.Binary]
    options += [] if certs else [pkcs7.PKCS7Options.NoCerts]
    options += [pkcs7.PKCS7Options.DetachedSignature] if detached else []
    options += [] if attributes else [pkcs7.PKCS7Options.NoAttributes]
    return (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(DOCUMENT)
        .add_signer(signer.cert, signer.key, hashes.SHA256(), rsa_padding=padding.PKCS1v15())
        .sign(serialization.Encoding.DER, options)
    )


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.make("cms codec test")


@pytest.fixture(scope="module")
def samples(signer: Signer) -> dict[str, bytes]:
    out = {}
    for detached, certs, attributes in SHAPES:
        der = sign(signer, detached=detached, certs=certs, attributes=attributes)
        name = shape_name(detached, certs, attributes)
        out[f"der-{name}"] = der
        out[f"ber-{name}"] = ber(der)
    return out


def rejected(data: bytes) -> CmsError:
    with pytest.raises(CmsError) as info:
        parse_signed_data(data)
    assert MARKER not in str(info.value)
    return info.value


# --- what the codec reads -----------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["der", "ber"])
@pytest.mark.parametrize(("detached", "certs", "attributes"), SHAPES, ids=str)
def test_reads_what_asn1crypto_reads(
    samples: dict[str, bytes], signer: Signer, encoding: str, detached: bool, certs: bool, attributes: bool
) -> None:
    name = shape_name(detached, certs, attributes)
    data = samples[f"{encoding}-{name}"]
    if encoding == "ber":
        assert data[1] == 0x80 and data != samples[f"der-{name}"]
    sd = parse_signed_data(data)
    assert ours(sd) == reference(data)
    # and what it reads is right, not only the same
    assert sd.content_type == DATA and sd.digest_algorithms == (SHA256,)
    assert sd.content == (None if detached else DOCUMENT)
    (si,) = sd.signer_infos
    assert si.digest_algorithm == SHA256 and si.signature_algorithm == RSA
    attrs = si.signed_attributes
    assert (attrs is not None) == attributes
    signed = DOCUMENT if attrs is None else attrs.signed_bytes
    key = signer.cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    key.verify(si.signature, signed, padding.PKCS1v15(), hashes.SHA256())  # raises if signed is not what was signed
    if attrs is not None:
        found = dict(attrs.attributes)
        assert found[CONTENT_TYPE] == ((0, 0, 6, DATA),)
        assert found[MESSAGE_DIGEST] == ((0, 0, 4, hashlib.sha256(DOCUMENT).digest()),)


def test_hand_made_shapes() -> None:
    skid = signer_info(sid=tlv(0x80, b"key id"), attrs=tlv(0xA0, ATTRIBUTES), after=tlv(0xA1, ATTRIBUTES))
    params = signer_info(digest=tlv(0x30, oid_tlv("2.16.840.1.101.3.4.2.1")), signature=tlv(0x04, b"s"))
    odd_params = signer_info(digest=tlv(0x30, oid_tlv("2.16.840.1.101.3.4.2.1"), tlv(0x30, tlv(0x02, b"\x05"))))
    middle = tlv(0xA0, tlv(0x30, b"not a certificate")) + tlv(0xA1, b"\x05\x00")
    data = content_info(signers=tlv(0x31, skid, params, odd_params), middle=middle)
    sd = parse_signed_data(data)
    assert ours(sd) == reference(data)
    assert sd.content == b"hello" and [si.signature for si in sd.signer_infos] == [b"sig", b"s", b"sig"]
    attrs = sd.signer_infos[0].signed_attributes
    assert attrs is not None and attrs.signed_bytes == tlv(0x31, ATTRIBUTES)
    assert attrs.attributes == ((CONTENT_TYPE, ((0, 0, 6, DATA),)),)
    assert [si.digest_algorithm for si in sd.signer_infos] == [SHA256] * 3
    assert parse_signed_data(content_info(signers=tlv(0x31))).signer_infos == ()


def test_wide_sets() -> None:
    many = content_info(signers=tlv(0x31, *[signer_info()] * 300))
    assert len(parse_signed_data(many).signer_infos) == 300

    def values(n: int) -> bytes:
        return content_info(
            signers=tlv(0x31, signer_info(attrs=tlv(0xA0, tlv(0x30, DATA_OID, tlv(0x31, *[EXTRA] * n)))))
        )

    (si,) = parse_signed_data(values(MAX_ELEMENTS)).signer_infos
    assert si.signed_attributes is not None
    assert si.signed_attributes.attributes == ((DATA, ((0, 0, 2, b"\x07"),) * MAX_ELEMENTS),)
    assert "more than" in str(rejected(values(MAX_ELEMENTS + 1)))
    chunks = tlv(0x24, *[tlv(0x04, b"c")] * (MAX_ELEMENTS + 1))
    assert "more than" in str(rejected(content_info(encap=tlv(0x30, DATA_OID, tlv(0xA0, chunks)))))


def test_octet_string_nesting_bound() -> None:
    def nested(levels: int) -> bytes:
        value = tlv(0x04, b"deep")
        for _ in range(levels):
            value = tlv(0x24, value, tlv(0x04, b"!"))
        return content_info(encap=tlv(0x30, DATA_OID, tlv(0xA0, value)))

    assert parse_signed_data(nested(MAX_OCTET_STRING_DEPTH)).content == b"deep" + b"!" * MAX_OCTET_STRING_DEPTH
    assert "nested too deep" in str(rejected(nested(MAX_OCTET_STRING_DEPTH + 1)))
    assert "nested too deep" in str(rejected(nested(1000)))


# --- what it refuses ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["der-attached-certs-attrs", "ber-attached-nocerts-attrs", "der-detached-nocerts-noattrs"]
)
def test_truncated_at_every_length(samples: dict[str, bytes], name: str) -> None:
    data = samples[name]
    for cut in range(len(data)):
        rejected(data[:cut])


@pytest.mark.parametrize("name", ["der-attached-certs-attrs", "ber-attached-nocerts-attrs"])
def test_each_byte_flipped(samples: dict[str, bytes], name: str) -> None:
    """A flip is refused, or it is in bytes the codec hands on (content, signature, a value): then the codec
    still reads what asn1crypto reads."""
    data = samples[name]
    refused = 0
    for pos in range(0, len(data), 3):
        flipped = data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1 :]
        try:
            sd = parse_signed_data(flipped)
        except CmsError as exc:
            assert MARKER not in str(exc)
            refused += 1
            continue
        assert ours(sd, values=False) == reference(flipped, values=False)
    assert refused > 10


def test_lengths_past_the_end(samples: dict[str, bytes]) -> None:
    data = samples["der-attached-nocerts-attrs"]
    # ContentInfo, its [0], SignedData, signerInfos, the SignerInfo, its signature: each the last of its parent
    offsets = last_child_offsets(data, 6)
    assert data[offsets[-1]] == 0x04
    for at in offsets:
        for by in (1, 2, 200):
            rejected(bump_length(data, at, by))


def test_huge_declared_lengths(samples: dict[str, bytes]) -> None:
    data = samples["der-attached-nocerts-attrs"]
    assert data[1] == 0x82
    rejected(b"\x30\x84\xff\xff\xff\xff" + data[4:])
    rejected(b"\x30\xff" + b"\xff" * 127 + data[4:])
    signature_at = last_child_offsets(data, 6)[-1]
    rejected(bump_length(data, signature_at, 0xFFFF - int.from_bytes(data[signature_at + 2 : signature_at + 4])))
    rejected(content_info(encap=tlv(0x30, DATA_OID, b"\xa0\x88" + b"\xff" * 8)))


def test_wrong_outer_tag(samples: dict[str, bytes]) -> None:
    data = samples["der-attached-nocerts-attrs"]
    for ident in (0x31, 0x10, 0xA0, 0x00, 0x1F):
        rejected(bytes([ident]) + data[1:])
    with pytest.raises(NotSignedData):
        parse_signed_data(cms.ContentInfo({"content_type": "data", "content": b"x"}).dump())
    assert SIGNED_DATA == cms.ContentType("signed_data").contents


def test_trailing_bytes(samples: dict[str, bytes]) -> None:
    for data in (samples["der-attached-nocerts-attrs"], samples["ber-attached-certs-attrs"]):
        for extra in (b"\x00", b"\x00\x00", b"\x05\x00"):
            rejected(data + extra)


@pytest.mark.parametrize(
    ("where", "data"),
    [
        ("ContentInfo", content_info(ci_after=EXTRA)),
        ("SignedData", content_info(explicit_after=EXTRA)),
        ("SignedData", content_info(sd_after=EXTRA)),
        ("eContent", content_info(encap=tlv(0x30, DATA_OID, tlv(0xA0, tlv(0x04), EXTRA)))),
        ("encapContentInfo", content_info(encap=tlv(0x30, DATA_OID, tlv(0xA0, tlv(0x04)), EXTRA))),
        ("SignerInfo", content_info(signers=tlv(0x31, signer_info(after=EXTRA)))),
        ("SignerInfo", content_info(signers=tlv(0x31, signer_info(after=tlv(0xA1) + EXTRA)))),
        (
            "AlgorithmIdentifier",
            content_info(signers=tlv(0x31, signer_info(digest=tlv(0x30, *elements(inner(ALG_SHA256)), EXTRA)))),
        ),
        (
            "Attribute",
            content_info(
                signers=tlv(0x31, signer_info(attrs=tlv(0xA0, tlv(0x30, *elements(inner(ATTRIBUTES)), EXTRA))))
            ),
        ),
    ],
)
def test_trailing_elements_inside(where: str, data: bytes) -> None:
    assert str(rejected(data)).startswith(where)


@pytest.mark.parametrize(
    ("where", "data"),
    [
        ("ContentInfo contentType", tlv(0x30, tlv(0x04, SIGNED_DATA), tlv(0xA0))),
        ("ContentInfo content", tlv(0x30, oid_tlv("1.2.840.113549.1.7.2"), tlv(0x80, b"x"))),
        ("SignedData", tlv(0x30, oid_tlv("1.2.840.113549.1.7.2"), tlv(0xA0, tlv(0x31)))),
        ("SignedData version", content_info().replace(b"\x02\x01\x01\x31", b"\x04\x01\x01\x31", 1)),
        ("SignedData digestAlgorithms", content_info().replace(tlv(0x31, ALG_SHA256), tlv(0x30, ALG_SHA256), 1)),
        (
            "digestAlgorithms",
            content_info().replace(tlv(0x31, ALG_SHA256), tlv(0x31, tlv(0x31, *elements(inner(ALG_SHA256)))), 1),
        ),
        ("encapContentInfo eContentType", content_info(encap=tlv(0x30, tlv(0x04, DATA)))),
        ("encapContentInfo eContent", content_info(encap=tlv(0x30, DATA_OID, tlv(0xA1, tlv(0x04))))),
        ("encapContentInfo eContent", content_info(encap=tlv(0x30, DATA_OID, tlv(0x80, b"hello")))),
        ("eContent", content_info(encap=tlv(0x30, DATA_OID, tlv(0xA0, tlv(0x0C, b"hello"))))),
        ("eContent", content_info(encap=tlv(0x30, DATA_OID, tlv(0xA0, tlv(0x24, tlv(0x0C, b"hello")))))),
        ("SignedData signerInfos", content_info(middle=tlv(0xA2))),
        ("SignedData signerInfos", content_info(middle=tlv(0xA1) + tlv(0xA0))),
        ("signerInfos", content_info(signers=tlv(0x31, tlv(0x31, *elements(inner(signer_info())))))),
        ("SignerInfo version", content_info(signers=tlv(0x31, signer_info()[:2] + b"\x0a" + signer_info()[3:]))),
        ("SignerInfo: sid", content_info(signers=tlv(0x31, signer_info(sid=tlv(0xA0, tlv(0x04, b"id")))))),
        ("SignerInfo: sid", content_info(signers=tlv(0x31, signer_info(sid=tlv(0x31))))),
        ("SignerInfo digestAlgorithm", content_info(signers=tlv(0x31, signer_info(digest=tlv(0x31))))),
        ("SignerInfo signatureAlgorithm", content_info(signers=tlv(0x31, signer_info(attrs=tlv(0xA1, ATTRIBUTES))))),
        ("AlgorithmIdentifier algorithm", content_info(signers=tlv(0x31, signer_info(digest=tlv(0x30, b"\x05\x00"))))),
        ("SignerInfo signature", content_info(signers=tlv(0x31, signer_info(signature=tlv(0x03, b"\x00s"))))),
        (
            "SignerInfo signature",
            content_info(signers=tlv(0x31, signer_info(signature=tlv(0x24, tlv(0x04, b"s"))))),
        ),
        ("SignerInfo unsignedAttrs", content_info(signers=tlv(0x31, signer_info(after=tlv(0xA0))))),
        (
            "signedAttrs",
            content_info(signers=tlv(0x31, signer_info(attrs=tlv(0xA0, tlv(0x31, *elements(inner(ATTRIBUTES))))))),
        ),
        (
            "Attribute attrType",
            content_info(signers=tlv(0x31, signer_info(attrs=tlv(0xA0, tlv(0x30, DATA, tlv(0x31)))))),
        ),
        (
            "Attribute attrValues",
            content_info(signers=tlv(0x31, signer_info(attrs=tlv(0xA0, tlv(0x30, DATA_OID, tlv(0x30)))))),
        ),
        ("Attribute attrValues", content_info(signers=tlv(0x31, signer_info(attrs=tlv(0xA0, tlv(0x30, DATA_OID)))))),
    ],
)
def test_wrong_tags(where: str, data: bytes) -> None:
    assert str(rejected(data)).startswith(where)


def test_indefinite_length_signed_attributes_are_refused() -> None:
    definite = content_info(signers=tlv(0x31, signer_info(attrs=tlv(0xA0, ATTRIBUTES))))
    assert parse_signed_data(definite).signer_infos[0].signed_attributes is not None
    data = content_info(signers=tlv(0x31, signer_info(attrs=indefinite(0xA0, ATTRIBUTES))))
    assert "indefinite length" in str(rejected(data))


def test_nesting_bombs() -> None:
    bomb = b"\x24\x80" * 2000 + tlv(0x04, b"x") + b"\x00\x00" * 2000
    rejected(content_info(encap=tlv(0x30, DATA_OID, tlv(0xA0, bomb))))
    rejected(content_info(encap=tlv(0x30, DATA_OID, indefinite(0xA0, bomb))))
    rejected(b"\x30\x80" * 5000 + b"\x00\x00" * 5000)
    rejected(content_info(middle=b"\xa0\x80" + b"\x30\x80" * 3000 + b"\x00\x00" * 3001))


@pytest.mark.parametrize(
    "data", [b"", b"\x30", b"\x30\x00", b"\x30\x80", b"\x30\x80\x00\x00", b"\x00\x00", b"\xff" * 40]
)
def test_garbage(data: bytes) -> None:
    rejected(data)


# --- bounded fuzzing ----------------------------------------------------------------------------------


@FUZZ
@given(which=st.integers(0, 2 * len(SHAPES) - 1), edits=fuzz_edits(max_size=4))
def test_fuzz_damaged_samples(samples: dict[str, bytes], which: int, edits: list[tuple[int, int, int]]) -> None:
    data = mutate(sorted(samples.values())[which], edits)
    try:
        sd = parse_signed_data(data)
    except CmsError as exc:
        assert MARKER not in str(exc)
        return
    assert isinstance(sd, SignedData)
    assert all(isinstance(si.signature, bytes) for si in sd.signer_infos)


@FUZZ
@given(data=st.binary(max_size=200), prefix=st.sampled_from([b"", b"\x30\x80\x06\x09" + SIGNED_DATA + b"\xa0\x80"]))
def test_fuzz_random_bytes(data: bytes, prefix: bytes) -> None:
    try:
        sd = parse_signed_data(prefix + data)
    except CmsError:
        return
    assert isinstance(sd, SignedData)
