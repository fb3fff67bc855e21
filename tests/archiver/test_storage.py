"""Archive files (archiver/storage.py): what is appended is durable and read back as written,
and the page cache keeps only each file's newest bytes (the Archiver's capacity on a VM)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from archiver.storage import CACHED_TAIL_BYTES, ArchiveFiles

MiB = 2**20


def _resident_bytes(path: Path) -> int:
    """Bytes of the file in the page cache, as the kernel says (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES",
                          str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux's fincore")
def test_written_bytes_leave_the_page_cache_once_durable_except_the_newest(
        tmp_path: Path) -> None:
    files = ArchiveFiles(tmp_path / "archive")
    rel = "gate/2026-12-07.fsa"
    written: list[bytes] = []
    try:
        for _ in range(6 * CACHED_TAIL_BYTES // MiB):
            written.append(os.urandom(MiB))
            files.append(rel, [written[-1][:1000], memoryview(written[-1])[1000:]])
        path = tmp_path / "archive" / rel
        assert path.stat().st_size == len(written) * MiB
        # Dropped in steps of at least the tail: the newest 1-2 tails stay, nothing older.
        resident = _resident_bytes(path)
        assert CACHED_TAIL_BYTES // 2 <= resident <= 2 * CACHED_TAIL_BYTES + MiB, resident

        # An append whose index commit failed is cut back below what was dropped; what is
        # appended after it is dropped in turn, and every byte reads back as written.
        files.cut_back(rel, MiB)
        del written[1:]
        for _ in range(4 * CACHED_TAIL_BYTES // MiB):
            written.append(os.urandom(MiB))
            files.append(rel, written[-1])
        assert _resident_bytes(path) <= 2 * CACHED_TAIL_BYTES + MiB
        reader = files.opener(rel)
        try:
            assert [reader.read(i * MiB, MiB) for i in range(len(written))] == written
        finally:
            reader.close()
    finally:
        files.close()
