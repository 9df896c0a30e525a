"""A CMS ContentInfo holding a SignedData (RFC 5652 sections 3, 5), read by a narrow, strict walk.

Only asn1crypto's low-level BER/DER parser (:mod:`asn1crypto.parser`) is used, not its spec layer, which
costs several times more. The walk checks each element's identifier octet (class, constructed-ness and
tag) exactly and refuses anything left over inside a structure, truncation and lengths past the end::

    ContentInfo       SEQUENCE { contentType OID (signedData), content [0] EXPLICIT SignedData }
    SignedData        SEQUENCE { version INTEGER, digestAlgorithms SET OF AlgorithmIdentifier,
                                 encapContentInfo SEQUENCE { eContentType OID,
                                                             eContent [0] EXPLICIT OCTET STRING OPTIONAL },
                                 certificates [0] IMPLICIT OPTIONAL, crls [1] IMPLICIT OPTIONAL (stepped over),
                                 signerInfos SET OF SignerInfo }
    SignerInfo        SEQUENCE { version INTEGER, sid IssuerAndSerialNumber SEQUENCE | [0] IMPLICIT OCTET STRING,
                                 digestAlgorithm AlgorithmIdentifier, signedAttrs [0] IMPLICIT SET OF Attribute
                                 OPTIONAL, signatureAlgorithm AlgorithmIdentifier, signature OCTET STRING,
                                 unsignedAttrs [1] IMPLICIT OPTIONAL (stepped over) }
    AlgorithmIdentifier SEQUENCE { algorithm OID, parameters ANY OPTIONAL (one element of any kind) }
    Attribute         SEQUENCE { attrType OID, attrValues SET OF ANY }

BER is accepted (indefinite lengths; the eContent OCTET STRING may be constructed, its chunks concatenated up
to :data:`MAX_OCTET_STRING_DEPTH` levels deep) except for the signed attributes, whose received encoding is
what the signature covers (section 5.4) and must have a definite length. A SET OF or constructed OCTET STRING
may hold at most :data:`MAX_ELEMENTS` elements. OIDs are kept as the contents
bytes of their DER encoding; compare them with :func:`oid`. No signature is verified here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from asn1crypto import core, parser

MAX_OCTET_STRING_DEPTH: Final = 8
MAX_ELEMENTS: Final = 1024  # in one SET OF or constructed OCTET STRING (splitting them costs quadratic copying)

_INTEGER: Final = 0x02
_OCTET_STRING: Final = 0x04
_OID: Final = 0x06
_SEQUENCE: Final = 0x30
_SET: Final = 0x31
_CONSTRUCTED_OCTET_STRING: Final = 0x24
_CONTEXT_0: Final = 0xA0  # [0], constructed
_CONTEXT_1: Final = 0xA1  # [1], constructed
_CONTEXT_0_PRIMITIVE: Final = 0x80  # [0] IMPLICIT OCTET STRING (subjectKeyIdentifier)
_NULL: Final = b"\x05\x00"

# (class, constructed, tag, header, contents, trailer) as asn1crypto.parser.parse returns it
_Element = tuple[int, int, int, bytes, bytes, bytes]


class CmsError(ValueError):
    """The bytes are not a well-formed ContentInfo holding a SignedData."""


class NotSignedData(CmsError):
    """A well-formed ContentInfo start, but of another content type than SignedData."""


def oid(dotted: str) -> bytes:
    """The contents bytes of the DER encoding of an OBJECT IDENTIFIER, the form OIDs take here."""
    return bytes(core.ObjectIdentifier(dotted).contents)


SIGNED_DATA: Final = oid("1.2.840.113549.1.7.2")
DATA: Final = oid("1.2.840.113549.1.7.1")
CONTENT_TYPE: Final = oid("1.2.840.113549.1.9.3")
MESSAGE_DIGEST: Final = oid("1.2.840.113549.1.9.4")


RawValue = tuple[int, int, int, bytes]  # an attribute value: class (0 universal), constructed (0/1), tag, contents


@dataclass(frozen=True, slots=True)
class SignedAttributes:
    signed_bytes: bytes  # what the signature covers: the received encoding with the SET tag 0x31 for [0]
    attributes: tuple[tuple[bytes, tuple[RawValue, ...]], ...]  # (attrType, attrValues) in received order


@dataclass(frozen=True, slots=True)
class SignerInfo:
    digest_algorithm: bytes
    signature_algorithm: bytes
    signature: bytes
    signed_attributes: SignedAttributes | None


@dataclass(frozen=True, slots=True)
class SignedData:
    content_type: bytes  # eContentType
    content: bytes | None  # eContent, None when the content is detached
    digest_algorithms: tuple[bytes, ...]
    signer_infos: tuple[SignerInfo, ...]


def parse_signed_data(data: bytes) -> SignedData:
    """Read a ContentInfo holding a SignedData.

    Raises :class:`CmsError` (:class:`NotSignedData` for another content type) whose message names the
    structure and never holds content bytes; a ``data`` that is not ``bytes`` is a TypeError.
    """
    content_type, rest = _take(_whole(data, _SEQUENCE, "ContentInfo"), _OID, "ContentInfo contentType")
    if content_type != SIGNED_DATA:
        raise NotSignedData("ContentInfo: the content type is not SignedData")
    sd = _whole(_whole(rest, _CONTEXT_0, "ContentInfo content"), _SEQUENCE, "SignedData")
    _, rest = _take(sd, _INTEGER, "SignedData version")
    digest_algorithms, rest = _take(rest, _SET, "SignedData digestAlgorithms")
    encap, rest = _take(rest, _SEQUENCE, "SignedData encapContentInfo")
    _, rest = _take_if(rest, _CONTEXT_0, "SignedData certificates")
    _, rest = _take_if(rest, _CONTEXT_1, "SignedData crls")
    signer_infos = _whole(rest, _SET, "SignedData signerInfos")
    content_type, rest = _take(encap, _OID, "encapContentInfo eContentType")
    content = None
    if rest:
        content = _octets(_parse(_whole(rest, _CONTEXT_0, "encapContentInfo eContent"), "eContent"), "eContent")
    return SignedData(
        content_type,
        content,
        tuple([_algorithm(a[4]) for a in _elements(digest_algorithms, _SEQUENCE, "digestAlgorithms")]),
        tuple([_signer_info(si[4]) for si in _elements(signer_infos, _SEQUENCE, "signerInfos")]),
    )


def _signer_info(si: bytes) -> SignerInfo:
    _, rest = _take(si, _INTEGER, "SignerInfo version")
    sid, rest = _next(rest, "SignerInfo sid")
    if sid[3][0] not in (_SEQUENCE, _CONTEXT_0_PRIMITIVE):  # IssuerAndSerialNumber, [0] subjectKeyIdentifier
        raise CmsError("SignerInfo: sid is neither an IssuerAndSerialNumber nor a subjectKeyIdentifier")
    digest_algorithm, rest = _take(rest, _SEQUENCE, "SignerInfo digestAlgorithm")
    attrs, rest = _take_if(rest, _CONTEXT_0, "SignerInfo signedAttrs")
    signature_algorithm, rest = _take(rest, _SEQUENCE, "SignerInfo signatureAlgorithm")
    signature, rest = _take(rest, _OCTET_STRING, "SignerInfo signature")
    if rest:
        _whole(rest, _CONTEXT_1, "SignerInfo unsignedAttrs")
    return SignerInfo(
        _algorithm(digest_algorithm),
        _algorithm(signature_algorithm),
        signature,
        None if attrs is None else _signed_attributes(attrs),
    )


def _signed_attributes(attrs: _Element) -> SignedAttributes:
    _, _, _, header, contents, trailer = attrs
    if trailer:
        raise CmsError("SignerInfo: the signed attributes have an indefinite length")
    attributes = []
    for attribute in _elements(contents, _SEQUENCE, "signedAttrs"):
        attr_type, rest = _take(attribute[4], _OID, "Attribute attrType")
        values = _elements(_whole(rest, _SET, "Attribute attrValues"), None, "attrValues")
        attributes.append((attr_type, tuple([(v[0], v[1], v[2], v[4]) for v in values])))
    return SignedAttributes(b"\x31" + header[1:] + contents, tuple(attributes))


def _algorithm(contents: bytes) -> bytes:
    """The algorithm OID of an AlgorithmIdentifier; the parameters (absent, NULL or anything) are not looked at."""
    algorithm, rest = _take(contents, _OID, "AlgorithmIdentifier algorithm")
    if rest and rest != _NULL:
        _parse(rest, "AlgorithmIdentifier parameters")
    return algorithm


def _octets(element: _Element, what: str, depth: int = 0) -> bytes:
    """The bytes of an OCTET STRING, primitive or constructed (BER: chunks, possibly constructed)."""
    ident = element[3][0]
    if ident == _OCTET_STRING:
        return element[4]
    if ident != _CONSTRUCTED_OCTET_STRING:
        raise CmsError(f"{what}: not an OCTET STRING")
    if depth >= MAX_OCTET_STRING_DEPTH:
        raise CmsError(f"{what}: constructed OCTET STRING nested too deep")
    return b"".join([_octets(chunk, what, depth + 1) for chunk in _elements(element[4], None, what)])


def _whole(data: bytes, ident: int, what: str) -> bytes:
    """The contents of the one element ``data`` must be exactly, with identifier octet ``ident``."""
    element = _parse(data, what)
    if element[3][0] != ident:
        raise CmsError(f"{what}: wrong tag")
    return element[4]


def _take(data: bytes, ident: int, what: str) -> tuple[bytes, bytes]:
    """The contents of the first element of ``data``, which must have identifier octet ``ident``, and the rest."""
    try:
        _, _, _, header, contents, trailer = parser.parse(data)
    except ValueError as exc:  # truncated, a length past the end, indefinite lengths nested too deep
        raise CmsError(f"{what}: {exc}") from exc
    if header[0] != ident:
        raise CmsError(f"{what}: wrong tag")
    return contents, data[len(header) + len(contents) + len(trailer) :]


def _take_if(data: bytes, ident: int, what: str) -> tuple[_Element | None, bytes]:
    """The first element of ``data`` and the rest if it has identifier octet ``ident``, else None and ``data``."""
    if not data or data[0] != ident:
        return None, data
    return _next(data, what)


def _elements(data: bytes, ident: int | None, what: str) -> list[_Element]:
    """The elements ``data`` is a concatenation of, each with identifier octet ``ident`` (None: any)."""
    elements: list[_Element] = []
    while data:
        if len(elements) == MAX_ELEMENTS:
            raise CmsError(f"{what}: more than {MAX_ELEMENTS} elements")
        try:
            element = parser.parse(data)
        except ValueError as exc:
            raise CmsError(f"{what}: {exc}") from exc
        if ident is not None and element[3][0] != ident:
            raise CmsError(f"{what}: an element has the wrong tag")
        elements.append(element)
        data = data[len(element[3]) + len(element[4]) + len(element[5]) :]
    return elements


def _next(data: bytes, what: str) -> tuple[_Element, bytes]:
    """The first element of ``data`` and the bytes after it."""
    try:
        element = parser.parse(data)
    except ValueError as exc:  # truncated, a length past the end, indefinite lengths nested too deep
        raise CmsError(f"{what}: {exc}") from exc
    return element, data[len(element[3]) + len(element[4]) + len(element[5]) :]


def _parse(data: bytes, what: str) -> _Element:
    """The one element ``data`` must be exactly."""
    try:
        return parser.parse(data, strict=True)  # type: ignore[no-any-return]
    except ValueError as exc:  # as above, or trailing data
        raise CmsError(f"{what}: {exc}") from exc
