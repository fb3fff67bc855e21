"""Retention: video older than its camera's period is destroyed, keys first (crypto-shredding),
unless an evidence hold covers it; below a free-space threshold the oldest unheld video goes
whatever its age. docs/retention.md has the rules and the crash argument.

The unit of removal is a camera's archive day (``CAMERA/DAY.fsa`` and its key journal
``CAMERA/DAY.fsk``): files are per UTC day of arrival, so a day that is over is never appended
to again, and removing it needs no rewrite of the archive. A day is removed in four steps, each
durable before the next, and a pass first finishes any removal a crash interrupted:

1. its tombstone (``expired_files``) and its index rows, in one transaction: from here on no
   viewer is served that video, recovery and the checker know its file goes on purpose. Its
   first and last signed manifests are kept in the index (``chain_anchors``: digests and key
   commitments, no key material), so that a range of the video kept next to it still proves
   its edges to the viewer, and the chain stays checkable across the gap;
2. the key material no remaining segment uses: every viewer's key records and the epoch
   openers nothing needs any more (``Database.shred_unused_keys``), and the same records in
   the key journals, which are rewritten without them (atomically) or deleted;
3. the ciphertext (the ``.fsa`` file);
4. the tombstone is marked done.

Without the key records no one can open the segments again, from this disk or any copy of it.
SQLite runs with ``secure_delete`` (deleted rows are overwritten) and its WAL is truncated
after a pass, so the key bytes do not linger in free pages or old WAL frames.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from archiver.db import Database
from archiver.directory import Directory, HoldRow
from archiver.reindex import JOURNALED, read_records
from archiver.settings import Settings
from archiver.storage import ArchiveFiles, StorageFull
from keyservice.errors import FormatError
from keyservice.format import ChainRecord, EpochOpener, decode_record

log = logging.getLogger("archiver.retention")
DAY_MS = 86_400_000
_DAY_FILE = re.compile(r"^(\d{4}-\d{2}-\d{2})\.(fsa|fsk)$")

T = TypeVar("T")
REASON_RETENTION = "retention"
REASON_DISK = "disk space"


@dataclass
class PassReport:
    """What one retention pass did."""

    files_removed: int = 0  # archive days (.fsa) removed
    journals_rewritten: int = 0
    journals_removed: int = 0
    bytes_reclaimed: int = 0
    key_records_shredded: int = 0
    epochs_shredded: int = 0
    backups_removed: int = 0
    below_watermark: bool = False  # free space stayed below the threshold
    seconds: float = 0.0
    removed: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)


def day_start_ms(day: str) -> int:
    return int(dt.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=dt.UTC).timestamp() * 1000)


def _day_of(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d")


def disk_free(path: Path) -> Callable[[], int]:
    return lambda: shutil.disk_usage(path).free


class Retention:
    def __init__(self, settings: Settings, db: Database, files: ArchiveFiles,
                 clock: Callable[[], int], free_bytes: Callable[[], int] | None = None,
                 on_removed: Callable[[str, str, int, int, str], None] | None = None, *,
                 directory: Directory) -> None:
        """``free_bytes``: the archive file system's free space (injectable: tests simulate a
        full disk). ``on_removed(camera, file, from_ms, to_ms, reason)``: for the audit log."""
        self.settings = settings
        self.db = db
        self.directory = directory  # cameras, their retention and holds
        self.files = files
        self.clock = clock
        self.free_bytes = free_bytes or disk_free(settings.archive_dir)
        self.on_removed = on_removed
        self.lock = threading.Lock()
        # Totals since start, for the metrics.
        self.total = PassReport()
        self.last_pass: PassReport | None = None

    # --- the reserve ------------------------------------------------------------------
    @property
    def reserve_path(self) -> Path:
        return self.settings.data_dir / "retention-reserve"

    def ensure_reserve(self, room: int = 4) -> None:
        """Set the reserve aside if it is missing and ``room`` times its size is free (best
        effort: never the last space of a small disk)."""
        size = self.settings.reserve_bytes
        path = self.reserve_path
        if size == 0 or path.exists():
            return
        try:
            if self.free_bytes() < room * size:
                return
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            path.unlink(missing_ok=True)

    def _release_reserve(self) -> bool:
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            return False
        log.warning("the disk is full: released the retention reserve to make room")
        return True

    # --- what is kept -----------------------------------------------------------------
    def days_of(self, camera: str) -> int:
        row = self.directory.camera(camera)
        return row.retention_days if row and row.retention_days else self.settings.retention_days

    def _day_files(self, camera: str) -> list[str]:
        """The camera's archive days on disk, oldest first."""
        directory = self.settings.archive_dir / camera
        days = set()
        if directory.is_dir():
            for path in directory.iterdir():
                match = _DAY_FILE.match(path.name)
                if match:
                    days.add(match.group(1))
        return sorted(days)

    def _span(self, camera: str, day: str) -> tuple[int, int]:
        """The time a camera-day covers: the UTC day, widened to the video indexed in it."""
        start = day_start_ms(day)
        span = self.db.file_span(f"{camera}/{day}.fsa")
        if span is None:
            return start, start + DAY_MS - 1
        return min(start, span[0]), max(start + DAY_MS - 1, span[1])

    @staticmethod
    def _held(holds: list[HoldRow], camera: str, span: tuple[int, int]) -> bool:
        return any(h.camera == camera and h.from_ms <= span[1] and h.to_ms >= span[0]
                   for h in holds)

    # --- passes -----------------------------------------------------------------------
    def run(self) -> PassReport:
        """One pass: finish interrupted removals, remove expired unheld days, then the oldest
        unheld days while free space is below the threshold."""
        with self.lock:
            started = time.perf_counter()
            report = PassReport()
            self._finish_pending(report)
            now = self.clock()
            holds = self.directory.holds()
            for camera in self.directory.cameras(include_removed=True):
                cutoff = now - self.days_of(camera.name) * DAY_MS
                for day in self._day_files(camera.name):
                    span = self._span(camera.name, day)
                    if span[1] >= cutoff:
                        break  # days are in order: the rest is younger
                    if not self._held(holds, camera.name, span):
                        self._remove_day(camera.name, day, span, REASON_RETENTION, report)
            while self.free_bytes() < self.settings.min_free_bytes:
                if not self._evict_oldest(holds, now, report):
                    report.below_watermark = True
                    if not self.total.below_watermark:  # once, not every pass
                        log.warning("free space is below %d bytes and no unheld video of a "
                                    "past day is left to remove", self.settings.min_free_bytes)
                    break
            self._remove_old_backups(now, report)
            if report.files_removed or report.key_records_shredded:
                self.db.checkpoint()  # no old WAL frames with shredded key records
            self.ensure_reserve()
            report.seconds = time.perf_counter() - started
            self._add_to_totals(report)
            return report

    def make_room(self) -> bool:
        """Ingest found the disk full: remove the oldest unheld day now. False if there is
        none (then the 507 stands)."""
        with self.lock:
            report = PassReport()
            removed = self._evict_oldest(self.directory.holds(), self.clock(), report)
            if removed:
                self.db.checkpoint()
                self.ensure_reserve(room=2)  # for the next time the disk fills
            self._add_to_totals(report)
            return removed

    def _evict_oldest(self, holds: list[HoldRow], now: int, report: PassReport) -> bool:
        today = _day_of(now)
        oldest: tuple[str, str, tuple[int, int]] | None = None
        for camera in self.directory.cameras(include_removed=True):
            for day in self._day_files(camera.name):
                if day >= today:
                    break  # the day in progress is being written to
                span = self._span(camera.name, day)
                if self._held(holds, camera.name, span):
                    continue
                if oldest is None or (day, camera.name) < (oldest[1], oldest[0]):
                    oldest = (camera.name, day, span)
                break  # only each camera's oldest unheld day competes
        if oldest is None:
            return False
        self._remove_day(oldest[0], oldest[1], oldest[2], REASON_DISK, report)
        return True

    def _finish_pending(self, report: PassReport) -> None:
        for expired in self.db.expired_files(pending_only=True):
            day = expired.file.rsplit("/", 1)[-1].removesuffix(".fsa")
            log.warning("finishing the interrupted removal of %s", expired.file)
            self._shred_and_delete(expired.camera, day, report)

    def _remove_day(self, camera: str, day: str, span: tuple[int, int], reason: str,
                    report: PassReport) -> None:
        rel = f"{camera}/{day}.fsa"
        log.info("removing %s (%s): video %s .. %s", rel, reason, span[0], span[1])
        manifests = self.db.manifests_in_file(rel)
        anchors = []
        if manifests:
            reader = self.files.opener(rel)
            try:
                for row in {manifests[0].manifest_seq: manifests[0],
                            manifests[-1].manifest_seq: manifests[-1]}.values():
                    anchors.append((row.manifest_seq, reader.read(row.offset, row.length)))
            finally:
                reader.close()
        self._with_room(self.db.expire_file, rel, camera, span[0], span[1], reason,
                        self.clock(), anchors)
        self._shred_and_delete(camera, day, report)
        report.removed.append((rel, reason))
        if self.on_removed is not None:
            try:
                self.on_removed(camera, rel, span[0], span[1], reason)
            except Exception:  # the removal stands; a full disk may refuse the audit line
                log.warning("could not audit the removal of %s", rel)

    def _shred_and_delete(self, camera: str, day: str, report: PassReport) -> None:
        """Steps 2-4 of a removal (idempotent: a crash anywhere here is finished next pass)."""
        end = day_start_ms(day) + DAY_MS
        records, epochs = self._with_room(self.db.shred_unused_keys, camera, end)
        report.key_records_shredded += records
        report.epochs_shredded += epochs
        # In archives written before key periods were split at midnight, a key of the day
        # before may have sealed this day's first segments: its records are in that journal.
        in_use = self.db.chain_ids_in_use(camera)
        for journal_day in (_day_of(day_start_ms(day) - DAY_MS), day):
            self._with_room(self._rewrite_journal, f"{camera}/{journal_day}.fsk", in_use, end,
                            report)
        rel = f"{camera}/{day}.fsa"
        size = self.files.remove(rel)
        report.bytes_reclaimed += size
        report.files_removed += 1
        self._with_room(self.db.file_removed, rel)

    def _with_room(self, step: Callable[..., T], *args: Any) -> T:
        """A step of a removal; if the disk is full (deleting rows needs room in SQLite's
        WAL, rewriting a journal a temporary file), the reserve is given back, once."""
        try:
            return step(*args)
        except (StorageFull, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            if not self._release_reserve():
                raise
            return step(*args)

    def _rewrite_journal(self, rel: str, in_use: set[bytes], before_ms: int,
                         report: PassReport) -> None:
        """Keep only the chain records of chains still in use (or too recent to judge) and the
        epoch openers they need."""
        path = self.settings.archive_dir / rel
        if not path.exists():
            return
        kept_records: list[tuple[bytes, bytes]] = []  # (epoch id, raw)
        openers: dict[bytes, bytes] = {}
        dropped = False
        size = path.stat().st_size
        total = 0
        for _, raw in read_records(path, 0, JOURNALED):
            total += len(raw)
            try:
                record = decode_record(raw)
            except FormatError:
                break
            if isinstance(record, EpochOpener):
                openers.setdefault(record.epoch_id, raw)
            elif isinstance(record, ChainRecord):
                started_ms = record.start_period * self.settings.key_period_s * 1000
                if record.chain_id in in_use or started_ms >= before_ms:
                    kept_records.append((record.epoch_id, raw))
                else:
                    dropped = True
        needed = {epoch_id for epoch_id, _ in kept_records}
        if not dropped and total == size and needed == set(openers):
            return
        if not kept_records:
            report.bytes_reclaimed += self.files.remove(rel)
            report.journals_removed += 1
            return
        # Openers first, in their original order, then the records: the order a journal
        # is written in (an opener precedes its epoch's records).
        data = b"".join([raw for epoch_id, raw in openers.items() if epoch_id in needed]
                        + [raw for _, raw in kept_records])
        self.files.replace(rel, data)
        report.bytes_reclaimed += max(0, size - len(data))
        report.journals_rewritten += 1

    def _remove_old_backups(self, now: int, report: PassReport) -> None:
        """Database backups (made before a schema migration) hold key records as they were
        then: they go once older than the shortest retention period in force."""
        periods = [self.settings.retention_days] + [
            c.retention_days for c in self.directory.cameras(include_removed=True) if c.retention_days]
        limit_s = min(periods) * DAY_MS / 1000
        for path in self.settings.data_dir.glob("archiver.sqlite3.v*.bak"):
            try:
                if now / 1000 - path.stat().st_mtime > limit_s:
                    path.unlink()
                    report.backups_removed += 1
                    log.warning("removed the database backup %s (older than the retention "
                                "period: it holds expired key material)", path.name)
            except FileNotFoundError:
                continue

    def _add_to_totals(self, report: PassReport) -> None:
        self.last_pass = report
        for name in ("files_removed", "journals_rewritten", "journals_removed",
                     "bytes_reclaimed", "key_records_shredded", "epochs_shredded",
                     "backups_removed"):
            setattr(self.total, name, getattr(self.total, name) + getattr(report, name))
        self.total.below_watermark = report.below_watermark
