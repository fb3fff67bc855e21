"""Cameras pushing over HTTP PUT, as ffmpeg's HLS muxer does: every segment ffmpeg sent is archived,
whatever its size and however fast it arrives (issue: small and bursty segments were lost when
ffmpeg closed the connection right after the last byte without reading the answer)."""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.camera import frame_hashes, requires_ffmpeg
from tests.fixtures.server import ArchiverServer, unique_camera
from tests.fixtures.viewer import fetch, login, play

pytestmark = requires_ffmpeg


def _encode(path: Path, seconds: int, *, bitrate: str | None, pattern: str = "testsrc",
            size: str = "320x240") -> Path:
    """An H.264 source: default preset, a keyframe every second (as cameras do)."""
    rate = ["-b:v", bitrate, "-maxrate", bitrate, "-bufsize", bitrate] if bitrate else []
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
         "-i", f"{pattern}=size={size}:rate=25", "-t", str(seconds), "-c:v", "libx264", *rate,
         "-g", "25", "-pix_fmt", "yuv420p", "-f", "mpegts", str(path)], check=True)
    return path


def _push_counting(source: Path, server: ArchiverServer, camera: str, token: str, *,
                   realtime: bool, hls_time: int = 2) -> list[str]:
    """Push like a camera; return the names of the .ts segments ffmpeg PUT (from its own log)."""
    result = subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "verbose",
         *(["-re"] if realtime else []), "-i", str(source), "-c", "copy", "-f", "hls",
         "-hls_time", str(hls_time), "-hls_list_size", "5", "-method", "PUT",
         "-headers", f"Authorization: Bearer {token}\r\n",
         f"{server.url}/ingest/{camera}/index.m3u8"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return sorted(set(re.findall(r"Opening '[^']*/([^/']+\.ts)' for writing", result.stderr)))


def _archived(server: ArchiverServer, camera: str, expected: int | None = None,
              timeout: float = 20) -> int:
    """Segments archived; with ``expected``, waits for that many first (ffmpeg does not wait
    for the answers to its PUTs, so it may exit while the last ones are being archived)."""
    deadline = time.monotonic() + timeout
    while True:
        cameras = server.admin("GET", "/v1/admin/cameras", expect=200)
        count = next(c["segments"] for c in cameras if c["name"] == camera)
        if expected is None or count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.1)


def _check_frame_exact(server: ArchiverServer, viewer, source: Path, tmp_path: Path,
                       camera: str = "cam1") -> None:
    stream = fetch(server.url, login(server.url, viewer.identity), camera).content
    played = play(viewer.identity, stream)
    assert played.ended
    decrypted = tmp_path / "decrypted.ts"
    decrypted.write_bytes(played.data)
    assert frame_hashes(decrypted) == frame_hashes(source)


@pytest.mark.parametrize(("case", "seconds", "bitrate", "realtime"), [
    ("low bitrate, segments under 32 KB", 12, "40k", True),
    ("burst: no -re, as fast as the disk reads", 12, None, False),
    ("high bitrate, segments of MBs", 6, "6M", True),
])
def test_every_segment_ffmpeg_sent_is_archived(module_archiver: ArchiverServer, make_viewer,
                                                tmp_path: Path, case: str, seconds: int,
                                                bitrate: str | None, realtime: bool) -> None:
    archiver_server, cam = module_archiver, unique_camera()  # a shared Archiver
    viewer = make_viewer("night")
    token = archiver_server.add_camera(cam)
    archiver_server.add_viewer(viewer.pem, [cam])
    pattern = "testsrc" if bitrate != "6M" else "mandelbrot"
    source = _encode(tmp_path / "source.ts", seconds, bitrate=bitrate, pattern=pattern)
    sent = _push_counting(source, archiver_server, cam, token, realtime=realtime)
    assert len(sent) >= seconds // 2 - 1, sent
    assert _archived(archiver_server, cam, len(sent)) == len(sent), case
    _check_frame_exact(archiver_server, viewer, source, tmp_path, cam)


def _raw_put(server: ArchiverServer, token: str, head: bytes, body: bytes,
             camera: str = "cam1") -> None:
    """Send a request and close at once, without reading the answer (as ffmpeg does)."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"PUT /ingest/" + camera.encode() + b"/seg.ts HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + token.encode() + b"\r\n" + head + b"\r\n" + body)


def test_complete_bodies_are_archived_even_when_the_client_closes_at_once(
        module_archiver: ArchiverServer) -> None:
    archiver_server, cam = module_archiver, unique_camera()  # a shared Archiver
    token = archiver_server.add_camera(cam)
    for size in (1, 100, 40_000, 300_000):
        payload = bytes([size % 251]) * size
        _raw_put(archiver_server, token, b"Content-Length: %d\r\n" % size, payload, cam)
        chunked = b"%x\r\n" % size + payload + b"\r\n0\r\n\r\n"
        _raw_put(archiver_server, token, b"Transfer-Encoding: chunked\r\n", chunked, cam)
    _wait_for(lambda: _archived(archiver_server, cam) == 8)


def test_bodies_cut_short_are_refused_and_nothing_of_them_archived(
        module_archiver: ArchiverServer) -> None:
    archiver_server, cam = module_archiver, unique_camera()  # a shared Archiver
    token = archiver_server.add_camera(cam)
    # Short Content-Length, and a chunked body without its terminating chunk.
    _raw_put(archiver_server, token, b"Content-Length: 5000\r\n", b"x" * 4999, cam)
    _raw_put(archiver_server, token, b"Transfer-Encoding: chunked\r\n",
             b"400\r\n" + b"y" * 1024 + b"\r\n", cam)
    _raw_put(archiver_server, token, b"Transfer-Encoding: chunked\r\n", b"400\r\n" + b"z" * 1000,
             cam)
    assert archiver_server.put_segment(cam, token, b"after" * 10) == 201
    assert _archived(archiver_server, cam) == 1
    assert "Traceback" not in archiver_server.log()


def _wait_for(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    assert condition()


def test_segment_time_is_the_span_of_its_video_and_a_silent_camera_is_flagged(
        archiver_server: ArchiverServer, make_viewer, tmp_path: Path) -> None:
    viewer = make_viewer("day")
    token = archiver_server.add_camera("cam1")
    archiver_server.add_viewer(viewer.pem, ["cam1"])
    source = _encode(tmp_path / "source.ts", 6, bitrate="100k")
    sent = _push_counting(source, archiver_server, "cam1", token, realtime=True)
    _wait_for(lambda: _archived(archiver_server, "cam1") == len(sent) == 3)
    with sqlite3.connect(archiver_server.data_dir / "archiver.sqlite3") as db:
        spans = db.execute("SELECT capture_ms, end_ms FROM segments ORDER BY seq").fetchall()
    # Each segment spans the 2 s of video it holds, and they follow each other without a hole.
    assert [end - start for start, end in spans] == [2000, 2000, 2000]
    assert all(spans[i][1] == spans[i + 1][0] for i in range(2))
    # A search for an instant inside the second segment finds that segment, and only it.
    session = login(archiver_server.url, viewer.identity)
    inside = spans[1][0] + 700
    played = play(viewer.identity, fetch(archiver_server.url, session, "cam1", inside, inside).content)
    assert len(played.plaintexts) == 1 and played.plaintexts[0].capture_ms == spans[1][0]

    # Silence: after 3 segment durations the camera is stalled, in the API, metrics and audit.
    _wait_for(lambda: archiver_server.admin("GET", "/v1/admin/cameras")[0]["state"] == "stalled", 20)
    metrics = httpx.get(f"{archiver_server.url}/metrics", headers={
        "Authorization": f"Bearer {archiver_server.admin_token}"}).text  # not public (issue 12)
    assert 'fusion_camera_state{camera="cam1",state="stalled"} 1.0' in metrics
    _push_counting(source, archiver_server, "cam1", token, realtime=True)
    _wait_for(lambda: archiver_server.admin("GET", "/v1/admin/cameras")[0]["state"] == "receiving")
    audit = [json.loads(line)["action"] for line in
             (archiver_server.data_dir / "audit.jsonl").read_text().splitlines()]
    assert audit.index("camera.stalled") < len(audit) - 1 - audit[::-1].index("camera.receiving")
    gaps = httpx.get(f"{archiver_server.url}/v1/cameras/cam1/gaps",
                     params={"from_ms": spans[0][0], "to_ms": spans[-1][1] + 60_000},
                     headers={"Authorization": f"Bearer {session}"}).json()["gaps"]
    assert gaps and gaps[0]["from_ms"] == spans[-1][1] and gaps[0]["to_ms"] - gaps[0]["from_ms"] > 5000


def _readme_commands(marker: str) -> str:
    """The README command (with its continuation lines) that contains ``marker``."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line)
    end = start
    while lines[end].endswith("\\"):
        end += 1
    return "\n".join(lines[start:end + 1])


@pytest.mark.parametrize("marker", ["-i SRC", "-f lavfi"])
def test_the_readme_camera_lines_push_as_written(archiver_server: ArchiverServer,
                                                 tmp_path: Path, marker: str) -> None:
    """The README's ffmpeg lines, run by bash as written (HOST, TOKEN and SRC filled in, the
    generated source limited to 8 s): no warning about the header, every segment archived."""
    token = archiver_server.add_camera("lobby")
    command = (_readme_commands(marker).replace("HOST:8080", f"127.0.0.1:{archiver_server.port}")
               .replace("TOKEN", token).replace("SRC", str(_encode(tmp_path / "src.ts", 8,
                                                                    bitrate="200k")))
               .replace("-f lavfi", "-t 8 -f lavfi").replace("ffmpeg ", "ffmpeg -nostdin "
                                                             "-loglevel verbose ", 1))
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "No trailing CRLF" not in result.stderr
    opened = set(re.findall(r"Opening '[^']*/([^/']+\.ts)' for writing", result.stderr))
    assert len(opened) >= 3
    assert _archived(archiver_server, "lobby", len(opened)) == len(opened)
