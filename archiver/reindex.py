"""The archive files are the source of truth; the SQLite segment index is derived from them.

Two uses of one verified scan of archive records:

* **Recovery at start** (``recover``): bytes past a file's last indexed record are either a
  torn or unsigned tail (a crash mid-write) or complete, *signed* segment groups whose index
  rows are missing (a crash between the fsync and the index commit, or an attacker who deleted
  rows from the index). Signed groups that continue the camera's manifest chain are indexed
  again; only bytes no valid signature covers are cut. Bytes that hold a validly signed
  manifest but do not continue the chain are never cut: they are left in place and reported.
* **Rebuild** (``rebuild_index``, ``fusion-archiver reindex``): the segment and manifest index
  is dropped and rebuilt from the files alone, every group verified against the Archiver's key.

A group is what ingest appends in one write: a new key chain's signed recipients statement
(its parts, if the segment is the chain's first), the segment records since the previous
manifest, then the manifest that covers them.
It is accepted only if the manifest's signature verifies under the Archiver's public key, it
belongs to the file's camera, it continues the chain (sequence and hash of the previous
manifest), its entries match the segments exactly (stream, seq, capture time, key id, SHA-256
of the record bytes), and each recipients part is the Archiver's, for this camera.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from archiver.db import Database, GrantRow, KeyMaterial, ManifestRow, SegmentRow
from keyservice.crypto import chain_key_id
from keyservice.errors import FormatError
from keyservice.format import (
    RECORD_HEADER_LEN,
    TAG_LEN,
    ZERO_HASH,
    ChainRecipients,
    ChainRecord,
    EpochOpener,
    Manifest,
    RecordType,
    Segment,
    decode_record,
    encode_record,
    max_body,
)

log = logging.getLogger("archiver.reindex")
_RECORD_HEADER = struct.Struct(">BI")
_ECDSA = ec.ECDSA(hashes.SHA256())


@dataclass
class ChainState:
    """Where a camera's chain stands: the next manifest must have ``next_seq`` and name
    ``prev_hash``; None while a rebuild has not met the camera's first manifest yet."""

    next_seq: int | None
    prev_hash: bytes = ZERO_HASH


@dataclass(frozen=True)
class Group:
    segments: tuple[SegmentRow, ...]
    manifest: ManifestRow
    grants: tuple[GrantRow, ...] = ()  # signed chain recipients archived before the segments

    @property
    def end(self) -> int:
        return self.manifest.offset + self.manifest.length


def ec_public_key(key: object) -> ec.EllipticCurvePublicKey:
    """The Archiver's manifest key (its certificate's key is EC P-256 by construction)."""
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise TypeError("The Archiver's signing certificate does not hold an EC key.")
    return key


_ARCHIVED = (RecordType.SEGMENT, RecordType.MANIFEST, RecordType.CHAIN_RECIPIENTS)
JOURNALED = (RecordType.EPOCH_OPENER, RecordType.CHAIN_RECORD)


def read_records(path: Path, start: int,
                 kinds: tuple[RecordType, ...] = _ARCHIVED) -> Iterator[tuple[int, bytes]]:
    """(offset, exact bytes) of each complete, well-framed record from ``start``; stops at
    the end, at a torn record or at a framing error (unknown type, oversized length)."""
    with open(path, "rb") as fh:
        fh.seek(start)
        offset = start
        while True:
            head = fh.read(RECORD_HEADER_LEN)
            if len(head) < RECORD_HEADER_LEN:
                return
            kind, length = _RECORD_HEADER.unpack(head)
            if kind not in kinds or length > max_body(kind):
                return
            body = fh.read(length)
            if len(body) < length:
                return
            yield offset, head + body
            offset += RECORD_HEADER_LEN + length


def _signature_valid(key: ec.EllipticCurvePublicKey, record: Manifest | ChainRecipients) -> bool:
    try:
        key.verify(record.signature, record.signed_bytes(), _ECDSA)
    except (InvalidSignature, ValueError):
        return False
    return True


def scan(path: Path, rel: str, camera: str, start: int, chain: ChainState,
         key: ec.EllipticCurvePublicKey) -> tuple[list[Group], bool]:
    """The verified groups from ``start`` on, in order, advancing ``chain``; stops at the
    first byte that is not part of one. Also says whether a validly signed manifest lies
    beyond that point (then those bytes must not be cut)."""
    groups: list[Group] = []
    pending: list[tuple[int, bytes, Segment]] = []
    grants: list[GrantRow] = []
    records = read_records(path, start)
    for offset, raw in records:
        try:
            record = decode_record(raw)
        except FormatError:
            break
        if isinstance(record, ChainRecipients):
            if pending or record.camera != camera or not _signature_valid(key, record):
                break  # recipients come first in a group, and only the Archiver's
            grants.append(GrantRow(chain_key_id(record.chain_id, record.part), camera, rel,
                                   offset, len(raw)))
            continue
        if isinstance(record, Segment):
            pending.append((offset, raw, record))
            continue
        assert isinstance(record, Manifest)
        group = _verify_group(rel, camera, pending, offset, raw, record, chain, key)
        if group is None:
            # Not a continuation: if it is signed all the same, its bytes are evidence.
            return groups, _signature_valid(key, record) or _signed_after(records, key)
        groups.append(Group(group.segments, group.manifest, tuple(grants)))
        chain.next_seq, chain.prev_hash = record.manifest_seq + 1, group.manifest.hash
        pending, grants = [], []
    return groups, _signed_after(records, key)


def _signed_after(records: Iterator[tuple[int, bytes]], key: ec.EllipticCurvePublicKey) -> bool:
    for _, raw in records:
        if raw[0] not in (RecordType.MANIFEST, RecordType.CHAIN_RECIPIENTS):
            continue
        try:
            record = decode_record(raw)
        except FormatError:
            continue
        if isinstance(record, Manifest | ChainRecipients) and _signature_valid(key, record):
            return True
    return False


def _verify_group(rel: str, camera: str, segments: list[tuple[int, bytes, Segment]],
                  offset: int, raw: bytes, manifest: Manifest, chain: ChainState,
                  key: ec.EllipticCurvePublicKey) -> Group | None:
    if manifest.camera != camera or not _signature_valid(key, manifest):
        return None
    if chain.next_seq is None:  # a rebuild joins the chain at the first manifest it finds
        if (manifest.manifest_seq == 0) != (manifest.prev_hash == ZERO_HASH):
            return None
    elif (manifest.manifest_seq != chain.next_seq
          or not hmac.compare_digest(manifest.prev_hash, chain.prev_hash)):
        return None
    if len(manifest.entries) != len(segments):
        return None
    rows = []
    for entry, (seg_offset, seg_raw, segment) in zip(manifest.entries, segments, strict=True):
        digest = hashlib.sha256(seg_raw).digest()
        if (segment.camera != camera or not hmac.compare_digest(digest, entry.digest)
                or segment.seq != entry.seq or segment.stream != entry.stream
                or segment.capture_ms != entry.capture_ms
                or not hmac.compare_digest(segment.key_id, entry.key_id)):
            return None
        # The signed start and duration give the end; without a duration (0: not timed
        # video) a point for now, see _with_end_times.
        rows.append(SegmentRow(camera, int(segment.stream), segment.seq, segment.capture_ms,
                               segment.key_id, len(segment.ciphertext) - TAG_LEN, digest, rel,
                               seg_offset, len(seg_raw), manifest.manifest_seq,
                               segment.capture_ms + segment.duration_ms))
    captures = [entry.capture_ms for entry in manifest.entries] or [manifest.issued_ms]
    row = ManifestRow(camera, manifest.manifest_seq, rel, offset, len(raw),
                      hashlib.sha256(raw).digest(), min(captures), max(captures))
    return Group(tuple(rows), row)


# A segment re-indexed from the files ends where the next one of its stream starts, if that
# comes within this bound (segments last seconds); otherwise it is a point in time.
MAX_SEGMENT_MS = 60_000


def _with_end_times(groups: list[Group]) -> list[Group]:
    """End times for re-indexed segments without a signed duration (end = start): the next
    segment's start of the same data stream, within MAX_SEGMENT_MS. The last such segment of
    each stream stays a point. Manifest times follow their segments."""
    following: dict[tuple[str, int, int], int] = {}
    previous: dict[tuple[str, int], SegmentRow] = {}
    for group in groups:
        for row in group.segments:
            before = previous.get((row.camera, row.stream))
            if before is not None and 0 <= row.capture_ms - before.capture_ms <= MAX_SEGMENT_MS:
                following[(before.camera, before.stream, before.seq)] = row.capture_ms
            previous[(row.camera, row.stream)] = row
    out = []
    for group in groups:
        rows = tuple(row if row.end_ms != row.capture_ms else
                     replace(row, end_ms=following.get((row.camera, row.stream, row.seq),
                                                       row.end_ms)) for row in group.segments)
        manifest = group.manifest
        if rows:
            manifest = replace(manifest, first_capture_ms=min(r.capture_ms for r in rows),
                               last_capture_ms=max(r.end_ms for r in rows))
        out.append(Group(rows, manifest, group.grants))
    return out


def linked(archive_dir: Path, path: Path) -> bool:
    """A symbolic link (the file, or its camera directory) or a path leading out of the archive
    directory: never read. Whoever can plant a link would have the Archiver index, serve or
    report on bytes from anywhere on the machine."""
    return (path.is_symlink() or path.parent.is_symlink()
            or not path.resolve().is_relative_to(archive_dir.resolve()))


def linked_files(archive_dir: Path, pattern: str = "*/*.fs[ak]") -> list[str]:
    """The archive files and key journals (relative paths) that are links, for the reports."""
    return [path.relative_to(archive_dir).as_posix() for path in sorted(archive_dir.glob(pattern))
            if linked(archive_dir, path)]


def _files(archive_dir: Path, db: Database) -> list[tuple[str, str, Path]]:
    """(camera, relative path, path) of every archive file, per camera in day order; not
    those retention is removing (tombstoned in the index: the next pass finishes them), nor
    links (``linked``)."""
    removing = {expired.file for expired in db.expired_files()}
    return [(path.parent.name, rel, path) for path in sorted(archive_dir.glob("*/*.fsa"))
            if (rel := path.relative_to(archive_dir).as_posix()) not in removing
            and not linked(archive_dir, path)]


def recover(archive_dir: Path, db: Database, key: ec.EllipticCurvePublicKey) -> list[str]:
    """At start: index again every signed group past a file's last indexed byte, cut only
    unsigned or torn bytes. Returns what was done, for the log and the audit log."""
    ends = db.file_ends()
    chains: dict[str, ChainState] = {}
    actions = [f"ARCHIVE INCONSISTENT: {rel} is a symbolic link; not read (replace it by the "
               "file itself)" for rel in linked_files(archive_dir)]
    for camera, rel, path in _files(archive_dir, db):
        acknowledged = ends.get(rel, 0)
        size = path.stat().st_size
        if size < acknowledged:
            actions.append(f"ARCHIVE DAMAGED: {rel} is {size} bytes, the index expects "
                           f"{acknowledged}")
            continue
        if size == acknowledged:
            continue
        chain = chains.get(camera)
        if chain is None:
            tail = db.chain_tail(camera)
            chain = chains[camera] = (ChainState(0) if tail is None
                                      else ChainState(tail[0] + 1, tail[1]))
        groups, signed_beyond = scan(path, rel, camera, acknowledged, chain, key)
        groups = _with_end_times(groups)
        for group in groups:
            db.record_segments(group.segments, group.manifest, group.grants)
        if groups:
            count = sum(len(g.segments) for g in groups)
            actions.append(f"re-indexed {count} signed segment(s) ({len(groups)} manifest(s)) "
                           f"at the end of {rel} that the index did not list")
        end = groups[-1].end if groups else acknowledged
        if end == size:
            continue
        if signed_beyond:
            # Never cut what the Archiver signed: it may be the evidence someone removed
            # from the index. Left in place; a rebuild or an operator must look at it.
            actions.append(f"ARCHIVE INCONSISTENT: {rel} holds {size - end} bytes from offset "
                           f"{end} with a signed manifest that does not continue the chain; "
                           "left in place (run 'fusion-archiver reindex' with the Archiver "
                           "stopped)")
            continue
        with open(path, "r+b") as fh:
            fh.truncate(end)
            os.fsync(fh.fileno())
        actions.append(f"cut {size - end} unacknowledged bytes from the end of {rel}")
    for line in actions:
        log.warning("recovery: %s", line)
    return actions


@dataclass(frozen=True)
class RebuildReport:
    cameras: dict[str, int]  # camera -> segments indexed
    manifests: int
    files: int
    problems: list[str]
    epochs: int = 0  # epoch openers read back from the key journals
    key_records: int = 0


def restore_key_streams(archive_dir: Path, db: Database) -> tuple[int, int]:
    """Read the viewers' key streams (epoch openers, chain records) back from the archive's key
    journals into the database, keeping what it has. Returns (openers, chain records) read.
    They need no signature: each is encrypted to, and bound to, one viewer and epoch, and a
    wrong one only fails that viewer's own checks."""
    openers: dict[bytes, EpochOpener] = {}
    records: list[tuple[str, ChainRecord, bytes]] = []
    for path in sorted(archive_dir.glob("*/*.fsk")):
        if linked(archive_dir, path):
            continue
        for _, raw in read_records(path, 0, JOURNALED):
            try:
                record = decode_record(raw)
            except FormatError:
                break
            if isinstance(record, EpochOpener):
                openers.setdefault(record.epoch_id, record)
            elif isinstance(record, ChainRecord):
                records.append((path.parent.name, record, raw))
    material = []
    for camera, record, raw in records:
        opener = openers.get(record.epoch_id)
        if opener is None or record.camera != camera:
            continue  # its opener is lost, or it is not this camera's: nobody could use it
        material.append(KeyMaterial(opener.viewer_fingerprint.hex(), camera, record.chain_id,
                                    record.epoch_id,
                                    record.start_period * opener.period_s * 1000, raw, None))
    db.restore_key_material(
        [(o.epoch_id, o.viewer_fingerprint.hex(), o.start_period * o.period_s * 1000,
          encode_record(o)) for o in openers.values()], material)
    return len(openers), len(material)


def rebuild_index(archive_dir: Path, db: Database,
                  key: ec.EllipticCurvePublicKey) -> RebuildReport:
    """Drop the segment and manifest index and rebuild it from the archive files alone,
    each group verified against the Archiver's key and chain. Nothing in the files is
    changed; bytes that do not verify are reported (a start's recovery deals with a torn
    tail)."""
    chains: dict[str, ChainState] = {}
    counts: dict[str, int] = {}
    manifests = 0
    problems = [f"{rel}: a symbolic link; not read (replace it by the file itself)"
                for rel in linked_files(archive_dir)]
    files = _files(archive_dir, db)
    found: list[Group] = []
    for camera, rel, path in files:
        chain = chains.setdefault(camera, ChainState(None))
        groups, _ = scan(path, rel, camera, 0, chain, key)
        found += groups
        manifests += len(groups)
        counts[camera] = counts.get(camera, 0) + sum(len(g.segments) for g in groups)
        end = groups[-1].end if groups else 0
        size = path.stat().st_size
        if end != size:
            problems.append(f"{rel}: {size - end} bytes from offset {end} do not verify as "
                            "signed segments continuing the chain; not indexed")
    # Only once every file was read: a rebuild that fails halfway leaves the old index.
    found = _with_end_times(found)
    db.replace_segment_index([(g.segments, g.manifest) for g in found],
                             [grant for g in found for grant in g.grants])
    epochs, key_records = restore_key_streams(archive_dir, db)
    return RebuildReport(counts, manifests, len(files), problems, epochs, key_records)
