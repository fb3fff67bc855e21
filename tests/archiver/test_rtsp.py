"""RTSP pull against a real RTSP server (GStreamer's gst-rtsp-server serving live H.264/H.265):
the Archiver pulls in-process, segments at keyframes, reports camera health and gaps, and keeps
the camera's credentials out of every process's argv, the logs and the API."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.camera import requires_ffmpeg
from tests.fixtures.rtsp import requires_gstreamer, wait_for
from tests.fixtures.server import ArchiverServer
from tests.fixtures.viewer import fetch, login, play

pytestmark = [requires_ffmpeg, requires_gstreamer]
PASSWORD = "s3cret-Camera-Pw"


def _camera(server: ArchiverServer, name: str) -> dict:
    return next(c for c in server.admin("GET", "/v1/admin/cameras", expect=200) if c["name"] == name)


def _decode(path: Path) -> tuple[int, str, str]:
    """(decoded video frames, codec, decoder complaints) as ffmpeg sees the file."""
    codec = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                            "stream=codec_name", "-of", "csv=p=0", str(path)],
                           capture_output=True, text=True).stdout.split()[0]
    result = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:v",
                             "-f", "framemd5", "-"], capture_output=True, text=True)
    frames = sum(1 for line in result.stdout.splitlines() if line and not line.startswith("#"))
    return frames, codec, result.stderr


def _play_all(server: ArchiverServer, viewer, camera: str, tmp_path: Path):
    session = login(server.url, viewer.identity, server.verify)
    stream = fetch(server.url, session, camera, verify=server.verify).content
    played = play(viewer.identity, stream)
    assert played.ended
    out = tmp_path / f"{camera}.ts"
    out.write_bytes(played.data)
    return played, out


def _visible_to_other_users(secret: str) -> list[str]:
    """Every process's argv and our own files' contents that show the secret."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if secret.encode() in cmdline:
                found.append(f"argv of pid {pid}")
    return found


@pytest.mark.parametrize("kbps", [100, 1500])
def test_pulled_camera_is_archived_whole(https_archiver: ArchiverServer, make_viewer,
                                         rtsp_camera, tmp_path: Path, kbps: int) -> None:
    """Production mode: the Archiver serves HTTPS under the site CA (admin API, viewer)."""
    archiver_server = https_archiver
    camera = rtsp_camera(kbps=kbps, user="admin", password=PASSWORD).start()
    viewer = make_viewer("guard")
    archiver_server.admin("POST", "/v1/admin/cameras", {"name": "door", "rtsp_url": camera.url()},
                          expect=201)
    archiver_server.add_viewer(viewer.pem, ["door"])
    wait_for(lambda: _camera(archiver_server, "door")["segments"] >= 4, 40, "4 pulled segments")
    info = _camera(archiver_server, "door")
    assert info["state"] == "receiving" and info["segments_last_minute"] >= 4
    assert info["bytes_last_minute"] > 0 and info["gaps"] == 0
    listed = json.dumps(archiver_server.admin("GET", "/v1/admin/cameras"))
    assert PASSWORD not in listed and "***@" in listed

    # Removing the camera stops the pull and archives what the puller held.
    archiver_server.admin("DELETE", "/v1/admin/cameras/door", expect=204)
    played, out = _play_all(archiver_server, viewer, "door", tmp_path)
    frames, codec, complaints = _decode(out)
    assert codec == "h264" and complaints == ""
    # Every segment starts at a keyframe, 25 fps: at least 2 s of frames per closed segment.
    assert frames >= 50 * (len(played.plaintexts) - 1)

    # The camera's password: not in any argv, log, API answer or audit line.
    assert _visible_to_other_users(PASSWORD) == []
    assert PASSWORD not in archiver_server.log()
    assert PASSWORD not in (archiver_server.data_dir / "audit.jsonl").read_text()


def test_outage_is_recorded_as_a_gap_and_the_pull_resumes(archiver_server: ArchiverServer,
                                                           make_viewer, rtsp_camera,
                                                           tmp_path: Path) -> None:
    camera = rtsp_camera(kbps=150).start()
    viewer = make_viewer("night")
    archiver_server.admin("POST", "/v1/admin/cameras", {"name": "yard", "rtsp_url": camera.url()},
                          expect=201)
    archiver_server.add_viewer(viewer.pem, ["yard"])
    wait_for(lambda: _camera(archiver_server, "yard")["segments"] >= 2, 40, "first segments")
    camera.stop()  # the camera goes away
    wait_for(lambda: _camera(archiver_server, "yard")["state"] == "unreachable", 30,
             "the camera to be reported unreachable")
    before = _camera(archiver_server, "yard")["segments"]
    time.sleep(6)
    camera.start()  # and comes back on the same address
    wait_for(lambda: _camera(archiver_server, "yard")["segments"] >= before + 2, 60,
             "the pull to resume by itself")
    info = _camera(archiver_server, "yard")
    assert info["state"] == "receiving" and info["gaps"] == 1 and info["puller_restarts"] >= 1

    session = login(archiver_server.url, viewer.identity)
    gaps = httpx.get(f"{archiver_server.url}/v1/cameras/yard/gaps",
                     params={"from_ms": info["first_ms"], "to_ms": info["last_ms"]},
                     headers={"Authorization": f"Bearer {session}"}).json()["gaps"]
    assert len(gaps) == 1 and gaps[0]["to_ms"] - gaps[0]["from_ms"] >= 5000, gaps

    metrics = httpx.get(f"{archiver_server.url}/metrics", headers={
        "Authorization": f"Bearer {archiver_server.admin_token}"}).text  # not public (issue 12)
    assert 'fusion_camera_gaps_total{camera="yard"} 1.0' in metrics
    assert 'fusion_camera_state{camera="yard",state="receiving"} 1.0' in metrics
    archiver_server.admin("DELETE", "/v1/admin/cameras/yard", expect=204)
    played, out = _play_all(archiver_server, viewer, "yard", tmp_path)
    frames, _, complaints = _decode(out)  # playback across the gap
    assert frames >= 50 * (len(played.plaintexts) - 2) and complaints == ""
    audit = [json.loads(line) for line in
             (archiver_server.data_dir / "audit.jsonl").read_text().splitlines()]
    actions = [entry["action"] for entry in audit if entry.get("camera") == "yard"]
    assert "camera.unreachable" in actions and "camera.receiving" in actions


def test_wrong_credentials_give_a_clear_state_not_a_restart_storm(
        archiver_server: ArchiverServer, rtsp_camera) -> None:
    camera = rtsp_camera(user="admin", password=PASSWORD).start()
    archiver_server.admin("POST", "/v1/admin/cameras",
                          {"name": "gate", "rtsp_url": camera.url(password="wrong-password")},
                          expect=201)
    info = wait_for(lambda: (c := _camera(archiver_server, "gate"))["state"] == "auth_failed" and c,
                    30, "the camera to be reported auth_failed")
    assert "401" in info["message"] or "nauthorized" in info["message"]
    time.sleep(6)
    info = _camera(archiver_server, "gate")
    assert info["state"] == "auth_failed" and info["puller_restarts"] == 1 and info["segments"] == 0
    assert "wrong-password" not in json.dumps(info) and "wrong-password" not in archiver_server.log()


def test_h265_passes_through_untouched(archiver_server: ArchiverServer, make_viewer,
                                       rtsp_camera, tmp_path: Path) -> None:
    camera = rtsp_camera(codec="h265", kbps=300).start()
    viewer = make_viewer("hevc")
    archiver_server.admin("POST", "/v1/admin/cameras", {"name": "lobby", "rtsp_url": camera.url()},
                          expect=201)
    archiver_server.add_viewer(viewer.pem, ["lobby"])
    wait_for(lambda: _camera(archiver_server, "lobby")["segments"] >= 3, 40, "3 segments")
    archiver_server.admin("DELETE", "/v1/admin/cameras/lobby", expect=204)
    played, out = _play_all(archiver_server, viewer, "lobby", tmp_path)
    frames, codec, complaints = _decode(out)
    assert codec == "hevc" and complaints == "" and frames >= 50 * (len(played.plaintexts) - 1)
