"""The edges of a range played across a change of Archiver (issue 22 follow-up): a segment at
a part's edge is played exactly when the single-Archiver play of that part's share includes
it. The Archivers' answer is their real time index (archiver.db.Database.manifests_from, the
query a playback stream is served from: a segment overlapping [from, to], both inclusive);
the client's side is the real planning (client.site.plan_parts, played_part) walked as
play, evidence, grants and the web page walk it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from archiver.db import Database, ManifestRow, SegmentRow
from client.session import NoRecording, PlacementView
from client.site import (
    HANDOVER_MS,
    Part,
    nothing_at_the_end,
    plan_parts,
    played_part,
    start_after,
)

SEGMENT_MS = 2_000
Played = list[tuple[str, int, int]]  # (Archiver, start, end) of each segment, in play order


def _archive(path: Path, camera: str, spans: list[tuple[int, int]]) -> Database:
    """An Archiver's index holding ``camera``'s segments [start, end), one per manifest, as
    archiver/archive.py records them."""
    db = Database(path)
    for seq, (start, end) in enumerate(spans):
        db.record_segments(
            [SegmentRow(camera, 0, seq, start, b"k" * 16, 10, b"d" * 32, "f", seq * 100, 100,
                        seq, end)],
            ManifestRow(camera, seq, "f", seq * 100 + 100, 10, b"h" * 32, start, end))
    return db


def _served(db: Database, camera: str, from_ms: int, to_ms: int) -> Played:
    """The segments an Archiver's playback stream of [from_ms, to_ms] carries; NoRecording
    when it has none there (archiver/services/playback.py answers 404 no_recording)."""
    played = [(str(db), seg.capture_ms, seg.end_ms)
              for row in db.manifests_from(camera, from_ms, to_ms)
              for seg in db.segments_of(camera, row.manifest_seq)]
    if not played:
        raise NoRecording(f"Camera '{camera}' has no recording in the requested range.")
    return played


def _play_across(dbs: Mapping[str, Database], camera: str, parts: list[Part]) -> Played:
    """What a multi-part play writes: each part's range from played_part, the next part
    starting after the video played so far (client/playback.py play_parts, viewer.py,
    across.py and the web backend walk the parts alike), a "no recording" answer for the
    instant --to after video that ended there meaning no video (nothing_at_the_end)."""
    played: Played = []
    previous_end: int | None = None
    for i in range(len(parts)):
        part = played_part(parts, i, previous_end)
        if part is None:
            continue
        try:
            got = [(part.archiver, s, e) for _, s, e in
                   _served(dbs[part.archiver], camera, part.from_ms, part.to_ms)]
        except NoRecording as exc:
            if nothing_at_the_end(exc, part, previous_end):
                continue
            raise
        played += got
        previous_end = max(e for _, _, e in got)
    return played


def _alone(dbs: Mapping[str, Database], camera: str, parts: list[Part]) -> Played:
    """Each part's share played alone, at its own Archiver."""
    return [(p.archiver, s, e) for p in parts
            for _, s, e in _served(dbs[p.archiver], camera, p.from_ms, p.to_ms)]


def _outcome(play: Callable[[], Played]) -> Played | str:
    """The video played, or the refusal the viewer sees."""
    try:
        return play()
    except NoRecording as exc:
        return str(exc)


def _edges(spans: list[tuple[int, int]]) -> set[int]:
    """Every instant at or next to a segment's start or end."""
    return {t + d for s, e in spans for t in (s, e) for d in (-1, 0, 1)}


@pytest.mark.parametrize(("handover_ms", "switch_gap_ms"), [(0, 200), (1_500, 0), (1_500, 300)])
def test_a_segment_at_an_edge_of_a_part_is_played_as_the_part_alone_plays_it(
        tmp_path: Path, handover_ms: int, switch_gap_ms: int) -> None:
    """A failover (the old Archiver died before the takeover: handover_ms 0) and a move the
    old Archiver noticed late (it recorded 1.5 s into the new one's time, its last segment
    ending where the new one's first starts, or 0.3 s before it). Every range whose ends fall
    at, 1 ms before or 1 ms after a segment's start or end: a range the directory cuts in two
    plays every segment the two Archivers' own answers give for it, each once, in time order;
    after a failover exactly the single plays of each part's share. (Before the fix, a range
    ending exactly where the old Archiver's video ended left out the new one's segment
    starting at --to.)"""
    camera = "gate"
    took = 10_700  # the directory's placement: a1 until it, a2 since it
    a1_end = took + handover_ms if handover_ms else 10_000
    a1 = [(s, min(s + SEGMENT_MS, a1_end)) for s in range(0, a1_end, SEGMENT_MS)]
    # The new Archiver's first segment, after the old one's last.
    a2_start = max(took + switch_gap_ms, a1_end + switch_gap_ms)
    a2 = [(s, s + SEGMENT_MS) for s in range(a2_start, a2_start + 5 * SEGMENT_MS, SEGMENT_MS)]
    dbs = {"a1": _archive(tmp_path / "a1.sqlite3", camera, a1),
           "a2": _archive(tmp_path / "a2.sqlite3", camera, a2)}
    placements = [PlacementView("a1", "https://a1", 0, took),
                  PlacementView("a2", "https://a2", took, None)]
    assert a2[-1][1] < took + HANDOVER_MS  # the old Archiver's part reaches every range's end
    across = 0
    for from_ms, to_ms in itertools.product(sorted(_edges(a1)), sorted(_edges(a1 + a2))):
        if from_ms > to_ms or from_ms < 0:
            continue
        parts = plan_parts(placements, "a1", from_ms, to_ms)
        played = _outcome(lambda p=parts: _play_across(dbs, camera, p))
        where = f"range {from_ms} .. {to_ms}: {parts}"
        if len(parts) == 1 or not handover_ms:
            # A share with no video at all is refused alone and across alike (a range ending
            # in the gap of a failover: the new Archiver has nothing in its share).
            assert played == _outcome(lambda p=parts: _alone(dbs, camera, p)), where
        if len(parts) == 1 or isinstance(played, str):
            continue
        # Every segment either Archiver answers for the range (both ends inclusive: one
        # starting at --to, or 1 ms before it, is in), each once, in time order.
        answers = {name: _outcome(lambda d=db: _served(d, camera, from_ms, to_ms))
                   for name, db in dbs.items()}
        recorded = sorted((name, s, e) for name, got in answers.items()
                          if not isinstance(got, str) for _, s, e in got)
        assert sorted(played, key=lambda x: x[1]) == played, where
        assert sorted(played) == recorded, where
        across += 1
    assert across > 100


def test_the_next_part_starts_after_the_video_played_but_never_past_the_range_end() -> None:
    """start_after, the rule every multi-part path (play, evidence, grants, the web page)
    cuts the next Archiver's share by: just after the played video's signed end, or --to
    itself when that video ended exactly there; past --to only when it reached beyond."""
    assert start_after(12_000, 20_000) == 12_001
    assert start_after(20_000, 20_000) == 20_000
    assert start_after(20_001, 20_000) == 20_002  # nothing left: played_part gives None
    parts = [Part("a1", 0, 10_699, True), Part("a2", 10_700, 12_200, False)]
    assert played_part(parts, 1, 12_200) == Part("a2", 12_200, 12_200, False)
    assert played_part(parts, 1, 12_201) is None
    assert played_part(parts, 0, None) == Part("a1", 0, 12_200, True)
