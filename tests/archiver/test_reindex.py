"""Issue 12, item 2: the archive files, not the SQLite index, are the source of truth.

An attacker (or a crash) that removes index rows must not make the next start cut signed
bytes from the archive; the index can be rebuilt from the files alone. Real Archiver under
uvicorn, real SoftHSM viewer token; the index is edited with sqlite3 as the attacker would."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from fusion_testkit import forkserver
from keyservice.certs import build_archiver_certificate
from keyservice.crypto import new_minute_key, seal_segment
from keyservice.format import DataStream, encode_record
from keyservice.fusion_writer import ManifestChain
from keyservice.identity import SoftwareSigner
from tests.fixtures.server import REPO_ROOT, ArchiverServer
from tests.fixtures.viewer import fetch, login, play

from .conftest import Viewer

SEGMENT_COLUMNS = ("camera, stream, seq, capture_ms, key_id, plaintext_bytes, digest, file, "
                   "offset, length, manifest_seq")
MANIFEST_COLUMNS = "camera, manifest_seq, file, offset, length, hash, first_capture_ms"


def _segments(count: int) -> list[bytes]:
    return [os.urandom(2000) + bytes([i]) * 1000 for i in range(count)]


def _index(server: ArchiverServer) -> sqlite3.Connection:
    return sqlite3.connect(server.data_dir / "archiver.sqlite3", isolation_level=None)


def _recoveries(server: ArchiverServer) -> list[list[str]]:
    lines = (server.data_dir / "audit.jsonl").read_text().splitlines()
    return [entry.get("recovery", []) for entry in map(json.loads, lines)
            if entry["action"] == "start"]


def _played(server: ArchiverServer, viewer: Viewer) -> bytes:
    stream = fetch(server.url, login(server.url, viewer.identity), "cam1")
    assert stream.status_code == 200, stream.text
    result = play(viewer.identity, stream.content)
    assert result.ended and not result.skipped
    return result.data


def _rogue_group(chain_next: int, prev_hash: bytes, capture_ms: int) -> bytes:
    """A segment and a manifest that continue cam1's chain, signed by a key that is not the
    Archiver's (what an attacker who can write the files, but not sign, could append)."""
    key = ec.generate_private_key(ec.SECP256R1())
    signer = SoftwareSigner(build_archiver_certificate(key, "rogue", now=dt.datetime.now(dt.UTC)),
                            key)
    minute_key = new_minute_key("cam1", DataStream.VIDEO, capture_ms)
    segment = seal_segment(minute_key, 10_000, capture_ms, b"forged" * 100)
    _, manifest = ManifestChain("cam1", chain_next, prev_hash).issue(
        [segment], [minute_key], signer, capture_ms)
    return encode_record(segment) + manifest


def test_deleted_tail_rows_are_indexed_again_not_cut(
        archiver_server: ArchiverServer, make_viewer: Callable[[str], Viewer]) -> None:
    alice = make_viewer("alice")
    token = archiver_server.add_camera("cam1")
    archiver_server.add_viewer(alice.pem, ["cam1"])
    chunks = _segments(8)
    for data in chunks:
        assert archiver_server.put_segment("cam1", token, data) == 201
    archiver_server.stop()
    (path,) = (archiver_server.data_dir / "archive" / "cam1").glob("*.fsa")
    genuine_size = path.stat().st_size
    # The attacker deletes the index rows of the last three segments: before issue 12 the
    # next start cut their signed bytes from the archive file as "unacknowledged".
    with _index(archiver_server) as db:
        last_hash, last_capture = db.execute(
            "SELECT hash, last_capture_ms FROM manifests WHERE manifest_seq=7").fetchone()
        db.execute("DELETE FROM segments WHERE seq >= 5")
        db.execute("DELETE FROM manifests WHERE manifest_seq >= 5")
    # ... and appends a group that continues the chain but is not signed by the Archiver.
    forged = _rogue_group(8, last_hash, last_capture + 1)
    with open(path, "ab") as fh:
        fh.write(forged + b"\x04\x00\x00\x10\x00torn")
    archiver_server.start()
    assert path.stat().st_size == genuine_size  # the forged and torn bytes cut, nothing else
    rel = path.relative_to(archiver_server.data_dir / "archive").as_posix()
    assert _recoveries(archiver_server)[-1] == [
        f"re-indexed 3 signed segment(s) (3 manifest(s)) at the end of {rel} that the index "
        "did not list",
        f"cut {len(forged) + 9} unacknowledged bytes from the end of {rel}"]
    assert _played(archiver_server, alice) == b"".join(chunks)
    # Ingest continues the chain after the restored tail.
    more = _segments(1)
    assert archiver_server.put_segment("cam1", token, more[0]) == 201
    assert _played(archiver_server, alice) == b"".join(chunks + more)


def test_signed_bytes_that_do_not_continue_the_chain_are_never_cut(
        archiver_server: ArchiverServer, make_viewer: Callable[[str], Viewer]) -> None:
    alice = make_viewer("alice")
    token = archiver_server.add_camera("cam1")
    archiver_server.add_viewer(alice.pem, ["cam1"])
    for data in _segments(6):
        assert archiver_server.put_segment("cam1", token, data) == 201
    archiver_server.stop()
    (path,) = (archiver_server.data_dir / "archive" / "cam1").glob("*.fsa")
    size = path.stat().st_size
    # Rows from segment 2 on deleted, and a lying row: the index now says the chain is at
    # manifest 3, ending where manifest 1 ends. The signed manifest 2 that follows in the
    # file does not continue that: recovery must not "fix" it by cutting.
    with _index(archiver_server) as db:
        db.execute("DELETE FROM segments WHERE seq >= 2")
        db.execute("DELETE FROM manifests WHERE manifest_seq >= 2")
        db.execute("INSERT INTO manifests SELECT camera, 3, file, offset, length, hash,"
                   " first_capture_ms, last_capture_ms FROM manifests WHERE manifest_seq=1")
    archiver_server.start()
    assert path.stat().st_size == size
    assert any("ARCHIVE INCONSISTENT" in line and "left in place" in line
               for line in _recoveries(archiver_server)[-1])


def _reindex(data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "FUSION_PIN")}
    return forkserver.run([sys.executable, "-m", "archiver", "reindex", "--data", str(data_dir)],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)


def test_reindex_rebuilds_the_index_from_the_files(
        archiver_server: ArchiverServer, make_viewer: Callable[[str], Viewer]) -> None:
    alice = make_viewer("alice")
    tokens = {cam: archiver_server.add_camera(cam) for cam in ("cam1", "cam2")}
    archiver_server.add_viewer(alice.pem, ["cam1", "cam2"])
    chunks = _segments(6)
    for i, data in enumerate(chunks):
        assert archiver_server.put_segment("cam1", tokens["cam1"], data) == 201
        assert archiver_server.put_segment("cam2", tokens["cam2"], data[::-1]) == 201
        if i == 2:  # re-authorized midway (issue 23: the chains run on, nothing restarts)
            archiver_server.add_viewer(alice.pem, ["cam1", "cam2"])
    before = _played(archiver_server, alice)
    archiver_server.stop()
    with _index(archiver_server) as db:
        rows_before = db.execute(f"SELECT {SEGMENT_COLUMNS} FROM segments ORDER BY camera, "
                                 "seq").fetchall()
        manifests_before = db.execute(f"SELECT {MANIFEST_COLUMNS} FROM manifests ORDER BY "
                                      "camera, manifest_seq").fetchall()
        # The whole segment index gone.
        db.execute("DELETE FROM segments")
        db.execute("DELETE FROM manifests")
    done = _reindex(archiver_server.data_dir)
    assert done.returncode == 0, done.stderr
    assert "indexed 12 segment(s) under 12 signed manifest(s) from 2 file(s)" in done.stdout
    with _index(archiver_server) as db:
        # Everything but the end of each segment's video, which the signed records do not
        # carry (reindex takes the next segment's start; these synthetic segments are points).
        assert db.execute(f"SELECT {SEGMENT_COLUMNS} FROM segments ORDER BY camera, "
                          "seq").fetchall() == rows_before
        assert db.execute(f"SELECT {MANIFEST_COLUMNS} FROM manifests ORDER BY camera, "
                          "manifest_seq").fetchall() == manifests_before
    archiver_server.start()
    assert _recoveries(archiver_server)[-1] == []
    assert before == b"".join(chunks)
    assert _played(archiver_server, alice) == before
    # Not a data directory: a clear error, no traceback.
    wrong = _reindex(archiver_server.data_dir / "archive")
    assert wrong.returncode == 2 and "not an Archiver data directory" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_the_whole_database_lost_is_rebuilt_from_the_archive(
        archiver_server: ArchiverServer, make_viewer: Callable[[str], Viewer]) -> None:
    """The index database deleted outright: `reindex` rebuilds the segment index and reads the
    viewers' key streams back from the archive's key journals; once the admin has added the
    camera and the viewer again, playback is byte-identical (so frame-exact)."""
    alice = make_viewer("alice")
    token = archiver_server.add_camera("cam1")
    archiver_server.add_viewer(alice.pem, ["cam1"])
    bob = make_viewer("bob")
    chunks = _segments(6)
    for i, data in enumerate(chunks):
        if i == 3:  # a second viewer joins the chain midway: its opener and join record,
            archiver_server.add_viewer(bob.pem, ["cam1"])  # written at the next key period
            period_ms = archiver_server.key_period_s * 1000
            time.sleep((period_ms - time.time_ns() // 1_000_000 % period_ms) / 1000 + 0.05)
        assert archiver_server.put_segment("cam1", token, data) == 201
    assert _played(archiver_server, alice) == b"".join(chunks)
    archiver_server.stop()
    for path in archiver_server.data_dir.glob("archiver.sqlite3*"):
        path.unlink()
    done = _reindex(archiver_server.data_dir)
    assert done.returncode == 0, done.stderr
    assert "indexed 6 segment(s) under 6 signed manifest(s) from 1 file(s)" in done.stdout
    # At least two epochs and two chain records (alice's, and bob's join record).
    found = re.search(r"key streams: (\d+) epoch opener\(s\), (\d+) key record", done.stdout)
    assert found and int(found[1]) >= 2 and int(found[2]) >= 2, done.stdout
    archiver_server.start()
    assert _recoveries(archiver_server)[-1] == []
    archiver_server.add_camera("cam1")
    archiver_server.add_viewer(alice.pem, ["cam1"])
    assert _played(archiver_server, alice) == b"".join(chunks)
