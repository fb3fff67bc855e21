"""The site directory's schema, once for both backends (SQLite, the embedded default, and
PostgreSQL): SQLAlchemy Core ``Table`` objects. Alembic's revisions (alembic/versions/) create
and change these tables; ``tests/archiver/test_directory_schema.py`` checks that the revisions
and this metadata agree on both backends.

Types: ``Ms`` is a millisecond timestamp (BIGINT on PostgreSQL, INTEGER on SQLite, which is
64-bit anyway and is what the legacy index declared), so an old SQLite file and a new one
compare equal to this metadata.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    text,
)

# 64-bit on both backends (SQLite's INTEGER is; PostgreSQL's INTEGER is not).
Ms = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

# --- revision 0001: the directory tables of the legacy index at version 7 ---------------

cameras = Table(
    "cameras", metadata,
    Column("name", Text, primary_key=True),
    Column("token_sha256", LargeBinary, nullable=False),  # the camera's token, hashed only
    Column("rtsp_url", Text),
    Column("created_ms", Ms, nullable=False),
    Column("removed_ms", Ms),
    Column("retention_days", Integer),  # NULL: the site default
    # Revision 0002: the Archiver that records the camera (NULL: the Archiver that added it,
    # the only one of a standalone site).
    Column("archiver", Text),
    # Revision 0003: every Archiver of camera_archivers records it at once (redundant archiving).
    Column("redundant", Integer, nullable=False, server_default=text("0")),
)

viewers = Table(
    "viewers", metadata,
    Column("fingerprint", Text, primary_key=True),
    Column("certificate", LargeBinary, nullable=False),  # DER, public
    Column("subject", Text, nullable=False),
    Column("oaep_hash", Integer, nullable=False),  # the KeyScheme's wire byte
    Column("all_cameras", Integer, nullable=False),
    Column("added_ms", Ms, nullable=False),
    Column("revoked_ms", Ms),
    Column("key_streams_deleted", Integer, nullable=False, server_default=text("0")),
)

viewer_cameras = Table(
    "viewer_cameras", metadata,
    Column("fingerprint", Text, nullable=False),
    Column("camera", Text, nullable=False),
    PrimaryKeyConstraint("fingerprint", "camera"),
)

holds = Table(
    "holds", metadata,
    Column("hold_id", Ms, primary_key=True, autoincrement=True),
    Column("camera", Text, nullable=False),
    Column("from_ms", Ms, nullable=False),
    Column("to_ms", Ms, nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_by", Text, nullable=False),
    Column("created_ms", Ms, nullable=False),
    Index("holds_by_camera", "camera", "from_ms", "to_ms"),
    # Hold ids are never reused (an audit entry names one): SQLite's AUTOINCREMENT, as the
    # legacy index declared it; PostgreSQL's sequence never reuses a value either.
    sqlite_autoincrement=True,
)

access_grants = Table(
    "access_grants", metadata,
    Column("grant_id", Text, primary_key=True),
    Column("camera", Text, nullable=False),
    Column("from_ms", Ms, nullable=False),
    Column("to_ms", Ms, nullable=False),
    Column("grantor", Text, nullable=False),
    Column("grantee", Text, nullable=False),
    Column("key_count", Integer, nullable=False),
    Column("created_ms", Ms, nullable=False),
    Column("state", Text, nullable=False),
    Column("decided_ms", Ms),
    Column("decided_by", Text),
    Column("note", Text),
    Column("blob", LargeBinary, nullable=False),  # the grant as the grantor sent it (opaque)
    Index("access_grants_by_grantee", "grantee"),
)

admins = Table(
    "admins", metadata,
    Column("fingerprint", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("certificate", LargeBinary, nullable=False),
    Column("subject", Text, nullable=False),
    Column("oaep_hash", Integer, nullable=False),
    Column("added_ms", Ms, nullable=False),
    Column("added_by", Text, nullable=False),
    Column("revoked_ms", Ms),
    Column("revoked_by", Text),
    UniqueConstraint("name"),  # never reused: the audit log names admins by it
)

# --- revision 0002: what a site of several Archivers adds -------------------------------

archivers = Table(
    "archivers", metadata,
    Column("name", Text, primary_key=True),
    Column("url", Text, nullable=False),
    Column("certificate", LargeBinary, nullable=False),  # its signing certificate, DER
    Column("registered_ms", Ms, nullable=False),
    Column("heartbeat_ms", Ms),  # NULL: never heard of since registration
)

# Where each camera was recorded, and since when: a row per placement (``cameras add`` makes the
# first, ``cameras move`` the next). A range of a moved camera is played from each part's
# Archiver; the history stays where it was recorded.
camera_placements = Table(
    "camera_placements", metadata,
    Column("camera", Text, nullable=False),
    Column("since_ms", Ms, nullable=False),
    Column("archiver", Text, nullable=False),
    PrimaryKeyConstraint("camera", "since_ms"),
)

# --- revision 0003: no single point of failure ---------------------------------------

# The Archivers assigned to a camera, in order: rank 0 the primary, then its standbys (``cameras
# add --archivers a1,a2,a3``). None for a camera of one Archiver (``cameras.archiver`` only).
# ``cameras.archiver`` stays the one recording it now (a failover changes it, not this list).
camera_archivers = Table(
    "camera_archivers", metadata,
    Column("camera", Text, nullable=False),
    Column("rank", Integer, nullable=False),
    Column("archiver", Text, nullable=False),
    PrimaryKeyConstraint("camera", "rank"),
    UniqueConstraint("camera", "archiver"),
)

# Who records a camera with standbys now: its lease (issue 22). ``holder`` renews ``expires_ms``
# while it records; ``epoch`` grows at each change of holder (a takeover, a move), so two
# Archivers can never both believe they hold the same epoch. The fast signal of a dead holder is
# its session-level advisory lock (archiver/directory/leases.py); the expiry is the backstop.
camera_leases = Table(
    "camera_leases", metadata,
    Column("camera", Text, primary_key=True),
    Column("holder", Text, nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("expires_ms", Ms, nullable=False),
    # 1: the holder held the camera's advisory lock when it last renewed. Only then is a free
    # lock its death; a holder that took over under a lock still held (an expired lease) has
    # 0 until it gets the lock, and only the expiry takes the camera from it.
    Column("locked", Integer, nullable=False, server_default=text("0")),
)

# The site's audit log: each Archiver's audit.jsonl lines, as written (``entry``) with the
# SHA-256 of the line, in that Archiver's order (``seq``: its line number). The file stays the
# Archiver's tamper-evident copy (hash-chained, fsynced before the row is written).
audit_events = Table(
    "audit_events", metadata,
    Column("archiver", Text, nullable=False),
    Column("seq", Ms, nullable=False),
    Column("ts_ms", Ms, nullable=False),
    Column("actor", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("entry", Text, nullable=False),
    Column("line_sha256", Text, nullable=False),
    PrimaryKeyConstraint("archiver", "seq"),
    Index("audit_events_by_time", "ts_ms"),
)

# The tables the legacy SQLite migrations (archiver/migrations.py, up to version 7) made:
# an old data directory's file already has them, and Alembic stamps revision 0001 on it.
LEGACY_TABLES = ("cameras", "viewers", "viewer_cameras", "holds", "access_grants", "admins")
