"""Playing a redundant camera (issue 22, item 3): several Archivers record it at once, each
under its own chains and signature, so each holds a *copy* of its range.

The viewer plays one copy (the Archiver it asked, if it holds one, else the first listed) and
fills that copy's gaps (the Archiver was down, its link to the camera failed) from another copy.
Each stretch is its own stream, asked of the Archiver that recorded it and verified against
that Archiver's own signer; nothing of one copy is ever vouched for by another's signature.

The copies' segments do not line up: each Archiver cuts its own at keyframes. At a switch a
segment of the next copy that starts before the end of the video already written (by more
than ``EDGE_TOLERANCE_MS``, the two Archivers' clocks' difference allowed) repeats frames the
viewer has, and is left out whole (a verified segment is never cut). So a switch either meets
exactly, or leaves a hole shorter than one segment, which is said at its signed edges.

Planning asks the Archivers' gap lists (``/gaps``: their indexes, unsigned); they only choose
which stream to ask for. What is written, and every edge reported, comes from the signed
segment times of the verified streams.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from client.site import Part, Site
from keyservice.errors import ArchiverFailed, ArchiverUnreachable
from keyservice.reader import SegmentPlaintext

__all__ = ["EDGE_TOLERANCE_MS", "Selection", "Stretch", "plan_stretches", "survey"]

# Two copies' times of the same keyframe differ by the two Archivers' arrival clocks (each
# anchors the camera's stream time to when it received it): less than this on one site (NTP),
# and less than any segment's overlap with the previous copy's video (segments are >= 1 s).
EDGE_TOLERANCE_MS = 500


@dataclass(frozen=True)
class Stretch:
    """A stretch of a part played from one copy: ``part`` names the Archiver and the range
    asked of it; ``fills`` is the copy whose gap it fills (None: the copy played)."""

    part: Part
    fills: str | None = None
    hole: tuple[int, int] | None = None  # the gap being filled, as the played copy's index says


def survey(site: Site, camera: str,
           part: Part) -> tuple[Part, dict[str, list[tuple[int, int]]], list[str]]:
    """Each copy's gaps in ``part`` (its Archiver's index, asked there: logged in and checked
    as any followed Archiver is), the part to play (the copy asked for, or the first that
    answers), and one line per copy that could not be asked (it is then not used)."""
    gaps: dict[str, list[tuple[int, int]]] = {}
    unreachable: list[str] = []
    for name, url in part.copies:
        copy = Part(name, part.from_ms, part.to_ms, name == site.entry_name, url, part.copies)
        try:
            session, _ = site.reach(copy)
            gaps[name] = session.gaps(camera, part.from_ms, part.to_ms)
        except (ArchiverUnreachable, ArchiverFailed) as exc:
            # Down (or failing): its copy is not played, the others' are. A refusal (an
            # untrusted signer, a revoked viewer) is no reason to go elsewhere: it ends here.
            unreachable.append(f"the copy of Archiver {name} is not used: {exc}")
    if part.archiver not in gaps:
        reachable = [name for name, _ in part.copies if name in gaps]
        if reachable:
            urls = dict(part.copies)
            part = replace(part, archiver=reachable[0], url=urls[reachable[0]],
                           entry=reachable[0] == site.entry_name)
    return part, gaps, unreachable


def _covers(gaps: Sequence[tuple[int, int]], from_ms: int, to_ms: int) -> bool:
    """Whether ``gaps`` (of one copy) hold all of [from_ms, to_ms]: it has nothing there."""
    return any(a <= from_ms and b >= to_ms for a, b in gaps)


def plan_stretches(part: Part, gaps: Mapping[str, Sequence[tuple[int, int]]]) -> list[Stretch]:
    """The stretches of a redundant ``part``, oldest first: ``part.archiver``'s copy, and each
    of its gaps (``gaps[part.archiver]``) from the first other copy that has video there (by
    ``gaps`` of the others; an Archiver missing from ``gaps`` is not asked: unreachable). A gap
    no other copy has video in stays a gap. Pure: the caller asks the Archivers."""
    urls = dict(part.copies)
    mine = gaps.get(part.archiver, [])
    others = [name for name, _ in part.copies if name != part.archiver and name in gaps]
    stretches: list[Stretch] = []
    cursor = part.from_ms
    for a, b in sorted(mine):
        a, b = max(a, part.from_ms), min(b, part.to_ms)
        if a > b:
            continue
        donor = next((o for o in others if not _covers(gaps[o], a, b)), None)
        if donor is None:
            continue  # no copy has it: a gap of the copy played, said by its stream
        if a > cursor:
            stretches.append(Stretch(_at(part, part.archiver, urls, cursor, a)))
        stretches.append(Stretch(_at(part, donor, urls, a, b), fills=part.archiver,
                                 hole=(a, b)))
        cursor = b
    if cursor < part.to_ms or not stretches:
        stretches.append(Stretch(_at(part, part.archiver, urls, cursor, part.to_ms)))
    return stretches


def _at(part: Part, archiver: str, urls: Mapping[str, str | None], from_ms: int,
        to_ms: int) -> Part:
    return Part(archiver, from_ms, to_ms, part.entry and archiver == part.archiver,
                urls.get(archiver), part.copies)


@dataclass
class Selection:
    """Writes the verified segments of the stretches in order, leaving out a segment that
    starts before the end of the video already written (another copy's recording of frames
    already given). ``write``/``segment`` are a stretch's output and ``on_segment``: the
    player writes a released segment, then tells its signed times."""

    sink: Callable[[bytes], None]
    written_end: int | None = None  # signed end of the last segment written, any copy
    pending: bytes | None = None
    # Of the stretch being played: what was written (signed times) and left out.
    kept: int = 0
    kept_bytes: int = 0
    first_ms: int | None = None
    last_ms: int | None = None
    left_out: int = 0
    left_out_ms: list[tuple[int, int]] = field(default_factory=list)

    def start(self) -> None:
        """A new stretch: its own counts."""
        self.kept = self.kept_bytes = self.left_out = 0
        self.first_ms = self.last_ms = None
        self.left_out_ms = []

    def write(self, data: bytes) -> None:
        """A verified segment's bytes, held until its times say whether it repeats video."""
        self.pending = data

    def segment(self, event: SegmentPlaintext) -> None:
        """The segment just written: keep it, or leave it out if it overlaps what was given."""
        data, self.pending = self.pending, None
        if data is None:
            return
        end = event.capture_ms + event.duration_ms
        if self.written_end is not None and \
                event.capture_ms < self.written_end - EDGE_TOLERANCE_MS:
            self.left_out += 1
            self.left_out_ms.append((event.capture_ms, end))
            return
        self.sink(data)
        self.kept += 1
        self.kept_bytes += len(data)
        self.first_ms = event.capture_ms if self.first_ms is None else self.first_ms
        self.last_ms = end
        self.written_end = end if self.written_end is None else max(self.written_end, end)
