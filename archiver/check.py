"""``fusion-archiver check``: an operator's fsck of the archive against its index.

Reads the archive files with the wire-format decoder and the SQLite index read-only, and
verifies, independently of how ingest wrote them:

* every archive file is a sequence of complete, well-formed records (no torn tail);
* every record is indexed at its offset, and every index row points at a record of its kind
  with the same camera, stream, sequence number, capture time, key id, length and SHA-256;
* every manifest's and chain recipients record's signature verifies under the Archiver's key, and each
  manifest's entries are exactly the segments before it;
* each camera's manifests form one unbroken hash chain (from sequence 0, or from where
  retention removed the start);
* the key journals are well framed; video retention is removing is reported, not flagged, but
  only where retention's own rules would remove it (a tombstone row alone proves nothing);
* no archive file or key journal is a symbolic link (never followed out of the data directory).

A damaged index (a table dropped, the file unreadable) is ``IndexDamaged``, exit code 3, with
the command that rebuilds it.

Problems are plain sentences; ``fusion-archiver reindex`` (or ``check --rebuild-index``)
rebuilds the index from the files when the files are sound and the index is not.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import re
import sqlite3
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from archiver.migrations import SCHEMA_VERSION, missing_tables
from archiver.reindex import linked
from archiver.retention import DAY_MS, REASON_DISK, REASON_RETENTION, day_start_ms
from keyservice.crypto import chain_key_id
from keyservice.errors import FormatError, KeyServiceError, UsageError
from keyservice.exitcodes import ExitCode
from keyservice.format import (
    RECORD_HEADER_LEN,
    ZERO_HASH,
    ChainRecipients,
    Manifest,
    RecordType,
    Segment,
    decode_record,
    max_body,
)

_HEADER = struct.Struct(">BI")
_ECDSA = ec.ECDSA(hashes.SHA256())
_JOURNAL_KINDS = (RecordType.EPOCH_OPENER, RecordType.CHAIN_RECORD)
_ARCHIVE_KINDS = (RecordType.SEGMENT, RecordType.MANIFEST, RecordType.CHAIN_RECIPIENTS)


@dataclass(frozen=True)
class Problem:
    kind: str  # damaged_record, truncated, unindexed, index_mismatch, missing, bad_signature,
    #            chain_broken, journal_damaged, link, expiry_unjustified, consolidated_part
    file: str | None
    offset: int | None
    message: str


@dataclass
class CheckReport:
    files: int = 0
    journals: int = 0
    segments: int = 0
    manifests: int = 0
    cameras: dict[str, int] = field(default_factory=dict)  # camera -> manifests checked
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    consolidated: list[dict[str, object]] = field(default_factory=list)  # verified, each

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, object]:
        return {"ok": self.ok, "files": self.files, "journals": self.journals,
                "segments": self.segments, "manifests": self.manifests,
                "cameras": self.cameras, "problems": [asdict(p) for p in self.problems],
                "notes": self.notes, "consolidated": self.consolidated}


def _signed(key: ec.EllipticCurvePublicKey, record: Manifest | ChainRecipients) -> bool:
    try:
        key.verify(record.signature, record.signed_bytes(), _ECDSA)
    except (InvalidSignature, ValueError):
        return False
    return True


def _same(row: tuple, expected: tuple) -> bool:
    """An index row equals what the file holds (bytes compared in constant time, as
    everywhere in the Archiver)."""
    return len(row) == len(expected) and all(
        hmac.compare_digest(a, b) if isinstance(a, bytes) and isinstance(b, bytes)
        else type(a) is type(b) and a == b
        for a, b in zip(row, expected, strict=True))


EXIT_DAMAGED = ExitCode.ARCHIVE_DAMAGED
REBUILD_ADVICE = ("Rebuild it from the archive files with 'fusion-archiver reindex --data DIR' "
                  "(Archiver stopped).")


class IndexDamaged(KeyServiceError):
    """The SQLite index cannot be read as an index (a table dropped, the file damaged)."""

    exit_code = EXIT_DAMAGED


def _open_index(db_path: Path) -> sqlite3.Connection:
    if not db_path.exists():
        raise UsageError(f"There is no Archiver index at {db_path}.")
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        missing = missing_tables(conn) if version == SCHEMA_VERSION else []
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise IndexDamaged(f"The index {db_path.name} is damaged ({exc}).", REBUILD_ADVICE) from None
    if version != SCHEMA_VERSION:
        conn.close()
        raise UsageError(f"The index has schema version {version}, this checker reads "
                         f"{SCHEMA_VERSION}.", "Start the Archiver once to migrate it.")
    if missing:
        conn.close()
        raise IndexDamaged(f"The index {db_path.name} is damaged: its table(s) "
                           f"{', '.join(missing)} are missing.", REBUILD_ADVICE)
    return conn


@dataclass(frozen=True)
class _Tombstone:
    camera: str
    from_ms: int
    to_ms: int
    reason: str
    removed_ms: int
    done: bool


def _signed_last_capture(data: bytes, key: ec.EllipticCurvePublicKey) -> int | None:
    """The latest capture time of a segment a valid signed manifest of this file covers: what
    the file itself proves about its age (an index row or a tombstone proves nothing)."""
    captures: dict[bytes, int] = {}
    last = None
    pos = 0
    while pos + RECORD_HEADER_LEN <= len(data):
        kind, length = _HEADER.unpack_from(data, pos)
        end = pos + RECORD_HEADER_LEN + length
        if kind not in _ARCHIVE_KINDS or length > max_body(kind) or end > len(data):
            break
        raw = data[pos:end]
        pos = end
        try:
            record = decode_record(raw)
        except FormatError:
            continue
        if isinstance(record, Segment):
            captures[hashlib.sha256(raw).digest()] = record.capture_ms
        elif isinstance(record, Manifest) and _signed(key, record):
            for entry in record.entries:
                capture = captures.get(entry.digest)
                if capture is not None:
                    last = capture if last is None else max(last, capture)
    return last


def _unjustified(rel: str, tombstone: _Tombstone, data: bytes, key: ec.EllipticCurvePublicKey,
                 retention_days: int, holds: list[tuple[str, int, int]],
                 kept_days: list[tuple[str, str]], now_ms: int) -> str | None:
    """Why retention's own rules would not have removed this file when its tombstone says they
    did (None: they would have). A tombstone is just a row: whoever can write the index could
    add one to hide a damaged or doctored day from this check."""
    camera, _, name = rel.partition("/")
    day = name.removesuffix(".fsa")
    try:
        day_start = day_start_ms(day)
    except ValueError:
        return "its file name is not an archive day"
    if tombstone.camera != camera:
        return f"it names camera '{tombstone.camera}'"
    if tombstone.done:
        return "it says the removal finished, yet the file is still there"
    if tombstone.removed_ms > now_ms:
        return "its removal time is in the future"
    last = _signed_last_capture(data, key)
    video_end = max(day_start + DAY_MS - 1, last if last is not None else 0)
    if tombstone.reason == REASON_RETENTION:
        cutoff = tombstone.removed_ms - retention_days * DAY_MS
        if video_end >= cutoff:
            return (f"its signed video was within the retention period of {retention_days} "
                    "day(s) when it was removed (if the site's default is shorter, give it "
                    "with --retention-days)")
    elif tombstone.reason == REASON_DISK:
        if day_start + DAY_MS > tombstone.removed_ms:
            return "the disk watermark never removes the day in progress"
        # The watermark removes the oldest unheld day first: an older one still kept belies it.
        for other_day, other_camera in kept_days:
            other_start = day_start_ms(other_day)
            if other_day < day and not _held(holds, other_camera, other_start,
                                             other_start + DAY_MS - 1):
                return (f"the older day {other_camera}/{other_day} is kept, and the disk "
                        "watermark removes the oldest unheld day first")
    else:
        return f"'{tombstone.reason}' is not a reason retention removes video for"
    if _held(holds, camera, day_start, video_end):
        return "an evidence hold covers it"
    return None


def _site_rules(url: str, data_dir: Path, default_retention_days: int
                ) -> tuple[dict[str, int], list[tuple[str, int, int]]]:
    """The cameras' retention and the holds, from a PostgreSQL site directory."""
    from archiver.directory import open_directory

    directory = open_directory(url, data_dir)
    try:
        return ({c.name: c.retention_days or default_retention_days
                 for c in directory.cameras(include_removed=True)},
                [(h.camera, h.from_ms, h.to_ms) for h in directory.holds()])
    finally:
        directory.close()


def _held(holds: list[tuple[str, int, int]], camera: str, start_ms: int, end_ms: int) -> bool:
    return any(h_camera == camera and h_from <= end_ms and h_to >= start_ms
               for h_camera, h_from, h_to in holds)


def check_archive(data_dir: Path, key: ec.EllipticCurvePublicKey, default_retention_days: int = 30,
                  now_ms: int | None = None, directory_url: str | None = None) -> CheckReport:
    """``directory_url``: the site directory (PostgreSQL) holding the cameras' retention and
    the holds; without it, the data directory's own file holds them."""
    try:
        return _check_archive(data_dir, key, default_retention_days,
                              int(time.time() * 1000) if now_ms is None else now_ms,
                              directory_url)
    except sqlite3.DatabaseError as exc:
        raise IndexDamaged(f"The index archiver.sqlite3 is damaged ({exc}).",
                           REBUILD_ADVICE) from None


def _check_archive(data_dir: Path, key: ec.EllipticCurvePublicKey, default_retention_days: int,
                   now_ms: int, directory_url: str | None = None) -> CheckReport:
    archive = data_dir / "archive"
    conn = _open_index(data_dir / "archiver.sqlite3")
    try:
        segments = {(r[0], r[1]): r[2:] for r in conn.execute(
            "SELECT file, offset, camera, stream, seq, capture_ms, key_id, length, digest"
            " FROM segments")}
        manifests = {(r[0], r[1]): r[2:] for r in conn.execute(
            "SELECT file, offset, camera, manifest_seq, length, hash FROM manifests")}
        recipients = {(r[0], r[1]): r[2:] for r in conn.execute(
            "SELECT file, offset, camera, key_id, length FROM chain_recipients")}
        expired = {r[0]: _Tombstone(r[1], r[2], r[3], r[4], r[5], bool(r[6])) for r in conn.execute(
            "SELECT file, camera, from_ms, to_ms, reason, removed_ms, done FROM expired_files")}
        retention = {r[0]: r[1] or default_retention_days for r in conn.execute(
            "SELECT name, retention_days FROM cameras")}
        holds = conn.execute("SELECT camera, from_ms, to_ms FROM holds").fetchall()
        anchors = conn.execute("SELECT camera, manifest_seq, record FROM chain_anchors").fetchall()
    finally:
        conn.close()
    if directory_url:
        retention, holds = _site_rules(directory_url, data_dir, default_retention_days)
    report = CheckReport()
    problem = report.problems.append
    # camera -> [(seq, prev_hash, hash, where)]; where is a file, or "" for a chain anchor
    links: dict[str, list[tuple[int, bytes, bytes, str]]] = {}
    for camera, seq, raw in anchors:
        try:
            anchor = decode_record(raw)
        except FormatError:
            anchor = None
        if (not isinstance(anchor, Manifest) or anchor.camera != camera
                or anchor.manifest_seq != seq or not _signed(key, anchor)):
            problem(Problem("bad_signature", None, None, f"{camera}: the manifest {seq} kept "
                            "from removed video is not a valid signed manifest of this camera"))
            continue
        links.setdefault(camera, []).append(
            (seq, anchor.prev_hash, hashlib.sha256(raw).digest(), ""))
    # Cameras whose chain may start after 0: a removal retention finished, or one it is doing.
    removed_start = {t.camera for rel, t in expired.items() if not (archive / rel).exists()}
    for path in sorted(archive.glob("*/*.fs[ak]")):
        if linked(archive, path):
            rel = path.relative_to(archive).as_posix()
            problem(Problem("link", rel, None, f"{rel} is a symbolic link (it may lead out of "
                            "the data directory); not read: replace it by the file itself"))
    kept_days = [(path.stem, path.parent.name) for path in archive.glob("*/*.fsa")
                 if path.relative_to(archive).as_posix() not in expired
                 and re.fullmatch(r"\d{4}-\d{2}-\d{2}", path.stem)]
    for path in sorted(archive.glob("*/*.fsa")):
        rel = path.relative_to(archive).as_posix()
        if linked(archive, path):
            continue
        camera = path.parent.name
        data = path.read_bytes()
        tombstone = expired.get(rel)
        if tombstone is not None:
            why = _unjustified(rel, tombstone, data, key,
                               retention.get(camera, default_retention_days), holds, kept_days,
                               now_ms)
            if why is None:
                removed_start.add(camera)
                report.notes.append(f"{rel}: being removed by retention (finished by the next "
                                    "pass of a running Archiver)")
                continue
            problem(Problem("expiry_unjustified", rel, None, f"{rel} is marked as removed by "
                            f"retention, but retention would not have removed it: {why}; "
                            "checked as a kept file"))
        report.files += 1
        pos = 0
        pending: list[tuple[bytes, Segment]] = []
        while pos < len(data):
            if len(data) - pos < RECORD_HEADER_LEN:
                problem(Problem("truncated", rel, pos, f"{rel} ends in the middle of a record "
                                f"header at offset {pos} (the file was cut short)"))
                break
            kind, length = _HEADER.unpack_from(data, pos)
            if kind not in _ARCHIVE_KINDS or length > max_body(kind):
                problem(Problem("damaged_record", rel, pos, f"{rel}: the bytes at offset {pos} "
                                "are not a record (damaged); the rest of the file is unreadable"))
                break
            end = pos + RECORD_HEADER_LEN + length
            if end > len(data):
                problem(Problem("truncated", rel, pos, f"{rel} ends in the middle of a record at "
                                f"offset {pos} ({end - len(data)} bytes missing: the file was cut "
                                "short)"))
                break
            raw = data[pos:end]
            try:
                record = decode_record(raw)
            except FormatError as exc:
                problem(Problem("damaged_record", rel, pos, f"{rel}: the record at offset {pos} "
                                f"is damaged ({exc})"))
                segments.pop((rel, pos), None)
                manifests.pop((rel, pos), None)
                recipients.pop((rel, pos), None)
                pos = end
                continue
            digest = hashlib.sha256(raw).digest()
            if isinstance(record, Segment):
                report.segments += 1
                pending.append((digest, record))
                row = segments.pop((rel, pos), None)
                if row is None:
                    problem(Problem("unindexed", rel, pos, f"{rel}: the segment at offset {pos} "
                                    "(camera {0}, seq {1}) is not in the index".format(
                                        record.camera, record.seq)))
                elif not _same(row, (record.camera, int(record.stream), record.seq,
                                     record.capture_ms, record.key_id, len(raw), digest)):
                    problem(Problem("index_mismatch", rel, pos, f"{rel}: the segment at offset "
                                    f"{pos} differs from its index row (damaged bytes?)"))
            elif isinstance(record, Manifest):
                report.manifests += 1
                row = manifests.pop((rel, pos), None)
                if row is None:
                    problem(Problem("unindexed", rel, pos, f"{rel}: manifest {record.manifest_seq} "
                                    f"at offset {pos} is not in the index"))
                elif not _same(row, (record.camera, record.manifest_seq, len(raw), digest)):
                    problem(Problem("index_mismatch", rel, pos, f"{rel}: manifest at offset {pos} "
                                    "differs from its index row"))
                if not _signed(key, record) or record.camera != camera:
                    problem(Problem("bad_signature", rel, pos, f"{rel}: manifest "
                                    f"{record.manifest_seq} at offset {pos} does not carry a valid "
                                    "signature of this Archiver for this camera"))
                entries = [(e.digest, e.seq) for e in record.entries]
                if len(entries) != len(pending) or any(
                        not hmac.compare_digest(d, e[0]) or s.seq != e[1]
                        for (d, s), e in zip(pending, entries, strict=False)):
                    problem(Problem("index_mismatch", rel, pos, f"{rel}: manifest "
                                    f"{record.manifest_seq} does not match the segments before it "
                                    "(a segment was altered, removed or added)"))
                pending = []
                links.setdefault(camera, []).append(
                    (record.manifest_seq, record.prev_hash, digest, rel))
            elif isinstance(record, ChainRecipients):
                row = recipients.pop((rel, pos), None)
                if row is None or not _same(row, (record.camera, chain_key_id(record.chain_id, record.part),
                                                  len(raw))):
                    problem(Problem("unindexed" if row is None else "index_mismatch", rel, pos,
                                    f"{rel}: the chain recipients at offset {pos} are not indexed as "
                                    "they are"))
                if not _signed(key, record):
                    problem(Problem("bad_signature", rel, pos, f"{rel}: the chain recipients at "
                                    f"offset {pos} do not carry a valid signature of this Archiver"))
            pos = end
        if pending:
            problem(Problem("unindexed", rel, pos, f"{rel}: {len(pending)} segment(s) at the end "
                            "are not covered by a signed manifest"))
    for what, rows in (("segment", segments), ("manifest", manifests),
                       ("chain recipients record", recipients)):
        for (rel, offset), _ in sorted(rows.items()):
            problem(Problem("missing", rel, offset, f"the index lists a {what} in {rel} at offset "
                            f"{offset} that the file does not hold"))
    for camera, chain in sorted(links.items()):
        chain.sort()
        report.cameras[camera] = len(chain)
        retained_start = camera in removed_start
        first_seq, first_prev, _, first_file = chain[0]
        if first_seq == 0 and first_prev != ZERO_HASH:
            problem(Problem("chain_broken", first_file, None, f"{camera}: manifest 0 names a "
                            "previous manifest"))
        elif first_seq != 0 and not retained_start:
            problem(Problem("chain_broken", first_file, None, f"{camera}: the chain starts at "
                            f"manifest {first_seq}; manifests 0..{first_seq - 1} are missing"))
        elif first_seq != 0:
            report.notes.append(f"{camera}: the chain starts at manifest {first_seq} (earlier "
                                "video was removed by retention)")
        if not retained_start and any(not where for *_, where in chain):
            problem(Problem("chain_broken", None, None, f"{camera}: manifests kept from "
                            "removed video, but no removal is recorded"))
        for (seq, _, hash_, where), (next_seq, prev, _, rel) in itertools.pairwise(chain):
            if seq == next_seq:
                continue  # a kept manifest and its file both present (removal in progress)
            if not where and not rel:
                continue  # between two kept manifests: video retention removed
            if next_seq != seq + 1 or not hmac.compare_digest(prev, hash_):
                problem(Problem("chain_broken", rel, None, f"{camera}: the manifest chain breaks "
                                f"between manifests {seq} and {next_seq} (video missing or "
                                "replaced in between)"))
    for path in sorted(archive.glob("*/*.fsk")):
        if linked(archive, path):
            continue
        report.journals += 1
        _check_journal(path, path.relative_to(archive).as_posix(), report)
    _check_consolidated(data_dir, report)
    return report


def _check_consolidated(data_dir: Path, report: CheckReport) -> None:
    """Consolidated parts (other Archivers' recordings copied here, archiver/consolidation.py):
    each verified from its files alone against its OWN signer's certificate, never this
    Archiver's key."""
    from archiver.consolidated import CONSOLIDATED_DIR, ConsolidationRefused, PartStore, check_part

    store = PartStore(data_dir / CONSOLIDATED_DIR)
    for info in store.parts():
        where = f"{CONSOLIDATED_DIR}/{info.camera}/{info.part}"
        try:
            check_part(store, info)
        except ConsolidationRefused as exc:
            report.problems.append(Problem("consolidated_part", where, None, exc.message))
            continue
        report.consolidated.append({"camera": info.camera, "part": info.part,
                                    "archiver": info.archiver, "signer": info.signer_subject,
                                    "segments": info.segments, "from_ms": info.from_ms,
                                    "to_ms": info.to_ms})


def _check_journal(path: Path, rel: str, report: CheckReport) -> None:
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        if len(data) - pos < RECORD_HEADER_LEN:
            break
        kind, length = _HEADER.unpack_from(data, pos)
        end = pos + RECORD_HEADER_LEN + length
        if kind not in _JOURNAL_KINDS or length > max_body(kind) or end > len(data):
            break
        try:
            decode_record(data[pos:end])
        except FormatError:
            break
        pos = end
    if pos != len(data):
        report.problems.append(Problem(
            "journal_damaged", rel, pos, f"the key journal {rel} is damaged from offset {pos} "
            f"({len(data) - pos} bytes): viewers' key streams there cannot be restored from it"))
