"""A pre-encoded RTSP "camera rack" for ``bench.rtsp_cameras``: one process serving the same
pre-encoded H.264 stream (RTP over interleaved TCP, RFC 2326 / RFC 6184) to any number of
sessions, in real time, 25 frames a second, a keyframe a second.

Why not gst-rtsp-server here: one shared live encoding served to 96+ sessions broke whole sets
of sessions at once on this machine ("Invalid argument", "Operation not permitted" in FFmpeg,
in bursts, whenever sessions joined), the old code and the new alike; and one encoder per
session would eat the two cores the Archiver is measured on. Here the clip is encoded once,
before the run, and each tick sends the same bytes to every session (one global RTP sequence
and clock: each session sees consecutive packets from its PLAY on).

    python -m bench.rtsp_fanout PORT CLIP.h264 [--stamp]    # prints "ready"

``--stamp`` (bench/overload.py): each frame carries its capture time in an SEI NAL unit
(H.264 user data unregistered, ``STAMP_UUID``), put before its slice: the frame's index, the
wall time its RTP clock says it was captured (the rack's start plus index / 25 s: the camera's
own clock) and the wall time the rack sent it (later if the rack itself fell behind). The
Archiver copies the bytes, so a viewer that decrypts a segment reads when it was really
captured, independently of the time the Archiver signed for it (``read_stamps``).
"""

from __future__ import annotations

import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fusion_testkit import rtsp_wire
from fusion_testkit.rtsp_wire import FPS, TICKS

MAX_BACKLOG = 8 * 2**20  # a session this far behind (8 s of 1 Mbit/s) is dropped
# Sixteen bytes, none zero (no emulation prevention needed in the SEI payload).
STAMP_UUID = b"FusionRackStamp!"
_STAMP = re.compile(re.escape(STAMP_UUID) + rb"(\d+);(\d+);(\d+)")


@dataclass(frozen=True)
class Stamp:
    """One frame's stamp: its index in the rack's stream, its capture time (the camera's
    clock: the rack's start + index / FPS) and when the rack sent it (wall ms)."""

    index: int
    capture_ms: int
    sent_ms: int


def stamp_nal(index: int, capture_ms: int, sent_ms: int) -> bytes:
    """An SEI NAL unit (type 6), payload type 5 (user data unregistered): UUID + ASCII digits
    (no zero bytes, so no emulation prevention), then the RBSP stop bit."""
    payload = STAMP_UUID + f"{index};{capture_ms};{sent_ms}".encode()
    return bytes([0x06, 0x05, len(payload)]) + payload + b"\x80"


def read_stamps(data: bytes) -> list[Stamp]:
    """Every stamp in a piece of H.264 (an access unit, a demuxed packet), in order."""
    return [Stamp(int(m[1]), int(m[2]), int(m[3])) for m in _STAMP.finditer(data)]


def encode_clip(path: Path, seconds: int = 20, size: str = "640x360", kbps: int = 1000) -> Path:
    """A looping clip: H.264 Annex B, one slice per frame, no B-frames, a keyframe a second."""
    return rtsp_wire.encode_h264(path, seconds, size, FPS, kbps=kbps, preset="veryfast")


class Fanout:
    def __init__(self, port: int, units: list[list[bytes]], stamp: bool = False) -> None:
        self.port = port
        self.units = units
        self.stamp = stamp
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
        start_wall_ms = time.time() * 1000 - (time.monotonic() - start) * 1000
        while True:
            # A session joining mid-stream waits for the next keyframe (its segmenter does).
            frame = self.frames[index % len(self.frames)]
            if self.stamp:
                unit = self.units[index % len(self.units)]
                sei = stamp_nal(index, round(start_wall_ms + index * 1000 / FPS),
                                round(time.time() * 1000))
                frame = rtsp_wire.rtp_payloads([*unit[:-1], sei, unit[-1]])
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
    Fanout(int(sys.argv[1]), rtsp_wire.access_units(Path(sys.argv[2]).read_bytes()),
           stamp="--stamp" in sys.argv[3:]).serve()
