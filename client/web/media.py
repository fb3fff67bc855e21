"""Verified MPEG-TS segment -> fragmented MP4 for Media Source Extensions, with ffmpeg.

Chromium's MSE plays H.264 in fragmented MP4, not MPEG-TS, so every verified segment is remuxed
(``-c copy``: no re-encoding) on its own. One ffmpeg per segment keeps the mapping between a
segment (and its signed capture time) and the media it becomes exact: the page appends each
result in "sequence" mode and knows which media range came from which segment.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass

from keyservice.errors import KeyServiceError
from keyservice.exitcodes import ExitCode

__all__ = ["FFMPEG_TIMEOUT_S", "MIME", "RemuxFailed", "VideoInfo", "probe", "to_fmp4"]

FFMPEG_TIMEOUT_S = 30
# Generic codec strings for MediaSource.isTypeSupported / addSourceBuffer: Chromium decodes
# whatever the avcC/hvcC box says; the string only selects the decoder.
MIME = {
    "h264": 'video/mp4; codecs="avc1.640028"',
    "hevc": 'video/mp4; codecs="hvc1.1.6.L93.B0"',
}


class RemuxFailed(KeyServiceError):
    """ffmpeg could not turn a verified segment into fragmented MP4."""

    exit_code = ExitCode.REMUX_FAILED


@dataclass(frozen=True)
class VideoInfo:
    """What ffprobe says about a verified segment's video: codec, MIME type, size."""

    codec: str    # ffprobe's codec_name: h264, hevc, ...
    mime: str     # MIME type with codecs parameter ("" when the browser side has none)
    width: int
    height: int


def probe(segment: bytes) -> VideoInfo:
    """The video codec of a verified MPEG-TS segment (ffprobe reads it from standard input)."""
    try:
        done = subprocess.run(
            ["ffprobe", "-v", "error", "-f", "mpegts", "-i", "pipe:0", "-select_streams", "v:0",
             "-show_entries", "stream=codec_name,width,height", "-of", "json"],
            input=segment, capture_output=True, timeout=FFMPEG_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RemuxFailed(f"Cannot run ffprobe ({exc.__class__.__name__}); is ffmpeg "
                          "installed?") from None
    try:
        stream = json.loads(done.stdout)["streams"][0]
        codec = str(stream["codec_name"])
        return VideoInfo(codec, MIME.get(codec, ""), int(stream.get("width", 0)),
                         int(stream.get("height", 0)))
    except (ValueError, KeyError, IndexError, TypeError):
        raise RemuxFailed("The verified segment has no video stream ffprobe can read.") from None


def to_fmp4(segment: bytes) -> bytes:
    """One verified MPEG-TS segment as an init segment + fragments (video only)."""
    try:
        done = subprocess.run(
            ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-f", "mpegts",
             "-i", "pipe:0", "-map", "0:v:0", "-c", "copy", "-f", "mp4",
             "-movflags", "frag_keyframe+empty_moov+default_base_moof", "pipe:1"],
            input=segment, capture_output=True, timeout=FFMPEG_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RemuxFailed(f"Cannot run ffmpeg ({exc.__class__.__name__}); is ffmpeg "
                          "installed?") from None
    if done.returncode != 0 or not done.stdout:
        detail = done.stderr.decode(errors="replace").strip().splitlines()
        raise RemuxFailed("ffmpeg could not remux a verified segment to MP4"
                          + (f": {detail[-1]}" if detail else "."))
    return done.stdout
