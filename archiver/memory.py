"""The Archiver process's heap: keep freed segment buffers instead of handing them back.

Every upload allocates a few large buffers (its body, then its ciphertext: up to 32 MiB each by
default) from dozens of threads and frees them a moment later. glibc's malloc gives such blocks
back to the kernel (``munmap``, or a trim of the thread's arena), so the next upload's buffers
are fresh pages: faulted in and zeroed by the kernel again, and on a VM whose balloon reports
free pages to its host (as the page cache did, archiver.storage) faulted in by the host as
well. Measured with the ingest benchmark's load (docs/benchmarks.md, "Freed buffers kept"),
windows alternating on the same machine: the encrypting Archiver 0.45-0.6 ms of CPU per MB less
(mostly kernel) and 6-9 % more MB/s, the plaintext baseline 0.2-0.3 ms less. The cost: memory
freed after a burst of uploads stays in the process (about the burst's buffers, ~40 MB there;
docs/deployment.md, "Memory").

An administrator who sets glibc's malloc tunables (``GLIBC_TUNABLES``) keeps them: nothing is
changed then. Not glibc (musl): nothing is changed either.
"""

from __future__ import annotations

import ctypes
import os

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap, not from their own mmap: a segment and its
# ciphertext up to twice Settings.max_segment_bytes' default (32 MiB).
MMAP_THRESHOLD = 64 * 2**20
# Free memory at the top of a heap is only returned to the kernel beyond this.
TRIM_THRESHOLD = 256 * 2**20


def keep_freed_buffers() -> bool:
    """Tell glibc's malloc to keep freed segment buffers (see the module). True if done."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False  # the administrator's settings win
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # not glibc
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # Both set explicitly: setting one also turns off glibc's own adjustment of the other.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
