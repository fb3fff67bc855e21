"""The data directory's permissions: 0700, every file in it 0600 or 0640 at most.

It holds the admin token, the signing token and its PIN, camera URLs (with their RTSP
credentials) and the audit log: nothing in it is for other local users. Files are created with
these modes; ``secure_data_dir`` also tightens a directory made by an older version or by hand.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

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
