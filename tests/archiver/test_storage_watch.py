"""The rule that makes a holder give a camera to its standby (archiver/storage_watch.py): only
this Archiver's own disk counts, 3 refused segments in a row or 10 s with the probe failing
too, an archived segment starts the count again; the probe writes to the real directories."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from archiver.directory.snapshot import DirectoryUnreachable
from archiver.storage import DiskFailed, DiskFull, StorageFailed, StorageFull
from archiver.storage_watch import FAILED_MS, FAILED_SEGMENTS, PROBE_NAME, StorageWatch
from fusion_testkit.server import server_env


def test_only_this_disks_failures_count_and_an_archived_segment_starts_again(
        tmp_path: Path) -> None:
    now = [1_000_000]
    woken: list[int] = []
    watch = StorageWatch([tmp_path], lambda: now[0])
    watch.on_failing = lambda: woken.append(now[0])
    # The directory's failures (PostgreSQL unreachable, or failing) are not the disk's.
    for exc in (DirectoryUnreachable("down", 0), StorageFailed("directory failed"),
                StorageFull("directory full")):
        watch.refused("gate", exc)
    assert watch.failure("gate") is None
    for _ in range(FAILED_SEGMENTS - 1):
        watch.refused("gate", DiskFull("The archive disk is full."))
    assert watch.due(["gate"]) == {} and woken == []
    watch.archived("gate")  # one archived segment: the count starts again
    assert watch.failure("gate") is None
    for i in range(FAILED_SEGMENTS):
        now[0] += 1000
        watch.refused("gate", DiskFailed("Writing the archive failed (Read-only file system)."))
    failure = watch.due(["gate", "door"])["gate"]
    assert (failure.count, failure.since_ms) == (FAILED_SEGMENTS, 1_001_000)
    assert "Read-only" in failure.message and woken == [now[0]]  # woken once, at the bound
    assert watch.due(["door"]) == {}  # only the cameras asked about
    # One refused segment, then none for FAILED_MS: due only if the probe fails too. Here the
    # directory takes writes, so the camera stays (a pulled camera backs off; a disk that
    # works again is not a reason to hand the camera over).
    watch.refused("door", DiskFull("full"))
    now[0] += FAILED_MS
    assert watch.due(["door"]) == {}
    assert watch.probe() is None and not (tmp_path / PROBE_NAME).exists()
    watch.forget("gate")
    assert watch.failure("gate") is None


def test_the_probe_says_why_a_directory_cannot_be_written(tmp_path: Path) -> None:
    # A directory that is not there (a disk that went away under its mount point).
    watch = StorageWatch([tmp_path / "gone"], lambda: 0)
    why = watch.probe()
    assert why is not None and "is failing (No such file or directory)" in why
    now = [0]
    watch = StorageWatch([tmp_path / "gone"], lambda: now[0])
    watch.refused("door", DiskFull("full"))
    now[0] = FAILED_MS
    assert list(watch.due(["door"])) == ["door"]  # 10 s, and the probe fails


_READ_ONLY_SCRIPT = r"""
import logging, subprocess, sys
from pathlib import Path
from archiver.storage import ArchiveFiles, DiskFailed
from archiver.storage_watch import StorageWatch

root = Path(sys.argv[1])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "fusion-test", str(root)],
               check=True)
logging.basicConfig(level=logging.INFO)
files = ArchiveFiles(root)
files.append("gate/2026-12-07.fsa", b"a" * 1000)
files.close()  # the kernel refuses a read-only remount under a file open for writing
subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
for rel in ("gate/2026-12-07.fsa", "door/2026-12-07.fsa"):  # a file there, a new one
    try:
        files.append(rel, b"b" * 1000)
    except DiskFailed as exc:
        print("refused:", exc)
print("probe:", StorageWatch([root], lambda: 0).probe())
"""


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                    reason="needs unshare (util-linux) and root to remount a tmpfs read-only")
def test_a_read_only_remount_is_a_disk_failure_without_a_traceback(tmp_path: Path) -> None:
    """A disk remounted read-only (what the kernel does after I/O errors): an append to a file
    there and to a new one are DiskFailed with the reason (before: the opening's OSError went
    up raw, a 500 and a traceback), and the probe says why."""
    root = tmp_path / "archive"
    root.mkdir(mode=0o700)
    done = subprocess.run(["unshare", "--mount", sys.executable, "-P", "-c", _READ_ONLY_SCRIPT,
                           str(root)], capture_output=True, text=True, timeout=60,
                          env=server_env())
    if "permission denied" in done.stderr.lower() or "not permitted" in done.stderr.lower():
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr
    refused = [line for line in done.stdout.splitlines() if line.startswith("refused:")]
    assert refused == ["refused: Writing the archive failed (Read-only file system); the "
                       "segment was not archived."] * 2, done.stdout
    assert "probe: the disk of" in done.stdout and "is failing (Read-only file system)" in (
        done.stdout), done.stdout
    assert "Traceback" not in done.stderr, done.stderr
