"""keysteward's errors in the XKS spec's names, and quotas per store prefix."""

from __future__ import annotations

import pytest

from keysteward.errors import Conflict, Denied, InvalidCiphertext, KeystewardError, NotFound, Sealed, Unavailable
from keysteward.formats.xks_wire import ERRORS
from keysteward.xks.errors import to_xks
from keysteward.xks.quota import Quotas

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("error", "name"),
    [
        (Denied("forbidden by policy version 2 (x)", code="forbidden_by_policy"), "AccessDeniedException"),
        (NotFound("no external key", code="key_not_found"), "KeyNotFoundException"),
        (Conflict("usage", code="invalid_key_usage"), "InvalidKeyUsageException"),
        (Conflict("disabled", code="key_disabled"), "InvalidStateException"),
        (Conflict("shredded", code="key_version_destroyed"), "InvalidStateException"),
        (InvalidCiphertext("bad"), "InvalidCiphertextException"),
        (Sealed("sealed"), "InternalException"),
        (Unavailable("audit", code="audit_unavailable"), "DependencyTimeoutException"),
        (KeystewardError("something new", code="surprise"), "InternalException"),
    ],
)
def test_errors_map_to_the_spec_names(error: KeystewardError, name: str) -> None:
    mapped = to_xks(error, "req-1")
    assert mapped.name == name and mapped.status == ERRORS[name]
    assert len(mapped.message) < 512


def test_an_unknown_error_says_nothing_but_its_code() -> None:
    mapped = to_xks(KeystewardError("key 'secret-name' exploded", code="surprise"), "req-9")
    assert "secret-name" not in mapped.message and "surprise" in mapped.message and "req-9" in mapped.message


def test_quotas_are_per_prefix_and_refill() -> None:
    quotas = Quotas(5)
    assert [quotas.take("/a") for _ in range(7)].count(True) == 5
    assert quotas.take("/b")  # another store's quota is its own
    quotas._buckets["/a"] = (0.0, quotas._buckets["/a"][1] - 1.0)  # a second later
    assert quotas.take("/a")
    with pytest.raises(ValueError):
        Quotas(0)
