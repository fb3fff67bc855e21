"""Append-only audit log: one JSON object per line, each carrying the SHA-256 of the line before
it, so deleting or editing an entry breaks the chain (``verify_audit_log`` finds where).

In a site (issue 21) every line also reaches the site directory's ``audit_events`` table, so the
site has one log: written by a background thread *after* the line is fsynced to the file (the
file stays the Archiver's tamper-evident copy, and a directory that is slow or down never holds
up the request being audited, nor ingest). The row's key is (Archiver name, line number): a row
that could not be written is written from the file later (the next entry, every ``retry_s``,
or at start, from the directory's ``last_audit_seq``), and a row already there is never written
twice."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from archiver.storage import StorageFailed, StorageFull

if TYPE_CHECKING:
    from archiver.directory import AuditEvent, Directory

GENESIS = "0" * 64
log = logging.getLogger("archiver.audit")
# Lines kept in memory for the directory while it cannot be written; beyond, they are read
# back from the file (which has them all) once it can.
PENDING_MAX = 10_000
# Rows written to the directory per transaction when catching up.
SYNC_BATCH = 500


class AuditLog:
    def __init__(self, path: Path, site: Directory | None = None, archiver: str = "",
                 retry_s: float = 5.0) -> None:
        """``site``: the site directory the lines also go to (None: a standalone Archiver,
        whose log is the file alone); ``archiver``: this Archiver's name there."""
        self._path = path
        self._lock = threading.Lock()
        self._prev = GENESIS
        self._seq = 0  # the number of the last line in the file
        if path.exists():
            lines = path.read_bytes().splitlines()
            if lines:
                self._prev = hashlib.sha256(lines[-1]).hexdigest()
            self._seq = len(lines)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._site = site
        self.archiver = archiver
        # Called in the writer thread with the rows just committed to the directory (the site's
        # change notifications hang off it: archiver/directory/notify.py).
        self.on_synced: Callable[[list[AuditEvent]], None] | None = None
        self._pending: deque[tuple[int, bytes]] = deque(maxlen=PENDING_MAX)
        self._synced: int | None = None  # the directory's last line of ours (None: ask it)
        self._failing = False
        self._wake = threading.Event()
        self._stopping = False
        self._retry_s = retry_s
        self._writer: threading.Thread | None = None
        if site is not None:
            self._writer = threading.Thread(target=self._run, daemon=True,
                                            name="fusion-audit-site")
            self._writer.start()
            self._wake.set()  # at start: catch up with what the directory lacks

    def record(self, actor: str, action: str, now_ms: int, **details: Any) -> None:
        self.record_many(actor, action, now_ms, [details])

    def record_many(self, actor: str, action: str, now_ms: int,
                    entries: Sequence[dict[str, Any]]) -> None:
        """One line per entry, chained as ``record``'s, written and fsynced at once (a batch
        enrolment: one fsync, not one per viewer); all of them or none."""
        if not entries:
            return
        with self._lock:
            prev, lines = self._prev, []
            for details in entries:
                entry = {"ts_ms": now_ms, "actor": actor, "action": action, **details,
                         "prev": prev}
                lines.append(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode())
                prev = hashlib.sha256(lines[-1]).hexdigest()
            data = b"".join(line + b"\n" for line in lines)
            size = os.fstat(self._fd).st_size
            try:
                if os.write(self._fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write")
                os.fsync(self._fd)
            except OSError as exc:
                # Fail closed (what cannot be audited is refused), and never leave half a line:
                # it would break the chain for every later entry.
                os.ftruncate(self._fd, size)
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise StorageFull("The disk is full; the audit log cannot record this "
                                      "request, so it was refused.", "Free space.") from None
                raise StorageFailed("Writing the audit log failed; the request was "
                                    "refused.") from None
            self._prev = prev
            for line in lines:
                self._seq += 1
                if self._site is not None:
                    self._pending.append((self._seq, line))
        if self._site is not None:
            self._wake.set()  # the rows go to the directory after the fsync, off this thread

    def flush_soon(self) -> None:
        """Write what the directory lacks now, not at the next retry (it is back)."""
        if self._site is not None:
            self._wake.set()

    @property
    def lines(self) -> int:
        """The number of lines in the file."""
        with self._lock:
            return self._seq

    def synced(self) -> int | None:
        """The last line the directory is known to have (None: not known yet)."""
        return self._synced

    def sync(self) -> None:
        """Write to the directory every line it lacks (in order, in batches); raises the
        directory's failure. Run by the writer thread; callable by a test."""
        assert self._site is not None
        from sqlalchemy.exc import IntegrityError

        with self._lock:
            target = self._seq
            pending = list(self._pending)
        if self._synced is None:
            self._synced = self._site.last_audit_seq(self.archiver)
            if self._synced > target:
                log.warning("the site directory has %d audit lines of Archiver %s, its file "
                            "only %d: the file was replaced; lines from %d on are not sent",
                            self._synced, self.archiver, target, target + 1)
        while self._synced < target:
            first = self._synced + 1
            last = min(target, self._synced + SYNC_BATCH)
            if pending and pending[0][0] <= first:
                lines = [line for seq, line in pending if first <= seq <= last]
            else:  # fell out of memory (a long outage, or written before this start)
                lines = self._file_lines(first, last)
            events = [self._event(first + i, line) for i, line in enumerate(lines)]
            try:
                self._site.append_audits(events)
            except IntegrityError:
                # Some were written although the answer was lost: ask where the directory is.
                self._synced = None
                raise
            self._synced = last
            if self.on_synced is not None:
                try:
                    self.on_synced(events)
                except Exception:
                    log.warning("the audit rows' listener failed", exc_info=True)
        with self._lock:
            while self._pending and self._pending[0][0] <= self._synced:
                self._pending.popleft()

    def _file_lines(self, first: int, last: int) -> list[bytes]:
        with open(self._path, "rb") as file:
            lines = [line.rstrip(b"\n") for number, line in enumerate(file, start=1)
                     if first <= number <= last]
        if len(lines) != last - first + 1:
            raise ValueError(f"the audit file lacks lines {first} to {last}")
        return lines

    def _event(self, seq: int, line: bytes) -> AuditEvent:
        from archiver.directory import AuditEvent

        entry = json.loads(line)
        return AuditEvent(self.archiver, seq, int(entry.get("ts_ms", 0)),
                          str(entry.get("actor", "")), str(entry.get("action", "")),
                          line.decode(), hashlib.sha256(line).hexdigest())

    def _run(self) -> None:
        while True:
            # Woken by a new line; while behind, tried again every retry_s.
            self._wake.wait(self._retry_s if self._failing else None)
            self._wake.clear()
            stopping = self._stopping
            try:
                self.sync()
                if self._failing:
                    log.info("the site directory has this Archiver's audit log again")
                self._failing = False
            except Exception as exc:
                if not self._failing:
                    log.warning("could not write the audit log to the site directory (%s); "
                                "trying again every %.0f s from the file", exc, self._retry_s)
                self._failing = True
            if stopping:
                return

    def close(self, flush_s: float = 5.0) -> None:
        """Close the file; in a site, first give the writer ``flush_s`` to send what the
        directory lacks (what it could not send goes at the next start)."""
        if self._writer is not None:
            self._stopping = True
            self._wake.set()
            self._writer.join(flush_s)
        os.close(self._fd)


@dataclass(frozen=True)
class AuditEntry:
    """One entry of an audit log as listed: the Archiver that wrote it (its line ``seq`` in
    that Archiver's file) and the entry itself."""

    archiver: str
    seq: int
    ts_ms: int
    actor: str
    action: str
    entry: dict[str, Any]


def read_audit(path: Path, site: Directory | None, archiver: str, *, since_ms: int = 0,
               only: str | None = None, limit: int = 1000) -> list[AuditEntry]:
    """The audit log, oldest first from ``since_ms``, at most ``limit`` entries: the site's
    (every Archiver's lines, from the directory) in a site, else this Archiver's file.
    ``only``: one Archiver's entries."""
    if site is not None:
        return [AuditEntry(e.archiver, e.seq, e.ts_ms, e.actor, e.action, json.loads(e.entry))
                for e in site.audit_events(archiver=only, since_ms=since_ms, limit=limit)]
    if only is not None and only != archiver:
        return []
    found: list[AuditEntry] = []
    if not path.exists():
        return found
    for seq, line in enumerate(path.read_bytes().splitlines(), start=1):
        entry = json.loads(line)
        if int(entry.get("ts_ms", 0)) < since_ms:
            continue
        found.append(AuditEntry(archiver, seq, int(entry.get("ts_ms", 0)),
                                str(entry.get("actor", "")), str(entry.get("action", "")), entry))
        if len(found) >= limit:
            break
    return found


def verify_audit_log(path: Path) -> int | None:
    """Line number (1-based) of the first entry whose chain link is broken, or None if intact."""
    prev = GENESIS
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            return number
        if entry.get("prev") != prev:
            return number
        prev = hashlib.sha256(line).hexdigest()
    return None
