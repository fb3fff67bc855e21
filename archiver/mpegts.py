"""The time span of the video in an MPEG-TS segment, read from its own PES timestamps. Pure.

Every TS packet that starts a payload (payload_unit_start_indicator) is looked at, found with
C-speed slicing and byte searches, and the PTS of each video PES read: a 2 s segment holds a few
dozen, so this costs about what AES-GCM costs for the segment. B-frames make presentation order
differ from the order in the file, so the times are sorted, and the span runs from the first to
the last plus one frame duration.

A camera's timestamps are its own word: one segment of 2 s of frames whose timestamps jump by
hours half-way through would otherwise be signed as covering hours (issue 19). So the time a
segment covers is bounded by the frames it holds: a step between two consecutive frames longer
than ``MAX_FRAME_INTERVAL_MS`` is a jump, and counts as one frame interval. A segment of N
frames never covers more than N x ``MAX_FRAME_INTERVAL_MS``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

PACKET = 188
SYNC = 0x47
PTS_CLOCK_HZ = 90_000
PTS_WRAP = 1 << 33
MAX_FRAME_INTERVAL_MS = 2000  # slower than 0.5 frame/s is a timestamp jump, not a frame rate
_MAX_FRAME_TICKS = MAX_FRAME_INTERVAL_MS * PTS_CLOCK_HZ // 1000
# Byte 1 of a TS packet -> 1 if payload_unit_start_indicator is set (translate table).
_PUSI = bytes(1 if b & 0x40 else 0 for b in range(256))


@dataclass(frozen=True)
class MediaSpan:
    """Presentation times, in 90 kHz ticks, of the first frame and of the end of the last frame;
    ``covered_ticks``: how much of that the frames cover (None: all of it), with any jump in
    the timestamps counted as one frame; ``jump_ticks``: the time the jumps skipped."""

    first_pts: int
    end_pts: int
    covered_ticks: int | None = None
    jump_ticks: int = 0
    frames: int = 0

    @property
    def duration_ms(self) -> int:
        """The time the segment's frames cover: what the Archiver signs."""
        if self.covered_ticks is not None:
            return self.covered_ticks * 1000 // PTS_CLOCK_HZ
        return ((self.end_pts - self.first_pts) % PTS_WRAP) * 1000 // PTS_CLOCK_HZ

    @property
    def jump_ms(self) -> int:
        return self.jump_ticks * 1000 // PTS_CLOCK_HZ


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


def _all_video_pts(data: bytes) -> list[int]:
    """The PTS of every video PES header, in file order. Only packets that start a payload
    are visited (found with C-speed slicing and byte searches)."""
    found: list[int] = []
    starts = data[1::PACKET].translate(_PUSI)
    index = starts.find(1)
    while index >= 0:
        packet = index * PACKET
        if packet + PACKET <= len(data) and data[packet] == SYNC:
            adaptation = (data[packet + 3] >> 4) & 0x3
            pes = packet + 4
            if adaptation & 0x2:
                pes += 1 + data[pes]
            if (pes + 4 <= packet + PACKET and data[pes:pes + 3] == _START_CODE
                    and data[pes + 3] & 0xF0 == 0xE0):
                pts = _video_pts(data, pes)
                if pts is not None:
                    found.append(pts)
        index = starts.find(1, index + 1)
    return found


def media_span(data: bytes) -> MediaSpan | None:
    """The span of the video in an MPEG-TS segment, or None if it holds no timed video."""
    if len(data) < PACKET or data[0] != SYNC:
        return None
    every = _all_video_pts(data)
    if not every:
        return None
    every = sorted(set(_unwrap(every, every[0])))
    steps = [b - a for a, b in itertools.pairwise(every)]
    # A step longer than any plausible frame interval is a jump of the camera's clock, not
    # video: it counts as one frame, so the signed span is bounded by the frames held.
    plausible = [step for step in steps if step <= _MAX_FRAME_TICKS]
    jumps = [step for step in steps if step > _MAX_FRAME_TICKS]
    frame = min(plausible) if plausible else 0
    covered = sum(plausible) + frame * (len(jumps) + 1)
    return MediaSpan(every[0] % PTS_WRAP, (every[-1] + frame) % PTS_WRAP, covered,
                     sum(jumps) - frame * len(jumps), len(every))
