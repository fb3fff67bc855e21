"""A pre-encoded RTSP "camera rack" for ``bench.rtsp_cameras``: one process serving the same
pre-encoded H.264 stream (RTP over interleaved TCP, RFC 2326 / RFC 6184) to any number of
sessions, in real time, 25 frames a second, a keyframe a second.

Why not gst-rtsp-server here: one shared live encoding served to 96+ sessions broke whole sets
of sessions at once on this machine ("Invalid argument", "Operation not permitted" in FFmpeg,
in bursts, whenever sessions joined), the old code and the new alike; and one encoder per
session would eat the two cores the Archiver is measured on. Here the clip is encoded once,
before the run, and each tick sends the same bytes to every session (one global RTP sequence
and clock: each session sees consecutive packets from its PLAY on).

    python -m bench.rtsp_fanout PORT CLIP.h264     # prints "ready"
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

from fusion_testkit import rtsp_wire
from fusion_testkit.rtsp_wire import FPS, TICKS

MAX_BACKLOG = 8 * 2**20  # a session this far behind (8 s of 1 Mbit/s) is dropped


def encode_clip(path: Path, seconds: int = 20, size: str = "640x360", kbps: int = 1000) -> Path:
    """A looping clip: H.264 Annex B, one slice per frame, no B-frames, a keyframe a second."""
    return rtsp_wire.encode_h264(path, seconds, size, FPS, kbps=kbps, preset="veryfast")


class Fanout:
    def __init__(self, port: int, units: list[list[bytes]]) -> None:
        self.port = port
        self.frames = [rtsp_wire.rtp_payloads(unit) for unit in units]
        self.description = rtsp_wire.sdp(units, "rack")
        self.sessions: dict[socket.socket, bytearray] = {}
        self.lock = threading.Lock()

    def serve(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port), backlog=1024)
        threading.Thread(target=self.tick, daemon=True).start()
        print("ready", flush=True)
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=self.session, args=(conn,), daemon=True).start()

    def session(self, conn: socket.socket) -> None:
        """The RTSP dialogue; at PLAY the socket joins the fan-out."""
        try:
            for method, cseq in rtsp_wire.requests(conn):
                self.answer(conn, method, cseq)
        except OSError:
            pass
        with self.lock:
            self.sessions.pop(conn, None)
        conn.close()

    def answer(self, conn: socket.socket, method: str, cseq: str) -> None:
        reply = rtsp_wire.reply(method, cseq, f"rtsp://127.0.0.1:{self.port}/stream",
                                self.description)
        with self.lock:
            pending = self.sessions.get(conn)
            if pending is not None:
                pending += reply  # in order with the media already queued
            else:
                conn.sendall(reply)
                if method == "PLAY":
                    self.sessions[conn] = bytearray()

    def tick(self) -> None:
        seq, start, index = 0, time.monotonic(), 0
        while True:
            # A session joining mid-stream waits for the next keyframe (its segmenter does).
            frame = self.frames[index % len(self.frames)]
            timestamp = 1000 + index * TICKS
            blob, seq = rtsp_wire.interleaved_frame(frame, seq, timestamp)
            with self.lock:
                for conn, pending in list(self.sessions.items()):
                    pending += blob
                    try:
                        # Never blocks the tick (the session's thread blocks in recv).
                        sent = conn.send(pending, socket.MSG_DONTWAIT)
                        del pending[:sent]
                    except BlockingIOError:
                        pass
                    except OSError:
                        del self.sessions[conn]
                        continue
                    if len(pending) > MAX_BACKLOG:
                        del self.sessions[conn]
                        conn.close()
            index += 1
            delay = start + index / FPS - time.monotonic()
            if delay > 0:
                time.sleep(delay)


if __name__ == "__main__":
    Fanout(int(sys.argv[1]), rtsp_wire.access_units(Path(sys.argv[2]).read_bytes())).serve()
