"""The index schema's versions and the forward migrations between them (``PRAGMA
user_version``): ``MIGRATIONS[n]`` brings version n to n + 1, and ``migrate`` runs those a
database needs when ``archiver.db.Database`` opens it, after a backup of the database.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from keyservice.errors import UsageError

# The logger's name from before the split out of db.py: log lines and filters keep it.
log = logging.getLogger("archiver.db")

# Version 0: the unversioned schema of the first releases (``CREATE TABLE IF NOT EXISTS`` and
# an ADDED_COLUMNS step); migration 1 brings a fresh or a version-0 database to version 1.
_V1 = """
CREATE TABLE IF NOT EXISTS cameras (
    name TEXT PRIMARY KEY,
    token_sha256 BLOB NOT NULL,
    rtsp_url TEXT,
    created_ms INTEGER NOT NULL,
    removed_ms INTEGER
);
CREATE TABLE IF NOT EXISTS clients (
    fingerprint TEXT PRIMARY KEY,
    certificate BLOB NOT NULL,
    subject TEXT NOT NULL,
    oaep_hash INTEGER NOT NULL,
    all_cameras INTEGER NOT NULL,
    added_ms INTEGER NOT NULL,
    revoked_ms INTEGER,
    key_streams_deleted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS client_cameras (
    fingerprint TEXT NOT NULL,
    camera TEXT NOT NULL,
    PRIMARY KEY (fingerprint, camera)
);
CREATE TABLE IF NOT EXISTS epochs (
    epoch_id BLOB PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    record BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS key_records (
    fingerprint TEXT NOT NULL,
    key_id BLOB NOT NULL,
    camera TEXT NOT NULL,
    epoch_id BLOB NOT NULL,
    valid_from_ms INTEGER NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (fingerprint, key_id)
);
CREATE TABLE IF NOT EXISTS segments (
    camera TEXT NOT NULL,
    stream INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    capture_ms INTEGER NOT NULL,
    key_id BLOB NOT NULL,
    plaintext_bytes INTEGER NOT NULL,
    digest BLOB NOT NULL,
    file TEXT NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    manifest_seq INTEGER NOT NULL,
    PRIMARY KEY (camera, stream, seq)
);
CREATE INDEX IF NOT EXISTS segments_by_manifest ON segments (camera, manifest_seq);
CREATE TABLE IF NOT EXISTS manifests (
    camera TEXT NOT NULL,
    manifest_seq INTEGER NOT NULL,
    file TEXT NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    hash BLOB NOT NULL,
    first_capture_ms INTEGER NOT NULL,
    last_capture_ms INTEGER NOT NULL,
    PRIMARY KEY (camera, manifest_seq)
);
CREATE INDEX IF NOT EXISTS manifests_by_time ON manifests (camera, last_capture_ms);
CREATE TABLE IF NOT EXISTS key_grants (
    key_id BLOB PRIMARY KEY,
    camera TEXT NOT NULL,
    file TEXT NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL
);
"""


def _script(conn: sqlite3.Connection, sql: str) -> None:
    """Statements one by one: ``executescript`` would commit the migration's transaction."""
    for statement in sql.split(";"):
        if statement.strip():
            conn.execute(statement)


def _migrate_1(conn: sqlite3.Connection) -> None:
    """The version-0 schema, and the end of a segment's video (0 in version-0 archives that
    predate it: the reader falls back to its start)."""
    _script(conn, _V1)
    present = {row[1] for row in conn.execute("PRAGMA table_info(segments)")}
    if "end_ms" not in present:
        conn.execute("ALTER TABLE segments ADD COLUMN end_ms INTEGER NOT NULL DEFAULT 0")
    conn.execute("CREATE INDEX IF NOT EXISTS segments_by_time ON segments (camera, stream, end_ms)")


def _migrate_2(conn: sqlite3.Connection) -> None:
    """One vocabulary: the spec's "viewer" in the tables too."""
    conn.execute("ALTER TABLE clients RENAME TO viewers")
    conn.execute("ALTER TABLE client_cameras RENAME TO viewer_cameras")


def _migrate_3(conn: sqlite3.Connection) -> None:
    """Retention: a period per camera (NULL: the site default), evidence holds, and the
    files retention removed (kept as tombstones: a viewer asking for that video is told it
    expired, recovery and the checker know the file is gone on purpose)."""
    conn.execute("ALTER TABLE cameras ADD COLUMN retention_days INTEGER")
    _script(conn, """
        CREATE TABLE holds (
            hold_id INTEGER PRIMARY KEY AUTOINCREMENT,
            camera TEXT NOT NULL,
            from_ms INTEGER NOT NULL,
            to_ms INTEGER NOT NULL,
            reason TEXT NOT NULL,
            created_by TEXT NOT NULL,
            created_ms INTEGER NOT NULL
        );
        CREATE INDEX holds_by_camera ON holds (camera, from_ms, to_ms);
        CREATE TABLE expired_files (
            file TEXT PRIMARY KEY,
            camera TEXT NOT NULL,
            from_ms INTEGER NOT NULL,
            to_ms INTEGER NOT NULL,
            reason TEXT NOT NULL,
            removed_ms INTEGER NOT NULL,
            done INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX expired_by_camera ON expired_files (camera, to_ms);
        CREATE TABLE chain_anchors (
            camera TEXT NOT NULL,
            manifest_seq INTEGER NOT NULL,
            record BLOB NOT NULL,
            PRIMARY KEY (camera, manifest_seq)
        );
        CREATE INDEX key_records_by_camera ON key_records (camera, valid_from_ms);
        CREATE INDEX segments_by_key ON segments (key_id);
        CREATE INDEX key_records_by_epoch ON key_records (epoch_id);
    """)


def _migrate_4(conn: sqlite3.Connection) -> None:
    """Access grants of past video (archiver/grants.py): opaque blobs a viewer made for
    another certificate, and the admin's decision on each."""
    _script(conn, """
        CREATE TABLE access_grants (
            grant_id TEXT PRIMARY KEY,
            camera TEXT NOT NULL,
            from_ms INTEGER NOT NULL,
            to_ms INTEGER NOT NULL,
            grantor TEXT NOT NULL,
            grantee TEXT NOT NULL,
            key_count INTEGER NOT NULL,
            created_ms INTEGER NOT NULL,
            state TEXT NOT NULL,
            decided_ms INTEGER,
            decided_by TEXT,
            note TEXT,
            blob BLOB NOT NULL
        );
        CREATE INDEX access_grants_by_grantee ON access_grants (grantee);
    """)


def _migrate_5(conn: sqlite3.Connection) -> None:
    """Admins are people (archiver/admins.py): each admin's certificate, on the admin's own
    token, under a unique name that is never reused (the audit log names admins by it)."""
    _script(conn, """
        CREATE TABLE admins (
            fingerprint TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            certificate BLOB NOT NULL,
            subject TEXT NOT NULL,
            oaep_hash INTEGER NOT NULL,
            added_ms INTEGER NOT NULL,
            added_by TEXT NOT NULL,
            revoked_ms INTEGER,
            revoked_by TEXT
        );
    """)


def _migrate_6(conn: sqlite3.Connection) -> None:
    """Camera health that survives a restart: each camera's last known state, its reason and
    its last segment's arrival (shown as "before the restart" until the camera is heard of)."""
    _script(conn, """
        CREATE TABLE camera_health (
            camera TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            message TEXT NOT NULL,
            last_segment_ms INTEGER,
            saved_ms INTEGER NOT NULL
        );
    """)


def _migrate_7(conn: sqlite3.Connection) -> None:
    """The names of format v1 say what the tables hold in v2: ``key_records`` are the viewers'
    chain records, found by chain id (the column ``key_id`` always held a chain id), and
    ``key_grants`` are where each part of a chain's signed recipients is archived. Indexes
    follow their tables' names. Rows are kept as they are."""
    _script(conn, """
        ALTER TABLE key_records RENAME TO chain_records;
        ALTER TABLE chain_records RENAME COLUMN key_id TO chain_id;
        DROP INDEX IF EXISTS key_records_by_camera;
        DROP INDEX IF EXISTS key_records_by_epoch;
        CREATE INDEX chain_records_by_camera ON chain_records (camera, valid_from_ms);
        CREATE INDEX chain_records_by_epoch ON chain_records (epoch_id);
        ALTER TABLE key_grants RENAME TO chain_recipients;
    """)


# Each epoch opener's count of the chain records wrapped under it (``epoch_uses``), so that
# shredding finds the openers no record needs without an index over every record. Inserts
# count per batch (archiver.db, the one writer of chain records: a trigger per inserted row
# cost 1.8-5 s of CPU a million records in bench.chain_index); deletes and changes, whatever
# statement makes them, are uncounted here by SQLite itself. Never INSERT OR REPLACE a chain
# record: the rows REPLACE deletes do not fire delete triggers.
_V8_TRIGGERS = (
    """CREATE TRIGGER chain_records_uncounted AFTER DELETE ON chain_records BEGIN
        UPDATE epoch_uses SET records = records - 1 WHERE epoch_id = OLD.epoch_id;
        DELETE FROM epoch_uses WHERE epoch_id = OLD.epoch_id AND records <= 0;
    END""",
    """CREATE TRIGGER chain_records_recounted AFTER UPDATE OF epoch_id ON chain_records BEGIN
        UPDATE epoch_uses SET records = records - 1 WHERE epoch_id = OLD.epoch_id;
        DELETE FROM epoch_uses WHERE epoch_id = OLD.epoch_id AND records <= 0;
        INSERT INTO epoch_uses (epoch_id, records) VALUES (NEW.epoch_id, 1)
            ON CONFLICT (epoch_id) DO UPDATE SET records = records + 1;
    END""",
)


def _migrate_8(conn: sqlite3.Connection) -> None:
    """A chain's records written together (issue 23, revocation at scale): a revocation at
    10 000 viewers writes a million records, and version 7's table cost ~20 us of CPU each at
    2-3 million rows, its four B-trees (the rowid table, the primary key on the 64-character
    fingerprint, by camera, by epoch) three of them written in random order. Now:

    * ``chain_records`` is the B-tree of its primary key (chain id, fingerprint), WITHOUT
      ROWID: a chain's records land side by side, one place in the tree per chain;
    * the per-chain facts (camera, start) are one row per chain in ``chains``, whose
      ``chains_by_camera`` index retention's shredding searches;
    * the per-record epoch index is gone: ``epoch_uses`` counts each epoch's records (see
      above) and shredding takes the openers no record counts.

    Every row is kept; a chain's start is its earliest record's (a join record's is later)."""
    _script(conn, """
        CREATE TABLE chains (
            chain_id BLOB PRIMARY KEY,
            camera TEXT NOT NULL,
            valid_from_ms INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX chains_by_camera ON chains (camera, valid_from_ms);
        CREATE TABLE epoch_uses (
            epoch_id BLOB PRIMARY KEY,
            records INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE chain_records_v8 (
            chain_id BLOB NOT NULL,
            fingerprint TEXT NOT NULL,
            epoch_id BLOB NOT NULL,
            record BLOB NOT NULL,
            PRIMARY KEY (chain_id, fingerprint)
        ) WITHOUT ROWID;
        INSERT INTO chains (chain_id, camera, valid_from_ms)
            SELECT chain_id, MIN(camera), MIN(valid_from_ms) FROM chain_records GROUP BY chain_id;
        INSERT INTO chain_records_v8 (chain_id, fingerprint, epoch_id, record)
            SELECT chain_id, fingerprint, epoch_id, record FROM chain_records
            ORDER BY chain_id, fingerprint;
        INSERT INTO epoch_uses (epoch_id, records)
            SELECT epoch_id, COUNT(*) FROM chain_records GROUP BY epoch_id;
        DROP TABLE chain_records;
        ALTER TABLE chain_records_v8 RENAME TO chain_records
    """)
    for trigger in _V8_TRIGGERS:  # one statement each: _script splits at semicolons
        conn.execute(trigger)


# Forward migrations: MIGRATIONS[n] brings version n to n + 1. Append only; never edit one
# that has shipped.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_migrate_1, _migrate_2, _migrate_3,
                                                                 _migrate_4, _migrate_5, _migrate_6,
                                                                 _migrate_7, _migrate_8)
SCHEMA_VERSION = len(MIGRATIONS)


def _has_tables(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' LIMIT 1").fetchone() is not None


def backup_database(conn: sqlite3.Connection, directory: Path, version: int | str) -> Path:
    """A consistent copy of the database (SQLite's online backup), mode 0600, in ``directory``
    (``version``: the index's schema version, or ``dREVISION`` before a directory migration)."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = directory / f"archiver.sqlite3.v{version}-{stamp}.bak"
    n = 1
    while path.exists():
        path = directory / f"archiver.sqlite3.v{version}-{stamp}-{n}.bak"
        n += 1
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    target = sqlite3.connect(path)
    try:
        conn.backup(target)
    finally:
        target.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def migrate(conn: sqlite3.Connection, backup_dir: Path) -> tuple[int, Path | None]:
    """Bring the database to SCHEMA_VERSION: a backup first (unless it is new), then each
    forward migration in a transaction of its own with the version it reaches, so a crash
    leaves a database at a known version. Returns (version found, backup path or None)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise UsageError(
            f"The Archiver's database has schema version {version}; this Archiver knows up "
            f"to {SCHEMA_VERSION}.", "Run the newer Archiver that wrote it, or restore a backup.")
    backup = None
    if version < SCHEMA_VERSION and _has_tables(conn):
        backup = backup_database(conn, backup_dir, version)
        log.warning("migrating the database from schema version %d to %d (backup: %s)",
                    version, SCHEMA_VERSION, backup)
    for target in range(version + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[target - 1](conn)
            conn.execute(f"PRAGMA user_version={target}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return version, backup


def _expected_schema() -> dict[str, tuple[str, str | None]]:
    """name -> (type, CREATE statement) of every table and index a new database gets."""
    reference = sqlite3.connect(":memory:")
    try:
        migrate(reference, Path())  # a new database: no backup is made
        return {name: (kind, sql) for kind, name, sql in reference.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")}
    finally:
        reference.close()


def missing_tables(conn: sqlite3.Connection) -> list[str]:
    """The tables of the current schema that a database at the current version lacks (someone
    dropped them, or the file was damaged)."""
    present = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    return sorted(name for name, (kind, _) in _expected_schema().items()
                  if kind == "table" and name not in present)


def restore_missing_tables(conn: sqlite3.Connection) -> list[str]:
    """Create the missing tables (empty), their indexes and triggers, for ``reindex`` to refill
    what the archive files hold. Returns the tables created."""
    expected = _expected_schema()
    missing = missing_tables(conn)
    if not missing:
        return []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for name in missing:
            conn.execute(str(expected[name][1]))
        present = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        for name, (kind, sql) in expected.items():
            if kind in ("index", "trigger") and sql and name not in present:
                conn.execute(sql)
        if {"chain_records", "epoch_uses"} & set(missing):
            # Counted again from the records left: an opener counted short would be shredded
            # while a viewer's record still needs it (one counted long, never).
            conn.execute("DELETE FROM epoch_uses")
            conn.execute("INSERT INTO epoch_uses (epoch_id, records)"
                         " SELECT epoch_id, COUNT(*) FROM chain_records GROUP BY epoch_id")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return missing
