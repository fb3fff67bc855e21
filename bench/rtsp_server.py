"""The RTSP cameras of ``bench.rtsp_cameras``: one gst-rtsp-server serving one shared live
H.264 media to every session, so the server encodes once (not once per camera) and its own CPU
goes to RTP and the sockets, as a rack of real cameras' would not be on this machine at all.

Runs under the system Python (GStreamer's bindings are Debian packages):
``/usr/bin/python3 bench/rtsp_server.py PORT KBPS WIDTHxHEIGHT``; prints ``ready``.
"""

from __future__ import annotations

import sys

# 25 fps, a keyframe every second (as cameras do), no B-frames (zerolatency), the cheapest
# preset: encoding is not what is measured.
PIPELINE = ("( videotestsrc is-live=true pattern=ball ! video/x-raw,width={w},height={h},"
            "framerate=25/1 ! x264enc tune=zerolatency speed-preset=ultrafast bitrate={kbps} "
            "key-int-max=25 ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=1 )")


def serve(port: int, kbps: int, width: int, height: int) -> None:
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(port))
    server.set_backlog(1024)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(PIPELINE.format(w=width, h=height, kbps=kbps))
    factory.set_shared(True)  # one encoder for all sessions
    # Not seekable (the clock published with its offset, RFC 7273), as a live camera: otherwise
    # each PLAY's Range seeks the shared pipeline and restarts every other session's stream
    # clock (tests/fixtures/rtsp_camera.py).
    factory.set_publish_clock_mode(GstRtspServer.RTSPPublishClockMode.CLOCK_AND_OFFSET)
    server.get_mount_points().add_factory("/stream", factory)
    if server.attach(None) == 0:
        raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    width, height = (int(x) for x in sys.argv[3].split("x"))
    serve(int(sys.argv[1]), int(sys.argv[2]), width, height)
