"""Errors of the evidence verifiers.

    KeystewardError
    └── EvidenceRejected   403  evidence_invalid | binding_mismatch

``evidence_invalid`` covers everything that makes evidence untrustworthy: a signature that does not
verify, a certificate outside its validity, a document that does not parse, missing or altered fields,
a wrong audience, an expired token, an unknown evidence type or no registered provider of that type.
``binding_mismatch`` means the evidence is genuine but was made for another nonce or HPKE key.
Messages name what an operator can act on (the provider, the field) and never carry document bytes.
"""

from __future__ import annotations

from keysteward.errors import KeystewardError

EVIDENCE_INVALID = "evidence_invalid"
BINDING_MISMATCH = "binding_mismatch"


class EvidenceRejected(KeystewardError):
    """Evidence that does not prove what it claims; the release is denied."""

    code = EVIDENCE_INVALID
    status = 403
    title = "Evidence rejected"
