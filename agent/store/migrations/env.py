"""Alembic's entry point: runs the migrations on the connection store.migrate hands over.

The agent never runs Alembic from the command line; `seyaha-agent migrate` and every start
call store.migrate, which takes the migration lock and then lands here.
"""

from __future__ import annotations

from alembic import context

from agent.store.migrate import VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(connection=connection, version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
