"""Which Archiver of the site answers for a camera's range (issue 21, item 3): the rules.

A site's Archivers share one directory, which says which Archiver recorded each camera when
(``camera_placements``). A viewer may ask any of them; the one asked answers a range it
recorded (part of) with what it holds, sends the viewer to the one other Archiver that holds
the range (a redirect: the ciphertext goes from its signer to the viewer untouched, and no
Archiver carries another's streams), and answers a range only several others recorded with
the parts. The viewer's client asks the placements first and plays each part from its own
Archiver, each verified against its own signer. An Archiver that never moved a camera (a standalone one, or
one whose cameras have no placements) holds all of its history: nothing changes for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from archiver.directory import ArchiverRow, Directory, Placement
from archiver.services.refused import Refused
from keyservice.wire import ErrorCode

__all__ = ["Holder", "Route", "RoutingService"]


@dataclass(frozen=True)
class Holder:
    """A placement with the URL its Archiver is reached at (None: not in the registry).
    ``copy_here``: this Archiver also holds that recording, consolidated as its Archiver
    signed it (issue 22): the viewer may play it here, verified against that Archiver."""

    archiver: str
    url: str | None
    since_ms: int
    until_ms: int | None
    copy_here: bool = False

    def to_json(self) -> dict[str, object]:
        return {"archiver": self.archiver, "url": self.url, "since_ms": self.since_ms,
                "until_ms": self.until_ms, "copy_here": self.copy_here}


@dataclass(frozen=True)
class Route:
    """Where a range is answered: here (``local``), or by ``holders`` (oldest first)."""

    local: bool
    holders: tuple[Holder, ...]

    @property
    def elsewhere(self) -> Holder | None:
        """The one other Archiver that holds the whole range (None: here, or several)."""
        names = {h.archiver for h in self.holders}
        return self.holders[0] if not self.local and len(names) == 1 else None


@dataclass
class RoutingService:
    directory: Directory
    name: str  # this Archiver's name in the site (Settings.archiver_name)
    clock: Callable[[], int]
    # Whether a consolidated copy here of (archiver, camera, from, to) is kept
    # (archiver/consolidation.py).
    holds_copy: Callable[[str, str, int, int], bool] | None = None

    def archivers(self) -> list[ArchiverRow]:
        """The site's Archivers (the registry)."""
        return self.directory.archivers()

    def placements(self, camera: str, from_ms: int | None, to_ms: int | None) -> list[Holder]:
        """Who recorded ``camera`` in [from_ms, to_ms] (inclusive; None: unbounded), oldest
        first, with their URLs; a camera never placed is this Archiver's whole history."""
        found = self.directory.placements(camera, from_ms, None if to_ms is None else to_ms + 1)
        if not found:
            found = [Placement(camera, self.name, 0, None)]
        urls = {row.name: row.url for row in self.directory.archivers()}
        return [Holder(p.archiver, urls.get(p.archiver), p.since_ms, p.until_ms,
                       self._copy_here(p)) for p in found]

    def _copy_here(self, p: Placement) -> bool:
        return (self.holds_copy is not None and p.archiver != self.name
                and p.until_ms is not None and self.holds_copy(p.archiver, p.camera,
                                                               p.since_ms, p.until_ms))

    def route(self, camera: str, from_ms: int | None, to_ms: int | None) -> Route:
        """Where [from_ms, to_ms] of ``camera`` is answered (``to_ms`` None: live from
        ``from_ms`` on, default now, which is the current holder's)."""
        if from_ms is None:
            from_ms = self.clock()
        holders = tuple(self.placements(camera, from_ms, to_ms))
        if to_ms is None:
            holders = holders[-1:]
        # This Archiver answers any range it recorded part of, with what it holds (the history
        # stays playable where it was recorded); the viewer's client asks the placements first
        # and plays each part from its own Archiver.
        if any(h.archiver == self.name for h in holders):
            return Route(True, holders)
        return Route(False, holders)

    def check(self, camera: str, route: Route) -> Holder:
        """The holder to send the viewer to; Refused when there is none to send it to: a
        range recorded by several Archivers (the body lists the parts), or a holder the
        registry does not know (a redirect would go nowhere)."""
        holder = route.elsewhere
        if holder is None:
            parts = ", ".join(f"{h.archiver} from {h.since_ms}" for h in route.holders)
            raise Refused(ErrorCode.RANGE_SPANS_ARCHIVERS,
                          f"Camera '{camera}''s range was recorded by several Archivers of the "
                          f"site ({parts}); play each part from its Archiver (the placements "
                          "are in this answer).",
                          body={"camera": camera, "archiver": self.name,
                                "placements": [h.to_json() for h in route.holders]})
        if holder.url is None:
            raise Refused(ErrorCode.HOLDER_UNKNOWN,
                          f"Camera '{camera}''s range is held by Archiver '{holder.archiver}', "
                          "which is not in the site's registry; ask the site's admin to start it.")
        return holder
