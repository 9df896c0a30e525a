"""Shared fixtures: each lives in tests/fixtures/ and is registered here."""

pytest_plugins = [
    "tests.fixtures.softhsm",
    "tests.fixtures.postgres",
    "tests.fixtures.keysteward",
    "tests.fixtures.guest",
]


def pytest_collection_modifyitems(items: list) -> None:  # type: ignore[type-arg]
    """The secret scan reads what every other test left behind: it runs last."""
    items.sort(key=lambda item: "test_secret_scan" in item.nodeid)
