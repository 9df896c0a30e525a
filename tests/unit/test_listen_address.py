"""A listener's ``HOST:PORT`` setting (``settings.listen_address``): the REST, KMIP and XKS listeners share it."""

from __future__ import annotations

import pytest

from keysteward import settings
from keysteward.errors import BadRequest


@pytest.mark.parametrize(
    ("value", "address"),
    [("127.0.0.1:5696", ("127.0.0.1", 5696)), ("[::1]:443", ("::1", 443)), (" localhost:8443 ", ("localhost", 8443))],
)
def test_a_listen_address_is_host_and_port(value: str, address: tuple[str, int]) -> None:
    assert settings.listen_address(value, "kmip.listen") == address


@pytest.mark.parametrize("value", ["", "5696", ":5696", "h:", "h:0", "h:65536", "h:-1", "h:56a", "[::1]", "h:5696x"])
def test_a_bad_listen_address_names_its_setting(value: str) -> None:
    with pytest.raises(BadRequest, match=r"setting xks\.listen must be HOST:PORT") as raised:
        settings.listen_address(value, "xks.listen")
    assert raised.value.code == "bad_setting"
