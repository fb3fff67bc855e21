"""Whether this Archiver can archive (issue 22, "a disk fails"): per camera, the failures of its
own disk since the camera's last archived segment, and a probe of the disk itself.

A holder whose disk fails (I/O errors, a read-only remount, full with nothing left to evict
under the holds) is alive: it heartbeats and keeps its leases, so without this its cameras
would go unrecorded while a healthy standby waits. ``Archive.ingest_segment`` reports here
each segment's outcome; ``SiteMember`` (archiver/registry.py) releases the lease of a camera
with standbys once its failures pass the bound (``due``), and probes the disk before taking any
camera over, so a standby whose own disk failed takes nothing.

Only this Archiver's own disk counts (``DiskFull``, ``DiskFailed``): the site directory's
failures (PostgreSQL down or full) are not the disk's, and have their own path (snapshot.py).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from archiver.storage import DiskFailed, DiskFull

# A camera's disk failed this many segments in a row, or for this long with the probe failing
# too (a pulled camera backs off between attempts): its holder gives it to a standby.
FAILED_SEGMENTS = 3
FAILED_MS = 10_000
# The probe writes this much (about a segment of a low-rate camera) and fsyncs it: a disk with
# a few KiB left, or that fails only on a flush, is not taken for a working one.
PROBE_BYTES = 1 << 20
PROBE_NAME = ".storage-probe"  # in the archive directory; no camera's name starts with a dot
PROBE_EVERY_S = 1.0  # a probe's answer is reused this long (a standby polls every 0.5 s)


@dataclass(frozen=True)
class DiskFailure:
    """A camera's disk failures since its last archived segment."""

    since_ms: int  # the first of them
    count: int
    message: str  # the last one's sentence


class StorageWatch:
    """Thread-safe: ingest threads report, the site member's threads read."""

    def __init__(self, dirs: Sequence[Path], clock: Callable[[], int]) -> None:
        self._dirs = list(dict.fromkeys(dirs))
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, DiskFailure] = {}
        self._probed: tuple[float, str | None] | None = None  # (monotonic time, answer)
        # Called (from an ingest thread) when a camera reaches FAILED_SEGMENTS: the site member
        # then acts at once, not at its next refresh.
        self.on_failing: Callable[[], None] | None = None

    def archived(self, camera: str) -> None:
        with self._lock:
            self._failures.pop(camera, None)

    def refused(self, camera: str, exc: BaseException) -> None:
        """A segment of ``camera`` was not archived; counted only if this disk is why."""
        if not isinstance(exc, DiskFull | DiskFailed):
            return
        with self._lock:
            before = self._failures.get(camera)
            failure = DiskFailure(before.since_ms if before else self._clock(),
                                  (before.count if before else 0) + 1, str(exc))
            self._failures[camera] = failure
        if failure.count == FAILED_SEGMENTS and self.on_failing is not None:
            self.on_failing()

    def forget(self, camera: str) -> None:
        """``camera`` is no longer recorded here (or starts afresh)."""
        with self._lock:
            self._failures.pop(camera, None)

    def failure(self, camera: str) -> DiskFailure | None:
        with self._lock:
            return self._failures.get(camera)

    def due(self, cameras: Sequence[str]) -> dict[str, DiskFailure]:
        """Those of ``cameras`` whose disk failures passed the bound: ``FAILED_SEGMENTS`` in a
        row, or ``FAILED_MS`` without a segment archived while the probe fails too."""
        now = self._clock()
        with self._lock:
            failing = {name: self._failures[name] for name in cameras if name in self._failures}
        due = {name: f for name, f in failing.items() if f.count >= FAILED_SEGMENTS}
        late = {name: f for name, f in failing.items()
                if name not in due and now - f.since_ms >= FAILED_MS}
        if late and self.probe() is not None:
            due.update(late)
        return due

    def probe(self) -> str | None:
        """None if this Archiver's disk takes a write (``PROBE_BYTES``, fsynced, then removed),
        else why not, in one sentence. Answers from the last second are reused."""
        now = time.monotonic()
        with self._lock:
            if self._probed is not None and now - self._probed[0] < PROBE_EVERY_S:
                return self._probed[1]
        answer = None
        for directory in self._dirs:
            answer = _probe(directory)
            if answer is not None:
                break
        with self._lock:
            self._probed = (time.monotonic(), answer)
        return answer


def _probe(directory: Path) -> str | None:
    path = directory / PROBE_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(bytes(PROBE_BYTES))
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
            try:
                path.unlink()
            except OSError:  # the write's error is the one to say
                pass
    except OSError as exc:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        return (f"the disk of {directory} is {'full' if full else 'failing'} "
                f"({os.strerror(exc.errno or 0)})")
    return None
