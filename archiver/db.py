"""The Archiver's local index in SQLite: the segment index, manifests, the per-viewer key
streams (chain records and the chain recipients), epochs, chain anchors, expired files and
camera health; all of it rebuildable from the Archiver's own files (``fusion-archiver
reindex``). What belongs to the site (cameras, viewers, holds, retention settings, access
grants, admins) is the site directory's (archiver/directory/), which by default shares this
file.

Nothing secret is stored here: camera tokens only as SHA-256 hashes, viewers as public
certificates, key streams as RSA-OAEP epoch openers and AES-GCM-wrapped key records.
Writes go through one connection behind one lock (SQLite serializes them anyway). Reads use a
connection per thread in WAL mode: a slow viewer query must not hold up ingest's writes.

The schema is versioned (``PRAGMA user_version``) and changed only by the forward migrations
in archiver/migrations.py, run at open after a backup of the database; every statement names
its columns, so a table's column order does not matter.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

# The site directory's rows, importable from here as before the split.
from archiver.directory.rows import CameraRow, HoldRow, ViewerRow
from archiver.migrations import migrate, restore_missing_tables
from archiver.storage import DiskFailed, DiskFull, StorageFailed, StorageFull
from keyservice.format import CHAIN_ID_LEN, Manifest, decode_record


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
class ChainRecipientsRow:
    """Where one part of a key chain's signed chain recipients (the viewers its keys were
    wrapped for) is archived; ``key_id`` is chain id || part (u32)."""

    key_id: bytes
    camera: str
    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class ExpiredFile:
    """An archive file retention removed (or is removing: ``done`` once its bytes are gone)."""

    file: str
    camera: str
    from_ms: int
    to_ms: int
    reason: str  # "retention" or "disk space"
    removed_ms: int
    done: bool


@dataclass(frozen=True)
class HealthRow:
    """A camera's health as last saved (archiver/cameras.py HealthBoard)."""

    camera: str
    state: str
    message: str
    last_segment_ms: int | None
    saved_ms: int


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


def _columns(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _select(cls: type, table: str) -> str:
    return f"SELECT {', '.join(_columns(cls))} FROM {table}"  # noqa: S608 (names are ours)


def _insert(cls: type, table: str, verb: str = "INSERT") -> str:
    names = _columns(cls)
    return (f"{verb} INTO {table} ({', '.join(names)})"
            f" VALUES ({', '.join('?' * len(names))})")


def _values(row: Any) -> tuple[Any, ...]:
    return tuple(getattr(row, name) for name in _columns(type(row)))


_INSERT_SEGMENT = _insert(SegmentRow, "segments")
_INSERT_MANIFEST = _insert(ManifestRow, "manifests")
_INSERT_RECIPIENTS = _insert(ChainRecipientsRow, "chain_recipients", "INSERT OR REPLACE")
_INSERT_EPOCH = "INSERT INTO epochs (epoch_id, fingerprint, created_ms, record) VALUES (?,?,?,?)"
# Schema version 8: a chain's records side by side under (chain id, fingerprint), the chain's
# camera and start once in ``chains`` (archiver/migrations.py _migrate_8 says why).
_INSERT_CHAIN_RECORD = ("INSERT INTO chain_records (chain_id, fingerprint, epoch_id, record)"
                        " VALUES (?,?,?,?)")
_ROWS_PER_INSERT = 1000  # 4 000 parameters: within SQLite's default limit (32 766 since 3.32)


def _insert_chain_records(rows: int) -> str:
    return _INSERT_CHAIN_RECORD + ",(?,?,?,?)" * (rows - 1)
# A chain's start is its earliest record's: a join record, written later, does not move it.
_UPSERT_CHAIN = ("INSERT INTO chains (chain_id, camera, valid_from_ms) VALUES (?,?,?)"
                 " ON CONFLICT (chain_id) DO UPDATE SET"
                 " valid_from_ms = MIN(valid_from_ms, excluded.valid_from_ms)")

_COUNT_EPOCH_USES = ("INSERT INTO epoch_uses (epoch_id, records) VALUES (?,?) ON CONFLICT"
                     " (epoch_id) DO UPDATE SET records = records + excluded.records")

# (fingerprint, chain id, camera, epoch id, valid from, record): a chain record as the
# KeyManager and the chain preparation process hand it over.
ChainRow = tuple[str, bytes, str, bytes, int, bytes]


def _chains_of(rows: Iterable[ChainRow]) -> list[tuple[bytes, str, int]]:
    """One (chain id, camera, earliest start) per chain of ``rows``."""
    chains: dict[bytes, tuple[str, int]] = {}
    for _, chain_id, camera, _, valid_from_ms, _ in rows:
        known = chains.get(chain_id)
        if known is None or valid_from_ms < known[1]:
            chains[chain_id] = (camera, valid_from_ms)
    return [(chain_id, camera, ms) for chain_id, (camera, ms) in chains.items()]


def _write_chain_rows(conn: sqlite3.Connection, rows: Sequence[ChainRow],
                      keep_existing: bool = False) -> None:
    """The chains of ``rows`` and their records, the records in primary-key order (chain id,
    fingerprint): a chain's rows are then appended at one place of the tree, each page
    written once (a sorted list sorts again in one pass). The one writer of chain records: it
    counts them into ``epoch_uses`` (archiver/migrations.py, _V8_TRIGGERS), which shredding
    trusts; a record written without its count would let its epoch opener be shredded.
    ``keep_existing``: a record already stored is kept, and not counted again."""
    conn.executemany(_UPSERT_CHAIN, _chains_of(rows))
    records = [(chain_id, fp, epoch_id, record)
               for fp, chain_id, _, epoch_id, _, record in rows]
    records.sort()
    uses: dict[bytes, int] = {}
    if keep_existing:  # rare (a reindex): row by row, to count only the rows written
        insert = _INSERT_CHAIN_RECORD.replace("INSERT", "INSERT OR IGNORE", 1)
        for row in records:
            if conn.execute(insert, row).rowcount == 1:
                uses[row[2]] = uses.get(row[2], 0) + 1
    else:
        # Many rows a statement: sqlite3 lets go of the GIL around every step, and a thread
        # that takes it back 100 000 times queues behind busy ingest threads each time
        # (seen: 1.8 s alone, 23 s beside one busy thread, for 100 000 records).
        full = _insert_chain_records(_ROWS_PER_INSERT)
        for start in range(0, len(records), _ROWS_PER_INSERT):
            chunk = records[start:start + _ROWS_PER_INSERT]
            conn.execute(full if len(chunk) == _ROWS_PER_INSERT
                         else _insert_chain_records(len(chunk)),
                         [value for row in chunk for value in row])
        for row in records:
            uses[row[2]] = uses.get(row[2], 0) + 1
    conn.executemany(_COUNT_EPOCH_USES, uses.items())


def _storage_error(exc: sqlite3.OperationalError) -> StorageFull | StorageFailed | None:
    """A full disk or an I/O error under the index is the archive's problem, answered like
    one (507/503), not an unexpected error."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # primary code of an extended one
    if code == sqlite3.SQLITE_FULL:
        return DiskFull("The archive disk is full; the Archiver could not update its index.",
                        "Free space or add storage; ingest resumes by itself.")
    if code == sqlite3.SQLITE_IOERR:
        return DiskFailed("An I/O error occurred while updating the Archiver's index.")
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
            # Deleted rows are overwritten, not left in free pages: crypto-shredding (retention,
            # --delete-key-streams) must not leave key records readable in the file.
            self._conn.execute("PRAGMA secure_delete=ON")
            # 64 MiB of page cache for the writer (SQLite's default is 2 MiB): a batch of chain
            # records (a revocation at 10 000 viewers) touches every page of their indexes.
            self._conn.execute("PRAGMA cache_size=-65536")
            self.migrated_from, self.backup = migrate(self._conn, path.parent)

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

    def checkpoint(self) -> None:
        """Copy the WAL into the database and empty it (after shredding: its old frames still
        hold the deleted rows). Best effort while readers hold an old snapshot."""
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def restore_missing_tables(self) -> list[str]:
        """Recreate dropped tables, empty (``reindex`` refills the segment index from the files)."""
        with self._lock:
            return restore_missing_tables(self._conn)

    def schema_version(self) -> int:
        return self._query("PRAGMA user_version")[0][0]

    # --- viewers' key streams (the viewers themselves are the site directory's) --------
    def delete_key_streams(self, fingerprint: str) -> None:
        """Crypto-shredding of one viewer's key streams (``viewers revoke
        --delete-key-streams``): its chain records and epoch openers."""
        with self._transaction() as conn:
            # One primary-key search per chain (the chains table lists them), not a scan of
            # every viewer's records.
            conn.execute("DELETE FROM chain_records WHERE chain_id IN (SELECT chain_id FROM"
                         " chains) AND fingerprint=?", (fingerprint,))
            conn.execute("DELETE FROM epochs WHERE fingerprint=?", (fingerprint,))

    # --- key streams ------------------------------------------------------------------
    def store_key_material(self, items: Sequence[KeyMaterial], now_ms: int) -> None:
        """A chain's openers and records, in one transaction (executemany: a chain start at
        10 000 viewers is 10 000 rows)."""
        with self._transaction() as conn:
            conn.executemany(_INSERT_EPOCH, [
                (item.epoch_id, item.fingerprint, now_ms, item.epoch_opener)
                for item in items if item.epoch_opener is not None])
            _write_chain_rows(conn, [
                (item.fingerprint, item.key_id, item.camera, item.epoch_id, item.valid_from_ms,
                 item.key_record) for item in items])

    def store_key_rows(self, openers: Sequence[tuple[bytes, str, int, bytes]],
                       records: Sequence[ChainRow]) -> None:
        """Chain records made elsewhere (archiver.chain_worker; cheapest in primary-key order,
        chain id then fingerprint), and the epoch openers (epoch id, fingerprint, created,
        record) they need, in one transaction: the rows as tuples, no object per record."""
        with self._transaction() as conn:
            conn.executemany(_INSERT_EPOCH, openers)
            _write_chain_rows(conn, records)

    def restore_key_material(self, openers: Iterable[tuple[bytes, str, int, bytes]],
                             records: Iterable[KeyMaterial]) -> None:
        """Put back epoch openers ``(epoch_id, fingerprint, created_ms, record)`` and key records
        read from the archive's key journals; what the database still has is kept."""
        with self._transaction() as conn:
            conn.executemany(_INSERT_EPOCH.replace("INSERT", "INSERT OR IGNORE", 1),
                             list(openers))
            _write_chain_rows(conn, [
                (m.fingerprint, m.key_id, m.camera, m.epoch_id, m.valid_from_ms, m.key_record)
                for m in records], keep_existing=True)

    def chain_record(self, fingerprint: str, chain_id: bytes) -> tuple[bytes, bytes] | None:
        """(epoch_id, chain record bytes) of this viewer for that key chain, if it has one."""
        rows = self._query("SELECT epoch_id, record FROM chain_records WHERE chain_id=? AND"
                           " fingerprint=?", (chain_id, fingerprint))
        return (rows[0][0], rows[0][1]) if rows else None

    def chain_records_of(self, chain_id: bytes) -> list[tuple[str, bytes, bytes]]:
        """(fingerprint, epoch_id, record) of every viewer's chain record of one key chain
        (consolidation copies them, as they are: ciphertext for their viewers)."""
        return [(row[0], row[1], row[2]) for row in self._query(
            "SELECT fingerprint, epoch_id, record FROM chain_records WHERE chain_id=?"
            " ORDER BY fingerprint", (chain_id,))]

    def epoch_opener(self, epoch_id: bytes) -> bytes | None:
        rows = self._query("SELECT record FROM epochs WHERE epoch_id=?", (epoch_id,))
        return rows[0][0] if rows else None

    def shred_unused_keys(self, camera: str, before_ms: int) -> tuple[int, int]:
        """Crypto-shredding: delete the key material of ``camera``'s key chains started before
        ``before_ms`` that no indexed segment uses any more (every viewer's chain record; a
        segment's key id starts with its chain id), then the epoch openers no chain record
        needs. The one place that decides which key material
        is gone; returns (key records, epoch openers) deleted. ``before_ms`` keeps a key just
        rotated, whose first segment is not indexed yet, out of reach."""
        with self._transaction() as conn:
            # Not correlated: SQLite builds the set of chains in use once.
            unused = [(row[0],) for row in conn.execute(
                "SELECT chain_id FROM chains WHERE camera=? AND valid_from_ms<? AND chain_id NOT IN"
                " (SELECT DISTINCT substr(key_id, 1, ?) FROM segments WHERE camera=?)",
                (camera, before_ms, CHAIN_ID_LEN, camera))]
            # Each chain's records are one stretch of the primary key; the triggers uncount
            # them from their epochs (epoch_uses).
            records = 0
            for chain in unused:
                records += conn.execute("DELETE FROM chain_records WHERE chain_id=?",
                                        chain).rowcount
                conn.execute("DELETE FROM chains WHERE chain_id=?", chain)
            epochs = conn.execute(
                "DELETE FROM epochs WHERE created_ms<? AND NOT EXISTS"
                " (SELECT 1 FROM epoch_uses WHERE epoch_uses.epoch_id=epochs.epoch_id)",
                (before_ms,)).rowcount
            return records, epochs

    def chain_ids_in_use(self, camera: str) -> set[bytes]:
        """The key chains some indexed segment of ``camera`` uses (key journals keep only
        these)."""
        return {row[0] for row in self._query(
            "SELECT DISTINCT substr(key_id, 1, ?) FROM segments WHERE camera=?",
            (CHAIN_ID_LEN, camera))}

    # --- the segment index ------------------------------------------------------------
    def record_segments(self, segments: Iterable[SegmentRow], manifest: ManifestRow,
                        recipients: Iterable[ChainRecipientsRow] = ()) -> None:
        """Index a manifest and the segments it covers (and the signed chain recipients
        archived with them) in one transaction: the commit is the acknowledgement point (the
        file bytes were fsynced before)."""
        with self._transaction() as conn:
            conn.executemany(_INSERT_RECIPIENTS, [_values(g) for g in recipients])
            conn.executemany(_INSERT_SEGMENT, [_values(s) for s in segments])
            conn.execute(_INSERT_MANIFEST, _values(manifest))

    def chain_recipients(self, key_id: bytes) -> ChainRecipientsRow | None:
        """Where the chain recipients part ``key_id`` (chain id || part) is archived."""
        rows = self._query(f"{_select(ChainRecipientsRow, 'chain_recipients')} WHERE key_id=?",
                           (key_id,))
        return ChainRecipientsRow(*rows[0]) if rows else None

    def replace_segment_index(self, groups: Iterable[tuple[Iterable[SegmentRow], ManifestRow]],
                              recipients: Iterable[ChainRecipientsRow] = ()) -> None:
        """Drop the segment, manifest and chain recipients index and fill it with ``groups``
        and ``recipients`` (a rebuild from the archive files), in one transaction: a failed
        rebuild leaves the old index."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM segments")
            conn.execute("DELETE FROM manifests")
            conn.execute("DELETE FROM chain_recipients")
            conn.executemany(_INSERT_RECIPIENTS, [_values(g) for g in recipients])
            for segments, manifest in groups:
                conn.executemany(_INSERT_SEGMENT, [_values(s) for s in segments])
                conn.execute(_INSERT_MANIFEST, _values(manifest))

    def last_manifest(self, camera: str) -> ManifestRow | None:
        rows = self._query(f"{_select(ManifestRow, 'manifests')} WHERE camera=?"
                           " ORDER BY manifest_seq DESC LIMIT 1", (camera,))
        return ManifestRow(*rows[0]) if rows else None

    def chain_tail(self, camera: str) -> tuple[int, bytes] | None:
        """(sequence, SHA-256) of the camera's last manifest: indexed, or kept as an anchor
        when retention removed everything after it was issued. A camera whose whole archive
        expired continues its chain; it does not start a new one."""
        tails = []
        last = self.last_manifest(camera)
        if last is not None:
            tails.append((last.manifest_seq, last.hash))
        rows = self._query("SELECT manifest_seq, record FROM chain_anchors WHERE camera=?"
                           " ORDER BY manifest_seq DESC LIMIT 1", (camera,))
        if rows:
            tails.append((rows[0][0], hashlib.sha256(rows[0][1]).digest()))
        return max(tails) if tails else None

    def next_segment_seq(self, camera: str, stream: int) -> int:
        rows = self._query("SELECT MAX(seq) FROM segments WHERE camera=? AND stream=?",
                           (camera, stream))
        if rows[0][0] is not None:
            return rows[0][0] + 1
        # All of the stream's segments expired: go on after those its last anchor covers.
        anchors = self._query("SELECT record FROM chain_anchors WHERE camera=?"
                              " ORDER BY manifest_seq DESC LIMIT 1", (camera,))
        if anchors:
            manifest = decode_record(anchors[0][0])
            if isinstance(manifest, Manifest):
                seqs = [e.seq for e in manifest.entries if int(e.stream) == stream]
                if seqs:
                    return max(seqs) + 1
        return 0

    def manifests_from(self, camera: str, from_ms: int, to_ms: int, after_seq: int = -1,
                       limit: int = 256) -> list[ManifestRow]:
        """Manifests overlapping [from_ms, to_ms], in chain order, found through the time index."""
        rows = self._query(
            f"{_select(ManifestRow, 'manifests')} WHERE camera=? AND last_capture_ms>=?"
            " AND first_capture_ms<=? AND manifest_seq>? ORDER BY manifest_seq LIMIT ?",
            (camera, from_ms, to_ms, after_seq, limit))
        return [ManifestRow(*row) for row in rows]

    def manifests_after(self, camera: str, after_seq: int, limit: int = 256) -> list[ManifestRow]:
        rows = self._query(
            f"{_select(ManifestRow, 'manifests')} WHERE camera=? AND manifest_seq>?"
            " ORDER BY manifest_seq LIMIT ?", (camera, after_seq, limit))
        return [ManifestRow(*row) for row in rows]

    def manifests_in_file(self, file: str) -> list[ManifestRow]:
        rows = self._query(f"{_select(ManifestRow, 'manifests')} WHERE file=?"
                           " ORDER BY manifest_seq", (file,))
        return [ManifestRow(*row) for row in rows]

    def segments_of(self, camera: str, manifest_seq: int) -> list[SegmentRow]:
        rows = self._query(f"{_select(SegmentRow, 'segments')} WHERE camera=? AND manifest_seq=?"
                           " ORDER BY offset", (camera, manifest_seq))
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

    # --- retention --------------------------------------------------------------------
    def file_span(self, file: str) -> tuple[int, int, int] | None:
        """(first start, last end, segment count) of the video indexed in one archive file."""
        first, last, count = self._query(
            "SELECT MIN(capture_ms), MAX(MAX(end_ms, capture_ms)), COUNT(*) FROM segments"
            " WHERE file=?", (file,))[0]
        return None if count == 0 else (first, last, count)

    def expire_file(self, file: str, camera: str, from_ms: int, to_ms: int, reason: str,
                    now_ms: int, anchors: Iterable[tuple[int, bytes]] = ()) -> None:
        """Step 1 of removing an archive file: in one transaction, its tombstone (a pending
        removal) and its index rows go, and its first and last signed manifests are kept as
        chain anchors ``(manifest_seq, record)`` (no key material: they link the chain around
        the gap). The key material no segment needs any more is shredded next
        (``shred_unused_keys``), then the files."""
        with self._transaction() as conn:
            conn.executemany("INSERT OR IGNORE INTO chain_anchors (camera, manifest_seq, record)"
                             " VALUES (?,?,?)", [(camera, seq, rec) for seq, rec in anchors])
            conn.execute(
                "INSERT INTO expired_files (file, camera, from_ms, to_ms, reason, removed_ms,"
                " done) VALUES (?,?,?,?,?,?,0) ON CONFLICT(file) DO NOTHING",
                (file, camera, from_ms, to_ms, reason, now_ms))
            conn.execute("DELETE FROM segments WHERE file=?", (file,))
            conn.execute("DELETE FROM manifests WHERE file=?", (file,))
            conn.execute("DELETE FROM chain_recipients WHERE file=?", (file,))

    def anchor(self, camera: str, manifest_seq: int) -> bytes | None:
        """The signed manifest kept from removed video, to serve as a range's edge."""
        rows = self._query("SELECT record FROM chain_anchors WHERE camera=? AND manifest_seq=?",
                           (camera, manifest_seq))
        return rows[0][0] if rows else None

    def file_removed(self, file: str) -> None:
        with self._transaction() as conn:
            conn.execute("UPDATE expired_files SET done=1 WHERE file=?", (file,))

    def expired_files(self, camera: str | None = None, pending_only: bool = False) -> list[ExpiredFile]:
        where, args = [], []
        if camera is not None:
            where.append("camera=?")
            args.append(camera)
        if pending_only:
            where.append("done=0")
        sql = _select(ExpiredFile, "expired_files")
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [ExpiredFile(*row[:6], bool(row[6]))
                for row in self._query(sql + " ORDER BY to_ms", args)]

    def expired_until(self, camera: str) -> int | None:
        """The end of the latest video of ``camera`` that retention removed, if any."""
        value = self._query("SELECT MAX(to_ms) FROM expired_files WHERE camera=?", (camera,))[0][0]
        return value

    def save_camera_health(self, rows: list[HealthRow]) -> None:
        if not rows:
            return
        with self._transaction() as conn:
            conn.executemany(_insert(HealthRow, "camera_health", "INSERT OR REPLACE"),
                             [_values(row) for row in rows])

    def camera_health(self) -> list[HealthRow]:
        return [HealthRow(*row) for row in self._query(_select(HealthRow, "camera_health"))]


__all__ = ["CameraRow", "ChainRecipientsRow", "ChainRow", "Database", "ExpiredFile", "HealthRow", "HoldRow",
           "KeyMaterial", "ManifestRow", "SegmentRow", "ViewerRow"]
