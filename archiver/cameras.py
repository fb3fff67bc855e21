"""Cameras as the Archiver sees them: where a segment sits in time, and whether a camera is healthy.

**Segment time.** A segment covers [start, end] of the video it holds. Its duration comes from the
stream's own timestamps (``archiver.mpegts``), bounded by the frames it holds (a jump between two
frames counts as one frame: a camera's clock cannot stretch a segment over hours); its place on
the wall clock from its arrival, since a camera sends a segment as soon as its last frame is
captured:

1. While a camera's stream timestamps run on from the previous segment, the new segment follows
   it on the same anchor: start = previous end (plus any jump in the stream clock), end = start +
   duration. Consecutive segments are then contiguous, with no jitter from upload latency.
2. That placement is kept only while it agrees with the arrival clock: it may not end after the
   segment arrived (plus ``DRIFT_TOLERANCE_MS``), nor more than a bound before: for a pushed
   camera ``MAX_BEHIND_MS`` (each upload is separate: a stream clock that ran on across 30 s of
   silence is a camera's claim, not a fact); for a **pulled** camera, within one RTSP session,
   ``MAX_LAG_MS``. A session is one connection whose packets the Archiver read in order: its
   clock running on is continuous video, so when the Archiver falls behind (overload, a pause)
   the segments keep their capture times, with no false gap. Beyond ``MAX_LAG_MS`` the camera's
   clock is not believed (it could place video far in the past): the segment is re-anchored on
   arrival and the camera is ``behind`` with the reason (``SegmentClock.overrun_ms``). A
   session more than ``DRIFT_TOLERANCE_MS`` behind slews towards arrival by up to 0.1 % of the
   time (``SLEW_DIVISOR``): a camera clock that runs slow does not build up a lag over days.
   Otherwise (first segment, new stream or session, clock drift, an Archiver restart) the
   segment is re-anchored: end = arrival, start = end - duration.
   A pulled segment's "arrival" for this rule is the puller's bound on when its capture ended
   (``captured_by``, ``archiver.rtsp.CaptureBound``): the earliest its packets' reading times
   allow, given the session's clock. An overloaded puller reads a new session's first segment
   late, and anchoring that on its arrival put the whole session late by as much (seconds:
   docs/benchmarks.md, "Time under overload"); its first packets, read while it still kept up,
   say when it really was. The bound anchors a segment and is what a slow clock slews towards;
   a session placed more than ``PULL_BACK_MS`` after its bound (anchored while the puller was
   already late: the bound is an upper bound, so that much later is known to be wrong) is
   pulled back towards it by at most half a segment per segment. The bound
   is used only within [arrival - ``MAX_LAG_MS``, arrival]: it never places video after its
   arrival, nor further back than the session bound.
3. Segments of one camera never overlap: a start before the previous end is moved to it. So a
   burst (video sent faster than real time) is laid out over its arrival times, never in the
   future. A segment without timestamps (not MPEG-TS video) is a point: start = end = arrival.

A segment's **lag** is the time from the end of its capture (its placed end) to its archiving
(acknowledged): what overload costs, in ``cameras list`` and ``/metrics``.

A **gap** is a stretch longer than ``GAP_TOLERANCE_MS`` between the end of one segment and the
start of the next.

**Health.** A camera is *receiving* while segments arrive; *stalled* when none arrived for
``STALL_FACTOR`` segment durations (at least ``MIN_STALL_MS``); *unreachable* or *auth_failed* when
the Archiver pulls it and cannot connect or log in; *waiting* before its first segment;
*behind* while a segment of the last ``RATE_WINDOW_MS`` was archived more than ``BEHIND_MS``
after its capture, or for ``FAULT_MEMORY_MS`` after a pulled segment was re-anchored beyond
``MAX_LAG_MS`` (the Archiver cannot keep up: see ``--max-rtsp-cameras``); *bad_stream* for
``FAULT_MEMORY_MS`` after its RTSP stream broke the segmenter's bounds (a
segment cut at the byte or time cap, a giant frame or frames without a keyframe dropped:
``archiver.rtsp``); *bad_timestamps* for ``JUMP_MEMORY_MS`` after a segment whose timestamps
jumped between two of its frames (``archiver.mpegts``: the jump was not signed as video, the
camera's clock is broken or hostile).
"""

from __future__ import annotations

import bisect
import datetime as dt
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from archiver.mpegts import PTS_CLOCK_HZ, PTS_WRAP, MediaSpan

GAP_TOLERANCE_MS = 1000
DRIFT_TOLERANCE_MS = 1000
MAX_BEHIND_MS = 30_000  # a pushed camera's continuous stream may arrive this late (the default)
# A pulled camera's session clock may be this far behind arrival (an overloaded or paused
# Archiver catches up); beyond, a hostile or broken clock could place video far in the past.
MAX_LAG_MS = 120_000
# A pulled session placed this much after its capture bound is pulled back towards it (rule 2).
PULL_BACK_MS = 100
# A pulled session's clock may run this much slower than the Archiver's (1/1000: 0.1 %) before
# it shows as lag (rule 2).
SLEW_DIVISOR = 1000
# Archived this long after capture: the camera is "behind" (issue 23's goal is one segment plus
# a second; this is the alarm, with room for a loaded machine's fsync or scheduling hiccup).
BEHIND_MS = 10_000
STALL_FACTOR = 3
MIN_STALL_MS = 5000
DEFAULT_SEGMENT_MS = 2000
RATE_WINDOW_MS = 60_000
JUMP_MEMORY_MS = 60_000  # a camera whose timestamps jumped stays flagged this long after
FAULT_MEMORY_MS = 60_000  # an RTSP stream that broke the segmenter's bounds stays flagged this long

log = logging.getLogger("archiver")


@dataclass(frozen=True)
class SegmentTime:
    start_ms: int
    end_ms: int


class SegmentClock:
    """Places one camera stream's segments on the wall clock (rules in the module docstring).
    Not thread-safe: used under the camera's ingest lock."""

    def __init__(self, previous_end_ms: int | None = None,
                 max_behind_ms: int = MAX_BEHIND_MS) -> None:
        self._previous_end_ms = previous_end_ms
        # The pushed-camera bound of rule 2 (``--max-behind-s``; tests shorten it so that an
        # outage beyond it need not last 30 s).
        self._max_behind_ms = max_behind_ms
        self._previous_end_pts: int | None = None
        self._session: int | None = None
        # Set by each place(): how far behind its arrival a pulled segment's session clock put
        # it, when that was beyond MAX_LAG_MS and the segment was re-anchored (0: it was not).
        self.overrun_ms = 0

    def place(self, arrival_ms: int, span: MediaSpan | None,
              session: int | None = None, captured_by_ms: int | None = None) -> SegmentTime:
        """``session``: the pulled camera's RTSP session (one connection) the segment came
        from, None for a pushed segment. ``captured_by_ms``: a pulled segment's bound on the
        end of its capture (rule 2; ignored for a pushed segment: one upload, no packets)."""
        floor = self._previous_end_ms
        same_session = session is not None and session == self._session
        self._session = session
        self.overrun_ms = 0
        anchor, bounded = arrival_ms, captured_by_ms is not None and session is not None
        if bounded and captured_by_ms is not None:
            # From the puller (a worker process is untrusted): clamped to the session bound.
            anchor = min(arrival_ms, max(captured_by_ms, arrival_ms - MAX_LAG_MS))
        if span is None:
            start = end = max(arrival_ms, floor or 0)
            self._previous_end_pts = None
        else:
            duration = span.duration_ms
            start, end = anchor - duration, anchor
            # A new session is a new anchor: its clock owes nothing to the last one's.
            if (floor is not None and self._previous_end_pts is not None
                    and (session is None or same_session)):
                jump = self._pts_delta_ms(self._previous_end_pts, span.first_pts,
                                          self._max_behind_ms)
                if jump is not None:
                    predicted_end = floor + jump + duration
                    if same_session and predicted_end < anchor - DRIFT_TOLERANCE_MS:
                        # A camera clock running slow (crystals drift by tens of ppm) would
                        # build up a lag over a session of days: slew up to 1/SLEW_DIVISOR of
                        # the time (a sub-frame gap before the segment, never a longer span).
                        # An Archiver behind (many %) is not hidden by it.
                        predicted_end += min(anchor - DRIFT_TOLERANCE_MS - predicted_end,
                                             max(1, (jump + duration) // SLEW_DIVISOR))
                    behind = MAX_LAG_MS if same_session else self._max_behind_ms
                    if arrival_ms - behind <= predicted_end <= arrival_ms + DRIFT_TOLERANCE_MS:
                        start, end = predicted_end - duration, predicted_end
                        if same_session and bounded and predicted_end > anchor + PULL_BACK_MS:
                            # The session was anchored late (its first packets were read
                            # late too) and the bound now shows it: pull back towards the
                            # bound, at most half a segment per segment (signed shorter than
                            # its video, never a gap, never an overlap, the error only shrinks).
                            end = max(anchor, predicted_end - duration // 2)
                    elif same_session and predicted_end < arrival_ms - behind:
                        self.overrun_ms = arrival_ms - predicted_end
            if floor is not None and start < floor:
                start = floor
                end = max(end, start)
            self._previous_end_pts = span.end_pts
        self._previous_end_ms = end
        return SegmentTime(start, end)

    @staticmethod
    def _pts_delta_ms(previous_end: int, first: int, max_behind_ms: int) -> int | None:
        """How far the stream clock moved between two segments, if it ran on (no reset)."""
        delta = (first - previous_end) % PTS_WRAP
        if delta > PTS_WRAP // 2:
            delta -= PTS_WRAP
        delta_ms = delta * 1000 // PTS_CLOCK_HZ
        return delta_ms if -DRIFT_TOLERANCE_MS <= delta_ms <= max_behind_ms else None


class CameraState(StrEnum):
    WAITING = "waiting"
    RECEIVING = "receiving"
    STALLED = "stalled"
    UNREACHABLE = "unreachable"
    AUTH_FAILED = "auth_failed"
    BAD_STREAM = "bad_stream"
    BAD_TIMESTAMPS = "bad_timestamps"
    BEHIND = "behind"


@dataclass
class _Health:
    last_arrival_ms: int | None = None
    last_end_ms: int | None = None
    typical_ms: int = DEFAULT_SEGMENT_MS
    # (arrival ms, bytes, lag ms: from the end of its capture to its archiving)
    recent: deque[tuple[int, int, int]] = field(default_factory=deque)
    lag_ms: int | None = None  # the last segment's
    gaps: int = 0
    refused: int = 0
    last_refusal: str = ""
    puller_problem: CameraState | None = None
    puller_message: str = ""
    puller_restarts: int = 0
    stream_faults: int = 0
    last_fault_ms: int | None = None
    fault_message: str = ""
    timestamp_jumps: int = 0
    last_jump_ms: int | None = None
    jump_message: str = ""
    overruns: int = 0
    last_overrun_ms: int | None = None
    overrun_message: str = ""
    # What the index held at start (state, message, when saved), until the camera is heard of.
    before_restart: tuple[CameraState, str, int] | None = None


@dataclass(frozen=True)
class CameraHealth:
    """What an admin (and a viewer) sees of a camera's feed."""

    state: CameraState
    last_segment_ms: int | None
    segments_last_minute: int
    bytes_last_minute: int
    gaps: int
    refused: int
    last_refusal: str
    puller_restarts: int
    message: str
    before_restart: bool = False  # the state is the one saved before the Archiver restarted
    stream_faults: int = 0  # RTSP: segments cut or packets dropped to keep the buffer bounded
    timestamp_jumps: int = 0  # segments whose timestamps jumped between two frames
    # From the end of a segment's capture to its archiving: the last segment's, and the most in
    # the last minute (what overload costs; over BEHIND_MS the camera is "behind").
    lag_ms: int | None = None
    max_lag_ms: int | None = None
    overruns: int = 0  # pulled segments re-anchored on arrival, their clock beyond MAX_LAG_MS

    @property
    def not_keeping_up(self) -> bool:
        """Archived over BEHIND_MS after capture in the last minute, whatever the state shown:
        a camera the Archiver fell far behind on also goes ``stalled`` between its late
        segments (state ``stalled`` comes first), and is no less a sign of overload."""
        return self.state == CameraState.BEHIND or (self.max_lag_ms or 0) > BEHIND_MS


# Buckets (seconds) of the capture-to-archive lag histogram of all cameras (/metrics).
LAG_BUCKETS_S = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class LagHistogram:
    """Cumulative counts per bucket of ``LAG_BUCKETS_S`` (then +Inf), and the sum (seconds)."""

    counts: tuple[int, ...]
    sum_s: float


@dataclass(frozen=True)
class SavedHealth:
    """What of a camera's health the index keeps across a restart."""

    camera: str
    state: CameraState
    message: str
    last_segment_ms: int | None
    saved_ms: int


class HealthBoard:
    """Per-camera feed health, updated by ingest and the RTSP pullers, read by the API, the
    metrics and the stall monitor. Kept in memory; ``to_save`` gives what changed for the index
    and ``restore`` brings it back at start, so that after a restart a camera shows its last
    known state (``before_restart``), not ``waiting``, until it is heard of again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cameras: dict[str, _Health] = {}
        self._saved: dict[str, SavedHealth] = {}
        self._lag_counts = [0] * (len(LAG_BUCKETS_S) + 1)  # per bucket, not cumulative
        self._lag_sum_ms = 0

    def lag_histogram(self) -> LagHistogram:
        with self._lock:
            counts, total = [], 0
            for count in self._lag_counts:
                total += count
                counts.append(total)
            return LagHistogram(tuple(counts), self._lag_sum_ms / 1000)

    def restore(self, saved: SavedHealth) -> None:
        with self._lock:
            health = self._get(saved.camera)
            health.last_arrival_ms = saved.last_segment_ms
            if saved.state in (CameraState.UNREACHABLE, CameraState.AUTH_FAILED) or (
                    saved.state == CameraState.STALLED and saved.message):
                health.puller_problem, health.puller_message = saved.state, saved.message
            health.before_restart = (saved.state, saved.message, saved.saved_ms)
            self._saved[saved.camera] = saved

    def to_save(self, cameras: list[str], now_ms: int, every_ms: int) -> list[SavedHealth]:
        """The cameras whose state or reason changed since last saved, or whose last segment
        time is more than ``every_ms`` newer (0: all that changed at all); marks them saved.
        The reason saved is the puller's or the stream's, not a sentence that changes each
        second ("no segment for N s"): a stalled camera is not written every tick."""
        out = []
        with self._lock:
            for camera in cameras:
                health = self._get(camera)
                if health.before_restart is not None:
                    continue  # nothing new since the start: what the index holds stands
                self._trim(health, now_ms)
                state = self._state(health, now_ms)
                reason = (health.fault_message if state == CameraState.BAD_STREAM
                          else health.jump_message if state == CameraState.BAD_TIMESTAMPS
                          else health.puller_message)
                last = health.last_arrival_ms
                before = self._saved.get(camera)
                if before is not None and (before.state, before.message) == (state, reason):
                    if last == before.last_segment_ms:
                        continue
                    if (before.last_segment_ms is not None and last is not None
                            and last - before.last_segment_ms < every_ms):
                        continue
                saved = SavedHealth(camera, state, reason, last, now_ms)
                self._saved[camera] = saved
                out.append(saved)
        return out

    def _get(self, camera: str) -> _Health:
        health = self._cameras.get(camera)
        if health is None:
            health = self._cameras[camera] = _Health()
        return health

    def segment_archived(self, camera: str, arrival_ms: int, size: int, time: SegmentTime,
                         jump_ms: int = 0, archived_ms: int | None = None,
                         overrun_ms: int = 0) -> None:
        """``jump_ms``: time the segment's timestamps skipped between two of its frames (not
        signed as video); any jump flags the camera. ``archived_ms``: when it was acknowledged
        (default: its arrival); the lag is from the end of its capture to then.
        ``overrun_ms``: how far behind its arrival its session clock was, when beyond
        ``MAX_LAG_MS`` (``SegmentClock.overrun_ms``)."""
        lag = max(0, (arrival_ms if archived_ms is None else archived_ms) - time.end_ms)
        with self._lock:
            health = self._get(camera)
            health.lag_ms = lag
            self._lag_sum_ms += lag
            self._lag_counts[bisect.bisect_left(LAG_BUCKETS_S, lag / 1000)] += 1
            if overrun_ms > 0:
                health.overruns += 1
                health.last_overrun_ms = arrival_ms
                health.overrun_message = (
                    f"its clock fell {_duration(overrun_ms)} behind (more than the "
                    f"{_duration(MAX_LAG_MS)} believed): a segment was placed at its arrival, "
                    f"{_iso(arrival_ms)}, not at its capture time")
            if jump_ms > 0:
                health.timestamp_jumps += 1
                health.last_jump_ms = arrival_ms
                health.jump_message = (
                    f"timestamps jumped by {_duration(jump_ms)} inside a segment; signed as the "
                    f"{(time.end_ms - time.start_ms) / 1000:.1f} s its frames cover")
            if health.last_end_ms is not None and time.start_ms - health.last_end_ms > GAP_TOLERANCE_MS:
                health.gaps += 1
            if time.end_ms > time.start_ms:
                health.typical_ms = time.end_ms - time.start_ms
            elif health.last_arrival_ms is not None and arrival_ms > health.last_arrival_ms:
                health.typical_ms = arrival_ms - health.last_arrival_ms
            health.last_arrival_ms, health.last_end_ms = arrival_ms, time.end_ms
            health.recent.append((arrival_ms, size, lag))
            health.puller_problem, health.puller_message = None, ""
            health.before_restart = None
            self._trim(health, arrival_ms)

    def segment_refused(self, camera: str, reason: str) -> None:
        """A segment of ``camera`` (a known camera: the board keeps no entry for arbitrary
        names) was not archived: counted and logged with its reason, since the camera itself
        is not told (ffmpeg does not read the answers to its uploads)."""
        with self._lock:
            health = self._get(camera)
            health.refused += 1
            health.last_refusal = reason
            count = health.refused
        log.warning("camera %s: segment refused (%d since start): %s", camera, count, reason)

    def puller_failed(self, camera: str, problem: CameraState, message: str) -> None:
        with self._lock:
            health = self._get(camera)
            health.puller_problem, health.puller_message = problem, message
            health.puller_restarts += 1
            health.before_restart = None

    def stream_fault(self, camera: str, message: str, now_ms: int) -> None:
        """An RTSP camera's stream broke the segmenter's bounds (a segment cut or packets
        dropped): the camera is ``bad_stream`` for ``FAULT_MEMORY_MS`` after the last one."""
        with self._lock:
            health = self._get(camera)
            health.stream_faults += 1
            health.last_fault_ms, health.fault_message = now_ms, message
            health.before_restart = None

    def forget(self, camera: str) -> None:
        with self._lock:
            self._cameras.pop(camera, None)
            self._saved.pop(camera, None)

    def health(self, camera: str, now_ms: int) -> CameraHealth:
        with self._lock:
            health = self._get(camera)
            self._trim(health, now_ms)
            state = self._state(health, now_ms)
            message = self._message(health, state, now_ms)
            if state == CameraState.BAD_STREAM:
                message = health.fault_message
            if health.before_restart is not None:
                saved_state, saved_message, saved_ms = health.before_restart
                message = (f"last known before the Archiver restarted (saved at "
                           f"{_iso(saved_ms)}): {saved_state.value}"
                           + (f" ({saved_message})" if saved_message else ""))
            return CameraHealth(
                state=state, last_segment_ms=health.last_arrival_ms,
                segments_last_minute=len(health.recent),
                bytes_last_minute=sum(size for _, size, _ in health.recent), gaps=health.gaps,
                refused=health.refused, last_refusal=health.last_refusal,
                puller_restarts=health.puller_restarts,
                message=message, before_restart=health.before_restart is not None,
                stream_faults=health.stream_faults, timestamp_jumps=health.timestamp_jumps,
                lag_ms=health.lag_ms, max_lag_ms=self._max_lag(health),
                overruns=health.overruns)

    @staticmethod
    def _message(health: _Health, state: CameraState, now_ms: int) -> str:
        """Why the camera is in ``state``: the puller's problem, why its timestamps are bad,
        or for a stalled camera how long it has been silent (and the last refusal: a camera
        whose uploads are all refused looks silent)."""
        if state == CameraState.BAD_TIMESTAMPS:
            return health.jump_message
        if state == CameraState.BEHIND:
            return HealthBoard._behind_message(health, now_ms)
        if (health.puller_problem is not None or state != CameraState.STALLED
                or health.last_arrival_ms is None):
            return health.puller_message
        message = (f"no segment archived for {(now_ms - health.last_arrival_ms) / 1000:.0f} s "
                   f"(one expected every {health.typical_ms / 1000:.0f} s)")
        if health.last_refusal:
            message += f"; last refused upload: {health.last_refusal}"
        return message

    @staticmethod
    def _state(health: _Health, now_ms: int) -> CameraState:
        if health.puller_problem is not None:
            return health.puller_problem
        if health.last_fault_ms is not None and now_ms - health.last_fault_ms <= FAULT_MEMORY_MS:
            return CameraState.BAD_STREAM
        if health.last_arrival_ms is None:
            return CameraState.WAITING
        stall_after = max(STALL_FACTOR * health.typical_ms, MIN_STALL_MS)
        if now_ms - health.last_arrival_ms > stall_after:
            return CameraState.STALLED
        if health.last_jump_ms is not None and now_ms - health.last_jump_ms <= JUMP_MEMORY_MS:
            return CameraState.BAD_TIMESTAMPS
        if HealthBoard._is_behind(health, now_ms):
            return CameraState.BEHIND
        return CameraState.RECEIVING

    @staticmethod
    def _max_lag(health: _Health) -> int | None:
        return max((lag for _, _, lag in health.recent), default=None)

    @staticmethod
    def _is_behind(health: _Health, now_ms: int) -> bool:
        """Behind: a segment of the last minute was archived over BEHIND_MS after its capture,
        or a pulled segment was re-anchored beyond MAX_LAG_MS recently. Kept for the minute,
        so that an Archiver catching up in seconds still shows (and alerts) that it was."""
        if health.last_overrun_ms is not None and now_ms - health.last_overrun_ms <= FAULT_MEMORY_MS:
            return True
        worst = HealthBoard._max_lag(health)
        return worst is not None and worst > BEHIND_MS

    @staticmethod
    def _behind_message(health: _Health, now_ms: int) -> str:
        worst = HealthBoard._max_lag(health) or 0
        message = (f"archived up to {worst / 1000:.1f} s after capture in the last minute (last "
                   f"segment {(health.lag_ms or 0) / 1000:.1f} s; over {BEHIND_MS / 1000:.0f} s "
                   "the Archiver is not keeping up: fewer cameras, or more cores)")
        if health.last_overrun_ms is not None and now_ms - health.last_overrun_ms <= FAULT_MEMORY_MS:
            message = health.overrun_message + "; " + message
        return message

    @staticmethod
    def _trim(health: _Health, now_ms: int) -> None:
        while health.recent and health.recent[0][0] < now_ms - RATE_WINDOW_MS:
            health.recent.popleft()


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration(ms: int) -> str:
    seconds = ms // 1000
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{ms / 1000:.1f} s"
