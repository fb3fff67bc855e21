"""A minimal RTSP camera's wire, for servers whose stream we control byte by byte
(tests/fixtures/hostile_rtsp.py) or that serve one encoding to hundreds of sessions
(bench/rtsp_fanout.py), which gst-rtsp-server cannot be made to do: H.264 access units from an
Annex B stream, RTP over interleaved TCP (RFC 2326, 10.12; RFC 6184 single NAL units and FU-A),
the SDP, and the RTSP requests a client sends (OPTIONS, DESCRIBE, SETUP, PLAY, TEARDOWN).
"""

from __future__ import annotations

import base64
import re
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

FPS = 25
TICKS = 90_000 // FPS  # RTP ticks (90 kHz) a frame
MAX_PAYLOAD = 1400
SESSION = "4242"


def encode_h264(path: Path, seconds: float, size: str = "320x240", gop: int = FPS,
                kbps: int | None = None, preset: str = "ultrafast") -> Path:
    """An H.264 elementary stream (Annex B), one slice per frame, no B-frames, a keyframe
    every ``gop`` frames (at ``kbps`` if given)."""
    rate = ["-b:v", f"{kbps}k", "-maxrate", f"{kbps}k", "-bufsize", f"{kbps}k"] if kbps else []
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
         "-i", f"testsrc2=size={size}:rate={FPS}", "-t", str(seconds), "-c:v", "libx264",
         "-preset", preset, "-tune", "zerolatency", "-threads", "1", "-bf", "0", *rate,
         "-x264-params", f"keyint={gop}:min-keyint={gop}:scenecut=0", "-pix_fmt", "yuv420p",
         "-f", "h264", str(path)], check=True)
    return path


def access_units(data: bytes) -> list[list[bytes]]:
    """The stream's access units: each a list of NAL units ending with its (one) slice."""
    starts = [m.end() for m in re.finditer(b"\x00\x00\x01", data)]
    nals = [data[a:b - 3].rstrip(b"\x00") for a, b in zip(starts, [*starts[1:], len(data) + 3],
                                                          strict=True)]
    units: list[list[bytes]] = []
    current: list[bytes] = []
    for nal in nals:
        if nal:
            current.append(nal)
            if nal[0] & 0x1F in (1, 5):  # a slice ends the access unit (one slice per frame)
                units.append(current)
                current = []
    return units


def is_keyframe(unit: list[bytes]) -> bool:
    return any(nal[0] & 0x1F == 5 for nal in unit)


def rtp_payloads(unit: list[bytes]) -> list[tuple[bytes, bool]]:
    """A frame's RTP payloads (single NAL unit packets, or FU-A fragments for large NAL units,
    RFC 6184 5.8) and their marker bits (set on the frame's last packet)."""
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


def interleaved_frame(payloads: list[tuple[bytes, bool]], seq: int,
                      timestamp: int) -> tuple[bytes, int]:
    """A frame's RTP packets on channel 0 of the RTSP connection, and the next sequence number."""
    packets = []
    for payload, marker in payloads:
        rtp = struct.pack(">BBHII", 0x80, (0x80 if marker else 0) | 96, seq & 0xFFFF,
                          timestamp & 0xFFFFFFFF, 0x1234) + payload
        seq += 1
        packets.append(b"$\x00" + struct.pack(">H", len(rtp)) + rtp)
    return b"".join(packets), seq


def sdp(units: list[list[bytes]], name: str) -> bytes:
    """The session description of one H.264 track, its parameter sets in band."""
    sps = next(n for u in units for n in u if n[0] & 0x1F == 7)
    pps = next(n for u in units for n in u if n[0] & 0x1F == 8)
    sets = f"{base64.b64encode(sps).decode()},{base64.b64encode(pps).decode()}"
    return (f"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns={name}\r\nc=IN IP4 127.0.0.1\r\n"
            f"t=0 0\r\nm=video 0 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n"
            f"a=fmtp:96 packetization-mode=1;sprop-parameter-sets={sets}\r\n"
            f"a=control:track1\r\n").encode()


def reply(method: str, cseq: str, url: str, description: bytes) -> bytes:
    """The answer of a camera that accepts everything: RTP over the RTSP connection."""
    extra, body = "", b""
    if method == "OPTIONS":
        extra = "Public: OPTIONS, DESCRIBE, SETUP, PLAY, TEARDOWN, GET_PARAMETER\r\n"
    elif method == "DESCRIBE":
        body = description
        extra = (f"Content-Base: {url}/\r\nContent-Type: application/sdp\r\n"
                 f"Content-Length: {len(body)}\r\n")
    elif method == "SETUP":
        extra = f"Transport: RTP/AVP/TCP;unicast;interleaved=0-1\r\nSession: {SESSION};timeout=60\r\n"
    elif method == "PLAY":
        extra = f"Session: {SESSION}\r\nRange: npt=0.000-\r\n"
    return f"RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\n{extra}\r\n".encode() + body


def requests(conn: socket.socket, running: Callable[[], bool] = lambda: True
             ) -> Iterator[tuple[str, str]]:
    """The client's requests, as (method, CSeq), until it closes the connection or ``running()``
    turns false (checked whenever the socket's timeout expires). Interleaved packets from the
    client (its RTCP) are skipped."""
    buffer = b""
    while running():
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            return
        buffer += chunk
        while True:
            if buffer.startswith(b"$"):
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
            body_length = int(headers.get("content-length", "0"))
            if len(rest) < body_length:
                break
            buffer = rest[body_length:]
            yield lines[0].split(" ")[0], headers.get("cseq", "0")
