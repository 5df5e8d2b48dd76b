"""Every line of the agent's log is one of its own records: Python's warnings are logged like
any other event, and the pool's traceback about a dead connection it discards is one DEBUG
line. No database here: the records are those SQLAlchemy's pool writes."""

from __future__ import annotations

import logging
import sys
import warnings

import pytest

from tests.log_lines import agent_log, json_lines


class Error(Exception):
    """A driver's base exception, as PEP 249 names it (psycopg.Error, sqlite3.Error...)."""


class OperationalError(Error):
    pass


def pool_error(message: str, exc: BaseException, *args: object) -> None:
    """What SQLAlchemy's pool does when it cannot reset or close a connection."""
    try:
        raise exc
    except BaseException:
        logging.getLogger("sqlalchemy.pool.impl.QueuePool").error(message, *args, exc_info=True)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_python_warning_is_one_line_of_the_log(fmt: str) -> None:
    with agent_log("INFO", fmt) as out, warnings.catch_warnings():
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        warnings.warn("a library\nsays  something", UserWarning, stacklevel=1)

    (text,) = out.getvalue().splitlines()
    if fmt == "text":
        assert "python.warning" in text
        assert "UserWarning: a library says something" in text
        return
    (body,) = json_lines(text)
    assert body["event"] == "python.warning"
    assert body["level"] == "warning"
    assert body["msg"] == "UserWarning: a library says something"
    assert body["category"] == "UserWarning"
    assert body["location"] == f"{__file__}:{line}"


def test_a_warning_python_filters_out_is_not_logged() -> None:
    with agent_log("DEBUG") as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.warn("hidden", ResourceWarning, stacklevel=1)
    assert out.getvalue() == ""


CONNECTION = "<psycopg.Connection [BAD] at 0x1>"


@pytest.mark.parametrize(
    ("message", "args", "shown"),
    [
        ("Exception during reset or similar", (), "Exception during reset or similar"),
        (
            "Exception closing connection %r",
            (CONNECTION,),
            f"Exception closing connection {CONNECTION!r}",
        ),
        (
            "Exception terminating connection %r",
            (CONNECTION,),
            f"Exception terminating connection {CONNECTION!r}",
        ),
        ("Error closing cursor", (), "Error closing cursor"),
    ],
)
def test_the_pools_traceback_about_a_dead_connection_is_one_debug_line(
    message: str, args: tuple[object, ...], shown: str
) -> None:
    dead = OperationalError("terminating connection due to administrator command\nmore")
    with agent_log("DEBUG") as out:
        pool_error(message, dead, *args)

    (body,) = json_lines(out.getvalue())
    assert body["level"] == "debug"
    assert body["event"] == "db.connection_discarded"
    assert body["msg"] == (
        f"{shown}: terminating connection due to administrator command "
        "(the connection was dead or closed already)"
    )
    assert "exception" not in body
    assert "Traceback" not in out.getvalue()


def test_it_is_not_shown_above_debug() -> None:
    with agent_log("INFO") as out:
        pool_error("Exception during reset or similar", OperationalError("server closed"))
    assert out.getvalue() == ""


def test_a_pool_failure_that_is_not_a_drivers_error_keeps_its_traceback() -> None:
    with agent_log("INFO") as out:
        pool_error("Exception during reset or similar", TypeError("a bug in an event hook"))

    (body,) = json_lines(out.getvalue())
    assert body["level"] == "error"
    assert "TypeError: a bug in an event hook" in body["exception"]
