"""Which Archiver of the site answers for a camera's range (issue 21, item 3): the rules.

A site's Archivers share one directory, which says which Archiver recorded each camera when
(``camera_placements``). A viewer may ask any of them; the one asked answers a range it
recorded (part of) with what it holds, sends the viewer to the one other Archiver that holds
the range (a redirect: the ciphertext goes from its signer to the viewer untouched, and no
Archiver carries another's streams), and answers a range only several others recorded with
the parts. The viewer's client asks the placements first and plays each part from its own
Archiver, each verified against its own signer. An Archiver that never moved a camera (a standalone one, or
one whose cameras have no placements) holds all of its history: nothing changes for it.

A redundant camera (issue 22, ``cameras add --archivers a1,a2 --redundant``) is recorded by all
its Archivers at once, each under its own chains and signature: each of its placements is held
by every one of them (``Holder.copies``). An Archiver holding a copy answers the range itself;
any other sends the viewer to the first copy whose Archiver is alive. The viewer's client plays
one copy and fills that copy's gaps from another (client/copies.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from archiver.directory import ArchiverRow, Directory, Placement
from archiver.registry import ALIVE_MS
from archiver.services.refused import Refused
from keyservice.wire import ErrorCode

__all__ = ["Copy", "Holder", "Route", "RoutingService"]


@dataclass(frozen=True)
class Copy:
    """One Archiver holding a copy of a placement's range, and its URL (None: unregistered)."""

    archiver: str
    url: str | None


@dataclass(frozen=True)
class Holder:
    """A placement with the URL its Archiver is reached at (None: not in the registry), and
    every Archiver that holds a copy of it, in the camera's order (``archiver`` among them;
    more than one only for a redundant camera)."""

    archiver: str
    url: str | None
    since_ms: int
    until_ms: int | None
    copies: tuple[Copy, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """The Archivers that hold this range (its copies, or its one Archiver)."""
        return tuple(c.archiver for c in self.copies) or (self.archiver,)

    def to_json(self) -> dict[str, object]:
        # ``copies`` was added in issue 22: clients from before ignore it and play
        # ``archiver``'s copy, as they did.
        copies = self.copies or (Copy(self.archiver, self.url),)
        return {"archiver": self.archiver, "url": self.url, "since_ms": self.since_ms,
                "until_ms": self.until_ms,
                "copies": [{"archiver": c.archiver, "url": c.url} for c in copies]}


@dataclass(frozen=True)
class Route:
    """Where a range is answered: here (``local``), or by ``holders`` (oldest first)."""

    local: bool
    holders: tuple[Holder, ...]

    @property
    def elsewhere(self) -> Holder | None:
        """The one other Archiver that holds the whole range (None: here, or several)."""
        names = {h.names for h in self.holders}
        return self.holders[0] if not self.local and len(names) == 1 else None


@dataclass
class RoutingService:
    directory: Directory
    name: str  # this Archiver's name in the site (Settings.archiver_name)
    clock: Callable[[], int]

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
        assigned = self._redundant(camera)
        return [Holder(p.archiver, urls.get(p.archiver), p.since_ms, p.until_ms,
                       tuple(Copy(a, urls.get(a)) for a in assigned)
                       if p.archiver in assigned else ())
                for p in found]

    def _redundant(self, camera: str) -> tuple[str, ...]:
        """The Archivers that all record ``camera`` at once (empty: it is not redundant)."""
        row = self.directory.camera(camera)
        if row is None or not row.redundant:
            return ()
        return self.directory.camera_archivers(camera).get(camera, ())

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
        # An Archiver with a copy of a redundant camera's range holds it as much as any.
        if any(self.name in h.names for h in holders):
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
        holder = self._live_copy(holder)
        if holder.url is None:
            raise Refused(ErrorCode.HOLDER_UNKNOWN,
                          f"Camera '{camera}''s range is held by Archiver '{holder.archiver}', "
                          "which is not in the site's registry; ask the site's admin to start it.")
        return holder

    def _live_copy(self, holder: Holder) -> Holder:
        """Of a redundant range, the first copy whose Archiver is alive (heard of within
        ``ALIVE_MS``) and registered: a viewer sent to a dead primary would get nothing while
        another copy is there. None alive: the placement's own Archiver, as before."""
        if len(holder.copies) < 2:
            return holder
        beats = {row.name: row.heartbeat_ms for row in self.directory.archivers()}
        now = self.clock()
        for copy in holder.copies:
            beat = beats.get(copy.archiver)
            if copy.url is not None and beat is not None and now - beat < ALIVE_MS:
                return Holder(copy.archiver, copy.url, holder.since_ms, holder.until_ms,
                              holder.copies)
        return holder
