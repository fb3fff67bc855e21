"""Issue 12, item 1: a fusion stream answers one request. A relay between a real viewer and a
real Archiver answers new requests with a stream the viewer saved earlier (the CCTV loop); the
real fusion-client must refuse it with a clear reason and a non-zero exit, and write nothing."""

from __future__ import annotations

import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from fusion_testkit.client_cli import (
    EXIT,
    Client,
    Viewer,
    chunk,
    iso,
    live,
    now_ms,
    play,
    put,
    wait_for_audit,
)
from tests.fixtures.server import ArchiverServer

from .proxy import TamperingProxy

EXIT_REQUEST_MISMATCH = EXIT["request_mismatch"]


def assert_no_video(out: Path) -> None:
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name)) == []


def test_relay_replaying_a_saved_stream_is_refused(
        archiver_server: ArchiverServer, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    alice = make_viewer("alice")
    cam1, cam2 = archiver_server.add_camera("cam1"), archiver_server.add_camera("cam2")
    archiver_server.add_viewer(alice.pem, ["cam1", "cam2"])
    t0 = now_ms()
    put(archiver_server, "cam1", cam1, *(chunk(f"cam1-{i}") for i in range(3)))
    put(archiver_server, "cam2", cam2, *(chunk(f"cam2-{i}") for i in range(3)))
    t1 = now_ms() + 1
    saved = tmp_path / "cam1.fusion"
    first = play(client, archiver_server.url, alice, tmp_path / "cam1.ts", t0, t1,
                 "--save-stream", str(saved))
    assert first.code == 0, first.stderr

    out = tmp_path / "out.ts"
    with TamperingProxy(archiver_server.url) as relay:
        relay.mode, relay.saved = "replay", saved.read_bytes()
        # The issue's attack: cam1's old stream as the answer to a request for cam2 ...
        other = play(client, relay.url, alice, out, t0, t1, camera="cam2")
        # ... and to a new request for exactly what it once answered.
        same = play(client, relay.url, alice, out, t0, t1, camera="cam1")
        live_cam2 = live(client, relay.url, alice, "cam2", out)
        # A relay that reads the request and rewrites the header to name it: the header no
        # longer matches what the Archiver signed, and the camera/mode still give it away.
        relay.rewrite = True
        rewritten = play(client, relay.url, alice, out, t0, t1, camera="cam2")
        rewritten_live = live(client, relay.url, alice, "cam1", out)
        assert relay.replayed == 5
    for result in (other, same):
        assert result.code == EXIT_REQUEST_MISMATCH, result.stderr
        assert "does not answer the request just sent" in result.stderr
        assert "no video was written" in result.stderr
    stderr = live_cam2.stderr.decode()
    assert live_cam2.returncode == EXIT_REQUEST_MISMATCH, stderr
    assert "does not answer the request just sent" in stderr and "Traceback" not in stderr
    assert rewritten.code == EXIT_REQUEST_MISMATCH, rewritten.stderr
    assert "not for the requested camera cam2" in rewritten.stderr
    stderr = rewritten_live.stderr.decode()
    assert rewritten_live.returncode == EXIT_REQUEST_MISMATCH, stderr
    assert "recording stream, but live was requested" in stderr
    assert_no_video(out)

    # The saved stream itself still verifies offline, and says what it is: which request it
    # answered, not a new one.
    opened = client("open", str(saved), "--token", alice.uri, "--archiver", archiver_server.url,
                    "-o", str(tmp_path / "opened.ts"))
    assert opened.code == 0, opened.stderr
    assert (tmp_path / "opened.ts").read_bytes() == (tmp_path / "cam1.ts").read_bytes()
    assert f"saved recording stream of camera cam1, range {iso(t0)} .. {iso(t1)}" in opened.stderr
    assert "made by Archiver" in opened.stderr and "request nonce " in opened.stderr
    assert "not a new one" in opened.stderr


def test_relay_looping_an_old_live_stream_as_live_is_refused(
        archiver_server: ArchiverServer, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    """The CCTV loop proper: a live stream recorded a little earlier, its header rewritten to
    name the new live request (nonce, fresh creation time): the segments' signed capture times
    are older than the request, beyond the allowed clock difference."""
    alice = make_viewer("alice")
    cam1 = archiver_server.add_camera("cam1")
    archiver_server.add_viewer(alice.pem, ["cam1"])
    saved = tmp_path / "live.fusion"
    viewer = subprocess.Popen(
        client.command("live", "--archiver", archiver_server.url, "--token", alice.uri,
                       "--camera", "cam1", "--duration", "3", "-o", str(tmp_path / "live.ts"),
                       "--save-stream", str(saved)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=client.env(),
        stdin=subprocess.DEVNULL)
    try:
        wait_for_audit(archiver_server, "stream.live")
        put(archiver_server, "cam1", cam1, *(chunk(f"live-{i}") for i in range(3)))
        _, err = viewer.communicate(timeout=60)
    finally:
        if viewer.poll() is None:
            viewer.kill()
            viewer.wait()
    assert viewer.returncode == 0, err.decode()
    assert (tmp_path / "live.ts").stat().st_size > 0
    time.sleep(1.5)  # the footage is now older than the 1 s clock difference allowed below
    out = tmp_path / "looped.ts"
    with TamperingProxy(archiver_server.url) as relay:
        relay.mode, relay.saved, relay.rewrite = "replay", saved.read_bytes(), True
        looped = live(client, relay.url, alice, "cam1", out, "--max-clock-skew", "1")
    stderr = looped.stderr.decode()
    assert looped.returncode == EXIT_REQUEST_MISMATCH, stderr
    assert "old footage offered as live" in stderr
    assert_no_video(out)


def test_edited_time_columns_cannot_pass_off_earlier_footage(
        archiver_server: ArchiverServer, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    """Issue 12's third index edit: with write access to the SQLite index only, the attacker
    moves the times of earlier manifests into the requested range, so the Archiver serves
    earlier footage for it. The capture times the viewer checks are the signed ones."""
    alice = make_viewer("alice")
    cam1 = archiver_server.add_camera("cam1")
    archiver_server.add_viewer(alice.pem, ["cam1"])
    put(archiver_server, "cam1", cam1, *(chunk(f"early-{i}") for i in range(3)))
    time.sleep(0.05)
    t_mid = now_ms()
    later = [chunk(f"late-{i}") for i in range(3)]
    put(archiver_server, "cam1", cam1, *later)
    t_end = now_ms() + 1
    honest = play(client, archiver_server.url, alice, tmp_path / "honest.ts", t_mid, t_end)
    assert honest.code == 0, honest.stderr
    assert (tmp_path / "honest.ts").read_bytes() == b"".join(later)
    with sqlite3.connect(archiver_server.data_dir / "archiver.sqlite3") as db:
        moved = db.execute("UPDATE manifests SET first_capture_ms=?, last_capture_ms=? WHERE "
                           "last_capture_ms < ?", (t_mid + 1, t_mid + 1, t_mid)).rowcount
    assert moved == 3
    out = tmp_path / "edited.ts"
    edited = play(client, archiver_server.url, alice, out, t_mid, t_end)
    assert edited.code == EXIT_REQUEST_MISMATCH, edited.stderr
    assert "outside the requested range" in edited.stderr
    assert_no_video(out)


EXIT_SEGMENTS_MISSING = 53


def test_deleted_key_records_are_reported_missing_not_unauthorized(
        archiver_server: ArchiverServer, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    """Issue 12's first index edit: deleting a viewer's key-record rows for the middle of a
    range made `play` say "complete" and call those minutes "not authorized". Now only the
    Archiver's signed chain recipients, made when the key chain started and archived with the
    segments, can say "not authorized"; without it the segments are missing (exit 53)."""
    alice, bob = make_viewer("alice"), make_viewer("bob")
    carol, dave = make_viewer("carol"), make_viewer("dave")
    cam1 = archiver_server.add_camera("cam1")
    alice_fp = archiver_server.add_viewer(alice.pem, ["cam1"])
    carol_fp = archiver_server.add_viewer(carol.pem, ["cam1"])
    dave_fp = archiver_server.add_viewer(dave.pem, ["cam1"])
    t0 = now_ms()
    parts = [[chunk(f"part{p}-{i}") for i in range(3)] for p in range(3)]
    put(archiver_server, "cam1", cam1, *parts[0])
    # Three chains: a revocation starts one from the next key period (adding a viewer only
    # joins a running chain, there too).
    archiver_server.revoke(carol_fp)
    archiver_server.add_viewer(bob.pem, ["cam1"])
    archiver_server.sleep_into_next_key_period()
    put(archiver_server, "cam1", cam1, *parts[1])
    archiver_server.revoke(dave_fp)
    archiver_server.sleep_into_next_key_period()
    put(archiver_server, "cam1", cam1, *parts[2])
    t1 = now_ms() + 1
    # Bob was authorized after the first part: the signed grants say so.
    seen_by_bob = play(client, archiver_server.url, bob, tmp_path / "bob.ts", t0, t1)
    assert seen_by_bob.code == 0, seen_by_bob.stderr
    assert "3 segment(s)" in seen_by_bob.stderr and "withheld: not authorized for you" in \
        seen_by_bob.stderr
    assert (tmp_path / "bob.ts").read_bytes() == b"".join(parts[1] + parts[2])
    with sqlite3.connect(archiver_server.data_dir / "archiver.sqlite3") as db:
        deleted = db.execute(
            # Format v2: a viewer's rows are per key chain, under the chain id (the first 12
            # bytes of a segment's key id); parts[1] is one chain (bob's authorization).
            "DELETE FROM chain_records WHERE fingerprint=? AND chain_id IN (SELECT substr(key_id, "
            "1, 12) FROM segments WHERE seq BETWEEN 3 AND 5)", (alice_fp,)).rowcount
    assert deleted == 1
    out = tmp_path / "alice.ts"
    result = play(client, archiver_server.url, alice, out, t0, t1)
    assert result.code == EXIT_SEGMENTS_MISSING, result.stderr
    assert "3 segment(s)" in result.stderr and "MISSING" in result.stderr
    assert "complete" not in result.stderr.replace("incomplete", "")
    assert "withheld: not authorized" not in result.stderr
    assert not out.exists()
    assert (tmp_path / "alice.ts.incomplete").read_bytes() == b"".join(parts[0] + parts[2])
    # Deleting the grants' index rows as well changes nothing: still missing.
    with sqlite3.connect(archiver_server.data_dir / "archiver.sqlite3") as db:
        assert db.execute("DELETE FROM chain_recipients").rowcount >= 3
    again = play(client, archiver_server.url, alice, tmp_path / "again.ts", t0, t1)
    assert again.code == EXIT_SEGMENTS_MISSING, again.stderr
    assert "withheld: not authorized" not in again.stderr


def test_deleted_rows_at_the_edges_of_a_range_are_detected(
        archiver_server: ArchiverServer, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    """Issue 12's second index edit, while the Archiver runs: rows deleted at the end (or the
    start) of a requested range make the stream shorter; the viewer can tell from signed data
    (the chain head in the END record, the bare manifests around the range) and does not say
    "complete"."""
    alice = make_viewer("alice")
    cam1 = archiver_server.add_camera("cam1")
    archiver_server.add_viewer(alice.pem, ["cam1"])
    put(archiver_server, "cam1", cam1, chunk("before"))
    time.sleep(0.05)
    t0 = now_ms()
    inside = [chunk(f"inside-{i}") for i in range(6)]
    put(archiver_server, "cam1", cam1, *inside)
    t1 = now_ms() + 1
    time.sleep(0.05)
    put(archiver_server, "cam1", cam1, chunk("after"))
    whole = play(client, archiver_server.url, alice, tmp_path / "whole.ts", t0, t1)
    assert whole.code == 0, whole.stderr
    assert (tmp_path / "whole.ts").read_bytes() == b"".join(inside)
    index = archiver_server.data_dir / "archiver.sqlite3"
    with sqlite3.connect(index) as db:  # the range's last two segments and the one after it
        db.execute("DELETE FROM segments WHERE seq >= 5")
        db.execute("DELETE FROM manifests WHERE manifest_seq >= 5")
    cut_end = play(client, archiver_server.url, alice, tmp_path / "end.ts", t0, t1)
    assert cut_end.code == EXIT_SEGMENTS_MISSING, cut_end.stderr
    assert "reaches the end of the requested range" in cut_end.stderr
    assert (tmp_path / "end.ts.incomplete").read_bytes() == b"".join(inside[:4])
    with sqlite3.connect(index) as db:  # and now the range's first segment and the one before
        db.execute("DELETE FROM segments WHERE seq <= 1")
        db.execute("DELETE FROM manifests WHERE manifest_seq <= 1")
    cut_start = play(client, archiver_server.url, alice, tmp_path / "start.ts", t0, t1)
    assert cut_start.code == EXIT_SEGMENTS_MISSING, cut_start.stderr
    assert "starts at the beginning of the requested range" in cut_start.stderr
