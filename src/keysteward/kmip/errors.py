"""KMIP Result Reasons: the error of one batch item, and how keysteward's error codes map onto them.

KMIP 1.x has a short list of reasons; 2.x adds precise ones (Wrong Key Lifecycle State, Attribute Read Only...).
:func:`reason_for` gives the one the request's version defines, so a 1.x client never sees a 2.x value.
"""

from __future__ import annotations

from typing import Final

from keysteward.errors import Forbidden, KeystewardError, Unauthenticated
from keysteward.formats.kmip_enums import RESULT_REASON

# keysteward code -> (KMIP 1.x reason, KMIP 2.x reason)
_BY_CODE: Final[dict[str, tuple[str, str]]] = {
    "kmip_not_found": ("ItemNotFound", "ObjectNotFound"),
    "kmip_wrong_state": ("PermissionDenied", "WrongKeyLifecycleState"),
    "kmip_destroyed": ("PermissionDenied", "ObjectDestroyed"),
    "kmip_read_only": ("PermissionDenied", "AttributeReadOnly"),
    "kmip_invalid_field": ("InvalidField", "InvalidAttributeValue"),
    "kmip_unsupported_attribute": ("InvalidField", "UnsupportedAttribute"),
    "kmip_single_valued": ("InvalidField", "AttributeSingleValued"),
    "kmip_attribute_not_found": ("ItemNotFound", "AttributeNotFound"),
    "kmip_too_many_attributes": ("InvalidField", "ServerLimitExceeded"),
    "kmip_no_material": ("KeyValueNotPresent", "KeyValueNotPresent"),
    "data_key_shredded": ("PermissionDenied", "ObjectDestroyed"),
    "tenant_not_found": ("PermissionDenied", "PermissionDenied"),
    "kmip_missing_data": ("MissingData", "MissingData"),
    "kmip_crypto_failure": ("CryptographicFailure", "CryptographicFailure"),
    "kmip_usage_mask": ("PermissionDenied", "IncompatibleCryptographicUsageMask"),
    "kmip_wrapping_not_found": ("ItemNotFound", "WrappingObjectNotFound"),
    "kmip_check_failed": ("IllegalOperation", "IncompatibleCryptographicUsageMask"),
    "kmip_check_lease": ("IllegalOperation", "IllegalOperation"),
    "kmip_name_not_unique": ("InvalidField", "NonUniqueNameAttribute"),
    "kmip_usage_limit": ("PermissionDenied", "PermissionDenied"),  # as the OASIS case CS-BC-M-7 answers
    "kmip_sensitive": ("PermissionDenied", "Sensitive"),
    "kmip_not_extractable": ("PermissionDenied", "NotExtractable"),
    "kmip_tag_length": ("GeneralFailure", "GeneralFailure"),  # as the OASIS GCM cases answer (CS-BC-M-GCM-1)
    "kmip_missing_iv": ("InvalidMessage", "InvalidMessage"),  # what the OASIS crypto cases answer (CS-BC-M-11)
}


class KmipError(Exception):
    """One batch item's failure: ``reason`` a Result Reason name (1.x spelling; :func:`reason_for` maps it)."""

    def __init__(self, reason: str, message: str, code: str = "") -> None:
        super().__init__(message)
        assert reason in RESULT_REASON
        self.reason = reason
        self.message = message
        self.code = code or reason


def from_keysteward(exc: KeystewardError, major: int) -> KmipError:
    pair = _BY_CODE.get(exc.code or "")
    if pair is not None:
        return KmipError(pair[0] if major < 2 else pair[1], exc.message, exc.code or "")
    if isinstance(exc, Forbidden | Unauthenticated):
        return KmipError("PermissionDenied", "DENIED", exc.code or "")
    if exc.code == "key_disabled" or exc.code == "key_destroyed":
        return KmipError("PermissionDenied", "the tenant's KMIP key is disabled or destroyed", exc.code)
    if exc.status == 400:
        return KmipError("InvalidField", exc.message, exc.code or "")
    return KmipError("GeneralFailure", "the operation failed", exc.code or "")


def reason_for(error: KmipError) -> int:
    return RESULT_REASON[error.reason]
