"""What the viewer asked for, and whether a fusion stream answers it: the request policy.

A ``StreamRequest`` names a fresh nonce, the cameras, the mode (playback or live) and the range;
for live also the viewer's clock and the allowed clock difference. The checks here decide, from
signed data only, whether the stream answers it (``RequestMismatch`` otherwise): the header
(nonce, camera, mode, range, freshness), each segment's signed capture time, a data stream's
first segment that starts before the range, and the range's edges (``RangeIncomplete`` when the
stream cannot show it covers the whole range). keyservice.reader.StreamReader, the state
machine that verifies signatures, chains and keys, calls them.

Pure: no I/O.
"""

from __future__ import annotations

import datetime as dt
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from keyservice.errors import RangeIncomplete, RequestMismatch
from keyservice.format import Header, Manifest, ManifestEntry, Mode, validate_name
from keyservice.records import FrozenRecord

# How far the Archiver's clock may be from the viewer's for a live stream to count as fresh.
DEFAULT_MAX_SKEW_MS = 30_000


@dataclass(eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class StreamRequest(FrozenRecord):
    """What the viewer asked for. A reader given one refuses (RequestMismatch) a stream that
    answers anything else: another nonce (a stream saved earlier and replayed by a relay),
    camera, mode or range, a segment whose *signed* capture time lies outside the range, or,
    live, a stream or segment older than the request by more than ``max_skew_ms``.

    Playback: ``from_ms``/``to_ms`` are the requested range. Live: ``from_ms`` is the viewer's
    clock when it sent the request, ``to_ms`` that plus the duration, and ``clock`` reads the
    viewer's clock (ms) so that segments from the future are refused as well.
    """

    nonce: bytes
    cameras: tuple[str, ...]
    mode: Mode
    from_ms: int
    to_ms: int
    clock: Callable[[], int] | None = None
    max_skew_ms: int = DEFAULT_MAX_SKEW_MS

    def __post_init__(self) -> None:
        if not isinstance(self.nonce, bytes) or len(self.nonce) != 16:
            raise ValueError("A request nonce is 16 random bytes.")
        if isinstance(self.cameras, str) or not self.cameras:
            raise ValueError("A request names its cameras as a non-empty tuple.")
        for camera in self.cameras:
            validate_name(camera)
        if self.mode == Mode.LIVE and self.clock is None:
            raise ValueError("A live request needs the viewer's clock.")


def iso(ms: int) -> str:
    """A time in messages: ISO 8601 UTC with milliseconds (or the raw number if out of range)."""
    try:
        when = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{ms} ms"
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def mode_name(mode: int) -> str:
    return "live" if mode == Mode.LIVE else "recording"


def check_header_answers(header: Header, request: StreamRequest) -> None:
    """The header names the request it answers (the END signature covers it)."""
    if not hmac.compare_digest(header.request_nonce, request.nonce):
        raise RequestMismatch(
            "This stream does not answer the request just sent: it carries another request "
            "nonce, so it was made for an earlier request (a saved stream replayed, or relayed "
            f"from another request: {mode_name(header.mode)} of "
            f"{', '.join(header.cameras)}, made {iso(header.created_ms)}).",
            "Nothing of it is used; check the network path to the Archiver.")
    if sorted(header.cameras) != sorted(request.cameras):
        raise RequestMismatch(
            f"This stream is for camera {', '.join(header.cameras)}, not for the requested "
            f"camera {', '.join(request.cameras)}.")
    if header.mode != request.mode:
        raise RequestMismatch(
            f"This is a {mode_name(header.mode)} stream, but {mode_name(request.mode)} "
            "was requested.")
    if request.mode == Mode.PLAYBACK:
        if (header.range_from_ms, header.range_to_ms) != (request.from_ms, request.to_ms):
            raise RequestMismatch(
                f"This stream answers the range {iso(header.range_from_ms)} .. "
                f"{iso(header.range_to_ms)}, not the requested {iso(request.from_ms)} .. "
                f"{iso(request.to_ms)}.")
        return
    assert request.clock is not None
    # Live starts where the viewer's request said (its clock when sending), so a relay that
    # holds the request back cannot make the stream skip its start.
    if (header.range_from_ms, header.range_to_ms) != (request.from_ms, request.to_ms):
        raise RequestMismatch(
            f"This live stream covers {iso(header.range_from_ms)} .. "
            f"{iso(header.range_to_ms)}, not the requested {iso(request.from_ms)} .. "
            f"{iso(request.to_ms)}.")
    now = request.clock()
    earliest, latest = request.from_ms - request.max_skew_ms, now + request.max_skew_ms
    for what, when in (("made", header.created_ms),):
        if not earliest <= when <= latest:
            raise RequestMismatch(
                f"This live stream was {what} {iso(when)} by the Archiver's clock, but the "
                f"request was sent {iso(request.from_ms)} by this machine's clock (allowed "
                f"difference {request.max_skew_ms / 1000:g} s): it is not fresh.",
                "A replayed stream, or clocks out of sync: check both clocks (NTP).")


def check_entry_answers(camera: str, entry: ManifestEntry, request: StreamRequest,
                        first_of_stream: bool) -> None:
    """A segment's signed capture time (the start of its video) must lie in what was asked
    for. Playback: the first segment of each camera data stream may start before the range,
    since the segment that overlaps the range's start belongs to it."""
    when = entry.capture_ms
    if request.mode == Mode.PLAYBACK:
        # With a signed duration, overlap is exact; without (0), only the data stream's first
        # segment may start before the range (and is held back, see holds_back).
        overlaps = (when + entry.duration_ms >= request.from_ms if entry.duration_ms
                    else first_of_stream)
        if not (request.from_ms <= when or overlaps) or when > request.to_ms:
            raise RequestMismatch(
                f"Segment {entry.seq} of camera {camera} was captured {iso(when)} (signed), "
                f"outside the requested range {iso(request.from_ms)} .. "
                f"{iso(request.to_ms)}.", "The Archiver's index may have been tampered with.")
        return
    assert request.clock is not None
    if when < request.from_ms - request.max_skew_ms:
        raise RequestMismatch(
            f"Segment {entry.seq} of camera {camera} was captured {iso(when)} (signed), before "
            f"this live request was sent ({iso(request.from_ms)}, allowed clock difference "
            f"{request.max_skew_ms / 1000:g} s): old footage offered as live.")
    if when > request.clock() + request.max_skew_ms:
        raise RequestMismatch(
            f"Segment {entry.seq} of camera {camera} was captured {iso(when)} (signed), in "
            "the future by this machine's clock: check both clocks (NTP).")


# --- a data stream's first segment that starts before a playback range ---------------------
def holds_back(request: StreamRequest | None, capture_ms: int, duration_ms: int) -> bool:
    """Playback: a segment without a signed duration that starts before the range may overlap
    the range's start, but only its successor shows that it does (it must start after the
    range's start). Such a segment is held back until then (check_entry_answers lets only a
    data stream's first segment start before the range)."""
    return (request is not None and request.mode == Mode.PLAYBACK
            and capture_ms < request.from_ms and not duration_ms)


def check_held_successor(camera: str, held_seq: int, held_capture_ms: int,
                         successor_capture_ms: int, request: StreamRequest) -> None:
    """A held segment is released only if its successor starts after the range's start;
    otherwise it is footage from before the range."""
    if successor_capture_ms <= request.from_ms:
        raise RequestMismatch(
            f"Segment {held_seq} of camera {camera} was captured {iso(held_capture_ms)}"
            f" (signed) and ends before the requested range "
            f"{iso(request.from_ms)} .. {iso(request.to_ms)}.",
            "The Archiver's index may have been tampered with.")


# --- the range's edges -----------------------------------------------------------------------
def playback_range(request: StreamRequest | None,
                   header: Header | None) -> tuple[int, int] | None:
    """The range whose edges a playback stream proves: the request's, or for a saved stream
    read without one, its header's (authenticated by END, where edges are judged)."""
    if request is not None:
        return (request.from_ms, request.to_ms) if request.mode == Mode.PLAYBACK else None
    if header is not None and header.mode == Mode.PLAYBACK:
        return header.range_from_ms, header.range_to_ms
    return None


def live_start(request: StreamRequest | None, header: Header | None) -> int | None:
    """A live stream's start: the request's, or for a saved stream read without one, its
    header's (authenticated by END)."""
    if request is not None:
        return request.from_ms if request.mode == Mode.LIVE else None
    if header is not None and header.mode == Mode.LIVE:
        return header.range_from_ms
    return None


# eq/repr off: process state compared by identity and never printed; each generated
# method is compiled at every start (issue 23, start-up).
@dataclass(eq=False, repr=False)
class Edges:
    """What one camera's manifests have shown of the range's edges: ``opened``, that nothing
    before its first delivered manifest was left out (the chain's start, or a bare manifest
    from before the range); ``closed``, that a bare manifest from after the range came."""

    opened: bool = False
    closed: bool = False

    def is_edge(self, manifest: Manifest, first: bool, has_pending: bool,
                span: tuple[int, int]) -> bool:
        """A playback edge: sent bare (no segment of it came), every entry's video ending
        before the range and it is the camera's first manifest, or every entry starting after
        the range."""
        from_ms, to_ms = span
        if has_pending or not manifest.entries:
            return False
        if first and all(e.capture_ms + e.duration_ms < from_ms for e in manifest.entries):
            self.opened = True
            return True
        if not self.closed and all(e.capture_ms > to_ms for e in manifest.entries):
            self.closed = True
            self.opened = self.opened or (first and manifest.manifest_seq == 0)
            return True
        return False

    def check_covered(self, camera: str, last_seq: int | None, head: int | None,
                      live: bool) -> None:
        """At END: the stream shows, from signed data, that it covers the whole range of this
        camera: from the chain's start or a manifest before the range, to a manifest after
        the range or the chain's head as END states it (``head``)."""
        if last_seq is None:
            if head == 0:
                return  # nothing was ever recorded on this camera
            raise RangeIncomplete(
                f"The stream holds no manifest of camera {camera}, and does not show that "
                "nothing was recorded in the requested range.")
        if not self.opened:
            what = "live start" if live else "requested range"
            raise RangeIncomplete(
                f"The stream does not show that it starts at the beginning of the {what} "
                f"for camera {camera}: earlier recordings may be missing.")
        if not self.closed and head != last_seq + 1:
            raise RangeIncomplete(
                f"The stream does not show that it reaches the end of the requested range "
                f"for camera {camera}: later recordings in the range may be missing.")
