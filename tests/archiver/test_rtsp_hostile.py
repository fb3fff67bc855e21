"""RTSP pull against hostile and broken cameras (issue 19, left open): the segmenter's buffer is
bounded (a byte cap and a time cap per segment, giant frames dropped), each misbehaving camera
is marked ``bad_stream`` or ``unreachable`` with its reason, a well-behaved camera beside them
keeps archiving, and nothing crashes. The hostile cameras are our own raw-socket RTSP servers
on 127.0.0.1 (tests/fixtures/hostile_rtsp.py); the good one is gst-rtsp-server; the Archiver is
a real one over HTTPS, with small caps (256 KiB, 4 s) so that the test runs in seconds."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.camera import requires_ffmpeg
from tests.fixtures.hostile_rtsp import HostileCamera, access_units, encode_h264
from tests.fixtures.rtsp import requires_gstreamer, wait_for
from tests.fixtures.server import ArchiverServer, SiteCa, production_archiver

pytestmark = [requires_ffmpeg, requires_gstreamer]
CAP_KIB = 256
CAP_S = 4
# An archived segment is the cut segment plus its encryption framing: well under this.
SEGMENT_LIMIT = CAP_KIB * 1024 + 64 * 1024


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[dict[str, HostileCamera]]:
    units = access_units(encode_h264(tmp_path / "normal.h264", 10))
    larger = access_units(encode_h264(tmp_path / "larger.h264", 4, size="640x480"))
    no_key = access_units(encode_h264(tmp_path / "nokey.h264", 10, gop=100_000))[1:]
    cameras = {
        "frozen": HostileCamera("frozen", units),
        "giant": HostileCamera("giant", units, giant_bytes=1 << 20),
        "nokey": HostileCamera("nokey", units, no_key),
        "resize": HostileCamera("resize", units, larger),
        "junk": HostileCamera("junk", units),
    }
    for camera in cameras.values():
        camera.start()
    try:
        yield cameras
    finally:
        for camera in cameras.values():
            camera.stop()


def _cameras(server: ArchiverServer) -> dict[str, dict]:
    return {c["name"]: c for c in server.admin("GET", "/v1/admin/cameras", expect=200)}


def _largest_segments(server: ArchiverServer) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{server.data_dir / 'archiver.sqlite3'}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT camera, MAX(length) FROM segments GROUP BY camera"))
    finally:
        conn.close()


def test_hostile_rtsp_cameras_are_bounded_flagged_and_do_not_hurt_a_good_one(
        site_ca: SiteCa, tmp_path: Path, hostile: dict[str, HostileCamera], rtsp_camera) -> None:
    good = rtsp_camera(codec="h264").start()
    server = production_archiver(site_ca, tmp_path / "archiver", extra_args=(
        "--rtsp-max-segment-kib", str(CAP_KIB), "--rtsp-max-segment-s", str(CAP_S))).start()
    try:
        server.admin("POST", "/v1/admin/cameras", {"name": "good", "rtsp_url": good.url()},
                     expect=201)
        for name, camera in hostile.items():
            server.admin("POST", "/v1/admin/cameras", {"name": name, "rtsp_url": camera.url},
                         expect=201)

        def flagged() -> dict[str, dict] | None:
            cameras = _cameras(server)
            seen = {name: cameras[name] for name in ("giant", "nokey", "junk", "frozen")}
            if (seen["giant"]["stream_faults"] and seen["nokey"]["stream_faults"]
                    and seen["junk"]["state"] == "unreachable"
                    and seen["frozen"]["state"] in ("bad_stream", "unreachable")
                    and cameras["resize"]["segments"] >= 4):
                return cameras
            return None

        cameras = wait_for(flagged, 120, "every hostile camera flagged")
        print({name: (c["state"], c["segments"], c["stream_faults"], c["message"])
               for name, c in cameras.items()})
        # A giant frame (1 MiB, over the 256 KiB cap) is dropped, never buffered.
        assert cameras["giant"]["state"] == "bad_stream"
        assert "over the segment cap" in cameras["giant"]["message"]
        assert cameras["giant"]["segments"] >= 1  # the frames around it are archived
        # No keyframe after the first: the segment is cut at the time cap, then frames are
        # dropped until a keyframe that never comes.
        assert cameras["nokey"]["state"] == "bad_stream"
        assert "keyframe" in cameras["nokey"]["message"]
        assert cameras["nokey"]["segments"] >= 1
        # Keyframes whose timestamps do not advance: cut at the time cap (or refused by the
        # muxer, then the camera is unreachable with FFmpeg's reason); never an endless segment.
        assert cameras["frozen"]["message"]
        # Junk RTSP answers: unreachable, with a reason.
        assert cameras["junk"]["message"] and hostile["junk"].connections >= 1
        # A resolution change mid-stream: archiving goes on.
        assert cameras["resize"]["state"] in ("receiving", "bad_stream")
        # Memory stayed bounded: no segment anywhere is over the cap.
        largest = _largest_segments(server)
        assert all(size <= SEGMENT_LIMIT for size in largest.values()), largest
        # The good camera, beside them all, kept archiving and is healthy.
        start = _cameras(server)["good"]["segments"]
        wait_for(lambda: _cameras(server)["good"]["segments"] >= start + 3, 60,
                 "the good camera archiving on")
        assert _cameras(server)["good"]["state"] == "receiving"
        assert server.process is not None and server.process.poll() is None
        metrics = httpx.get(f"{server.url}/metrics", verify=server.verify,
                            headers={"Authorization": f"Bearer {server.admin_token}"}).text
        assert 'fusion_camera_state{camera="giant",state="bad_stream"} 1.0' in metrics
        assert 'fusion_camera_stream_faults_total{camera="giant"}' in metrics
    finally:
        server.stop()
    log = server.log()
    assert "Traceback" not in log, log[-3000:]
