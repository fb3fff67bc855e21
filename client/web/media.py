"""Verified MPEG-TS segment -> fragmented MP4 for Media Source Extensions.

Chromium's MSE plays H.264 in fragmented MP4, not MPEG-TS, so every verified segment is remuxed
(stream copy: no re-encoding) on its own. One remux per segment keeps the mapping between a
segment (and its signed capture time) and the media it becomes exact: the page appends each
result in "sequence" mode and knows which media range came from which segment.

The remux runs in this process with PyAV (FFmpeg's libraries: the same demuxer and muxer as the
``ffmpeg`` command, so the same bytes), about 5 ms a segment instead of an ffprobe and an ffmpeg
process (about 0.1 s of CPU each). PyAV is the ``web`` extra; without it, or with
``FUSION_VIEWER_REMUX=ffmpeg``, the ``ffmpeg``/``ffprobe`` commands do it as before.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from keyservice.errors import KeyServiceError
from keyservice.exitcodes import ExitCode

__all__ = ["FFMPEG_TIMEOUT_S", "MIME", "MOVFLAGS", "REMUX_ENV", "Remux", "RemuxFailed",
           "Remuxed", "VideoInfo", "ffmpeg_remux", "probe", "pyav_available", "pyav_remux",
           "remuxer", "to_fmp4"]

FFMPEG_TIMEOUT_S = 30
# Generic codec strings for MediaSource.isTypeSupported / addSourceBuffer: Chromium decodes
# whatever the avcC/hvcC box says; the string only selects the decoder.
MIME = {
    "h264": 'video/mp4; codecs="avc1.640028"',
    "hevc": 'video/mp4; codecs="hvc1.1.6.L93.B0"',
}
# The init segment (ftyp+moov, no samples) first, then one moof+mdat per keyframe interval,
# each with its absolute decode time: what MSE needs.
MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"
# "pyav" (the default when PyAV is installed) or "ffmpeg" (the commands, one process each).
REMUX_ENV = "FUSION_VIEWER_REMUX"
# Only the codecs a browser may play are remuxed; the others are verified and reported only.
PLAYABLE = frozenset({"h264"})


class RemuxFailed(KeyServiceError):
    """A verified segment could not be turned into fragmented MP4."""

    exit_code = ExitCode.REMUX_FAILED


@dataclass(frozen=True)
class VideoInfo:
    """What the demuxer says about a verified segment's video: codec, MIME type, size."""

    codec: str    # FFmpeg's codec name: h264, hevc, ...
    mime: str     # MIME type with codecs parameter ("" when the browser side has none)
    width: int
    height: int


@dataclass(frozen=True)
class Remuxed:
    """One verified segment for the page: its video's description and, for a codec the page
    can play (H.264), the fragmented MP4 (init segment + fragments); None otherwise."""

    info: VideoInfo
    fmp4: bytes | None


Remux = Callable[[bytes], Remuxed]


def _info(codec: str, width: int, height: int) -> VideoInfo:
    return VideoInfo(codec, MIME.get(codec, ""), width, height)


# --- in-process: PyAV ------------------------------------------------------------------------
def pyav_available() -> bool:
    """True if PyAV can be imported (the ``web`` or ``archiver`` extra is installed)."""
    try:
        import av  # noqa: F401  (imported only when the viewer remuxes: keeps CLIs fast)
    except ImportError:
        return False
    return True


def pyav_remux(segment: bytes) -> Remuxed:
    """Demux the MPEG-TS segment from memory and copy its first video stream's packets into a
    fragmented MP4 in memory: ``ffmpeg -f mpegts -i - -map 0:v:0 -c copy -f mp4 -movflags
    MOVFLAGS -``, without a process."""
    import av

    try:
        with av.open(io.BytesIO(segment), format="mpegts") as source:
            if not source.streams.video:
                raise RemuxFailed("The verified segment has no video stream to show.")
            video = source.streams.video[0]
            context = video.codec_context
            info = _info(context.name, int(context.width or 0), int(context.height or 0))
            if info.codec not in PLAYABLE:
                return Remuxed(info, None)
            out = io.BytesIO()
            with av.open(out, mode="w", format="mp4",
                         options={"movflags": MOVFLAGS}) as sink:
                copy = sink.add_stream_from_template(video)
                packets = 0
                for packet in source.demux(video):
                    if packet.dts is None:  # the demuxer's end-of-stream marker
                        continue
                    packet.stream = copy
                    sink.mux(packet)
                    packets += 1
            if not packets:
                raise RemuxFailed("The verified segment has no video frames to show.")
            return Remuxed(info, out.getvalue())
    except av.FFmpegError as exc:
        # The segment passed verification, so this is the media itself (or PyAV's FFmpeg):
        # say what FFmpeg said, in one sentence.
        said = _one_line(str(exc.strerror or exc))
        raise RemuxFailed(f"The verified segment is not video FFmpeg can remux to MP4 "
                          f"({said}).") from None


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown error").rstrip(".")


# --- the commands: one ffprobe and one ffmpeg process a segment ------------------------------
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
        stream: dict[str, Any] = json.loads(done.stdout)["streams"][0]
        return _info(str(stream["codec_name"]), int(stream.get("width", 0)),
                     int(stream.get("height", 0)))
    except (ValueError, KeyError, IndexError, TypeError):
        raise RemuxFailed("The verified segment has no video stream ffprobe can read.") from None


def to_fmp4(segment: bytes) -> bytes:
    """One verified MPEG-TS segment as an init segment + fragments (video only), by ffmpeg."""
    try:
        done = subprocess.run(
            ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-f", "mpegts",
             "-i", "pipe:0", "-map", "0:v:0", "-c", "copy", "-f", "mp4",
             "-movflags", MOVFLAGS, "pipe:1"],
            input=segment, capture_output=True, timeout=FFMPEG_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RemuxFailed(f"Cannot run ffmpeg ({exc.__class__.__name__}); is ffmpeg "
                          "installed?") from None
    if done.returncode != 0 or not done.stdout:
        detail = done.stderr.decode(errors="replace").strip().splitlines()
        raise RemuxFailed("ffmpeg could not remux a verified segment to MP4"
                          + (f": {detail[-1]}" if detail else "."))
    return done.stdout


def ffmpeg_remux(segment: bytes) -> Remuxed:
    """The same as pyav_remux with the ffprobe and ffmpeg commands (two processes)."""
    info = probe(segment)
    return Remuxed(info, to_fmp4(segment) if info.codec in PLAYABLE else None)


def remuxer(choice: str | None = None) -> Remux:
    """The remux the viewer uses: ``choice`` (or $FUSION_VIEWER_REMUX) "pyav" or "ffmpeg";
    by default PyAV when it is installed, else the commands."""
    choice = (choice or os.environ.get(REMUX_ENV) or "").strip().lower()
    if choice == "ffmpeg":
        return ffmpeg_remux
    if choice not in ("", "pyav"):
        raise RemuxFailed(f"{REMUX_ENV} must be 'pyav' or 'ffmpeg', not {choice!r}.")
    if pyav_available():
        return pyav_remux
    if choice == "pyav":
        raise RemuxFailed(f"{REMUX_ENV}=pyav, but PyAV is not installed: pip install "
                          "'fusion-keyservice[web]'.")
    return ffmpeg_remux
