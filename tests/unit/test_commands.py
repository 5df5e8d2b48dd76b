from __future__ import annotations

from datetime import timedelta

import pytest

from agent.errors import ConfigError
from agent.outbox_command import parse_age


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("7d", 604800), ("12h", 43200), ("30m", 1800), ("45s", 45), ("90", 90), ("0s", 0)],
)
def test_parse_age(text: str, seconds: float) -> None:
    assert parse_age(text) == timedelta(seconds=seconds)


def test_a_bad_age_names_the_option() -> None:
    with pytest.raises(ConfigError, match="--older-than"):
        parse_age("a week")
