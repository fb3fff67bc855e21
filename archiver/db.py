"""The Archiver's metadata in SQLite: cameras, authorized viewers, the segment index and the
per-viewer key streams.

Nothing secret is stored here: camera tokens only as SHA-256 hashes, viewers as public
certificates, key streams as RSA-OAEP epoch openers and AES-GCM-wrapped key records.
Writes go through one connection behind one lock (SQLite serializes them anyway). Reads use a
connection per thread in WAL mode: a slow viewer query must not hold up ingest's writes.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass
from pathlib import Path

from archiver.storage import StorageFailed, StorageFull

SCHEMA = """
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
    end_ms INTEGER NOT NULL DEFAULT 0,
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
# Columns added after a release of the schema: (table, column, definition). Added at the end of
# the table, so positional reads stay valid for older data directories.
ADDED_COLUMNS = (
    # The end of the video a segment holds (capture_ms is its start); 0 in older archives.
    ("segments", "end_ms", "INTEGER NOT NULL DEFAULT 0"),
)
INDEXES_ON_ADDED_COLUMNS = """
CREATE INDEX IF NOT EXISTS segments_by_time ON segments (camera, stream, end_ms);
"""


@dataclass(frozen=True)
class CameraRow:
    name: str
    token_sha256: bytes
    rtsp_url: str | None
    created_ms: int
    removed_ms: int | None


@dataclass(frozen=True)
class ClientRow:
    fingerprint: str
    certificate: bytes
    subject: str
    oaep_hash: int
    all_cameras: bool
    cameras: tuple[str, ...]
    added_ms: int
    revoked_ms: int | None
    key_streams_deleted: bool

    def authorized_on(self, camera: str) -> bool:
        return self.revoked_ms is None and (self.all_cameras or camera in self.cameras)


@dataclass(frozen=True)
class SegmentRow:
    camera: str
    stream: int
    seq: int
    capture_ms: int
    key_id: bytes
    plaintext_bytes: int
    digest: bytes  # SHA-256 of the segment record, as its manifest entry carries it
    file: str
    offset: int
    length: int
    manifest_seq: int
    end_ms: int  # the end of the video it holds; capture_ms is its start


@dataclass(frozen=True)
class ManifestRow:
    camera: str
    manifest_seq: int
    file: str
    offset: int
    length: int
    hash: bytes
    first_capture_ms: int
    last_capture_ms: int


@dataclass(frozen=True)
class GrantRow:
    """Where a minute key's signed key grant (the viewers it was wrapped for) is archived."""

    key_id: bytes
    camera: str
    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class KeyMaterial:
    """What one key rotation writes for one viewer: maybe an epoch opener, always a key record."""

    fingerprint: str
    camera: str
    key_id: bytes
    epoch_id: bytes
    valid_from_ms: int
    key_record: bytes
    epoch_opener: bytes | None


def _storage_error(exc: sqlite3.OperationalError) -> StorageFull | StorageFailed | None:
    """A full disk or an I/O error under the index is the archive's problem, answered like
    one (507/503), not an unexpected error."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # primary code of an extended one
    if code == sqlite3.SQLITE_FULL:
        return StorageFull("The archive disk is full; the Archiver could not update its index.",
                           "Free space or add storage; ingest resumes by itself.")
    if code == sqlite3.SQLITE_IOERR:
        return StorageFailed("An I/O error occurred while updating the Archiver's index.")
    return None


class _ReadConnection(sqlite3.Connection):
    """A read connection (a subclass only so that it can be weakly referenced)."""


class Database:
    def __init__(self, path: Path) -> None:
        # Created 0600: SQLite gives its -wal and -shm files the database file's mode.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._path = path
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._local = threading.local()
        # Weak: a worker thread that ends (anyio retires idle ones) takes its connection along.
        self._readers: weakref.WeakSet[_ReadConnection] = weakref.WeakSet()
        self._readers_lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: an acknowledged segment's index entry survives power loss, not just a crash.
            self._conn.execute("PRAGMA synchronous=FULL")
            # A process killed inside COMMIT can leave a complete transaction in the WAL that
            # the shared-memory index never published: unacknowledged and invisible now, it
            # could reappear after a power loss, pointing at archive bytes that recovery has
            # cut. Checkpoint and empty the WAL at open, so there is one state to recover from.
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(SCHEMA)
            for table, column, definition in ADDED_COLUMNS:
                present = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
                if column not in present:
                    self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            self._conn.executescript(INDEXES_ON_ADDED_COLUMNS)

    def close(self) -> None:
        with self._readers_lock:
            for reader in list(self._readers):
                reader.close()
        with self._lock:
            self._conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                    self._conn.execute("COMMIT")
                except BaseException:
                    # A COMMIT that failed (disk full) leaves the transaction open: end it, or
                    # every later write would fail even once space returns.
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                error = _storage_error(exc)
                if error is None:
                    raise
                raise error from None

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only connection (WAL: readers see the last commit and neither
        wait for the writer nor make it wait)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None,
                                   factory=_ReadConnection)
            conn.execute("PRAGMA query_only=ON")
            with self._readers_lock:
                self._readers.add(conn)
            self._local.conn = conn
        return conn

    def _query(self, sql: str, args: Iterable[object] = ()) -> list[tuple]:
        return self._reader().execute(sql, tuple(args)).fetchall()

    # --- cameras ----------------------------------------------------------------------
    def add_camera(self, name: str, token_sha256: bytes, rtsp_url: str | None, now_ms: int) -> bool:
        """False if a camera of that name exists (removed cameras keep their name: evidence)."""
        with self._transaction() as conn:
            if conn.execute("SELECT 1 FROM cameras WHERE name=?", (name,)).fetchone():
                return False
            conn.execute("INSERT INTO cameras VALUES (?,?,?,?,NULL)",
                         (name, token_sha256, rtsp_url, now_ms))
            return True

    def cameras(self, include_removed: bool = False) -> list[CameraRow]:
        where = "" if include_removed else " WHERE removed_ms IS NULL"
        return [CameraRow(*row) for row in self._query(f"SELECT * FROM cameras{where} ORDER BY name")]  # noqa: S608

    def camera(self, name: str) -> CameraRow | None:
        rows = self._query("SELECT * FROM cameras WHERE name=?", (name,))
        return CameraRow(*rows[0]) if rows else None

    def remove_camera(self, name: str, now_ms: int) -> bool:
        with self._transaction() as conn:
            cur = conn.execute(
                "UPDATE cameras SET removed_ms=? WHERE name=? AND removed_ms IS NULL", (now_ms, name))
            return cur.rowcount == 1

    # --- viewers ----------------------------------------------------------------------
    def add_client(self, fingerprint: str, certificate: bytes, subject: str, oaep_hash: int,
                   cameras: Iterable[str] | None, now_ms: int) -> None:
        """Authorize (or re-authorize) a viewer; cameras None means all cameras, present and future."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM client_cameras WHERE fingerprint=?", (fingerprint,))
            conn.execute(
                "INSERT INTO clients VALUES (?,?,?,?,?,?,NULL,0) ON CONFLICT(fingerprint) DO UPDATE"
                " SET oaep_hash=excluded.oaep_hash, all_cameras=excluded.all_cameras,"
                " revoked_ms=NULL",
                (fingerprint, certificate, subject, oaep_hash, int(cameras is None), now_ms))
            conn.executemany("INSERT INTO client_cameras VALUES (?,?)",
                             [(fingerprint, c) for c in cameras or ()])

    def clients(self) -> list[ClientRow]:
        cameras: dict[str, list[str]] = {}
        for fp, cam in self._query("SELECT fingerprint, camera FROM client_cameras ORDER BY camera"):
            cameras.setdefault(fp, []).append(cam)
        return [
            ClientRow(fp, cert, subject, oaep, bool(all_cams), tuple(cameras.get(fp, ())),
                      added, revoked, bool(deleted))
            for fp, cert, subject, oaep, all_cams, added, revoked, deleted
            in self._query("SELECT * FROM clients ORDER BY added_ms")
        ]

    def client(self, fingerprint: str) -> ClientRow | None:
        return next((c for c in self.clients() if c.fingerprint == fingerprint), None)

    def revoke_client(self, fingerprint: str, now_ms: int, delete_key_streams: bool) -> bool:
        with self._transaction() as conn:
            cur = conn.execute(
                "UPDATE clients SET revoked_ms=COALESCE(revoked_ms, ?) WHERE fingerprint=?",
                (now_ms, fingerprint))
            if cur.rowcount != 1:
                return False
            if delete_key_streams:
                conn.execute("DELETE FROM key_records WHERE fingerprint=?", (fingerprint,))
                conn.execute("DELETE FROM epochs WHERE fingerprint=?", (fingerprint,))
                conn.execute("UPDATE clients SET key_streams_deleted=1 WHERE fingerprint=?",
                             (fingerprint,))
            return True

    # --- key streams ------------------------------------------------------------------
    def store_key_material(self, items: Iterable[KeyMaterial], now_ms: int) -> None:
        with self._transaction() as conn:
            for item in items:
                if item.epoch_opener is not None:
                    conn.execute("INSERT INTO epochs VALUES (?,?,?,?)",
                                 (item.epoch_id, item.fingerprint, now_ms, item.epoch_opener))
                conn.execute("INSERT INTO key_records VALUES (?,?,?,?,?,?)",
                             (item.fingerprint, item.key_id, item.camera, item.epoch_id,
                              item.valid_from_ms, item.key_record))

    def restore_key_material(self, openers: Iterable[tuple[bytes, str, int, bytes]],
                             records: Iterable[KeyMaterial]) -> None:
        """Put back epoch openers ``(epoch_id, fingerprint, created_ms, record)`` and key records
        read from the archive's key journals; what the database still has is kept."""
        with self._transaction() as conn:
            conn.executemany("INSERT OR IGNORE INTO epochs VALUES (?,?,?,?)", list(openers))
            conn.executemany("INSERT OR IGNORE INTO key_records VALUES (?,?,?,?,?,?)",
                             [(m.fingerprint, m.key_id, m.camera, m.epoch_id, m.valid_from_ms,
                               m.key_record) for m in records])

    def key_record(self, fingerprint: str, key_id: bytes) -> tuple[bytes, bytes] | None:
        """(epoch_id, key record bytes) of this viewer for that key, if it has one."""
        rows = self._query("SELECT epoch_id, record FROM key_records WHERE fingerprint=? AND key_id=?",
                           (fingerprint, key_id))
        return (rows[0][0], rows[0][1]) if rows else None

    def epoch_opener(self, epoch_id: bytes) -> bytes | None:
        rows = self._query("SELECT record FROM epochs WHERE epoch_id=?", (epoch_id,))
        return rows[0][0] if rows else None

    # --- the segment index ------------------------------------------------------------
    def record_segments(self, segments: Iterable[SegmentRow], manifest: ManifestRow,
                        grants: Iterable[GrantRow] = ()) -> None:
        """Index a manifest and the segments it covers (and the signed key grants archived
        with them) in one transaction: the commit is the acknowledgement point (the file
        bytes were fsynced before)."""
        with self._transaction() as conn:
            conn.executemany("INSERT OR REPLACE INTO key_grants VALUES (?,?,?,?,?)",
                             [astuple(g) for g in grants])
            conn.executemany("INSERT INTO segments VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                             [astuple(s) for s in segments])
            conn.execute("INSERT INTO manifests VALUES (?,?,?,?,?,?,?,?)",
                         astuple(manifest))

    def key_grant(self, key_id: bytes) -> GrantRow | None:
        rows = self._query("SELECT * FROM key_grants WHERE key_id=?", (key_id,))
        return GrantRow(*rows[0]) if rows else None

    def replace_segment_index(self, groups: Iterable[tuple[Iterable[SegmentRow], ManifestRow]],
                              grants: Iterable[GrantRow] = ()) -> None:
        """Drop the segment, manifest and key grant index and fill it with ``groups`` and
        ``grants`` (a rebuild from the archive files), in one transaction: a failed rebuild
        leaves the old index."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM segments")
            conn.execute("DELETE FROM manifests")
            conn.execute("DELETE FROM key_grants")
            conn.executemany("INSERT OR REPLACE INTO key_grants VALUES (?,?,?,?,?)",
                             [astuple(g) for g in grants])
            for segments, manifest in groups:
                conn.executemany("INSERT INTO segments VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                                 [astuple(s) for s in segments])
                conn.execute("INSERT INTO manifests VALUES (?,?,?,?,?,?,?,?)", astuple(manifest))

    def last_manifest(self, camera: str) -> ManifestRow | None:
        rows = self._query(
            "SELECT * FROM manifests WHERE camera=? ORDER BY manifest_seq DESC LIMIT 1", (camera,))
        return ManifestRow(*rows[0]) if rows else None

    def next_segment_seq(self, camera: str, stream: int) -> int:
        rows = self._query("SELECT MAX(seq) FROM segments WHERE camera=? AND stream=?",
                           (camera, stream))
        return 0 if rows[0][0] is None else rows[0][0] + 1

    def manifests_from(self, camera: str, from_ms: int, to_ms: int, after_seq: int = -1,
                       limit: int = 256) -> list[ManifestRow]:
        """Manifests overlapping [from_ms, to_ms], in chain order, found through the time index."""
        rows = self._query(
            "SELECT * FROM manifests WHERE camera=? AND last_capture_ms>=? AND first_capture_ms<=?"
            " AND manifest_seq>? ORDER BY manifest_seq LIMIT ?",
            (camera, from_ms, to_ms, after_seq, limit))
        return [ManifestRow(*row) for row in rows]

    def manifests_after(self, camera: str, after_seq: int, limit: int = 256) -> list[ManifestRow]:
        rows = self._query(
            "SELECT * FROM manifests WHERE camera=? AND manifest_seq>? ORDER BY manifest_seq LIMIT ?",
            (camera, after_seq, limit))
        return [ManifestRow(*row) for row in rows]

    def segments_of(self, camera: str, manifest_seq: int) -> list[SegmentRow]:
        rows = self._query("SELECT * FROM segments WHERE camera=? AND manifest_seq=? ORDER BY offset",
                           (camera, manifest_seq))
        return [SegmentRow(*row) for row in rows]

    def recorded_range(self, camera: str) -> tuple[int, int, int] | None:
        """(start of the first segment, end of the last, segment count) of a camera's archive."""
        first, last, count = self._query(
            "SELECT MIN(capture_ms), MAX(MAX(end_ms, capture_ms)), COUNT(*) FROM segments"
            " WHERE camera=?", (camera,))[0]
        return None if count == 0 else (first, last, count)

    def last_segment_end(self, camera: str, stream: int) -> int | None:
        rows = self._query("SELECT MAX(end_ms, capture_ms) FROM segments WHERE camera=? AND stream=?"
                           " ORDER BY seq DESC LIMIT 1", (camera, stream))
        return rows[0][0] if rows else None

    def gaps(self, camera: str, stream: int, from_ms: int, to_ms: int,
             tolerance_ms: int) -> list[tuple[int, int]]:
        """Stretches of [from_ms, to_ms] longer than tolerance_ms with no recorded video: between
        consecutive segments, and before the first / after the last one in the range."""
        rows = self._query(
            "SELECT capture_ms, MAX(end_ms, capture_ms) FROM segments WHERE camera=? AND stream=?"
            " AND MAX(end_ms, capture_ms)>=? AND capture_ms<=? ORDER BY seq",
            (camera, stream, from_ms, to_ms))
        gaps = []
        cursor = from_ms
        for start, end in rows:
            if start - cursor > tolerance_ms:
                gaps.append((cursor, start))
            cursor = max(cursor, end)
        if to_ms - cursor > tolerance_ms:
            gaps.append((cursor, to_ms))
        return gaps

    def file_ends(self) -> dict[str, int]:
        """For crash recovery: the acknowledged end of every archive file."""
        return {file: end for file, end in
                self._query("SELECT file, MAX(offset + length) FROM manifests GROUP BY file")}
