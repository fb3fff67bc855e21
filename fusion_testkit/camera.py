"""ffmpeg as the camera (a generated H.264 stream pushed over HLS PUT) and as the judge of
decrypted video (decoded-frame hashes, ``ffmpeg -f framemd5``)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CameraPush:
    """What a camera pushed: its ``source`` file, the MD5 of each of its decoded frames in
    order (to compare decrypted video with, frame by frame: ``frame_hashes``,
    ``is_contiguous_run``), and a time range [``from_ms``, ``to_ms``) (Archiver clock, ms since
    the epoch) that holds the whole push."""

    camera: str
    source: Path
    frames: list[str]
    from_ms: int
    to_ms: int


def make_source(path: Path, seconds: float, rate: int = 25) -> Path:
    """A deterministic H.264 MPEG-TS test stream, a keyframe every second."""
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
         "-i", f"testsrc2=size=320x240:rate={rate}", "-t", str(seconds), "-c:v", "libx264",
         "-preset", "ultrafast", "-g", str(rate), "-keyint_min", str(rate),
         "-sc_threshold", "0", "-pix_fmt", "yuv420p", "-f", "mpegts", str(path)],
        check=True)
    return path


def push(source: Path, url: str, camera: str, token: str, realtime: bool = True,
         hls_time: float = 1, wait: bool = True) -> subprocess.Popen[bytes]:
    """Push a file as a camera would: ffmpeg's HLS muxer with PUT and a bearer token."""
    process = subprocess.Popen(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error",
         *(["-re"] if realtime else []), "-i", str(source), "-c", "copy", "-f", "hls",
         "-hls_time", str(hls_time), "-hls_list_size", "5", "-method", "PUT",
         "-headers", f"Authorization: Bearer {token}\r\n",
         f"{url}/ingest/{camera}/index.m3u8"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if wait:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode(errors="replace")
    return process


def frame_hashes(path: Path) -> list[str]:
    """The hash column of `ffmpeg -f framemd5`: one MD5 per decoded video frame."""
    out = subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-i", str(path),
         "-map", "0:v", "-f", "framemd5", "-"], check=True, capture_output=True, text=True).stdout
    return [line.rsplit(",", 1)[1].strip() for line in out.splitlines()
            if line and not line.startswith("#")]


def is_contiguous_run(part: list[str], whole: list[str]) -> bool:
    """True if `part` occurs in `whole` as one contiguous run of frames."""
    if not part:
        return False
    n = len(part)
    return any(whole[i:i + n] == part for i in range(len(whole) - n + 1))
