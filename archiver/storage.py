"""Append-only archive files: one per camera per UTC day, holding encoded fusion-stream records
(segments and the manifests that cover them), exactly the bytes served to viewers.

Durability rule: bytes are fsynced here *before* the index row that acknowledges them is
committed (archiver.db). After a crash, ``archiver.reindex.recover`` indexes again what a
valid signature covers past the last indexed byte of a file, and cuts only the rest.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from keyservice.errors import KeyServiceError

log = logging.getLogger("archiver.storage")


class StorageFull(KeyServiceError):
    """The archive's file system is full: ingest must pause, nothing archived is harmed."""


_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

# How much of each file's newest bytes stays in the page cache once durable: the segments a
# live viewer is about to read. Older written bytes are dropped from the cache right after
# their fsync (the archive is written once and read rarely): a page cache that grows with
# every byte archived evicts what is read (the index, recent video), and each new page of it
# costs a fresh page of memory. On a VM that hands freed memory back to its host, that fresh
# page is a fault in the host too: measured here, 4-8 ms of CPU per MB archived in the
# kernel's copy into the cache, against 0.2-0.3 ms with the cache kept to this tail
# (docs/benchmarks.md, "Capacity: the page cache").
CACHED_TAIL_BYTES = 8 * 2**20


class StorageFailed(KeyServiceError):
    """An I/O error while writing the archive."""


# This Archiver's OWN disk (its archive files, its local index), not the site directory's
# database (whose failures are StorageFull/StorageFailed too): only these make a holder give
# its cameras to a standby (archiver/storage_watch.py, issue 22).
class DiskFull(StorageFull):
    """The disk under this Archiver's archive files or local index is full."""


class DiskFailed(StorageFailed):
    """An I/O error on the disk under this Archiver's archive files or local index."""


class ArchiveFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._write_fds: dict[str, int] = {}
        # relpath -> offset below which the written bytes were dropped from the page cache
        self._uncached_to: dict[str, int] = {}
        self._lock = threading.Lock()

    @staticmethod
    def file_for(camera: str, now_ms: int) -> str:
        day = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC).strftime("%Y-%m-%d")
        return f"{camera}/{day}.fsa"

    @staticmethod
    def key_file_for(camera: str, now_ms: int) -> str:
        """The camera's key journal of the day: the epoch openers and chain records made for
        its key chains (public-key and AEAD ciphertext only), so that viewers' key streams
        survive the loss of the database (``fusion-archiver reindex`` reads them back)."""
        day = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC).strftime("%Y-%m-%d")
        return f"{camera}/{day}.fsk"

    def append(self, relpath: str, data: bytes | Sequence[bytes | memoryview]) -> int:
        """Append and fsync; returns the offset. On failure the file is cut back to where it was.
        ``data`` may be several buffers: written with writev, never joined (a segment is MBs,
        and copying it costs the GIL-held time of the whole ingest path)."""
        try:
            fd = self._writer(relpath)
        except OSError as exc:  # a read-only remount, a dead disk: as a failed write
            raise _disk_error(exc) from None
        offset = os.fstat(fd).st_size
        parts = [data] if isinstance(data, bytes | bytearray | memoryview) else data
        views = [view for view in map(memoryview, parts) if view.nbytes]
        size = offset + sum(view.nbytes for view in views)
        try:
            while views:
                # At most IOV_MAX buffers per call (EINVAL beyond): a key chain's journal
                # entry holds one record (and maybe an opener) per viewer, thousands of them.
                written = os.writev(fd, views[:_IOV_MAX])
                while views and written >= views[0].nbytes:
                    written -= views[0].nbytes
                    views.pop(0)
                if written:  # a short write: go on from where it stopped
                    views[0] = views[0][written:]
            os.fsync(fd)
        except OSError as exc:
            self._undo(fd, offset)
            raise _disk_error(exc) from None
        self._drop_from_cache(relpath, fd, size)
        return offset

    def _drop_from_cache(self, relpath: str, fd: int, size: int) -> None:
        """Drop a durable file's written bytes from the page cache, all but the newest
        CACHED_TAIL_BYTES (clean pages after the fsync: nothing is written or lost)."""
        end = size - CACHED_TAIL_BYTES
        start = self._uncached_to.get(relpath, 0)
        if end - start >= CACHED_TAIL_BYTES and hasattr(os, "posix_fadvise"):  # in steps
            try:
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
            except OSError:  # advice only: the bytes are durable, the append succeeded
                return
            self._uncached_to[relpath] = end

    def cut_back(self, relpath: str, offset: int) -> None:
        """Undo an append whose index entry could not be committed (the caller holds the
        camera's lock, so nothing was appended after it)."""
        self._undo(self._writer(relpath), offset)
        if self._uncached_to.get(relpath, 0) > offset:
            self._uncached_to[relpath] = offset

    def remove(self, relpath: str) -> int:
        """Delete an archive file or key journal for good (retention): its write descriptor
        is closed first (an open descriptor would keep the space), the unlink is made durable.
        Returns the bytes it held (0 if it was gone already)."""
        self.release(relpath)
        path = self.root / relpath
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        _fsync_dir(path.parent)
        return size

    def replace(self, relpath: str, data: bytes) -> None:
        """Replace a file's content atomically (retention rewrites a key journal without the
        records it shreds): a temporary file, fsynced, renamed over it, the rename fsynced."""
        self.release(relpath)
        path = self.root / relpath
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def release(self, relpath: str) -> None:
        """Close the write descriptor of a file, if open (the next append opens it again)."""
        with self._lock:
            fd = self._write_fds.pop(relpath, None)
            self._uncached_to.pop(relpath, None)
            if fd is not None:
                os.close(fd)

    def opener(self, relpath: str) -> ArchiveReader:
        return ArchiveReader(self.root / relpath)

    def close(self) -> None:
        with self._lock:
            for fd in self._write_fds.values():
                os.close(fd)
            self._write_fds.clear()
            self._uncached_to.clear()

    def _writer(self, relpath: str) -> int:
        with self._lock:
            fd = self._write_fds.get(relpath)
            if fd is not None:
                return fd
            path = self.root / relpath
            is_new_dir = not path.parent.exists()
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # data dir: 0700
            is_new = not path.exists()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            if is_new:  # the new file's name must survive a crash too
                _fsync_dir(path.parent)
            if is_new_dir:
                _fsync_dir(self.root)
            # Keep only the newest file of each kind (archive, key journal) per camera open.
            camera, suffix = relpath.split("/", 1)[0], relpath.rsplit(".", 1)[-1]
            for old in [p for p in self._write_fds
                        if p.startswith(camera + "/") and p.endswith("." + suffix)]:
                os.close(self._write_fds.pop(old))
                self._uncached_to.pop(old, None)
            self._write_fds[relpath] = fd
            return fd

    @staticmethod
    def _undo(fd: int, offset: int) -> None:
        try:
            os.ftruncate(fd, offset)
            os.fsync(fd)
        except OSError as exc:  # a read-only remount refuses this too: said, not a traceback
            log.error("could not cut back a failed append (%s); recovery at restart will",
                      os.strerror(exc.errno or 0))


class ArchiveReader:
    """Reads record ranges of one archive file for one response, keeping the file open."""

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "rb")

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fh.fileno(), length, offset)
        if len(data) != length:
            raise StorageFailed("An archive file is shorter than its index says.")
        return data

    def close(self) -> None:
        self._fh.close()


def _disk_error(exc: OSError) -> DiskFull | DiskFailed:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull("The archive disk is full; the segment was not archived.",
                        "Free space or add storage; ingest resumes by itself.")
    return DiskFailed(f"Writing the archive failed ({os.strerror(exc.errno or 0)}); "
                      "the segment was not archived.")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
