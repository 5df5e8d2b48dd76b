"""Engines for the source and the state store, set up by their backend's Dialect.

Nothing connects here: SQLAlchemy engines connect lazily, on first use.
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from agent.dialects import dialect_for_backend

_CREDENTIALS = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def redact_url(url: str) -> str:
    """A database URL fit for a log line: the password is replaced by ***."""
    return _CREDENTIALS.sub(r"\1***@", url)


def create_engine(url: str, *, role: str) -> sa.Engine:
    """An engine for `url`; `role` ("source" or "state") is the application name servers see."""
    parsed = make_url(url)
    dialect = dialect_for_backend(parsed.get_backend_name())
    kwargs, connect_args = dialect.engine_options(role)
    engine = sa.create_engine(parsed, connect_args=connect_args, **kwargs)
    dialect.prepare(engine, role)
    return engine
