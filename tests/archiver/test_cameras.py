"""Segment time (archiver/mpegts.py, archiver/cameras.py): the span of the video a segment holds,
read from its own timestamps and judged by ffprobe; placed on the wall clock by the documented
rule (docs/cameras.md)."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import pytest

from archiver.cameras import (
    DRIFT_TOLERANCE_MS,
    MAX_BEHIND_MS,
    MAX_LAG_MS,
    CameraState,
    HealthBoard,
    SegmentClock,
    SegmentTime,
)
from archiver.mpegts import PTS_WRAP, MediaSpan, media_span
from archiver.rtsp import CaptureBound
from archiver.settings import Settings
from keyservice.errors import UsageError
from tests.fixtures.camera import requires_ffmpeg


def _segments(tmp_path: Path, *, bframes: bool, codec: str = "libx264") -> list[Path]:
    out = tmp_path / "hls"
    out.mkdir()
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
         "testsrc=size=160x120:rate=25", "-t", "7", "-c:v", codec,
         *(["-bf", "3"] if bframes else ["-bf", "0"]), "-g", "25", "-pix_fmt", "yuv420p",
         "-f", "hls", "-hls_time", "2", "-hls_list_size", "0", str(out / "index.m3u8")],
        check=True)
    return sorted(out.glob("*.ts"), key=lambda p: int(p.stem.removeprefix("index")))


def _ffprobe_span(path: Path) -> tuple[int, int]:
    """(min pts, max pts + one frame) in 90 kHz ticks, as ffprobe reads the packets."""
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                          "packet=pts,duration", "-of", "csv=p=0", str(path)],
                         capture_output=True, text=True, check=True).stdout
    rows = [tuple(int(v) for v in line.split(",")[:2]) for line in out.split() if line]
    return min(p for p, _ in rows), max(p + d for p, d in rows)


@requires_ffmpeg
@pytest.mark.parametrize("codec", ["libx264", "libx265"])
@pytest.mark.parametrize("bframes", [False, True])
def test_media_span_matches_ffprobe(tmp_path: Path, bframes: bool, codec: str) -> None:
    segments = _segments(tmp_path, bframes=bframes, codec=codec)
    assert len(segments) >= 3
    for path in segments:
        span = media_span(path.read_bytes())
        assert span is not None
        assert (span.first_pts, span.end_pts) == _ffprobe_span(path), path.name


def test_media_span_of_what_is_not_timed_video() -> None:
    assert media_span(b"") is None
    assert media_span(b"not a transport stream" * 100) is None
    assert media_span(b"\x47" + bytes(187)) is None  # a TS packet without a PES


def test_media_span_across_the_33_bit_wrap() -> None:
    assert MediaSpan(PTS_WRAP - 90_000, 90_000).duration_ms == 2000


def _span(first_s: float, seconds: float = 2.0) -> MediaSpan:
    return MediaSpan(int(first_s * 90_000) % PTS_WRAP, int((first_s + seconds) * 90_000) % PTS_WRAP)


def test_consecutive_segments_are_contiguous_despite_upload_jitter() -> None:
    clock = SegmentClock()
    first = clock.place(10_000, _span(0))
    assert first == SegmentTime(8_000, 10_000)  # anchored on arrival
    # Arrivals jitter by tens of ms; the stream's own clock decides.
    assert clock.place(12_040, _span(2)) == SegmentTime(10_000, 12_000)
    assert clock.place(13_990, _span(4)) == SegmentTime(12_000, 14_000)


def test_a_new_stream_or_drift_is_re_anchored_on_arrival() -> None:
    clock = SegmentClock()
    clock.place(10_000, _span(0))
    # The camera restarted: its clock jumped back. Placed by arrival.
    assert clock.place(30_000, _span(0.5)) == SegmentTime(28_000, 30_000)
    # Continuous stream, late by up to 30 s (buffered upload): the stream's clock is kept.
    assert clock.place(40_000, _span(2.5)) == SegmentTime(30_000, 32_000)
    # Further behind than that (a slow camera clock, long drift): re-anchored on arrival.
    assert clock.place(70_000, _span(4.5)) == SegmentTime(68_000, 70_000)


def test_the_pushed_lateness_bound_is_a_setting_of_30_s_by_default() -> None:
    """``serve --max-behind-s`` (tests shorten it instead of waiting out 30 s): the same
    continuous stream, 8 s late, keeps its clock under the default and is re-anchored under a
    6 s bound."""
    assert Settings(data_dir=Path("unused")).max_behind_s * 1000 == MAX_BEHIND_MS == 30_000
    for bound, expected in ((MAX_BEHIND_MS, SegmentTime(10_000, 12_000)),
                            (6_000, SegmentTime(18_000, 20_000))):
        clock = SegmentClock(max_behind_ms=bound)
        clock.place(10_000, _span(0))
        assert clock.place(20_000, _span(2)) == expected, bound
    with pytest.raises(UsageError, match="--max-behind-s"):
        Settings(data_dir=Path("unused"), max_behind_s=0)


def test_a_burst_is_laid_over_its_arrival_never_in_the_future() -> None:
    clock = SegmentClock()
    times = [clock.place(10_000 + 5 * i, _span(2 * i)) for i in range(4)]
    assert times[0] == SegmentTime(8_000, 10_000)
    for before, after in itertools.pairwise(times):
        assert after.start_ms == before.end_ms  # never overlapping
    assert all(t.end_ms <= 10_000 + 5 * 3 for t in times)  # never after arrival


def test_segments_without_timestamps_are_points_in_order() -> None:
    clock = SegmentClock(previous_end_ms=50_000)
    assert clock.place(40_000, None) == SegmentTime(50_000, 50_000)  # never before the last
    assert clock.place(60_000, None) == SegmentTime(60_000, 60_000)


def test_health_states_and_gaps() -> None:
    board = HealthBoard()
    assert board.health("cam", 0).state == CameraState.WAITING
    board.segment_archived("cam", 10_000, 100, SegmentTime(8_000, 10_000))
    board.segment_archived("cam", 12_000, 100, SegmentTime(10_000, 12_000))
    health = board.health("cam", 12_500)
    assert health.state == CameraState.RECEIVING and health.segments_last_minute == 2
    assert health.bytes_last_minute == 200 and health.gaps == 0
    assert board.health("cam", 12_000 + 6_001).state == CameraState.STALLED  # 3 x 2 s
    board.segment_archived("cam", 30_000, 100, SegmentTime(28_000, 30_000))
    assert board.health("cam", 30_000).gaps == 1
    assert board.health("cam", 30_000 + 61_000).segments_last_minute == 0
    board.puller_failed("cam", CameraState.AUTH_FAILED, "401 Unauthorized")
    health = board.health("cam", 92_000)
    assert health.state == CameraState.AUTH_FAILED and health.puller_restarts == 1
    board.segment_archived("cam", 93_000, 100, SegmentTime(91_000, 93_000))
    assert board.health("cam", 93_000).state == CameraState.RECEIVING


@requires_ffmpeg
def test_a_timestamp_jump_inside_a_segment_counts_as_one_frame(tmp_path: Path) -> None:
    """Issue 19: two ffmpeg files of 1 s each, the second moved by 10 h, as one segment: its
    span is the 2 s its 50 frames cover, and the jump is reported; backwards too."""
    def ts(name: str, offset_s: int) -> bytes:
        path = tmp_path / name
        subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-f",
                        "lavfi", "-i", "testsrc=size=160x120:rate=25", "-t", "1", "-c:v",
                        "libx264", "-bf", "0", "-pix_fmt", "yuv420p", "-output_ts_offset",
                        str(offset_s), "-f", "mpegts", str(path)], check=True)
        return path.read_bytes()

    early, late = ts("early.ts", 0), ts("late.ts", 36_000)
    for data in (early + late, late + early):
        span = media_span(data)
        assert span is not None and span.frames == 50
        assert span.duration_ms == 2000
        assert span.jump_ms == 36_000_000 - 1000  # 10 h less the 1 s the early frames cover
    plain = media_span(early)
    assert plain is not None and plain.jump_ms == 0 and plain.duration_ms == 1000


def test_a_camera_whose_timestamps_jumped_is_flagged_for_a_minute() -> None:
    board = HealthBoard()
    board.segment_archived("cam", 10_000, 100, SegmentTime(8_000, 10_000), jump_ms=3_600_000)
    health = board.health("cam", 10_500)
    assert health.state == CameraState.BAD_TIMESTAMPS and health.timestamp_jumps == 1
    assert "jumped by 1 h 00 min" in health.message and "2.0 s" in health.message
    board.segment_archived("cam", 12_000, 100, SegmentTime(10_000, 12_000))
    assert board.health("cam", 12_000).state == CameraState.BAD_TIMESTAMPS
    for arrival in range(14_000, 72_000, 2000):
        board.segment_archived("cam", arrival, 100, SegmentTime(arrival - 2000, arrival))
    health = board.health("cam", 72_000)
    assert health.state == CameraState.RECEIVING and health.timestamp_jumps == 1


def test_a_pulled_session_that_falls_behind_keeps_its_capture_times() -> None:
    """Issue 23: an Archiver that reads a pulled camera's session 40 s late (overload, a
    pause). Before: the first late segment was re-placed at its arrival, a false 30 s+ gap,
    and the backlog squeezed onto the arrival times. After: the session's clock is kept."""
    clock = SegmentClock()
    assert clock.place(10_000, _span(0), session=7) == SegmentTime(8_000, 10_000)
    assert clock.place(12_000, _span(2), session=7) == SegmentTime(10_000, 12_000)
    # Frozen for 40 s: the next ten segments (captured 12..32 s) are read at 52 s, in a burst.
    times = [clock.place(52_000 + 50 * i, _span(4 + 2 * i), session=7) for i in range(10)]
    # At their capture times (to the 0.1 % slew for a slow camera clock: 2 ms a segment).
    for i, placed in enumerate(times):
        assert placed.end_ms - placed.start_ms == 2000
        assert 0 <= placed.start_ms - (12_000 + 2000 * i) <= 2 * (i + 1)
    assert clock.overrun_ms == 0
    # Caught up: back on time, still contiguous.
    after = clock.place(54_000, _span(24), session=7)
    assert after.start_ms - times[-1].end_ms <= 2 and after.end_ms - 34_000 <= 22


def test_a_slow_camera_clock_does_not_build_up_a_lag() -> None:
    """A pulled camera whose clock runs 0.05 % slow, over a day-long session: its placement
    slews back towards arrival, so the lag stays within the drift tolerance (+ a segment's
    slew), and the camera is never "behind" for it; segments stay contiguous to a frame."""
    clock = SegmentClock()
    board = HealthBoard()
    previous = None
    for i in range(43_200):  # 24 h of 2 s segments
        arrival = 10_000 + 2001 * i  # 2 s of its clock take 2.001 s of ours: 0.05 % slow
        placed = clock.place(arrival, _span(2 * i), session=3)
        if previous is not None:
            assert 0 <= placed.start_ms - previous.end_ms <= 2
        previous = placed
        assert arrival - placed.end_ms <= DRIFT_TOLERANCE_MS + 2
    board.segment_archived("cam", arrival, 100, placed)
    assert board.health("cam", arrival).state == CameraState.RECEIVING


def test_a_pushed_stream_or_a_new_session_is_still_bounded_by_30_s() -> None:
    """What a pulled session may do, a pushed stream (separate uploads: its clock running on
    across silence is the camera's claim) or a new connection may not: the outage stays a gap."""
    for session in (None, 8):
        clock = SegmentClock()
        clock.place(10_000, _span(0), session=7 if session else None)
        assert clock.place(52_000, _span(2), session=session) == SegmentTime(50_000, 52_000)
        assert clock.overrun_ms == 0


def test_a_pulled_clock_far_behind_is_not_believed() -> None:
    """A hostile camera sends frames faster than its timestamps say, to place video far in
    the past: beyond MAX_LAG_MS the segment is placed at its arrival and counted (``behind``),
    never hours in the past, never overlapping."""
    clock = SegmentClock()
    clock.place(10_000, _span(0), session=1)
    late = 10_000 + MAX_LAG_MS + 30_000  # read 2 min 30 s after a continuous 2 s of video
    assert clock.place(late, _span(2), session=1) == SegmentTime(late - 2000, late)
    assert late - 12_000 - 5 <= clock.overrun_ms <= late - 12_000  # (less a 2 ms slew)
    assert clock.place(late + 2000, _span(4), session=1) == SegmentTime(late, late + 2000)
    assert clock.overrun_ms == 0
    # Within the bound it is believed again; and still never in the future.
    assert clock.place(late + 3500, _span(6), session=1) == SegmentTime(late + 2000, late + 4000)
    ahead = clock.place(late + 3600, _span(8), session=1)
    assert ahead.start_ms == late + 4000 and ahead.end_ms <= late + 3600 + DRIFT_TOLERANCE_MS


def test_a_camera_behind_is_flagged_with_its_lag() -> None:
    board = HealthBoard()
    board.segment_archived("cam", 10_000, 100, SegmentTime(8_000, 10_000), archived_ms=10_050)
    health = board.health("cam", 10_100)
    assert health.state == CameraState.RECEIVING and health.lag_ms == 50
    # Archived 40 s after capture (the backlog of a frozen Archiver), then caught up.
    board.segment_archived("cam", 52_000, 100, SegmentTime(10_000, 12_000), archived_ms=52_010)
    board.segment_archived("cam", 54_000, 100, SegmentTime(52_000, 54_000), archived_ms=54_020)
    health = board.health("cam", 54_100)
    assert health.state == CameraState.BEHIND
    assert (health.lag_ms, health.max_lag_ms) == (20, 40_010)
    assert "archived up to 40.0 s after capture" in health.message
    histogram = board.lag_histogram()
    assert histogram.counts[-1] == 3 and histogram.counts[0] == 2  # 2 under 0.25 s
    # A minute later without lag: receiving again.
    for arrival in range(56_000, 116_000, 2000):
        board.segment_archived("cam", arrival, 100, SegmentTime(arrival - 2000, arrival))
    assert board.health("cam", 116_000).state == CameraState.RECEIVING
    # A clock beyond the bound: behind, with the reason, for a minute.
    board.segment_archived("cam", 200_000, 100, SegmentTime(198_000, 200_000),
                           overrun_ms=150_000)
    health = board.health("cam", 200_000)
    assert health.state == CameraState.BEHIND and health.overruns == 1
    assert "fell 2 min 30 s behind" in health.message and "not at its capture time" in health.message


def _overloaded_puller(frames: int, delay_s: float, growth: float
                       ) -> list[tuple[float, float, float | None]]:
    """A pulled session of ``frames`` frames at 25 fps, captured from wall time 10 s, read by a
    puller that falls behind: frame k is read ``delay_s + growth * k`` s after its capture.
    Segments close at each second keyframe (every 2 s of video): per segment (first pts in
    seconds, arrival = when the frame that closed it was read, the CaptureBound then)."""
    bound, out, first = CaptureBound(), [], 0.0
    for k in range(1, frames + 1):
        pts = k * 0.04
        read_at = 10.0 + pts + delay_s + growth * k
        bound.observe(pts, read_at)
        if k % 50 == 0:
            out.append((first, read_at, bound.captured_by(pts)))
            first = pts
    return out


def test_a_session_read_late_from_its_start_is_placed_at_its_capture_times() -> None:
    """Issue 23, a real overload (docs/benchmarks.md, "Time under overload"): 800 cameras
    connect to a 2-core Archiver at once; a puller falling behind reads a session's first
    segment seconds after its capture. Before: that segment was anchored on its arrival and the
    whole session followed it, 9.8 s (4.9 segments) after its capture. After: anchored on the
    CaptureBound of its packets (read - pts, least while the puller still kept up), every
    segment is at its capture time to within the first packets' delay."""
    segments = _overloaded_puller(frames=500, delay_s=0.05, growth=0.1)  # 50 s behind at the end
    before, after = SegmentClock(), SegmentClock()
    for first, arrival, captured_by in segments:
        true_start = round((10.0 + first) * 1000)
        span = _span(first)
        old = before.place(round(arrival * 1000), span, session=5)
        assert captured_by is not None
        new = after.place(round(arrival * 1000), span, session=5, captured_by_ms=round(
            captured_by * 1000))
        assert 0 <= new.start_ms - true_start <= 200, (new, true_start)  # the first read: 0.15 s
        assert old.start_ms - true_start > 5000  # the 5 s the first segment was read late
        assert after.overrun_ms == 0


def test_the_capture_bound_is_clamped_to_the_arrival_and_the_session_bound() -> None:
    """From a worker process (untrusted) or a hostile camera clock: never after its arrival,
    never more than MAX_LAG_MS before it; a pushed segment has none."""
    clock = SegmentClock()
    assert clock.place(10_000, _span(0), session=1, captured_by_ms=99_000) == SegmentTime(
        8_000, 10_000)
    clock = SegmentClock()
    far = clock.place(MAX_LAG_MS * 10, _span(0), session=1, captured_by_ms=0)
    assert far.end_ms == MAX_LAG_MS * 9
    clock = SegmentClock()
    assert clock.place(10_000, _span(0), captured_by_ms=1_000) == SegmentTime(8_000, 10_000)


def test_the_capture_bound_stays_an_upper_bound_for_a_slow_camera_clock() -> None:
    """A camera clock 0.05 % slow makes the true offset grow; the bound ages by 0.1 % of the
    time, so it never claims a capture earlier than the real one, and stays within the
    reading delay (+ 0.1 %) of it."""
    bound = CaptureBound()
    for k in range(0, 36_000):  # an hour of frames, 10 a second
        capture = 10.0 + k * 0.1
        pts = k * 0.1 * (1 - 0.0005)
        bound.observe(pts, capture + 0.02)
        estimate = bound.captured_by(pts)
        assert estimate is not None and capture <= estimate <= capture + 0.02 + 0.001 * 0.1


def test_a_session_anchored_late_converges_on_its_capture_times() -> None:
    """A puller already 3 s late from the session's first packet (so its first bound is 3 s
    late too), which then catches up: once the bound shows the session placed late, segments
    are pulled back (no gap, no overlap) until they are at their capture times; the error
    never grows."""
    clock = SegmentClock()
    bound, first, placed, errors, last_read = CaptureBound(), 0.0, [], [], 0.0
    for k in range(1, 751):  # 30 s of frames
        pts = k * 0.04
        # The first segment entirely read 3 s late; then the backlog in a burst (reads in
        # order: never before the previous one), on time from frame ~125 on.
        read_at = 10.0 + pts + 3.0 if k <= 50 else max(last_read, 10.0 + pts + 0.02)
        last_read = read_at
        bound.observe(pts, read_at)
        if k % 50 == 0:
            captured_by = bound.captured_by(pts)
            assert captured_by is not None
            placed.append(clock.place(round(read_at * 1000), _span(first), session=2,
                                      captured_by_ms=round(captured_by * 1000)))
            errors.append(placed[-1].end_ms - round((10.0 + pts) * 1000))
            first = pts
    assert 2900 <= errors[0] <= 3100, errors  # nothing better was known then
    for before, after in itertools.pairwise(placed):
        assert after.start_ms == before.end_ms  # no gap, no overlap
        assert after.end_ms >= after.start_ms  # (a burst: never after its arrival + 1 s)
    assert all(b >= a for a, b in itertools.pairwise(errors[::-1]))  # the error only shrinks
    assert 0 <= errors[-1] <= 100, errors


def test_a_camera_far_behind_counts_against_admission_even_when_shown_stalled() -> None:
    """Measured at 800 cameras on 2 cores (docs/benchmarks.md, "Time under overload"): far
    behind, cameras go ``stalled`` between their late segments (that state comes first), none
    showed ``behind``, and the Archiver took one more camera. Admission asks
    ``not_keeping_up``: a lag over BEHIND_MS in the last minute, whatever the state shown; a
    camera that is merely silent does not count."""
    board = HealthBoard()
    board.segment_archived("far", 52_000, 100, SegmentTime(10_000, 12_000), archived_ms=52_010)
    board.segment_archived("quiet", 52_000, 100, SegmentTime(50_000, 52_000), archived_ms=52_010)
    far, quiet = board.health("far", 60_000), board.health("quiet", 60_000)
    assert far.state == quiet.state == CameraState.STALLED
    assert far.not_keeping_up and not quiet.not_keeping_up


def test_a_session_behind_for_long_does_not_drift_late() -> None:
    """Measured (docs/benchmarks.md, "Time under overload", --early): before, a session more
    than 1 s behind its arrival was slewed towards arrival by 0.1 % of the time (meant for a slow
    camera clock), so a camera behind for long drifted late (2 ms a segment: 3.6 s an hour).
    Now it slews towards its capture bound, which an Archiver falling behind does not move."""
    before, after = SegmentClock(), SegmentClock()
    for i in range(1800):  # an hour of 2 s segments, read 30 s late from the second on
        capture_end = 12_000 + 2000 * i
        arrival = capture_end + (30_000 if i else 20)
        old = before.place(arrival, _span(2 * i), session=4)
        new = after.place(arrival, _span(2 * i), session=4, captured_by_ms=capture_end + 20)
        assert 0 <= new.end_ms - capture_end <= 20
    assert old.end_ms - capture_end > 3000  # before: 3.6 s late after an hour
