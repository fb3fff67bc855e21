"""The judge of bench/overload.py (issue 23, item 6): the rack's capture-time stamps survive as
bytes in H.264, and the time report finds a constant offset, a false gap and a real one.
Pure: the benchmark itself runs the real Archiver (docs/benchmarks.md, "Time under overload")."""

from __future__ import annotations

from bench.overload import SEGMENT_MS, SegmentTruth, time_report
from bench.rtsp_fanout import Stamp, read_stamps, stamp_nal


def test_a_stamp_reads_back_from_the_bytes_around_it() -> None:
    nal = stamp_nal(1234, 1_796_613_316_822, 1_796_613_316_900)
    assert nal[0] == 0x06 and b"\x00\x00" not in nal  # an SEI; no emulation prevention needed
    data = b"\x00\x00\x00\x01" + nal + b"\x00\x00\x00\x01\x65" + b"\x11" * 50
    assert read_stamps(data) == [Stamp(1234, 1_796_613_316_822, 1_796_613_316_900)]


def _segment(signed_start: int, signed_duration: int, first: int, last: int,
             late_ms: int = 0) -> SegmentTruth:
    """Frames ``first``..``last`` of a rack started at 0 ms (40 ms a frame)."""
    return SegmentTruth(signed_start, signed_duration, Stamp(first, first * 40, first * 40 + late_ms),
                        Stamp(last, last * 40, last * 40))


def test_the_time_report_finds_offsets_and_false_and_real_gaps() -> None:
    on_time = [_segment(50 * i * 40, 2000, 50 * i, 50 * i + 49) for i in range(3)]
    report = time_report(on_time)
    assert (report.max_error_ms, report.false_gaps, report.real_gaps) == (0, 0, 0)
    # The whole session signed 4.5 s late: 2.25 segments, a constant offset.
    late = [_segment(s.capture_ms + 4500, 2000, s.first.index, s.last.index) for s in on_time]
    report = time_report(late)
    assert report.max_error_ms == 4500 and report.max_error_segments == 4500 / SEGMENT_MS
    assert report.mean_error_ms == 4500
    # Consecutive frames, signed 3 s apart: a false gap; frames missing between two: a real one.
    gapped = [on_time[0], _segment(5000, 2000, 50, 99, late_ms=700),
              _segment(8000, 2000, 150, 199)]
    report = time_report(gapped)
    assert (report.false_gaps, report.real_gaps, report.worst_index) == (1, 1, 1)
    assert report.rack_late_max_ms == 700
