"""Errors of the LUKS codecs.

Every problem with the bytes of a LUKS header is one :class:`LuksFormatError` (HTTP 400), told apart by
its ``code``; a passphrase that opens no keyslot is a :class:`LuksWrongPassphrase` (HTTP 401)::

    BadRequest
    └── LuksFormatError      bad_luks_header      damaged or malformed header, offsets out of bounds
                             luks_checksum        no header copy passes its checksum
                             luks_unsupported     valid LUKS, but a feature keysteward does not implement
                             luks_reencryption    the volume is in (or set up for) reencryption
                             luks_argon2_memory   a keyslot's Argon2 needs more memory than allowed
                             luks_full            no free keyslot or keyslot area left
    Unauthenticated
    └── LuksWrongPassphrase  luks_wrong_passphrase   no keyslot opens with this passphrase

Messages name fields and numbers, never key material.
"""

from __future__ import annotations

from keysteward.errors import BadRequest, Unauthenticated

BAD_HEADER = "bad_luks_header"
CHECKSUM = "luks_checksum"
UNSUPPORTED = "luks_unsupported"
REENCRYPTION = "luks_reencryption"
ARGON2_MEMORY = "luks_argon2_memory"
FULL = "luks_full"
WRONG_PASSPHRASE = "luks_wrong_passphrase"  # noqa: S105 - an error code, not a password


class LuksFormatError(BadRequest):
    """A LUKS header (or a request against it) that keysteward refuses; ``code`` says why."""

    code = BAD_HEADER
    title = "Bad LUKS header"


class LuksWrongPassphrase(Unauthenticated):
    """No keyslot opens with the passphrase given."""

    code = WRONG_PASSPHRASE
    title = "Wrong passphrase"


def unsupported(message: str) -> LuksFormatError:
    return LuksFormatError(message, code=UNSUPPORTED)
