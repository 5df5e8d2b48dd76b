from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.logs import (
    REDACTED,
    JsonFormatter,
    RedactingFormatter,
    Redaction,
    TextFormatter,
    event,
    setup_logging,
)
from tests.conftest import SECRET

Emit = Callable[[logging.Logger], None]


def capture(inner: logging.Formatter, emit: Emit, redaction: Redaction | None = None) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter(inner, redaction or Redaction([SECRET])))
    logger = logging.getLogger(f"test.logs.{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        emit(logger)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def in_message(logger: logging.Logger) -> None:
    logger.warning("sending with secret %s", SECRET)


def in_event_fields(logger: logging.Logger) -> None:
    event(logger, logging.INFO, "delivery.retry", "retrying", header=SECRET, message_id=3)


def in_extra(logger: logging.Logger) -> None:
    logger.info("headers", extra={"headers": {"x-webhook-secret": SECRET}})


def in_exception(logger: logging.Logger) -> None:
    try:
        raise RuntimeError(f"request failed: x-webhook-secret={SECRET}")
    except RuntimeError:
        logger.exception("delivery step failed", extra={"event": "delivery.error"})


LEAKS = [
    pytest.param(in_message, id="message"),
    pytest.param(in_event_fields, id="fields"),
    pytest.param(in_extra, id="extra"),
    pytest.param(in_exception, id="exception"),
]


@pytest.mark.parametrize("emit", LEAKS)
@pytest.mark.parametrize("inner", [TextFormatter, JsonFormatter])
def test_secret_is_redacted(inner: type[logging.Formatter], emit: Emit) -> None:
    line = capture(inner(), emit)
    assert SECRET not in line
    assert REDACTED in line


@pytest.mark.parametrize("emit", LEAKS)
def test_redacted_json_is_still_one_json_object(emit: Emit) -> None:
    (line,) = capture(JsonFormatter(), emit).splitlines()
    body = json.loads(line)
    assert REDACTED in json.dumps(body)


def test_json_line_carries_event_and_fields() -> None:
    def emit(logger: logging.Logger) -> None:
        event(
            logger, logging.WARNING, "notify.not_updated", "unknown option", product="p1", slot=None
        )

    body = json.loads(capture(JsonFormatter(), emit))
    assert body["level"] == "warning"
    assert body["event"] == "notify.not_updated"
    assert body["msg"] == "unknown option"
    assert body["product"] == "p1"
    assert body["slot"] is None
    assert body["ts"].endswith("+00:00")


def test_text_line_carries_event_and_fields() -> None:
    def emit(logger: logging.Logger) -> None:
        event(logger, logging.INFO, "scan.changes", "queued 1 trigger", added=2, removed=None)

    line = capture(TextFormatter(), emit)
    assert "INFO" in line
    assert "scan.changes" in line
    assert "queued 1 trigger" in line
    assert "added=2" in line
    assert "removed" not in line


@pytest.mark.parametrize(
    ("values", "text", "expected"),
    [
        ([SECRET], f"a {SECRET} b {SECRET}", f"a {REDACTED} b {REDACTED}"),
        ([SECRET], "nothing to hide", "nothing to hide"),
        (["", SECRET], "nothing to hide", "nothing to hide"),
        (["old-secret", "new-secret"], "old-secret then new-secret", f"{REDACTED} then {REDACTED}"),
        (["abc", "abcdef"], "key=abcdef", f"key={REDACTED}"),
        (["abcdef", "abc"], "key=abcdef", f"key={REDACTED}"),
        (["cdef", "abcdefgh"], "key=abcdefgh", f"key={REDACTED}"),
        (["5eca", SECRET], f"key={SECRET}", f"key={REDACTED}"),
        ([SECRET[8:], SECRET], f"key={SECRET}", f"key={REDACTED}"),
    ],
)
def test_redaction_apply(values: list[str], text: str, expected: str) -> None:
    assert Redaction(values).apply(text) == expected


def test_redaction_add_covers_a_rotated_secret() -> None:
    redaction = Redaction([SECRET])
    redaction.add("rotated-" + SECRET[::-1])
    redaction.add("")
    assert redaction.apply(f"{SECRET} rotated-{SECRET[::-1]} ok") == f"{REDACTED} {REDACTED} ok"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level for name in ("httpx", "httpcore", "apscheduler")}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, old in noisy.items():
        logging.getLogger(name).setLevel(old)


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize(("fmt", "is_json"), [("json", True), ("auto", True), ("text", False)])
def test_setup_logging_installs_one_redacting_handler(fmt: str, is_json: bool) -> None:
    stream = io.StringIO()
    handler = setup_logging(level="INFO", fmt=fmt, redaction=Redaction([SECRET]), stream=stream)

    logging.getLogger("agent.test").info("secret is %s", SECRET)
    logging.getLogger("agent.test").debug("hidden below INFO")

    assert logging.getLogger().handlers == [handler]
    assert logging.getLogger("httpx").level == logging.WARNING
    (line,) = stream.getvalue().splitlines()
    assert SECRET not in line
    if is_json:
        assert json.loads(line)["msg"] == f"secret is {REDACTED}"
    else:
        assert line.endswith(f"secret is {REDACTED}")


@given(
    values=st.sets(st.text(alphabet="abc", min_size=3, max_size=9), min_size=1, max_size=60),
    text=st.text(alphabet="abc =", max_size=200),
)
def test_no_value_survives_redaction_however_many_there_are(values: set[str], text: str) -> None:
    """Past a few values (a platform's secrets) lines are searched by windows of each
    length: whatever the values and however they overlap, none is left in the line."""
    for value in values:
        text = f"{text} {value}"
    out = Redaction(values).apply(text)
    assert not [v for v in values if v in out]


def test_many_values_are_masked_like_few() -> None:
    values = [f"{n:064x}" for n in range(1, 1001)]
    line = f"sent {values[10]} and {values[999]}, not {'0' * 63}"
    assert Redaction(values).apply(line) == f"sent {REDACTED} and {REDACTED}, not {'0' * 63}"
