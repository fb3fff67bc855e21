"""Append-only audit log: one JSON object per line, each carrying the SHA-256 of the line before
it, so deleting or editing an entry breaks the chain (``verify_audit_log`` finds where)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from archiver.storage import StorageFailed, StorageFull

GENESIS = "0" * 64


class AuditLog:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._prev = GENESIS
        if path.exists():
            lines = path.read_bytes().splitlines()
            if lines:
                self._prev = hashlib.sha256(lines[-1]).hexdigest()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def record(self, actor: str, action: str, now_ms: int, **details: Any) -> None:
        with self._lock:
            entry = {"ts_ms": now_ms, "actor": actor, "action": action, **details,
                     "prev": self._prev}
            line = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
            size = os.fstat(self._fd).st_size
            try:
                if os.write(self._fd, line + b"\n") != len(line) + 1:
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
            self._prev = hashlib.sha256(line).hexdigest()

    def close(self) -> None:
        os.close(self._fd)


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
