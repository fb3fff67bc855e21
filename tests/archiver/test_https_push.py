"""Cameras pushing over HTTPS (production mode, issue 20): every segment ffmpeg opened is
archived, and every upload that does not arrive whole is counted as refused, with a reason.

Before the fix: 12 segments opened by ffmpeg, 4-6 archived, refused 0; a raw TLS client that
closes right after its body got 400 in about 1 upload of 3."""

from __future__ import annotations

import re
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.camera import requires_ffmpeg
from tests.fixtures.server import ArchiverServer, unique_camera

pytestmark = requires_ffmpeg


def encode(path: Path, seconds: int, bitrate: str, pattern: str) -> Path:
    """An H.264 source at a constant bitrate, a keyframe every second (as cameras do)."""
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
         "-i", f"{pattern}=size=640x360:rate=25", "-t", str(seconds), "-c:v", "libx264",
         "-b:v", bitrate, "-maxrate", bitrate, "-bufsize", bitrate, "-g", "25",
         "-pix_fmt", "yuv420p", "-f", "mpegts", str(path)], check=True)
    return path


def push_counting(source: Path, server: ArchiverServer, camera: str, token: str,
                  *extra: str) -> list[str]:
    """Push like a camera, at real time; the .ts segments ffmpeg opened (from its own log)."""
    result = subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "verbose", "-re", "-i", str(source),
         "-c", "copy", "-f", "hls", "-hls_time", "2", "-hls_list_size", "5", "-method", "PUT",
         "-headers", f"Authorization: Bearer {token}\r\n", *extra,
         f"{server.url}/ingest/{camera}/index.m3u8"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return sorted(set(re.findall(r"Opening '[^']*/([^/']+\.ts)' for writing", result.stderr)))


def camera_row(server: ArchiverServer, camera: str) -> dict:
    return next(c for c in server.admin("GET", "/v1/admin/cameras", expect=200)
                if c["name"] == camera)


def wait_for(condition, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return bool(condition())


def settled(server: ArchiverServer, camera: str, uploads: int) -> dict:
    """The camera's row once every one of ``uploads`` was either archived or refused."""
    wait_for(lambda: (lambda row: row["segments"] + row["refused"] >= uploads)(
        camera_row(server, camera)))
    return camera_row(server, camera)


@pytest.mark.parametrize(("case", "bitrate", "pattern"), [
    ("about 1 Mbit/s", "1M", "testsrc2"),
    ("about 150 kbit/s, a quiet scene", "150k", "testsrc"),
])
def test_every_segment_ffmpeg_opened_over_https_is_archived(
        module_https_archiver: ArchiverServer, tmp_path: Path, case: str, bitrate: str,
        pattern: str) -> None:
    https_archiver, cam = module_https_archiver, unique_camera()  # a shared Archiver
    token = https_archiver.add_camera(cam)
    source = encode(tmp_path / "source.ts", 24, bitrate, pattern)
    opened = push_counting(source, https_archiver, cam, token)
    assert len(opened) >= 11, opened
    row = settled(https_archiver, cam, len(opened))
    assert (row["segments"], row["refused"]) == (len(opened), 0), case
    # Then silence: "stalled", with its reason, in the API and the log; and the first segment
    # of this run was logged as such, not as "receiving again".
    assert wait_for(lambda: camera_row(https_archiver, cam)["state"] == "stalled")
    assert camera_row(https_archiver, cam)["message"].startswith("no segment archived for ")
    stalled = rf"camera {cam}: stalled \(no segment archived for \d+ s \(one expected every 2 s\)\)"
    assert wait_for(lambda: re.search(stalled, https_archiver.log())), https_archiver.log()[-3000:]
    log = https_archiver.log()
    assert f"camera {cam}: receiving (first segment since start)" in log
    assert f"camera {cam}: receiving again" not in log


def tls_put_and_close(server: ArchiverServer, token: str, body: bytes, *,
                      declared: int | None = None, close_notify: bool = False,
                      camera: str = "cam1") -> None:
    """One PUT over TLS; the client closes right after the body without reading the answer
    (``close_notify``: with a TLS close alert first, as ffmpeg does; else a bare TCP close)."""
    context = ssl.create_default_context(cafile=str(server.tls_ca))
    raw = socket.create_connection(("127.0.0.1", server.port))
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sock.sendall(b"PUT /ingest/" + camera.encode() + b"/seg.ts HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + token.encode() + b"\r\nContent-Length: %d\r\n\r\n"
                     % (len(body) if declared is None else declared) + body)
        if close_notify:
            try:
                sock.unwrap()
            except ssl.SSLError as exc:
                # The alert went out; the answer came back before the server's own alert
                # (unwrap waits for it). A quick server, not a failure: ffmpeg never reads.
                if exc.reason != "APPLICATION_DATA_AFTER_CLOSE_NOTIFY":
                    raise


@pytest.mark.parametrize("close_notify", [False, True], ids=["tcp-close", "close-notify"])
def test_a_tls_client_that_closes_right_after_its_body_loses_nothing(
        module_https_archiver: ArchiverServer, close_notify: bool) -> None:
    https_archiver, cam = module_https_archiver, unique_camera()  # a shared Archiver
    token = https_archiver.add_camera(cam)
    sizes = (1000, 40_000, 70_000, 150_000, 300_000, 1_000_000)
    for size in sizes:
        tls_put_and_close(https_archiver, token, bytes([size % 251]) * size,
                          close_notify=close_notify, camera=cam)
    row = settled(https_archiver, cam, len(sizes))
    assert (row["segments"], row["refused"]) == (len(sizes), 0)


def cli_cameras_list(server: ArchiverServer) -> str:
    listed = subprocess.run(
        [sys.executable, "-m", "archiver", "cameras", "list", "--url", server.url,
         "--admin-token", server.admin_token, "--tls-ca", str(server.tls_ca)],
        capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    return listed.stdout


def refused_metric(server: ArchiverServer, camera: str) -> float:
    text = httpx.get(f"{server.url}/metrics", verify=server.verify, timeout=30,
                     headers={"Authorization": f"Bearer {server.admin_token}"}).text
    found = re.search(rf'^fusion_camera_refused_segments_total\{{camera="{camera}"\}} (\S+)$',
                      text, re.M)
    assert found, text
    return float(found.group(1))


def test_an_upload_cut_off_mid_body_is_counted_refused_with_its_reason(
        https_archiver: ArchiverServer) -> None:
    token = https_archiver.add_camera("cam1")
    # TLS close alert, then TCP close, after 60000 of the 100000 bytes the request declared.
    tls_put_and_close(https_archiver, token, b"x" * 60_000, declared=100_000, close_notify=True)
    row = settled(https_archiver, "cam1", 1)
    assert (row["segments"], row["refused"]) == (0, 1)
    # What the Archiver had read when it saw the close: all 60000 bytes, or fewer when it was
    # slow to start reading (uvicorn drops a body still buffered once the peer is gone).
    got = re.search(r"the client went away after (\d+) bytes of 100000", row["last_refusal"])
    assert got and int(got.group(1)) <= 60_000, row["last_refusal"]
    reason = got.group(0)
    assert wait_for(lambda: re.search(r"camera cam1: segment refused \(1 since start\): "
                                      r"HTTP 400: .*" + re.escape(reason), https_archiver.log()))
    assert refused_metric(https_archiver, "cam1") == 1
    assert f"refused 1 (last: HTTP 400: The upload was cut off: {reason}." \
        in cli_cameras_list(https_archiver)
    assert "Traceback" not in https_archiver.log()


def test_every_upload_of_clients_that_abort_is_archived_or_counted_refused(
        https_archiver: ArchiverServer) -> None:
    """Clients that reset the connection (SO_LINGER 0: TCP RST, no close alert) right after
    their body, or in the middle of it, or whose upload is refused for its size or token:
    each upload is archived or counted refused, with a logged reason; none is lost silently."""
    token = https_archiver.add_camera("cam1")
    context = ssl.create_default_context(cafile=str(https_archiver.tls_ca))
    uploads = 0
    for size, declared in ((50_000, None), (300_000, None), (300_000, 600_000)):
        for _ in range(3):
            raw = socket.create_connection(("127.0.0.1", https_archiver.port))
            sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
            sock.sendall(b"PUT /ingest/cam1/seg.ts HTTP/1.1\r\nHost: x\r\nAuthorization: "
                         b"Bearer " + token.encode() + b"\r\nContent-Length: %d\r\n\r\n"
                         % (declared or size) + b"r" * size)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            uploads += 1
    assert https_archiver.put_segment("cam1", "wrong-token", b"w" * 1000) == 403
    too_large = 1 + 64 * 1024 * 1024
    tls_put_and_close(https_archiver, token, b"", declared=too_large, close_notify=True)
    uploads += 2
    row = settled(https_archiver, "cam1", uploads)
    assert row["segments"] + row["refused"] == uploads
    assert row["refused"] >= 5  # the three cut short, the wrong token, the oversized one
    log = https_archiver.log()
    assert len(re.findall(r"camera cam1: segment refused \(\d+ since start\): HTTP \d{3}: \w",
                          log)) == row["refused"]
    assert "HTTP 403: This token is not valid for camera 'cam1'." in log
    assert "HTTP 413: The request body exceeds the limit of" in log
    assert refused_metric(https_archiver, "cam1") == row["refused"]
    assert "Traceback" not in log
