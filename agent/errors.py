"""The agent's exceptions: one small hierarchy, each message written for the person who must act.

The CLI prints `str(error)` as one line and exits non-zero; nothing here ever carries the
webhook secret.
"""


class AgentError(Exception):
    """Base class: something the operator can fix, described in plain words."""


class ConfigError(AgentError):
    """The configuration file or environment is wrong; the message names the key."""

    def __init__(self, problems: list[str], source: str = "configuration") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: " + "; ".join(problems))


class QueryError(AgentError):
    """A source query failed or returned the wrong shape; the message names the query."""


class SourceUnavailable(AgentError):
    """The inventory database cannot be reached right now (retry later)."""


class StateError(AgentError):
    """The state store (fingerprints and outbox) cannot be used."""


def first_line(exc: BaseException) -> str:
    """The first line of what went wrong, in the driver's words where there is a driver (a
    SQLAlchemy error's `orig`): fit for a log line or a one-line message."""
    original = getattr(exc, "orig", None) or exc
    text = str(original).strip()
    return text.splitlines()[0] if text else type(original).__name__


def shown_path(path: object) -> str:
    """A file name for a one-line message: as it is, or quoted with escapes when it holds a
    line break or another control character."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE the database gave for `exc` (a SQLAlchemy error or the driver's own), or
    None when there is none (the connection failed before the server answered)."""
    original = getattr(exc, "orig", None) or exc
    state = getattr(original, "sqlstate", None)
    return state if isinstance(state, str) else None
