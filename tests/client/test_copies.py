"""A redundant camera's copies, as the viewer plays them (issue 22, item 3; client/copies.py):
which copy plays which stretch, and which verified segments are written at a switch. Pure: the
end-to-end test with real Archivers is tests/archiver/test_redundant.py."""

from __future__ import annotations

from client.copies import Selection, Stretch, plan_stretches
from client.session import PlacementView
from client.site import Part, plan_parts
from keyservice.format import DataStream
from keyservice.reader import SegmentPlaintext

COPIES = (("a1", "https://a1"), ("a2", "https://a2"))


def test_a_redundant_placement_plays_the_entry_s_copy_else_the_first() -> None:
    placed = [PlacementView("a1", "https://a1", 0, None, COPIES)]
    assert plan_parts(placed, "a2", 10, 20) == [Part("a2", 10, 20, True, "https://a2", COPIES)]
    assert plan_parts(placed, "a3", 10, 20) == [Part("a1", 10, 20, False, "https://a1", COPIES)]
    # One copy only (an Archiver from before issue 22 lists none): as before.
    one = [PlacementView("a1", "https://a1", 0, None, (("a1", "https://a1"),))]
    assert plan_parts(one, "a2", 10, 20) == [Part("a1", 10, 20, False, "https://a1")]


def test_each_gap_of_the_copy_played_comes_from_the_first_other_copy_that_has_video_there(
        ) -> None:
    part = Part("a1", 0, 100_000, True, "https://a1", COPIES)
    a2 = Part("a2", 20_000, 40_000, False, "https://a2", COPIES)
    assert plan_stretches(part, {"a1": [(20_000, 40_000)], "a2": []}) == [
        Stretch(Part("a1", 0, 20_000, True, "https://a1", COPIES)),
        Stretch(a2, fills="a1", hole=(20_000, 40_000)),
        Stretch(Part("a1", 40_000, 100_000, True, "https://a1", COPIES))]
    # A gap at the start is filled; one the other copy lacks too stays in a1's stretch (its
    # stream says it); an Archiver that could not be asked (absent) fills nothing.
    stretches = plan_stretches(part, {"a1": [(0, 10_000), (50_000, 60_000)],
                                      "a2": [(45_000, 70_000)]})
    assert [(s.part.archiver, s.part.from_ms, s.part.to_ms, s.fills) for s in stretches] == [
        ("a2", 0, 10_000, "a1"), ("a1", 10_000, 100_000, None)]
    assert plan_stretches(part, {"a1": [(20_000, 40_000)]}) == [Stretch(part)]
    # No gap: one stretch, the whole part.
    assert plan_stretches(part, {"a1": [], "a2": []}) == [Stretch(part)]


def _segment(start: int, end: int) -> SegmentPlaintext:
    return SegmentPlaintext("cam", DataStream(0), 0, start, f"{start}".encode(),
                            duration_ms=end - start)


def test_a_segment_of_the_next_copy_that_repeats_video_already_written_is_left_out() -> None:
    written: list[bytes] = []
    selection = Selection(written.append)
    for start, end in ((0, 2_000), (2_000, 4_000)):  # a1's copy
        selection.write(f"{start}".encode())
        selection.segment(_segment(start, end))
    selection.start()
    # a2's segments are cut elsewhere: the first overlaps a1's last by 1 s (left out whole);
    # the next starts 1 s after a1's end (a hole, said at the switch); one that starts within
    # the two clocks' tolerance of the end is the same keyframe, kept.
    for start, end in ((3_000, 5_000), (5_000, 7_000), (7_000, 9_000)):
        selection.write(f"{start}".encode())
        selection.segment(_segment(start, end))
    assert (selection.kept, selection.left_out, selection.first_ms) == (2, 1, 5_000)
    selection.start()
    selection.write(b"8700")
    selection.segment(_segment(8_700, 10_000))
    assert written == [b"0", b"2000", b"5000", b"7000", b"8700"]
    assert (selection.kept, selection.left_out, selection.written_end) == (1, 0, 10_000)
