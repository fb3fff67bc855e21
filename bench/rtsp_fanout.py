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

import base64
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

FPS = 25
TICKS = 90_000 // FPS
MAX_PAYLOAD = 1400
MAX_BACKLOG = 8 * 2**20  # a session this far behind (8 s of 1 Mbit/s) is dropped


def encode_clip(path: Path, seconds: int = 20, size: str = "640x360", kbps: int = 1000) -> Path:
    """A looping clip: H.264 Annex B, one slice per frame, no B-frames, a keyframe a second."""
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
         "-i", f"testsrc2=size={size}:rate={FPS}", "-t", str(seconds), "-c:v", "libx264",
         "-preset", "veryfast", "-tune", "zerolatency", "-threads", "1", "-bf", "0",
         "-b:v", f"{kbps}k", "-maxrate", f"{kbps}k", "-bufsize", f"{kbps}k",
         "-x264-params", f"keyint={FPS}:min-keyint={FPS}:scenecut=0", "-pix_fmt", "yuv420p",
         "-f", "h264", str(path)], check=True)
    return path


def access_units(data: bytes) -> list[list[bytes]]:
    starts = [m.end() for m in re.finditer(b"\x00\x00\x01", data)]
    nals = [data[a:b - 3].rstrip(b"\x00") for a, b in zip(starts, [*starts[1:], len(data) + 3],
                                                          strict=True)]
    units: list[list[bytes]] = []
    current: list[bytes] = []
    for nal in nals:
        if nal:
            current.append(nal)
            if nal[0] & 0x1F in (1, 5):
                units.append(current)
                current = []
    return units


def payloads(unit: list[bytes]) -> list[tuple[bytes, bool]]:
    """A frame's RTP payloads (single NAL unit or FU-A) and their marker bits."""
    out = []
    for i, nal in enumerate(unit):
        last = i == len(unit) - 1
        if len(nal) <= MAX_PAYLOAD:
            out.append((nal, last))
            continue
        indicator, kind, body = (nal[0] & 0xE0) | 28, nal[0] & 0x1F, nal[1:]
        chunks = [body[j:j + MAX_PAYLOAD] for j in range(0, len(body), MAX_PAYLOAD)]
        for j, chunk in enumerate(chunks):
            header = kind | (0x80 if j == 0 else 0) | (0x40 if j == len(chunks) - 1 else 0)
            out.append((bytes([indicator, header]) + chunk, last and j == len(chunks) - 1))
    return out


class Fanout:
    def __init__(self, port: int, units: list[list[bytes]]) -> None:
        self.port = port
        self.frames = [payloads(unit) for unit in units]
        self.units = units
        self.sessions: dict[socket.socket, bytearray] = {}
        self.lock = threading.Lock()

    def sdp(self) -> bytes:
        sps = next(n for u in self.units for n in u if n[0] & 0x1F == 7)
        pps = next(n for u in self.units for n in u if n[0] & 0x1F == 8)
        sets = f"{base64.b64encode(sps).decode()},{base64.b64encode(pps).decode()}"
        return (f"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=rack\r\nc=IN IP4 127.0.0.1\r\n"
                f"t=0 0\r\nm=video 0 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n"
                f"a=fmtp:96 packetization-mode=1;sprop-parameter-sets={sets}\r\n"
                f"a=control:track1\r\n").encode()

    def serve(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port), backlog=1024)
        threading.Thread(target=self.tick, daemon=True).start()
        print("ready", flush=True)
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=self.session, args=(conn,), daemon=True).start()

    def session(self, conn: socket.socket) -> None:
        """The RTSP dialogue; at PLAY the socket joins the fan-out."""
        buffer = b""
        try:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                buffer += chunk
                while True:
                    if buffer.startswith(b"$"):  # RTCP from the client: skipped
                        if len(buffer) < 4:
                            break
                        length = struct.unpack(">H", buffer[2:4])[0]
                        if len(buffer) < 4 + length:
                            break
                        buffer = buffer[4 + length:]
                        continue
                    head, sep, rest = buffer.partition(b"\r\n\r\n")
                    if not sep:
                        break
                    lines = head.decode(errors="replace").split("\r\n")
                    headers = {k.strip().lower(): v.strip() for k, _, v in
                               (line.partition(":") for line in lines[1:])}
                    length = int(headers.get("content-length", "0"))
                    if len(rest) < length:
                        break
                    buffer = rest[length:]
                    self.answer(conn, lines[0].split(" ")[0], headers.get("cseq", "0"))
        except OSError:
            pass
        with self.lock:
            self.sessions.pop(conn, None)
        conn.close()

    def answer(self, conn: socket.socket, method: str, cseq: str) -> None:
        extra, body = "", b""
        url = f"rtsp://127.0.0.1:{self.port}/stream"
        if method == "OPTIONS":
            extra = "Public: OPTIONS, DESCRIBE, SETUP, PLAY, TEARDOWN, GET_PARAMETER\r\n"
        elif method == "DESCRIBE":
            body = self.sdp()
            extra = (f"Content-Base: {url}/\r\nContent-Type: application/sdp\r\n"
                     f"Content-Length: {len(body)}\r\n")
        elif method == "SETUP":
            extra = "Transport: RTP/AVP/TCP;unicast;interleaved=0-1\r\nSession: 4242;timeout=60\r\n"
        elif method == "PLAY":
            extra = "Session: 4242\r\nRange: npt=0.000-\r\n"
        reply = f"RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\n{extra}\r\n".encode() + body
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
            timestamp = (1000 + index * TICKS) & 0xFFFFFFFF
            packets = []
            for payload, marker in frame:
                rtp = struct.pack(">BBHII", 0x80, (0x80 if marker else 0) | 96, seq & 0xFFFF,
                                  timestamp, 0x1234) + payload
                seq += 1
                packets.append(b"$\x00" + struct.pack(">H", len(rtp)) + rtp)
            blob = b"".join(packets)
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
    Fanout(int(sys.argv[1]), access_units(Path(sys.argv[2]).read_bytes())).serve()
