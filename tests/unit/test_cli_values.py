"""The option values every CLI group parses alike (keysteward.cli.values): K=V labels, durations, times.

Each parser gets the mistakes an operator makes: an empty item, a missing '=', a key twice, an item too
long or too many, a duration without a unit, a time that is neither ISO 8601 nor a duration.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from keysteward.cli.values import (
    MAX_LABEL_KEY,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    ValueProblem,
    parse_duration,
    parse_labels,
    parse_since,
)

pytestmark = pytest.mark.unit


def test_labels_as_a_dict() -> None:
    assert parse_labels([]) == {}
    assert parse_labels(["env=prod", "empty=", "url=a=b"]) == {"env": "prod", "empty": "", "url": "a=b"}
    assert parse_labels(["k" * MAX_LABEL_KEY + "=" + "v" * MAX_LABEL_VALUE])


@pytest.mark.parametrize(
    ("items", "says"),
    [
        ([""], "takes KEY=VALUE, not '' (no '=')"),
        (["env"], "takes KEY=VALUE, not 'env' (no '=')"),
        (["=prod"], "the key is empty"),
        ([" env=prod"], "blanks around it"),
        (["env=prod", "env=dev"], "the key 'env' is given twice"),
        (["k" * (MAX_LABEL_KEY + 1) + "=v"], f"keys are at most {MAX_LABEL_KEY}"),
        (["k=" + "v" * (MAX_LABEL_VALUE + 1)], f"values {MAX_LABEL_VALUE}"),
        ([f"k{i}=v" for i in range(MAX_LABELS + 1)], f"at most {MAX_LABELS} labels"),
        (["k=a\nb"], "control characters"),
    ],
)
def test_bad_labels_name_the_option_and_the_item(items: list[str], says: str) -> None:
    with pytest.raises(ValueProblem) as caught:
        parse_labels(items, "--kms-label")
    message = str(caught.value)
    assert message.startswith("--kms-label") and says in message
    assert len(message) < 200, "a huge item is cut in the message"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90m", 5400), ("12h", 43200), ("30d", 2592000), ("1w", 604800), ("1h30m", 5400), ("45s", 45), ("2H", 7200)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text, "--ttl") == seconds


@pytest.mark.parametrize("text", ["", "30", "m", "1.5h", "-1h", "0s", "1y", "1h 30m", "9" * 13 + "d", "101000d", "1h-"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueProblem) as caught:
        parse_duration(text, "--ttl")
    assert str(caught.value).startswith("--ttl ")


def test_since_is_an_iso_time_or_a_duration_ago() -> None:
    now = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    assert parse_since("1h", "--since", now) == now - timedelta(hours=1)
    assert parse_since("2026-12-04T10:00:00Z", "--since") == datetime(2026, 12, 4, 10, tzinfo=UTC)
    assert parse_since("2026-12-04T10:00:00", "--since") == datetime(2026, 12, 4, 10, tzinfo=UTC)  # no zone: UTC
    plus_two = parse_since("2026-12-04T12:00:00+02:00", "--since")
    assert plus_two == datetime(2026, 12, 4, 10, tzinfo=UTC) and plus_two.tzinfo == timezone(timedelta(hours=2))
    for bad in ("yesterday", "", "2026-13-01", "1x"):
        with pytest.raises(ValueProblem) as caught:
            parse_since(bad, "--since")
        assert "ISO time" in str(caught.value) or "duration" in str(caught.value)
