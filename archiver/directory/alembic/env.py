"""Alembic's environment for the site directory: always given an open connection by
archiver/directory/migrate.py (``config.attributes["connection"]``), never a URL of its own."""

from __future__ import annotations

from alembic import context

from archiver.directory.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
with context.begin_transaction():
    context.run_migrations()
