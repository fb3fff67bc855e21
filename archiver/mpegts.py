"""The time span of the video in an MPEG-TS segment, read from its own PES timestamps. Pure.

Only the PES headers at the two ends of the segment are read (a few packets, not the whole
segment), so finding a segment's span costs microseconds on the ingest path. B-frames make
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
_SCAN_FRAMES = 8  # PES headers read at each end: enough to cover a B-frame reordering window


@dataclass(frozen=True)
class MediaSpan:
    """Presentation times, in 90 kHz ticks, of the first frame and of the end of the last frame."""

    first_pts: int
    end_pts: int

    @property
    def duration_ms(self) -> int:
        return ((self.end_pts - self.first_pts) % PTS_WRAP) * 1000 // PTS_CLOCK_HZ


def _video_pts(data: bytes | memoryview, offset: int) -> int | None:
    """The PTS of a video PES starting in the TS packet at offset, if it starts one."""
    if data[offset] != SYNC or not data[offset + 1] & 0x40:  # payload_unit_start_indicator
        return None
    adaptation = (data[offset + 3] >> 4) & 0x3
    start = offset + 4
    if adaptation & 0x2:
        start += 1 + data[start]
    if not adaptation & 0x1 or start + 14 > offset + PACKET:
        return None
    pes = data[start:start + 14]
    # 00 00 01, stream id 0xE0-0xEF (video), PTS present in the flags.
    if pes[0] or pes[1] or pes[2] != 1 or pes[3] & 0xF0 != 0xE0 or not pes[7] & 0x80:
        return None
    b = pes[9:14]
    return (((b[0] >> 1) & 0x7) << 30) | (b[1] << 22) | ((b[2] >> 1) << 15) | (b[3] << 7) | (b[4] >> 1)


def _unwrap(values: list[int], reference: int) -> list[int]:
    """Place 33-bit timestamps on one line around reference (a segment may straddle a wrap)."""
    half = PTS_WRAP // 2
    return [reference + ((v - reference + half) % PTS_WRAP) - half for v in values]


def media_span(data: bytes | memoryview) -> MediaSpan | None:
    """The span of the video in an MPEG-TS segment, or None if it holds no timed video."""
    count = len(data) // PACKET
    if count == 0 or data[0] != SYNC:
        return None
    head: list[int] = []
    for i in range(count):
        pts = _video_pts(data, i * PACKET)
        if pts is not None:
            head.append(pts)
            if len(head) == _SCAN_FRAMES:
                break
    if not head:
        return None
    tail: list[int] = []
    for i in range(count - 1, -1, -1):
        pts = _video_pts(data, i * PACKET)
        if pts is not None:
            tail.append(pts)
            if len(tail) == _SCAN_FRAMES:
                break
    head = _unwrap(head, head[0])
    tail = _unwrap(tail, head[0])
    every = sorted(set(head + tail))
    steps = [b - a for a, b in itertools.pairwise(every) if b > a]
    frame = min(steps) if steps else 0
    first, last = min(head), max(tail)
    return MediaSpan(first % PTS_WRAP, (last + frame) % PTS_WRAP)
