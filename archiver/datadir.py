"""The data directory's permissions: 0700, every file in it 0600 or 0640 at most.

It holds the admin token, the signing token and its PIN, camera URLs (with their RTSP
credentials) and the audit log: nothing in it is for other local users. Files are created with
these modes; ``secure_data_dir`` also tightens a directory made by an older version or by hand.

One process at a time writes a data directory (``lock_data_dir``): two Archivers on one directory
interleave their index writes and lose video, so ``serve`` and the offline commands that write
(``reindex``, ``check --rebuild-index``) each hold its lock for their whole run.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from keyservice.errors import KeyServiceError
from keyservice.exitcodes import ExitCode

log = logging.getLogger("archiver")

DIR_MODE = 0o700
MAX_FILE_MODE = 0o640  # archive files may be group-readable (a backup group); nothing more


def secure_data_dir(root: Path) -> list[str]:
    """Create ``root`` (0700) if needed and tighten everything under it; returns what changed."""
    root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    changed = []
    for path in [root, *root.rglob("*")]:
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue  # removed while walking (an SQLite journal, say)
        if stat.S_ISLNK(info.st_mode):
            continue
        mode = stat.S_IMODE(info.st_mode)
        wanted = DIR_MODE if stat.S_ISDIR(info.st_mode) else mode & MAX_FILE_MODE
        if mode != wanted:
            name = path.relative_to(root).as_posix() or "."
            try:
                os.chmod(path, wanted)
            except OSError as exc:  # not ours (a mount point, another owner): say so, go on
                log.error("cannot tighten %s in the data directory to %04o (%s); fix it by hand",
                          name, wanted, exc.strerror)
                continue
            changed.append(f"{name}: {mode:04o} -> {wanted:04o}")
    for line in changed:
        log.warning("tightened permissions in the data directory: %s", line)
    return changed


LOCK_NAME = "archiver.lock"
EXIT_DATA_DIR_IN_USE = ExitCode.DATA_DIR_IN_USE


class DataDirInUse(KeyServiceError):
    """Another process holds the data directory's lock (a running Archiver, a reindex)."""

    exit_code = EXIT_DATA_DIR_IN_USE


@dataclass
class DataDirLock:
    """The data directory's lock, held while the file descriptor is open. The kernel releases
    it when the process ends, however it ends (kill -9 too): a lock is never left stale."""

    path: Path
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def lock_data_dir(root: Path, purpose: str) -> DataDirLock:
    """Take ``root``'s lock for this process (``purpose``: the command, named to whoever is
    refused); DataDirInUse, naming the holder's pid, if another process has it."""
    path = root / LOCK_NAME
    try:
        # os.open's descriptors are not inherited (PEP 446): a child process (ffmpeg, a
        # PKCS#11 helper) cannot keep the lock after the Archiver is gone.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise KeyServiceError(f"Cannot open the lock file {path}: {exc.strerror}.") from None
    try:
        # flock, not fcntl's record locks: those are per process, so a second open and close
        # of the file anywhere in this process would silently drop the lock.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder(fd)
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise KeyServiceError(f"Cannot lock {path}: {exc.strerror}.") from None
        raise DataDirInUse(f"The data directory {root} is in use by {holder}; stop it first "
                           f"({purpose} needs the directory to itself).") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {purpose}\n".encode())
    return DataDirLock(path, fd)


def _holder(fd: int) -> str:
    """Who holds the lock, as the holder wrote it: "fusion-archiver serve (pid 1234)"."""
    try:
        text = os.pread(fd, 200, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    pid, _, purpose = text.partition(" ")
    if not pid.isdigit():  # taken this instant, not written yet
        return "another process"
    return f"fusion-archiver {purpose or 'process'} (pid {pid})"
