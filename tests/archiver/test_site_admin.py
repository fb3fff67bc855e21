"""One site, many Archivers: the registry and its heartbeat, `site archivers`, a name clash
refused, `cameras add --archiver`, `cameras move`, and the other admin commands through any
Archiver of the site (issue 21, items 3 and 5). Real PostgreSQL, 2 real Archiver processes on
127.0.0.1 in production mode (HTTPS under a site CA), real cameras (gst-rtsp-server pulled,
ffmpeg's HLS segments pushed)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest
from cryptography import x509

from fusion_testkit.playback import fetch, play
from fusion_testkit.server import ArchiverServer, UnexpectedStatus, server_env
from fusion_testkit.viewer import login
from tests.archiver.conftest import Viewer
from tests.fixtures.camera import frame_hashes, make_source, requires_ffmpeg
from tests.fixtures.rtsp import requires_gstreamer, wait_for
from tests.fixtures.server import SiteCa, production_archiver

TIMEOUT = 90  # a loaded machine: generous, always polled


def _archiver(site_ca: SiteCa, tmp_path: Path, name: str, postgres_url: str) -> ArchiverServer:
    # The directory through the environment: its URL (with a password) stays off argv.
    return production_archiver(site_ca, tmp_path / name, extra_args=("--name", name),
                               env=server_env({"FUSION_DIRECTORY": postgres_url}),
                               start_timeout_s=TIMEOUT)


@contextmanager
def _site(site_ca: SiteCa, tmp_path: Path, postgres_url: str, *names: str,
          first: Callable[[ArchiverServer], None] | None = None
          ) -> Iterator[list[ArchiverServer]]:
    """Archivers of one site, started in order; ``first`` runs once the first is up.

    Viewers are authorized before the other Archivers start: an Archiver reads the viewers
    that get keys at start and, until the directory's notifications (issue 21 item 4, another
    branch), learns of a change only when it is made through itself."""
    servers: list[ArchiverServer] = []
    try:
        for name in names:
            servers.append(_archiver(site_ca, tmp_path, name, postgres_url).start())
            if first is not None and len(servers) == 1:
                first(servers[0])
        yield servers
    finally:
        for server in servers:
            server.stop()
        for server in servers:
            assert "Traceback" not in server.log(), server.log()[-3000:]


def _cli(server: ArchiverServer, *args: str) -> subprocess.CompletedProcess[str]:
    """fusion-archiver's admin command against ``server`` over HTTPS with the site CA."""
    return subprocess.run(
        [sys.executable, "-P", "-m", "archiver", *args, "--admin-token", server.admin_token,
         "--tls-ca", str(server.tls_ca)],
        env=server_env(), capture_output=True, text=True, timeout=TIMEOUT)


def _segments(server: ArchiverServer, camera: str) -> list[tuple[int, int, int]]:
    """(seq, start_ms, end_ms) of ``camera``'s video segments in ``server``'s own local index."""
    with sqlite3.connect(f"file:{server.data_dir / 'archiver.sqlite3'}?mode=ro",
                         uri=True, timeout=30) as index:
        return index.execute("SELECT seq, capture_ms, end_ms FROM segments WHERE camera = ? "
                             "AND stream = 0 ORDER BY seq", (camera,)).fetchall()


def _audit(server: ArchiverServer) -> list[dict]:
    return [json.loads(line) for line in (server.data_dir / "audit.jsonl").read_text()
            .splitlines()]


def _logged(server: ArchiverServer, text: str) -> str:
    """The time stamp of the log line of ``server`` with ``text`` (sortable as text)."""
    lines = [line for line in server.log().splitlines() if text in line]
    assert len(lines) == 1, lines
    return lines[0][:23]


def _archivers(server: ArchiverServer) -> dict[str, dict]:
    listed = _cli(server, "site", "archivers", "--archiver", server.url, "--json")
    assert listed.returncode == 0, listed.stderr
    return {a["name"]: a for a in json.loads(listed.stdout)["archivers"]}


def test_archivers_register_heartbeat_and_site_archivers_lists_them(
        postgres_url: str, tmp_path: Path) -> None:
    site_ca = SiteCa.create(tmp_path / "site-ca")
    with _site(site_ca, tmp_path, postgres_url, "a1", "a2") as (a1, a2):
        token = a1.add_camera("lobby")  # recorded by a1 (the Archiver the command went to)
        assert a1.put_segment("lobby", token, b"x" * 1000) == 201
        # Asked of a2: both Archivers, their URLs, the SHA-256 of the certificate each signs
        # with (what /v1/archiver of each serves), a recent heartbeat, the cameras each holds.
        listed = _archivers(a2)
        assert sorted(listed) == ["a1", "a2"]
        for server, name in ((a1, "a1"), (a2, "a2")):
            served = httpx.get(f"{server.url}/v1/archiver", verify=server.verify,
                               timeout=TIMEOUT).json()
            assert listed[name]["url"] == server.url
            assert listed[name]["certificate_sha256"] == served["fingerprint"]
            assert listed[name]["alive"] and listed[name]["heartbeat_age_ms"] < 30_000
        assert listed["a1"]["cameras_held"] == ["lobby"] and listed["a2"]["cameras_held"] == []
        assert listed["a2"]["this"] and not listed["a1"]["this"]
        human = _cli(a2, "site", "archivers", "--archiver", a2.url)
        assert human.returncode == 0 and "a1" in human.stdout and a1.url in human.stdout
        assert listed["a1"]["certificate_sha256"] in human.stdout
        # The heartbeat goes on (every 5 s, a background thread).
        first = listed["a1"]["heartbeat_ms"]
        wait_for(lambda: _archivers(a2)["a1"]["heartbeat_ms"] > first, TIMEOUT,
                 "a1's next heartbeat")
        with psycopg.connect(postgres_url) as conn:
            assert sorted(conn.execute("SELECT name, url FROM archivers").fetchall()) == [
                ("a1", a1.url), ("a2", a2.url)]


def test_a_second_archiver_with_a_live_name_is_refused_at_start(
        postgres_url: str, tmp_path: Path) -> None:
    """The attack: two Archivers started with one name would both record (and release) the
    same cameras, splitting their chains. The second is refused with one sentence that names
    the first's URL, and exits non-zero; nothing in the registry changes."""
    site_ca = SiteCa.create(tmp_path / "site-ca")
    with _site(site_ca, tmp_path, postgres_url, "a1") as (a1,):
        clash = production_archiver(site_ca, tmp_path / "elsewhere", extra_args=("--name", "a1"),
                                    env=server_env({"FUSION_DIRECTORY": postgres_url}))
        clash.data_dir.mkdir(parents=True)
        done = subprocess.run(clash.command(), env=server_env(clash.env), capture_output=True,
                              text=True, timeout=TIMEOUT)
        assert done.returncode != 0
        assert "Another Archiver named 'a1' is running at " + a1.url in done.stderr
        assert "Traceback" not in done.stderr + done.stdout
        assert list(_archivers(a1)) == ["a1"] and _archivers(a1)["a1"]["url"] == a1.url
        a1.stop()
    # Stopped cleanly, the first signed off: the name is free at once, elsewhere too.
    with clash:
        listed = _archivers(clash)
        assert listed["a1"]["url"] == clash.url and listed["a1"]["alive"]


def test_cameras_add_archiver_only_the_holder_records_and_other_commands_work_through_a2(
        postgres_url: str, tmp_path: Path, make_viewer: Callable[[str], Viewer]) -> None:
    site_ca = SiteCa.create(tmp_path / "site-ca")
    viewer = make_viewer("guard")
    with _site(site_ca, tmp_path, postgres_url, "a1", "a2") as (a1, a2):
        # A name not in the registry: refused with the names there are.
        unknown = _cli(a2, "cameras", "add", "gate", "--archiver", a2.url, "--archiver", "a9")
        assert unknown.returncode != 0
        assert "No Archiver named 'a9'" in unknown.stderr and "a1, a2" in unknown.stderr
        # Sent to a2, recorded by a1: the ingest URL printed is a1's.
        added = _cli(a2, "cameras", "add", "gate", "--archiver", a2.url, "--archiver", "a1",
                     "--json")
        assert added.returncode == 0, added.stderr
        created = json.loads(added.stdout)
        assert created["archiver"] == "a1"
        assert created["ingest_url"] == f"{a1.url}/ingest/gate/index.m3u8"
        token = created["ingest_token"]
        # The viewer, its hold and retention, all through a2 for a1's camera.
        added_viewer = _cli(a2, "viewers", "add", str(viewer.pem), "--cameras", "gate",
                            "--archiver", a2.url, "--json")
        assert added_viewer.returncode == 0, added_viewer.stderr
        fp = json.loads(added_viewer.stdout)["fingerprint"]
        chunks = [os.urandom(3000) for _ in range(3)]
        for chunk in chunks:
            assert a1.put_segment("gate", token, chunk) == 201
        # A push to a2 is refused (421), naming the holder and its URL; nothing archived there.
        refused = httpx.put(f"{a2.url}/ingest/gate/seg9.ts", content=b"y" * 1000,
                            headers={"Authorization": f"Bearer {token}"}, verify=a2.verify,
                            timeout=TIMEOUT)
        assert refused.status_code == 421, refused.text
        assert refused.json()["error"] == "misdirected"
        assert f"recorded by Archiver 'a1' at {a1.url}" in refused.json()["message"]
        assert refused.json()["archiver_url"] == a1.url
        assert len(_segments(a1, "gate")) == 3 and _segments(a2, "gate") == []
        # A wrong token is still the same 403 on a2 (the 421 confirms nothing to a stranger).
        assert a2.put_segment("gate", "wrong-token", b"z" * 100) == 403
        # The site-wide list (asked of a2) shows who records it.
        listed = _cli(a2, "cameras", "list", "--archiver", a2.url, "--json")
        assert listed.returncode == 0, listed.stderr
        assert [(c["name"], c["archiver"]) for c in json.loads(listed.stdout)["cameras"]] == [
            ("gate", "a1")]
        hold = _cli(a2, "holds", "add", "gate", "--from", "2020-01-01T00:00:00Z", "--to",
                    "2020-01-02T00:00:00Z", "--reason", "case 7", "--archiver", a2.url)
        assert hold.returncode == 0, hold.stderr
        retention = _cli(a2, "cameras", "retention", "gate", "12", "--archiver", a2.url)
        assert retention.returncode == 0, retention.stderr
        on_a1 = a1.admin("GET", "/v1/admin/cameras", expect=200)
        assert [(c["name"], c["retention_days"], c["holds"], c["segments"]) for c in on_a1] == [
            ("gate", 12, 1, 3)]
        assert [h["reason"] for h in a1.admin("GET", "/v1/admin/holds", expect=200)] == ["case 7"]
        # The viewer authorized through a2 is a1's viewer too: it logs in there and sees the
        # camera with a1's recording. (Its keys on a1 come with the directory's notifications,
        # item 4; the moved-camera tests play each Archiver's part.)
        assert [v["fingerprint"] for v in a1.admin("GET", "/v1/admin/viewers", expect=200)] == [
            fp]
        session = login(a1.url, viewer.identity, verify=a1.verify)
        seen = httpx.get(f"{a1.url}/v1/cameras", headers={"Authorization": f"Bearer {session}"},
                         verify=a1.verify, timeout=TIMEOUT)
        assert seen.status_code == 200, seen.text
        assert [(c["name"], c["segments"]) for c in seen.json()] == [("gate", 3)]
        # Revoked through a2: a1 refuses its next login.
        revoked = _cli(a2, "viewers", "revoke", fp, "--archiver", a2.url)
        assert revoked.returncode == 0, revoked.stderr
        with pytest.raises(UnexpectedStatus, match=r"HTTP 40[13]"):
            login(a1.url, viewer.identity, verify=a1.verify)
        actions = [(e["action"], e.get("archiver")) for e in _audit(a2)
                   if e["action"].startswith(("camera.", "viewer.", "hold."))]
        assert ("camera.add", "a1") in actions and ("viewer.revoke", None) in actions
        # A camera's Archivers in order (issue 22): each named once, each in the registry, and
        # redundant archiving only of a pulled camera.
        for args, why in ((["--archivers", "a2,a1,a2"], "Name each of the camera's Archivers once"),
                          (["--archivers", "a2,a9"], "No Archiver named 'a9'"),
                          (["--archivers", "a2,a1", "--redundant"], "needs a pulled camera")):
            bad = _cli(a2, "cameras", "add", "lobby", "--archiver", a2.url, *args)
            assert bad.returncode != 0 and why in bad.stderr, bad.stderr
        standby = _cli(a2, "cameras", "add", "lobby", "--archiver", a2.url, "--archivers",
                       "a2,a1")
        assert standby.returncode == 0, standby.stderr
        assert "recorded by Archiver a2 (standbys, in order: a1)" in standby.stdout
        listed = _cli(a2, "cameras", "list", "--archiver", a2.url, "--json")
        assert {c["name"]: (c["archiver"], c["archivers"], c["redundant"])
                for c in json.loads(listed.stdout)["cameras"]}["lobby"] == ("a2", ["a2", "a1"],
                                                                            False)


def _ffmpeg_segments(directory: Path, seconds: int) -> list[bytes]:
    """A camera's HLS segments (1 s each, real H.264 from ffmpeg), in order."""
    source = make_source(directory / "source.ts", seconds)
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-i",
                    str(source), "-c", "copy", "-f", "hls", "-hls_time", "1",
                    "-hls_list_size", "0", "-hls_segment_filename",
                    str(directory / "seg%03d.ts"), str(directory / "index.m3u8")], check=True)
    return [p.read_bytes() for p in sorted(directory.glob("seg*.ts"))]


@requires_ffmpeg
def test_a_pushed_camera_moved_is_archived_once_each_segment_on_one_side(
        postgres_url: str, tmp_path: Path, make_viewer: Callable[[str], Viewer]) -> None:
    """A camera's forwarder that follows the 421 to the Archiver it names: each of its segments
    is archived exactly once, before the move on a1, after it on a2, and each part plays from
    its own Archiver (its own signer), together the camera's whole video."""
    site_ca = SiteCa.create(tmp_path / "site-ca")
    viewer = make_viewer("desk")
    (tmp_path / "hls").mkdir()
    segments = _ffmpeg_segments(tmp_path / "hls", 8)
    assert len(segments) >= 6
    token = ""

    def first(a1: ArchiverServer) -> None:
        nonlocal token
        token = a1.add_camera("dock")
        a1.add_viewer(viewer.pem, ["dock"])

    with _site(site_ca, tmp_path, postgres_url, "a1", "a2", first=first) as (a1, a2):
        target, redirected = a1.url, 0
        for i, segment in enumerate(segments):
            if i == len(segments) // 2:
                moved = _cli(a1, "cameras", "move", "dock", "--to", "a2", "--archiver", a1.url,
                             "--json")
                assert moved.returncode == 0, moved.stderr
                assert json.loads(moved.stdout)["moved"] is True
            for _ in range(2):
                answer = httpx.put(f"{target}/ingest/dock/seg{i:03d}.ts", content=segment,
                                   headers={"Authorization": f"Bearer {token}"},
                                   verify=a1.verify, timeout=TIMEOUT)
                if answer.status_code != 421:
                    break
                target, redirected = answer.json()["archiver_url"], redirected + 1
            assert answer.status_code == 201, answer.text
        half = len(segments) // 2
        assert redirected == 1 and target == a2.url
        # Counted from each Archiver's own index: every segment once, none on both sides.
        assert [s[0] for s in _segments(a1, "dock")] == list(range(half))
        assert [s[0] for s in _segments(a2, "dock")] == list(range(len(segments) - half))
        parts = []
        for server, expected in ((a1, segments[:half]), (a2, segments[half:])):
            session = login(server.url, viewer.identity, verify=server.verify)
            stream = fetch(server.url, session, "dock", verify=server.verify).content
            served = httpx.get(f"{server.url}/v1/archiver", verify=server.verify,
                               timeout=TIMEOUT).json()
            cert = x509.load_pem_x509_certificate(served["certificate"].encode())
            played = play(viewer.identity, stream, archiver_cert=cert)  # its own signer
            assert played.ended and played.data == b"".join(expected), server.data_dir.name
            parts.append(played.data)
        whole = tmp_path / "whole.ts"
        whole.write_bytes(b"".join(segments))
        joined = tmp_path / "joined.ts"
        joined.write_bytes(b"".join(parts))
        assert frame_hashes(joined) == frame_hashes(whole)
        moves = [e for e in _audit(a1) if e["action"] == "camera.move"]
        assert [(e["camera"], e["from"], e["to"]) for e in moves] == [("dock", "a1", "a2")]


@requires_ffmpeg
@requires_gstreamer
def test_cameras_move_stops_the_old_archiver_and_starts_the_new_one_without_a_restart(
        postgres_url: str, tmp_path: Path, rtsp_camera,
        make_viewer: Callable[[str], Viewer]) -> None:
    site_ca = SiteCa.create(tmp_path / "site-ca")
    viewer = make_viewer("pia")
    camera = rtsp_camera(kbps=150).start()
    with _site(site_ca, tmp_path, postgres_url, "a1", "a2",
               first=lambda a1: a1.add_viewer(viewer.pem, "all")) as (a1, a2):
        # Added through a2, pulled by a1 only.
        added = _cli(a2, "cameras", "add", "yard", "--rtsp", camera.url(), "--archiver", a2.url,
                     "--archiver", "a1", "--json")
        assert added.returncode == 0, added.stderr
        wait_for(lambda: len(_segments(a1, "yard")) >= 3, TIMEOUT, "3 segments pulled by a1")
        assert _segments(a2, "yard") == []
        move_ms = int(time.time() * 1000)
        moved = _cli(a2, "cameras", "move", "yard", "--to", "a2", "--archiver", a2.url)
        assert moved.returncode == 0, moved.stderr
        assert "recorded by a2" in moved.stdout
        wait_for(lambda: len(_segments(a2, "yard")) >= 3, TIMEOUT, "3 segments pulled by a2")

        # a1 stopped: its count stays the same while a2 goes on recording.
        def a1_settled() -> bool:
            before = len(_segments(a1, "yard"))
            grown = len(_segments(a2, "yard"))
            wait_for(lambda: len(_segments(a2, "yard")) >= grown + 2, TIMEOUT,
                     "2 more segments on a2")
            return len(_segments(a1, "yard")) == before
        assert wait_for(a1_settled, TIMEOUT, "a1 to stop pulling the moved camera")
        on_a1, on_a2 = _segments(a1, "yard"), _segments(a2, "yard")
        # Each side's index is one run (none lost inside it)...
        assert [s[0] for s in on_a1] == list(range(len(on_a1)))
        assert [s[0] for s in on_a2] == list(range(len(on_a2)))
        # The handover: a2 started pulling only once a1 had let go (their logs, one clock).
        let_go = _logged(a1, "camera yard: no longer recorded by this Archiver")
        took = _logged(a2, "camera yard: recorded by this Archiver")
        assert let_go <= took, (let_go, took)
        # ...a1 archived the segment it was building when it let go (it ends after the
        # move), and nothing was recorded twice: a1's video ends before a2's begins.
        assert on_a1[-1][2] >= move_ms - 3000
        assert on_a1[-1][2] <= on_a2[0][1]
        # The history stays playable where it was recorded, each part from its own Archiver.
        for server in (a1, a2):
            session = login(server.url, viewer.identity, verify=server.verify)
            played = play(viewer.identity,
                          fetch(server.url, session, "yard", verify=server.verify).content)
            assert played.ended and played.data
            out = tmp_path / f"{server.data_dir.name}.ts"
            out.write_bytes(played.data)
            assert len(frame_hashes(out)) > 0
        listed = _archivers(a1)
        assert listed["a2"]["cameras_held"] == ["yard"] and listed["a1"]["cameras_held"] == []
        # The audit log records the move (where it was made) and a1's release of the camera.
        assert [(e["camera"], e["from"], e["to"]) for e in _audit(a2)
                if e["action"] == "camera.move"] == [("yard", "a1", "a2")]
        assert [(e["camera"], e["to"]) for e in _audit(a1)
                if e["action"] == "camera.released"] == [("yard", "a2")]
        with psycopg.connect(postgres_url) as conn:
            assert [r[0] for r in conn.execute(
                "SELECT archiver FROM camera_placements WHERE camera = 'yard' "
                "ORDER BY since_ms")] == ["a1", "a2"]


def test_a_standalone_archiver_registers_itself_and_keeps_its_cameras_unplaced(
        https_archiver: ArchiverServer) -> None:
    """Without --directory the Archiver is a site of one: it registers in its SQLite file the
    same way, records every camera whatever its (host) name, and has nowhere to move one."""
    server = https_archiver
    listed = _archivers(server)
    assert [(a["url"], a["alive"], a["this"]) for a in listed.values()] == [
        (server.url, True, True)]
    token = server.add_camera("solo")
    assert server.put_segment("solo", token, b"s" * 500) == 201
    assert [(c["name"], c["archiver"]) for c in server.admin("GET", "/v1/admin/cameras",
                                                             expect=200)] == [("solo", None)]
    moved = _cli(server, "cameras", "move", "solo", "--to", "elsewhere", "--archiver",
                 server.url)
    assert moved.returncode != 0 and "not in a site" in moved.stderr
    assert "Traceback" not in moved.stderr
