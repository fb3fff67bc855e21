"""Alembic's environment for the site directory: always given an open connection by
archiver/directory/migrate.py (``config.attributes["connection"]``), never a URL of its own."""

from __future__ import annotations

from alembic import context

from archiver.directory.schema import metadata


def run_migrations() -> None:
    connection = context.config.attributes["connection"]
    context.configure(connection=connection, target_metadata=metadata,
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


# Alembic runs this file as a script; importing it otherwise (a walk over the package, as the
# exit-code and API-reference checks do) must not run anything. Alembic's context has a
# ``config`` only while it runs the migrations.
if getattr(context, "config", None) is not None:
    run_migrations()
