"""The Archiver's heap (archiver/memory.py): freed segment buffers are kept, not faulted in
again for every upload; an administrator's own malloc tunables are left alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Threads receiving uploads of 1-4 MiB (a body joined from 64 KiB chunks, then a second buffer
# of its size, as its ciphertext), twice; the second round's page faults are printed.
_UPLOADS = """
import resource, sys, threading
from archiver.memory import keep_freed_buffers
if sys.argv[1] == "keep":
    assert keep_freed_buffers()
chunk = b"x" * 65536
def uploads(k):
    for i in range(20):
        body = b"".join([chunk] * (16 + 16 * ((i + k) % 4)))
        ciphertext = body.replace(b"x", b"y")
        del body, ciphertext
def burst():
    threads = [threading.Thread(target=uploads, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
burst()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
burst()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", _UPLOADS, mode], capture_output=True,
                          text=True, env=env, check=True, timeout=60)
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_segment_buffers_are_reused_not_faulted_in_again() -> None:
    plain, kept = _page_faults("plain"), _page_faults("keep")
    # 80 uploads of 2.5 MiB on average, two buffers each: ~100 000 fresh pages when glibc gives
    # them back (measured 40 365), almost none once it keeps them (measured 6).
    assert plain > 10_000
    assert kept < plain / 20


def test_the_administrators_malloc_tunables_win() -> None:
    done = subprocess.run(
        [sys.executable, "-c",
         "from archiver.memory import keep_freed_buffers; print(keep_freed_buffers())"],
        capture_output=True, text=True, check=True, timeout=60,
        env={**os.environ, "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"})
    assert done.stdout.strip() == "False"
