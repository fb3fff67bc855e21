"""Several pullers on one RTSP camera, as at a real site (redundant archiving; a standby pulling
after a takeover while the old holder still pulls): none drops because another joined.

Before: the test camera (gst-rtsp-server, one shared live encoding) seeked its pipeline for every
PLAY, restarting the stream clock of every client already pulling; the puller's MPEG-TS muxer
refused the decoding time going back, so each pull ended ("unreachable (Invalid argument)"), and
its reconnection restarted the others' clocks in turn: with three pullers, each dropped about 16
times a minute, with gaps of 1.2-3.4 s (bench/rtsp_shared.py). Now the camera serves a live
stream as a real one does, and a puller whose camera does restart its clock cuts a segment there
and goes on, without reconnecting.
"""

from __future__ import annotations

from typing import Any

from tests.fixtures.camera import requires_ffmpeg
from tests.fixtures.rtsp import requires_gstreamer, wait_for
from tests.fixtures.server import ArchiverServer

pytestmark = [requires_ffmpeg, requires_gstreamer]


def _cameras(server: ArchiverServer) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in server.admin("GET", "/v1/admin/cameras", expect=200)}


def test_pullers_joining_one_camera_never_drop_one_another(https_archiver: ArchiverServer,
                                                           rtsp_camera) -> None:
    server = https_archiver
    live = rtsp_camera(kbps=150).start()  # as a real camera: a join disturbs no one
    # A camera whose stream clock restarts (timestamps back to 0) whenever a client joins.
    restarting = rtsp_camera(kbps=150, restart_clock_on_join=True).start()
    joins = [("live-1", live), ("restart-1", restarting), ("live-2", live),
             ("restart-2", restarting), ("live-3", live)]
    # One after the other, each once the previous pulls: every join is a PLAY on a stream that
    # other pullers are already receiving (the pullers run in the Archiver's worker processes).
    for name, camera in joins:
        server.admin("POST", "/v1/admin/cameras", {"name": name, "rtsp_url": camera.url()},
                     expect=201)
        wait_for(lambda name=name: _cameras(server)[name]["segments"] >= 1, 60,
                 f"the first segment of {name}")
    # ~12 s more of all five pulling at once (before, each pull dropped every 2-4 s).
    wait_for(lambda: _cameras(server)["live-3"]["segments"] >= 6, 90,
             "6 segments of the last puller to join")

    cameras = _cameras(server)
    for name, _ in joins:
        info = cameras[name]
        assert info["puller_restarts"] == 0, (name, info)  # never dropped, never reconnected
        assert info["gaps"] == 0, (name, info)
        assert info["state"] == "receiving", (name, info)
    # The restarting camera did restart restart-1's clock (so the test exercised it); its
    # puller cut a segment there and went on.
    assert "camera restart-1: its stream clock went back" in server.log()
    assert "camera live-1: its stream clock went back" not in server.log()
