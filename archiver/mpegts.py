"""The time span of the video in an MPEG-TS segment, read from its own PES timestamps. Pure.

Only the PES headers of the first and last few frames are read, found with C-speed byte searches:
on a 2.7 MB, 2 s H.264 segment this costs about what AES-GCM costs for it (2.3 ms vs 1.8 ms,
same run, noisy 2-core machine); a small segment costs well under a millisecond. B-frames make
presentation order differ from the order in the file, so the span is the minimum presentation
time of the first frames and the maximum of the last ones, plus one frame duration.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

PACKET = 188
SYNC = 0x47
PTS_CLOCK_HZ = 90_000
PTS_WRAP = 1 << 33
_SCAN_FRAMES = 5  # PES headers read at each end: covers a B-frame reordering window (<= 4)


@dataclass(frozen=True)
class MediaSpan:
    """Presentation times, in 90 kHz ticks, of the first frame and of the end of the last frame."""

    first_pts: int
    end_pts: int

    @property
    def duration_ms(self) -> int:
        return ((self.end_pts - self.first_pts) % PTS_WRAP) * 1000 // PTS_CLOCK_HZ


_START_CODE = b"\x00\x00\x01"  # then a video PES has its stream id, 0xE0-0xEF


def _video_pts(data: bytes, pes: int) -> int | None:
    """The PTS of the video PES starting at offset pes, if it starts a TS packet's payload.
    (The byte pattern cannot occur inside H.264/H.265 data: NAL headers have the top bit clear.)"""
    packet = pes - pes % PACKET
    if data[packet] != SYNC or not data[packet + 1] & 0x40:  # payload_unit_start_indicator
        return None
    adaptation = (data[packet + 3] >> 4) & 0x3
    start = packet + 4
    if adaptation & 0x2:
        start += 1 + data[start]
    if start != pes or not adaptation & 0x1 or pes + 14 > packet + PACKET:
        return None
    if not data[pes + 7] & 0x80:  # no PTS
        return None
    b = data[pes + 9:pes + 14]
    return (((b[0] >> 1) & 0x7) << 30) | (b[1] << 22) | ((b[2] >> 1) << 15) | (b[3] << 7) | (b[4] >> 1)


def _unwrap(values: list[int], reference: int) -> list[int]:
    """Place 33-bit timestamps on one line around reference (a segment may straddle a wrap)."""
    half = PTS_WRAP // 2
    return [reference + ((v - reference + half) % PTS_WRAP) - half for v in values]


def _video_pts_from(data: bytes, start: int, count: int | None) -> list[int]:
    """The PTS of the video PES headers from offset start on (at most count of them). A plain
    bytes.find per start code: C speed, where a regex crawls over zero-rich video."""
    found: list[int] = []
    at = data.find(_START_CODE, start)
    while at >= 0 and (count is None or len(found) < count):
        if at + 3 < len(data) and data[at + 3] & 0xF0 == 0xE0:
            pts = _video_pts(data, at)
            if pts is not None:
                found.append(pts)
        at = data.find(_START_CODE, at + 3)
    return found


def _last_video_pts(data: bytes, count: int) -> list[int]:
    """The PTS of the last ``count`` video PES headers: searched forward in a tail window that
    grows until it holds enough (bytes.rfind is pathologically slow on zero-rich video)."""
    window = 128 * 1024
    while True:
        start = max(0, len(data) - window)
        found = _video_pts_from(data, start, None)
        if len(found) >= count or start == 0:
            return found[-count:]
        window *= 4


def media_span(data: bytes) -> MediaSpan | None:
    """The span of the video in an MPEG-TS segment, or None if it holds no timed video."""
    if len(data) < PACKET or data[0] != SYNC:
        return None
    head = _video_pts_from(data, 0, _SCAN_FRAMES)
    if not head:
        return None
    tail = _last_video_pts(data, _SCAN_FRAMES)
    head = _unwrap(head, head[0])
    tail = _unwrap(tail, head[0])
    every = sorted(set(head + tail))
    steps = [b - a for a, b in itertools.pairwise(every) if b > a]
    frame = min(steps) if steps else 0
    first, last = min(head), max(tail)
    return MediaSpan(first % PTS_WRAP, (last + frame) % PTS_WRAP)
