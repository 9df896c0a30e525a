"""Who a proxy client is: the names its verified certificate carries, which the export policy names."""

from __future__ import annotations

from collections.abc import Mapping


def peer_names(cert: Mapping[str, object] | None) -> frozenset[str]:
    """The names a verified peer certificate (``SSLObject.getpeercert()``) carries: subject common names,
    DNS names and URIs of its subject alternative names. Empty for no certificate."""
    if not cert:
        return frozenset()
    names: set[str] = set()
    subject = cert.get("subject", ())
    for rdn in subject if isinstance(subject, tuple) else ():
        for attribute in rdn if isinstance(rdn, tuple) else ():
            if isinstance(attribute, tuple) and len(attribute) == 2 and attribute[0] == "commonName":
                names.add(str(attribute[1]))
    alt = cert.get("subjectAltName", ())
    for entry in alt if isinstance(alt, tuple) else ():
        if isinstance(entry, tuple) and len(entry) == 2 and entry[0] in ("DNS", "URI"):
            names.add(str(entry[1]))
    return frozenset(names)
