"""The site directory's schema revisions, with Alembic (alembic/versions/): ``upgrade`` brings
a directory to the newest revision when an Archiver opens it.

An SQLite data directory from before the directory (archiver/migrations.py's versions 0-7)
already has the baseline's tables in its index file: archiver/db.py's legacy migrations bring
the file to version 7 first, then it is stamped at the baseline (0001) and upgraded from
there, after a backup. A PostgreSQL directory is upgraded from empty, under an advisory lock:
several Archivers of a site may start at once, and one of them migrates.

A directory already at ``HEAD`` (every start but the first after an upgrade) is recognised by one
query of Alembic's version table, without importing Alembic: that import and reading the revision
scripts were most of the Archiver's start-up cost the site directory added (issue 23).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, column, inspect, literal, select, table, text

from archiver.directory.engine import SQLITE_FILE
from archiver.directory.schema import LEGACY_TABLES
from archiver.migrations import backup_database
from keyservice.errors import UsageError

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger("archiver.directory")

BASELINE = "0001"
# The newest revision in alembic/versions/ (a test checks it is Alembic's head).
HEAD = "0003"
SCRIPTS = Path(__file__).parent / "alembic"
# pg_advisory_xact_lock's key: one Archiver of a site migrates at a time ("FUSDIR01").
_LOCK_KEY = 0x4655534449523031


def alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(SCRIPTS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, sqlite_dir: Path | None) -> tuple[str | None, str]:
    """Bring the directory to the head revision; ``sqlite_dir``: where an SQLite file's backup
    goes (None for PostgreSQL). Returns (revision found, head)."""
    with engine.connect() as conn:
        if _recorded(conn) == HEAD:
            return HEAD, HEAD
    from alembic import command

    head = head_revision()
    holds_rows = False
    if sqlite_dir is not None:
        # The backup first, outside the migration's write transaction (SQLite's backup reads
        # the file through a connection of its own).
        with engine.connect() as conn:
            found, start = _start(conn)
            holds_rows = start is not None and any(
                conn.execute(select(literal(1)).select_from(table(name)).limit(1)).first()
                for name in LEGACY_TABLES)
        if holds_rows and start != head:
            _backup(sqlite_dir, str(start))
    with engine.connect() as conn:
        conn.execution_options(fusion_write=True)
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
            found, start = _start(conn)  # again, under the lock
            if start != head:
                # A warning when there was something to migrate; a new directory is made.
                log.log(logging.WARNING if holds_rows or found is not None else logging.INFO,
                        "migrating the site directory from revision %s to %s",
                        start or "(empty)", head)
            if found is None and start is not None:
                command.stamp(alembic_config(conn), start)
            if start != head:
                command.upgrade(alembic_config(conn), "head")
    return found, head


def _recorded(conn: Connection) -> str | None:
    """The revision Alembic recorded (None: none), read without Alembic."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    rows = conn.execute(select(column("version_num")).select_from(
        table("alembic_version"))).all()
    return rows[0][0] if len(rows) == 1 else None


def _start(conn: Connection) -> tuple[str | None, str | None]:
    """(the revision recorded, the revision the tables are at): an index file the legacy
    migrations made is at the baseline without a record of it."""
    from alembic.script import ScriptDirectory

    found = current_revision(conn)
    known = {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if found is not None and found not in known:
        raise UsageError(
            f"The site directory has schema revision {found}; this Archiver knows up to "
            f"{head_revision()}.", "Run the newer Archiver that migrated it, or restore a backup.")
    if found is not None:
        return found, found
    present = set(inspect(conn).get_table_names()) & set(LEGACY_TABLES)
    if present == set(LEGACY_TABLES):
        return None, BASELINE
    if present:
        raise UsageError(
            "The Archiver's database lacks table(s) "
            f"{', '.join(sorted(set(LEGACY_TABLES) - present))} of its directory.",
            "Run 'fusion-archiver reindex' to restore them, or restore a backup.")
    return None, None


def _backup(directory: Path, revision: str) -> Path:
    """A copy of the SQLite file before its directory tables change (the index's own
    migrations make theirs the same way)."""
    raw = sqlite3.connect(directory / SQLITE_FILE, timeout=30)
    try:
        path = backup_database(raw, directory, f"d{revision}")
    finally:
        raw.close()
    log.warning("backed up the database before migrating its directory tables: %s", path)
    return path
