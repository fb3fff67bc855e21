"""Issue 19, finding 4: a camera's timestamps cannot make a segment cover more time than its
frames. Real ffmpeg makes the segments (two MPEG-TS files, the second with its timestamps moved
by -output_ts_offset, concatenated into one segment), a real HTTPS Archiver (production mode)
archives them from httpx PUTs with the camera's ingest token, and the real fusion-client plays
them. What the Archiver signed is read from its archive files (capture_ms and duration_ms of
each SEGMENT record, authenticated by its tag and its signed manifest entry).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from fusion_testkit.client_cli import EXIT, Client, Viewer, now_ms, play, wait_for_audit
from keyservice.format import Segment, decode_record
from tests.fixtures.camera import requires_ffmpeg
from tests.fixtures.server import ArchiverServer, SiteCa, production_archiver

RATE = 25  # frames per second of the test camera
FRAME_MS = 1000 // RATE
HOUR_S = 3600
# The outage test's bound on a continuous stream's lateness (``--max-behind-s``) and its
# outage, longer than the bound by three of its segments.
MAX_BEHIND_S = 6
OUTAGE_S = MAX_BEHIND_S + 6


def _ts(path: Path, seconds: float, offset_s: float) -> bytes:
    """MPEG-TS video of ``seconds`` from ffmpeg, its timestamps moved by ``offset_s``."""
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
         f"testsrc=size=160x120:rate={RATE}", "-t", str(seconds), "-c:v", "libx264", "-bf", "0",
         "-g", str(RATE), "-pix_fmt", "yuv420p", "-output_ts_offset", str(offset_s),
         "-f", "mpegts", str(path)], check=True)
    return path.read_bytes()


def _put(server: ArchiverServer, token: str, data: bytes, name: str) -> tuple[int, int]:
    """PUT one segment; returns (ms before sending, ms after the acknowledgement)."""
    before = now_ms()
    response = httpx.put(f"{server.url}/ingest/cam1/{name}", content=data, timeout=60,
                         headers={"Authorization": f"Bearer {token}"}, verify=server.verify)
    assert response.status_code == 201, response.text
    return before, now_ms()


def _signed(server: ArchiverServer) -> list[tuple[int, int]]:
    """(capture_ms, duration_ms) of every archived segment of cam1, in order."""
    found = []
    for path in sorted((server.data_dir / "archive" / "cam1").glob("*.fsa")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            end = pos + 5 + int.from_bytes(data[pos + 1:pos + 5], "big")
            record = decode_record(data[pos:end])
            if isinstance(record, Segment):
                found.append((record.capture_ms, record.duration_ms))
            pos = end
    return found


def _camera(server: ArchiverServer) -> dict:
    return server.admin("GET", "/v1/admin/cameras", expect=200)[0]


def _metrics(server: ArchiverServer) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=30, verify=server.verify,
                     headers={"Authorization": f"Bearer {server.admin_token}"}).text


def _assert_flagged(server: ArchiverServer, jumps: int) -> None:
    """The camera is marked unhealthy, with the reason, in the API (cameras list) and metrics."""
    camera = _camera(server)
    assert camera["state"] == "bad_timestamps", camera
    assert camera["timestamp_jumps"] == jumps
    assert "timestamps jumped by" in camera["message"], camera["message"]
    metrics = _metrics(server)
    assert 'fusion_camera_state{camera="cam1",state="bad_timestamps"} 1.0' in metrics
    assert f'fusion_camera_timestamp_jumps_total{{camera="cam1"}} {float(jumps)}' in metrics


@requires_ffmpeg
def test_a_timestamp_jump_on_a_new_camera_is_not_signed_as_video(
        https_archiver: ArchiverServer, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    """Attack: 2 s of frames whose timestamps jump by 10 h half-way, from a camera with no
    earlier video. Before: signed as covering 10 h, and a play of one minute 9.5 h earlier
    returned it as complete (exit 0). After: signed as the 2 s its frames cover."""
    viewer = make_viewer("alice")
    token = https_archiver.add_camera("cam1")
    https_archiver.add_viewer(viewer.pem, ["cam1"])
    segment = (_ts(tmp_path / "a.ts", 1, 0) + _ts(tmp_path / "b.ts", 1, 10 * HOUR_S))
    sent, acked = _put(https_archiver, token, segment, "jump.ts")

    [(capture, duration)] = _signed(https_archiver)
    assert duration == 2 * RATE * FRAME_MS  # 50 frames: 2.000 s, not 10 h
    assert sent - duration <= capture and capture + duration <= acked  # ends at its arrival
    _assert_flagged(https_archiver, 1)
    # The viewer's camera list shows it too: asked at once, since 6 s after its only segment
    # (3 segment durations) the camera is "stalled", which outranks bad_timestamps.
    tls = ("--tls-ca", str(https_archiver.tls_ca))
    cameras = client("cameras", "--archiver", https_archiver.url, "--token", viewer.uri,
                     "--json", *tls)
    assert cameras.code == 0, cameras.stderr
    assert json.loads(cameras.stdout)["cameras"][0]["state"] == "bad_timestamps"
    wait_for_audit(https_archiver, "camera.bad_timestamps")  # once, from the health watcher

    earlier = sent - int(9.5 * HOUR_S * 1000)
    out = tmp_path / "earlier.ts"
    result = play(client, https_archiver.url, viewer, out, earlier, earlier + 60_000, *tls)
    assert result.code == EXIT["no_recording"], (result.code, result.stderr)
    assert "complete" not in result.stderr and not out.exists()
    # The segment is still there, at its arrival.
    here = tmp_path / "here.ts"
    result = play(client, https_archiver.url, viewer, here, capture, capture + duration, *tls)
    assert result.code == 0, result.stderr
    assert here.read_bytes() == segment


@requires_ffmpeg
def test_a_timestamp_jump_after_an_outage_leaves_the_outage_a_gap(
        site_ca: SiteCa, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    """Attack: after an outage (longer than the bound a continuous stream may be late:
    ``--max-behind-s``, 30 s by default, shortened here so that the outage need not last 40 s),
    a segment whose timestamps run on from the last one and jump by 1 h half-way. Before:
    signed as covering the whole outage, and a play inside the outage reported no gap. After:
    the outage is an exact gap and the segment covers the 2 s of its frames."""
    with production_archiver(site_ca, tmp_path / "archiver",
                             extra_args=("--max-behind-s", str(MAX_BEHIND_S))) as server:
        _outage_then_a_jump(server, make_viewer, client, tmp_path)


def _outage_then_a_jump(https_archiver: ArchiverServer, make_viewer: Callable[[str], Viewer],
                        client: Client, tmp_path: Path) -> None:
    viewer = make_viewer("alice")
    token = https_archiver.add_camera("cam1")
    https_archiver.add_viewer(viewer.pem, ["cam1"])
    first = _ts(tmp_path / "s1.ts", 2, 0)
    second = _ts(tmp_path / "s2.ts", 2, 2)
    third = _ts(tmp_path / "s3a.ts", 1, 4) + _ts(tmp_path / "s3b.ts", 1, 4 + HOUR_S)
    times = [_put(https_archiver, token, first, "s1.ts")]
    time.sleep(max(0.0, (times[0][1] + 2000 - now_ms()) / 1000))  # the camera's real time
    times.append(_put(https_archiver, token, second, "s2.ts"))
    time.sleep(OUTAGE_S)  # the outage itself
    times.append(_put(https_archiver, token, third, "s3.ts"))

    signed = _signed(https_archiver)
    assert len(signed) == 3
    # No segment is signed longer than its frames (50 frames of 40 ms each).
    assert [duration for _, duration in signed] == [2000, 2000, 2000]
    (_, _), (start2, duration2), (start3, duration3) = signed
    # The third segment ends at its arrival; the outage before it is a gap, exactly.
    assert times[2][0] <= start3 + duration3 <= times[2][1]
    gap = start3 - (start2 + duration2)
    assert OUTAGE_S * 1000 - 2000 - (times[1][1] - times[1][0]) - 2000 <= gap
    assert gap <= start3 - times[1][0] + 1000
    _assert_flagged(https_archiver, 1)

    tls = ("--tls-ca", str(https_archiver.tls_ca))
    whole = tmp_path / "whole.ts"
    result = play(client, https_archiver.url, viewer, whole, start2 - 2000, start3 + 2000, *tls)
    assert result.code == 0, result.stderr
    gaps = re.findall(r"gap: .*", result.stderr)
    assert len(gaps) == 1 and "no recording" in gaps[0], result.stderr
    assert whole.read_bytes() == first + second + third
    inside = tmp_path / "inside.ts"
    middle = start2 + duration2 + gap // 2
    result = play(client, https_archiver.url, viewer, inside, middle - gap // 4,
                  middle + gap // 4, *tls)
    assert result.code == EXIT["no_recording"], (result.code, result.stderr)
    assert not inside.exists()
