"""config.example.toml is valid and documents every key the agent accepts."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from agent.config import AgentSettings

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"


def test_the_example_validates() -> None:
    AgentSettings.model_validate(tomllib.loads(EXAMPLE.read_text(encoding="utf-8")))


def _sections() -> list[tuple[str, str]]:
    pairs = []
    for section, field in AgentSettings.model_fields.items():
        model = field.annotation
        assert model is not None
        pairs += [(section, key) for key in model.model_fields]  # type: ignore[attr-defined]
    return pairs


@pytest.mark.parametrize(("section", "key"), _sections())
def test_every_key_is_documented_in_its_section(section: str, key: str) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    body = text.split(f"[{section}]", 1)[1].split("\n[", 1)[0]
    assert re.search(rf"^#? ?{key} = ", body, re.MULTILINE), f"[{section}] {key} is undocumented"
