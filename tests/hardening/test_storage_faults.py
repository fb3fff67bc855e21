"""Disk full and write errors: ingest answers 507 / 503 with a sentence, nothing already archived
is harmed, and ingest resumes by itself once the disk is usable again.

Disk full is real: the Archiver's whole data directory (archive, SQLite index, audit log, its
token) sits on a 6 MiB tmpfs mounted in a private mount namespace (``unshare``), so the mount
can never leak out of the test. A 1 MiB ballast file on it is deleted to make space return.

The write error is injected with RLIMIT_FSIZE, set on the running server with prlimit(2):
writes past the limit fail with EFBIG, which takes the Archiver's "I/O error" path, the one EIO
takes (anything but ENOSPC/EDQUOT). A failing disk (dm-error, EIO) is not reproduced.
"""

from __future__ import annotations

import os
import resource
import shutil
from pathlib import Path

import httpx
import pytest

from archiver.audit import verify_audit_log
from tests.hardening.conftest import (
    Uploader,
    WrappedServer,
    assert_nonces_unique,
    check_archive,
    check_played,
    play_camera,
)

TMPFS_SIZE = "6m"


def _namespace_wrapper() -> tuple[str, ...]:
    # As root a mount namespace is enough; otherwise a user namespace maps us to root in it.
    return ("unshare", "--mount") if os.geteuid() == 0 else (
        "unshare", "--user", "--map-root-user", "--mount")


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) is not installed")
def test_disk_full_answers_507_harms_nothing_and_ingest_resumes(tmp_path: Path,
                                                                make_viewer) -> None:
    viewer = make_viewer("full-viewer")
    data = tmp_path / "archiver"
    data.mkdir()
    server = WrappedServer(
        data, wrapper=_namespace_wrapper(),
        setup_script=f"mount -t tmpfs -o size={TMPFS_SIZE},mode=0700 fusion-test '{data}'\n"
                     f"head -c 1048576 /dev/zero > '{data}/ballast'").start()
    try:
        assert not (data / "ballast").exists()  # the tmpfs is only visible to the server
        assert server.path("ballast").stat().st_size == 1 << 20
        tokens = {cam: server.add_camera(cam) for cam in ("cam1", "cam2")}
        server.add_viewer(viewer.pem, "all")
        uploaders = {cam: Uploader(server.url, cam, token, sizes=(150_000, 150_000))
                     for cam, token in tokens.items()}

        # Fill the disk, alternating cameras, until ingest refuses. (Fixed sizes: a smaller
        # segment could still fit after a larger one was refused.)
        with httpx.Client(timeout=60) as client:
            for _ in range(200):
                statuses = {cam: u.put_one(client) for cam, u in uploaders.items()}
                if 507 in statuses.values():
                    break
            else:
                pytest.fail("the 6 MiB disk never filled")
            # While full: every further upload is refused the same clear way, no 500.
            for _ in range(5):
                for uploader in uploaders.values():
                    assert uploader.put_one(client) == 507
            # Use up the last bytes too, so that nothing more can be written anywhere.
            for size in (30_000, 5_000, 1_000, 100):
                while uploaders["cam1"].put_one(client, size=size) == 201:
                    pass
            acked_before = {cam: len(u.acked) for cam, u in uploaders.items()}
            assert min(acked_before.values()) > 3
            # Other writes (index, audit log) answer 507 as well, or succeed where a page was
            # still free; never 500, and never half an audit line.
            added = client.post(f"{server.url}/v1/admin/cameras", json={"name": "cam3"},
                                headers={"Authorization": f"Bearer {server.admin_token}"})
            assert added.status_code in (201, 507), added.text
            if added.status_code == 507:
                assert added.json()["error"] == "storage_full"
            # A viewer login needs an audit entry: refused (507) rather than unaudited.
            pem = viewer.pem.read_text()
            challenge = client.post(f"{server.url}/v1/sessions/challenge",
                                    json={"certificate": pem})
            assert challenge.status_code == 200
            wrong = client.post(f"{server.url}/v1/sessions", json={
                "challenge_id": challenge.json()["challenge_id"], "proof": "AAAA"})
            assert wrong.status_code in (401, 507), wrong.text
            print(f"disk full: admin change {added.status_code}, refused login {wrong.status_code}")
        for uploader in uploaders.values():
            assert set(uploader.statuses) <= {201, 507}, uploader.statuses
            body = uploader.error_bodies[-1]
            assert '"error":"storage_full"' in body and "Free space" in body, body
        # Each refused upload is counted once, with its reason (the archive counts a storage
        # failure itself; the ingest route's outcome counting does not count it again).
        cameras = {c["name"]: c for c in server.admin("GET", "/v1/admin/cameras", expect=200)}
        for cam, uploader in uploaders.items():
            assert cameras[cam]["refused"] == sum(n for s, n in uploader.statuses.items() if s != 201) > 0
            assert "not archived" in cameras[cam]["last_refusal"]

        # Nothing archived is harmed: the files and the index agree record for record, and
        # everything acknowledged decrypts.
        report = check_archive(server.path())
        assert report.segments == sum(acked_before.values())
        assert_nonces_unique(report)

        # Space returns: ingest resumes at once, without a restart.
        server.path("ballast").unlink()
        with httpx.Client(timeout=60) as client:
            for uploader in uploaders.values():
                for _ in range(3):
                    assert uploader.put_one(client, size=50_000) == 201
        report = check_archive(server.path())
        assert_nonces_unique(report)
        assert verify_audit_log(server.path("audit.jsonl")) is None
        for cam, uploader in uploaders.items():
            played = play_camera(server.url, viewer.identity, cam)
            check_played(played, [uploader])
            assert len(played.plaintexts) == len(uploader.acked) and played.ended
    finally:
        server.stop()
    log = server.log()
    assert "Traceback" not in log, log[-3000:]


def test_write_error_answers_503_harms_nothing_and_ingest_resumes(tmp_path: Path,
                                                                  make_viewer) -> None:
    viewer = make_viewer("eio-viewer")
    server = WrappedServer(tmp_path / "archiver").start()
    try:
        token = server.add_camera("cam1")
        server.add_viewer(viewer.pem, ["cam1"])
        uploader = Uploader(server.url, "cam1", token, sizes=(20_000, 20_000))
        with httpx.Client(timeout=60) as client:
            for _ in range(5):
                assert uploader.put_one(client) == 201
            (archive_file,) = (server.data_dir / "archive" / "cam1").glob("*.fsa")
            # No file of the server may grow past its current largest size + 1 KiB: the next
            # segment (20 kB) cannot be written.
            # (Not counting the retention reserve: preallocated, it is never written to.)
            largest = max(p.stat().st_size for p in server.data_dir.rglob("*")
                          if p.is_file() and p.name != "retention-reserve")
            limit = largest + 1024
            # Only the soft limit: raising it back needs no privilege.
            old = resource.prlimit(server.pid, resource.RLIMIT_FSIZE)
            resource.prlimit(server.pid, resource.RLIMIT_FSIZE, (limit, old[1]))
            try:
                for _ in range(3):
                    assert uploader.put_one(client) == 503
                    size_while_failing = archive_file.stat().st_size
            finally:
                resource.prlimit(server.pid, resource.RLIMIT_FSIZE, old)
            assert '"error":"storage_failed"' in uploader.error_bodies[-1]
            assert "not archived" in uploader.error_bodies[-1] or "index" in uploader.error_bodies[-1]
            assert size_while_failing <= limit
            for _ in range(3):
                assert uploader.put_one(client) == 201
        report = check_archive(server.data_dir)
        assert report.segments == len(uploader.acked) == 8
        assert_nonces_unique(report)
        played = play_camera(server.url, viewer.identity, "cam1")
        check_played(played, [uploader])
        assert played.ended
    finally:
        server.stop()
    assert "Traceback" not in server.log()
