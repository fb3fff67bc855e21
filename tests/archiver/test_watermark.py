"""The disk watermark (issue 15, deliverable 1): on a disk too small for the archive, ingest
goes on by removing the oldest unheld video first. The free-space reading is simulated (a
capacity minus what the data directory holds), the rest is real: the Archiver's write path
with its SoftHSM signing key, a viewer enrolled on a SoftHSM token, an injected clock."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from archiver.admin import Admin
from archiver.archive import Archive
from archiver.audit import AuditLog
from archiver.auth import digest, new_secret
from archiver.retention import REASON_DISK
from archiver.settings import Settings
from archiver.signing import open_signer
from bench.generate import authorize, segment_bytes
from tests.archiver.conftest import Viewer
from tests.archiver.retention_helpers import DAY_MS, day_name, generate, today_ms
from tests.fixtures.tokens import TokenHandle
from tests.fixtures.viewer import play
from tests.hardening.conftest import (
    Uploader,
    WrappedServer,
    check_archive,
    check_played,
    play_camera,
)

KiB = 1024
SEGMENT_MS = 30 * 60_000  # 48 segments a simulated day
SIZE = 64 * KiB
DAYS = 9


def _used(data: Path) -> int:
    return sum(p.stat().st_size for p in data.rglob("*") if p.is_file())


def test_a_full_disk_keeps_ingesting_by_evicting_the_oldest_unheld_video(
        tmp_path: Path, softhsm_token: TokenHandle,
        make_viewer: Callable[[str], Viewer]) -> None:
    viewer = make_viewer("carol")
    data = tmp_path / "archiver"
    # Room for about four days (and SQLite's WAL, which grows to a few MiB between checkpoints).
    capacity, min_free = 24 * 1024 * KiB, 4 * 1024 * KiB
    settings = Settings(data_dir=data, signer_token_uri=softhsm_token.uri, retention_days=3650,
                        min_free_bytes=min_free)
    start = today_ms() - 9 * DAY_MS
    now = [start]
    archive = Archive(settings, open_signer(settings), clock=lambda: now[0],
                      free_bytes=lambda: capacity - _used(data))
    try:
        fp = authorize(Admin(archive, AuditLog(settings.audit_log_path)), viewer.pem.read_bytes())
        archive.directory.add_camera("lobby", digest(new_secret()), None, start)
        held_day = start + DAY_MS
        archive.directory.add_hold("lobby", held_day + 3600_000, held_day + 7200_000, "incident", "test",
                            start)
        low_after_pass = []
        for index in range(DAYS * 48):  # a pass every simulated hour, as the task does
            now[0] = start + index * SEGMENT_MS
            archive.ingest_segment("lobby", segment_bytes("lobby", index, SIZE), now_ms=now[0])
            if index % 2 == 1:
                report = archive.retention.run()
                if capacity - _used(data) < min_free:
                    low_after_pass.append(index)
                    assert report.below_watermark  # said so, when nothing could go
        removed = archive.db.expired_files("lobby")
        # Oldest first, never the held day, all for disk space; ingest never failed above.
        names = [r.file for r in sorted(removed, key=lambda r: r.removed_ms)]
        days = [day_name(start + i * DAY_MS) for i in range(DAYS)]
        assert names == sorted(names) and f"lobby/{days[1]}.fsa" not in names
        assert f"lobby/{days[0]}.fsa" in names and len(names) >= 3
        assert {r.reason for r in removed} == {REASON_DISK}
        # After every pass the free space was back above the threshold: there was always an
        # unheld past day left to remove.
        assert low_after_pass == []
        assert _used(data) <= capacity
        kept = sorted(p.name for p in (data / "archive" / "lobby").glob("*.fsa"))
        assert kept[0] == f"{days[1]}.fsa" and kept[-1] == f"{days[-1]}.fsa"
        # The held day is whole and a real viewer (its SoftHSM token) opens it.
        viewer_row = archive.directory.viewer(fp)
        assert viewer_row is not None
        stream = b"".join(archive.playback(viewer_row, "lobby", held_day,
                                           held_day + DAY_MS - 1, os.urandom(16)))
        played = play(viewer.identity, stream)
        assert played.ended and not played.skipped
        assert [p.data for p in played.plaintexts] == [
            segment_bytes("lobby", 48 + i, SIZE) for i in range(48)]
    finally:
        archive.close()


def _namespace_wrapper() -> tuple[str, ...]:
    # As root a mount namespace is enough; otherwise a user namespace maps us to root in it.
    return ("unshare", "--mount") if os.geteuid() == 0 else (
        "unshare", "--user", "--map-root-user", "--mount")


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) is not installed")
def test_a_really_full_disk_evicts_the_oldest_day_and_the_segment_is_archived(
        tmp_path: Path, make_viewer: Callable[[str], Viewer]) -> None:
    """No simulation: the data directory on a 24 MiB tmpfs (private mount namespace), three
    past days of another camera on it, the watermark off (--min-free-mib 0). A segment that
    finds the disk full makes ingest remove the oldest unheld past day at once and is archived;
    507 comes only once no past day is left."""
    viewer = make_viewer("dana")
    data = tmp_path / "archiver"
    stash = tmp_path / "stash"
    generate(data, "old", today_ms() - 4 * DAY_MS, 72, 1800, 100 * KiB, [viewer.pem])
    server = WrappedServer(
        data, wrapper=_namespace_wrapper(),
        extra_args=("--min-free-mib", "0", "--retention-days", "3650", "--disk-reserve-mib", "1"),
        setup_script=f"cp -a '{data}' '{stash}'\n"
                     f"mount -t tmpfs -o size=24m,mode=0700 fusion-test '{data}'\n"
                     f"cp -a '{stash}/.' '{data}/'").start()
    try:
        token = server.add_camera("live")
        uploader = Uploader(server.url, "live", token, sizes=(150_000, 150_000))
        past = sorted(p.name for p in server.path("archive/old").glob("*.fsa"))
        assert len(past) == 3
        left_at_first_refusal = None
        with httpx.Client(timeout=60) as client:
            for _ in range(300):
                status = uploader.put_one(client)
                if status != 201:
                    assert status == 507, uploader.error_bodies
                    left_at_first_refusal = list(server.path("archive/old").glob("*.fsa"))
                    break
            else:
                pytest.fail("the 24 MiB disk never filled")
        # Every past day went (oldest first, for disk space) before ingest said 507.
        assert left_at_first_refusal == []
        removed = [e for e in map(json.loads, server.path("audit.jsonl").read_text().splitlines())
                   if e.get("action") == "retention.remove"]
        assert [e["file"] for e in removed] == [f"old/{name}" for name in past]
        assert {e["reason"] for e in removed} == {REASON_DISK}
        # Well over what fit beside the past days (about 8 MiB free at the start).
        assert len(uploader.acked) * 150_000 > 16 * 1024 * KiB
        report = check_archive(server.path())
        assert report.segments == len(uploader.acked)
        played = play_camera(server.url, viewer.identity, "live")
        check_played(played, [uploader])
    finally:
        server.stop()
    assert "Traceback" not in server.log()
