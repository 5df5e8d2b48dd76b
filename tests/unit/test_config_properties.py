"""Properties of configuration loading: any TOML document either loads or is a ConfigError
whose every problem is one line that names a key, never another exception.

Not committed: the current agent/config.py breaks it; each counterexample Hypothesis found
is pinned with @example.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Iterator
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from agent.config import AgentSettings, load_config
from agent.errors import ConfigError
from tests.conftest import INTEGRATION_ID, SECRET

SECTIONS: dict[str, list[str]] = {
    name: list(field.annotation.model_fields)  # type: ignore[union-attr]
    for name, field in AgentSettings.model_fields.items()
}
"""Every section of the file and its keys, read from the models."""

VALID: dict[str, Any] = {
    "seyaha": {"integration_id": INTEGRATION_ID, "webhook_secret_file": "secret.txt"},
    "source": {
        "url": "postgresql+psycopg://reader@db.example/inventory",
        "catalog_query": "SELECT product_id, option_id, name FROM options",
        "slots_query": "SELECT * FROM slots",
    },
}


def _example(section: str, key: str) -> Any:
    if key in VALID.get(section, {}):
        return VALID[section][key]
    field = AgentSettings.model_fields[section].annotation.model_fields[key]  # type: ignore[union-attr]
    return field.default


EXAMPLES: dict[tuple[str, str], str] = {
    (section, key): sample
    for section, fields in SECTIONS.items()
    for key in fields
    if isinstance(sample := _example(section, key), str) and sample
}
"""A valid text for every text key: the file's or the default."""


class HexInt(int):
    """An integer the document writes in hexadecimal (0x...), as TOML allows."""


class Verbatim(str):
    """A value the document writes as it is (what no Python value writes, such as an integer
    with more digits than str() converts)."""


# -- a small TOML writer ------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_string(text: str) -> str:
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else toml_string(key)


def toml_value(value: Any) -> str:
    if isinstance(value, Verbatim):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, HexInt):
        return f"0x{value:x}"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {value!r}")


def toml_document(document: dict[str, Any]) -> str:
    """Top-level keys first, then one [table] per top-level table; deeper tables inline."""
    lines = [
        f"{toml_key(k)} = {toml_value(v)}" for k, v in document.items() if not isinstance(v, dict)
    ]
    for name, table in document.items():
        if isinstance(table, dict):
            lines.append(f"[{toml_key(name)}]")
            lines.extend(f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


# -- documents ----------------------------------------------------------------------------

keys = st.one_of(
    st.sampled_from(sorted({key for fields in SECTIONS.values() for key in fields})),
    st.text(max_size=6),
)

texts = st.one_of(
    st.text(),
    st.sampled_from(
        [
            "",
            " ",
            "https://api.seyaha.net",
            "http://localhost:8080",
            "http://127.0.0.1:9000/",
            "sqlite:///state.db",
            "postgresql+psycopg://u@h/db",
            "Europe/Istanbul",
            "SELECT 1 WHERE updated_at >= :since",
            INTEGRATION_ID,
            "secret.txt",
            "127.0.0.1:9464",
            "[::1]:9464",
            "debug",
            "json",
            "schema.table",
        ]
    ),
    # Something that starts like a valid value and goes on with anything.
    st.tuples(
        st.sampled_from(["http://", "https://", "sqlite:///", "postgresql://", "Europe/", ""]),
        st.text(max_size=8) | st.text(st.sampled_from(["\x00", "\n", "/", ".", "a", " ", "é"])),
    ).map("".join),
)

offsets = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))

scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(0, 4299).map(lambda n: 10**n),  # as many digits as int() reads (4300)
    st.integers(0, 2**64).map(HexInt),
    st.integers(14_300, 20_000).map(lambda n: HexInt(2**n)),  # more digits than int() prints
    st.floats(),  # inf, -inf and nan included
    texts,
    st.datetimes(timezones=st.none() | offsets),
    st.dates(),
    st.times(),
)

values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=6,
)


@st.composite
def twisted(draw: st.DrawFn, text: str) -> str:
    """A valid text with something slipped in (a NUL, a line break, a slash, a space...),
    perhaps twice, perhaps with https:// made http://."""
    if draw(st.booleans()):
        text = text.replace("https://", "http://")
    for _ in range(draw(st.integers(1, 2))):
        where = draw(st.integers(0, len(text)))
        piece = draw(st.sampled_from(["\x00", "\n", "\r", "/", " ", ":", "é"]) | st.text())
        text = text[:where] + piece + text[where:]
    return text


KNOWN_KEYS = sorted((section, key) for section, fields in SECTIONS.items() for key in fields)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """A valid file changed a few times: a text key's value twisted, a key set to any value,
    a key removed, an unknown key or section added, a section replaced by any value; or a
    document of anything at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.dictionaries(keys, values | st.dictionaries(keys, values), max_size=4))
    document = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 4))):
        change = draw(st.sampled_from(["twist", "set", "remove", "unknown", "replace"]))
        value: Any
        if change == "twist":
            section, key = draw(st.sampled_from(sorted(EXAMPLES)))
            value = draw(twisted(EXAMPLES[section, key]))
        elif change == "set":
            section, key = draw(st.sampled_from(KNOWN_KEYS))
            value = draw(values)
        elif change == "unknown":
            section = draw(st.sampled_from(sorted(SECTIONS)) | st.text(max_size=6))
            key, value = draw(keys), draw(values)
        elif change == "replace":
            document[draw(st.sampled_from(sorted(SECTIONS)) | st.text(max_size=6))] = draw(values)
            continue
        else:
            tables = [name for name, table in document.items() if isinstance(table, dict) and table]
            if tables:
                table = document[draw(st.sampled_from(tables))]
                del table[draw(st.sampled_from(sorted(table)))]
            continue
        table = document.setdefault(section, {})
        if isinstance(table, dict):
            table[key] = value
    return document


# -- the property -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A configuration folder with the secret file; no SEYAHA_ variable in the environment."""
    path = tmp_path_factory.mktemp("config")
    (path / "secret.txt").write_text(SECRET + "\n", encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("SEYAHA_")]:
            patch.delenv(name)
        yield path


def names_a_key(problem: str, document: dict[str, Any]) -> bool:
    """`[section]: ...` or `[section] key...: ...`, for a section and key of the document
    or of the models (a required one may be missing); a name that is not printable (a key
    with a line break) is shown as its repr, so that the problem stays on one line."""

    def shown(name: str) -> str:
        return name if name.isprintable() else repr(name)

    for section in {*SECTIONS, *document}:
        head = f"[{shown(section)}]"
        if not problem.startswith(head):
            continue
        rest = problem[len(head) :]
        if rest.startswith(": "):
            return True
        table = document.get(section)
        known = {*SECTIONS.get(section, ()), *(table if isinstance(table, dict) else ())}
        for key in map(shown, known):
            after = rest[1 + len(key) :]
            if rest.startswith(f" {key}") and (after.startswith(": ") or after.startswith(".")):
                return True
    return False


def valid_with(section: str, key: str, value: Any) -> dict[str, Any]:
    document = copy.deepcopy(VALID)
    document.setdefault(section, {})[key] = value
    return document


@given(document=documents())
# A line break in a value the message repeats without repr (SeyahaSettings._http_url).
@example(document=valid_with("seyaha", "base_url", "http://a\npi.seyaha.net"))
# A line break in an unknown key (_describe does not quote keys).
@example(document=valid_with("log", "\n", False))
# ValueError from _describe: repr() of an integer longer than 4300 digits (0x... has no limit).
@example(document={**VALID, "delivery": HexInt(2**14300)})
# ValueError from tomllib, which load_settings does not catch: a decimal integer that long.
@example(document=valid_with("delivery", "batch_size", Verbatim("1" + "0" * 4300)))
# ValueError "embedded null byte" from Path.resolve() in load_settings ...
@example(document=valid_with("seyaha", "webhook_secret_file", "sec\x00ret.txt"))
# ... in resolve_sqlite_url ...
@example(document=valid_with("state", "url", "sqlite:///sta\x00te.db"))
# ... and from read_text() in read_secret, which catches OSError and UnicodeDecodeError only.
@example(document=valid_with("seyaha", "webhook_secret_file", "/sec\x00ret.txt"))
# A line break in a secret file's name, repeated in "cannot read ..." without quotes.
@example(document=valid_with("seyaha", "webhook_secret_file", "\nsecret.txt"))
def test_any_toml_document_loads_or_every_problem_is_one_line_naming_a_key(
    folder: Path, document: dict[str, Any]
) -> None:
    path = folder / "agent.toml"
    path.write_text(toml_document(document), encoding="utf-8")
    try:
        load_config(path)
        return
    except ConfigError as exc:
        problems = exc.problems
    assert problems
    for problem in problems:
        assert not set(problem) & {"\n", "\r"}, problem
        if problem.startswith("not valid TOML: "):
            # The parser refused a value it cannot hold (an integer of more than 4,300
            # digits) and does not say which key held it: the one line says why.
            continue
        assert names_a_key(problem, document), problem
