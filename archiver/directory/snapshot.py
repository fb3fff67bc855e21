"""When the site directory (PostgreSQL) goes down (issue 22, item 5): the last authorizations
read, kept in memory, so recording goes on; the link's state, said in health and /metrics; a
fast refusal of what needs the directory; and the watch that sees it come back and reconciles.

- ``DirectoryLink``: up or unreachable (since when), and when the directory last answered.
  While it is unreachable no request waits on the server: every query fails at once
  (``DirectoryUnreachable``, a 503 with one sentence); only the watch tries the server.
- ``DirectorySnapshot``: the rows last read (cameras with their token *hashes*, viewers with
  their public certificates and cameras, holds, Archivers, placements), refreshed by every
  successful read, notification and poll. Kept in memory only: nothing of it is written
  anywhere, so it weakens nothing a stolen disk would give. Reads on the recording and serving
  paths answer from it while the directory is unreachable (archiver/directory/store.py).
- ``DirectoryWatch``: a thread that, while the link is down, tries the server every
  ``probe_s``; when it answers, a new connection pool, the snapshot read again in full, the
  link up, then the reconcilers (other Archivers' changes applied, heartbeat and held cameras,
  the deferred audit rows).

A standalone Archiver (its SQLite directory) has none of this: a disk failure is not an outage.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from archiver.directory.rows import ArchiverRow, CameraRow, HoldRow, ViewerRow
from archiver.storage import StorageFailed

log = logging.getLogger("archiver.site")

PROBE_S = 1.0  # how often the watch tries an unreachable directory
PROBE_TIMEOUT_S = 2.0


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class _Missing:
    """Not in the snapshot (distinct from None: "no such row", which a complete snapshot
    knows)."""


MISSING: Final = _Missing()


class DirectoryUnreachable(StorageFailed):
    """The site directory cannot be reached: what needs it is refused (503) with this
    sentence, never waited for."""

    def __init__(self, message: str, since_ms: int) -> None:
        super().__init__(message)
        self.message = message
        self.since_ms = since_ms


@dataclass(frozen=True)
class LinkState:
    """What health and /metrics say: ``state`` "ok" or "unreachable"."""

    state: str
    since_ms: int | None  # unreachable since (None: up)
    last_read_ms: int | None  # the last time the directory answered
    where: str  # host:port, never a password

    def as_json(self, now_ms: int) -> dict[str, Any]:
        return {"state": self.state, "where": self.where, "since_ms": self.since_ms,
                "last_read_ms": self.last_read_ms,
                "last_read_age_s": None if self.last_read_ms is None
                else round(max(0, now_ms - self.last_read_ms) / 1000, 3)}


class DirectoryLink:
    """Whether the directory answers. ``failed`` (a query could not reach it) takes it down;
    only ``back`` (the watch saw it answer and renewed the pool) brings it up."""

    def __init__(self, where: str, clock: Callable[[], int] = wall_ms) -> None:
        self.where = where
        self._clock = clock
        self._lock = threading.Lock()
        self._down_since: int | None = None
        self._last_read_ms: int | None = None
        self.outages = 0  # since start (tests, logs)
        # A DirectoryWatch runs: while down, queries fail at once and only the watch tries.
        self.watched = False
        self.went_down = threading.Event()  # set while down (the watch waits on it)

    @property
    def up(self) -> bool:
        return self._down_since is None

    def state(self) -> LinkState:
        with self._lock:
            return LinkState("ok" if self._down_since is None else "unreachable",
                             self._down_since, self._last_read_ms, self.where)

    def answered(self) -> None:
        self._last_read_ms = self._clock()

    def failed(self, reason: str) -> DirectoryUnreachable:
        """A query could not reach the directory: down from now (said once per outage)."""
        with self._lock:
            if self._down_since is None:
                self._down_since = self._clock()
                self.outages += 1
                self.went_down.set()
                log.warning("the site directory (PostgreSQL at %s) is unreachable (%s): "
                            "recording goes on under the authorizations last read; admin "
                            "changes and new logins are refused until it is back",
                            self.where, reason)
        return self.refusal()

    def back(self) -> None:
        with self._lock:
            since, self._down_since = self._down_since, None
            self._last_read_ms = self._clock()
            self.went_down.clear()
        if since is not None:
            log.info("the site directory (PostgreSQL at %s) answers again after %.1f s",
                     self.where, (self._clock() - since) / 1000)

    def refusal(self) -> DirectoryUnreachable:
        since = self._down_since if self._down_since is not None else self._clock()
        at = dt.datetime.fromtimestamp(since / 1000, dt.UTC).strftime("%H:%M:%S")
        return DirectoryUnreachable(
            f"The site directory (PostgreSQL at {self.where}) is unreachable since {at} UTC; "
            "this Archiver keeps recording under the authorizations it last read, but admin "
            "changes and new logins need the directory: try again when it is back.", since)


class DirectorySnapshot:
    """The directory's rows as last read (module docstring). Lookups answer ``MISSING`` when
    the snapshot cannot say; a full load (``load``) makes it complete, so that an absent row
    is a true None (an unknown camera's token is refused, not waited for)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cameras: dict[str, CameraRow] = {}
        self._cameras_complete = False
        self._viewers: dict[str, ViewerRow] = {}
        self._viewers_complete = False
        self._unknown_viewers: set[str] = set()  # seen by a poll, row not read yet
        self._holds: list[HoldRow] | None = None
        self._archivers: dict[str, ArchiverRow] = {}
        self._archivers_complete = False
        self._placements: dict[str, list[tuple[str, int]]] | None = None
        self._camera_archivers: dict[str, tuple[str, ...]] | None = None
        self.loaded_ms: int | None = None

    # --- refreshed by reads -----------------------------------------------------------
    def load(self, cameras: list[CameraRow], viewers: list[ViewerRow], holds: list[HoldRow],
             archivers: list[ArchiverRow], placements: list[tuple[str, str, int]],
             now_ms: int, camera_archivers: dict[str, tuple[str, ...]] | None = None) -> None:
        with self._lock:
            self._cameras = {row.name: row for row in cameras}
            self._viewers = {row.fingerprint: row for row in viewers}
            self._unknown_viewers.clear()
            self._holds = list(holds)
            self._archivers = {row.name: row for row in archivers}
            by_camera: dict[str, list[tuple[str, int]]] = {}
            for camera, archiver, since_ms in placements:
                by_camera.setdefault(camera, []).append((archiver, since_ms))
            self._placements = by_camera
            self._camera_archivers = dict(camera_archivers or {})
            self._cameras_complete = self._viewers_complete = self._archivers_complete = True
            self.loaded_ms = now_ms

    def put_cameras(self, rows: Iterable[CameraRow], include_removed: bool) -> None:
        with self._lock:
            fresh = {row.name: row for row in rows}
            for name, row in list(self._cameras.items()):
                if name not in fresh and (include_removed or row.removed_ms is None):
                    # Gone from an active-only list: removed (its time unknown here).
                    del self._cameras[name]
            self._cameras.update(fresh)

    def put_camera(self, name: str, row: CameraRow | None) -> None:
        with self._lock:
            if row is None:
                self._cameras.pop(name, None)
            else:
                self._cameras[name] = row

    def put_viewers(self, rows: Iterable[ViewerRow]) -> None:
        with self._lock:
            self._viewers = {row.fingerprint: row for row in rows}
            self._unknown_viewers.clear()
            self._viewers_complete = True

    def put_viewer(self, fingerprint: str, row: ViewerRow | None) -> None:
        with self._lock:
            self._unknown_viewers.discard(fingerprint)
            if row is None:
                self._viewers.pop(fingerprint, None)
            else:
                self._viewers[fingerprint] = row

    def put_states(self, states: dict[str, tuple[int | None, tuple[str, ...] | None,
                                                  bool]]) -> None:
        """A poll's authorizations (no certificates): applied to the viewers known; one not
        known is noted, so that the snapshot does not answer "no such viewer" for it."""
        with self._lock:
            for fp in list(self._viewers):
                if fp not in states:
                    del self._viewers[fp]
            for fp, (revoked_ms, cameras, deleted) in states.items():
                row = self._viewers.get(fp)
                if row is None:
                    self._unknown_viewers.add(fp)
                    continue
                self._viewers[fp] = dataclasses.replace(
                    row, revoked_ms=revoked_ms, all_cameras=cameras is None,
                    cameras=tuple(cameras or ()), key_streams_deleted=deleted)

    def put_holds(self, camera: str | None, rows: list[HoldRow]) -> None:
        with self._lock:
            if camera is None:
                self._holds = list(rows)
            elif self._holds is not None:
                self._holds = [h for h in self._holds if h.camera != camera] + list(rows)

    def put_archivers(self, rows: Iterable[ArchiverRow]) -> None:
        with self._lock:
            self._archivers = {row.name: row for row in rows}
            self._archivers_complete = True

    def put_archiver(self, name: str, row: ArchiverRow | None) -> None:
        with self._lock:
            if row is None:
                self._archivers.pop(name, None)
            else:
                self._archivers[name] = row

    def put_placements(self, camera: str, rows: list[tuple[str, int]]) -> None:
        with self._lock:
            if self._placements is not None:
                self._placements[camera] = list(rows)

    def put_camera_archivers(self, name: str | None,
                             found: dict[str, tuple[str, ...]]) -> None:
        with self._lock:
            if name is None:
                self._camera_archivers = dict(found)
            elif self._camera_archivers is not None:
                self._camera_archivers.pop(name, None)
                self._camera_archivers.update(found)

    # --- answered from it while the directory is unreachable --------------------------
    def cameras(self, include_removed: bool) -> list[CameraRow] | _Missing:
        with self._lock:
            if not self._cameras_complete:
                return MISSING
            return sorted((row for row in self._cameras.values()
                           if include_removed or row.removed_ms is None), key=lambda r: r.name)

    def camera(self, name: str) -> CameraRow | _Missing | None:
        with self._lock:
            row = self._cameras.get(name)
            if row is None and not self._cameras_complete:
                return MISSING
            return row

    def viewers(self) -> list[ViewerRow] | _Missing:
        with self._lock:
            if not self._viewers_complete or self._unknown_viewers:
                return MISSING
            return sorted(self._viewers.values(), key=lambda r: r.added_ms)

    def viewer(self, fingerprint: str) -> ViewerRow | _Missing | None:
        with self._lock:
            row = self._viewers.get(fingerprint)
            if row is None and (not self._viewers_complete
                                or fingerprint in self._unknown_viewers):
                return MISSING
            return row

    def viewer_states(self) -> dict[str, tuple[int | None, tuple[str, ...] | None,
                                               bool]] | _Missing:
        with self._lock:
            if not self._viewers_complete or self._unknown_viewers:
                return MISSING
            return {fp: (row.revoked_ms, None if row.all_cameras else row.cameras,
                         row.key_streams_deleted) for fp, row in self._viewers.items()}

    def holds(self, camera: str | None) -> list[HoldRow] | _Missing:
        with self._lock:
            if self._holds is None:
                return MISSING
            return [h for h in self._holds if camera is None or h.camera == camera]

    def archivers(self) -> list[ArchiverRow] | _Missing:
        with self._lock:
            if not self._archivers_complete:
                return MISSING
            return sorted(self._archivers.values(), key=lambda r: r.name)

    def archiver(self, name: str) -> ArchiverRow | _Missing | None:
        with self._lock:
            row = self._archivers.get(name)
            if row is None and not self._archivers_complete:
                return MISSING
            return row

    def camera_archivers(self, name: str | None) -> dict[str, tuple[str, ...]] | _Missing:
        with self._lock:
            if self._camera_archivers is None:
                return MISSING
            return {camera: order for camera, order in self._camera_archivers.items()
                    if name is None or camera == name}

    def placements(self, camera: str) -> list[tuple[str, int]] | _Missing:
        with self._lock:
            if self._placements is None:
                return MISSING
            return list(self._placements.get(camera, ()))


class Reconnectable(Protocol):
    """What the watch needs of the directory (store.py's Directory; no import: no cycle)."""

    link: DirectoryLink | None

    def reconnect(self, timeout_s: float = ...) -> None: ...


class DirectoryWatch:
    """The thread that brings the link back (module docstring). ``on_back``: the reconcilers,
    called in order once the directory answers again (each one's failure is logged, the
    others still run)."""

    def __init__(self, directory: Reconnectable, probe_s: float = PROBE_S) -> None:
        link = directory.link
        if link is None:
            raise ValueError("a standalone Archiver's directory has no link to watch")
        self._directory = directory
        self._link = link
        self._probe_s = probe_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_back: list[Callable[[], object]] = []
        self.reconciled = 0  # outages reconciled since start (tests)
        self.failed_probes = 0  # since start (tests)

    def start(self) -> None:
        self._link.watched = True
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="fusion-directory-watch")
        self._thread.start()

    def stop(self, wait_s: float = 5.0) -> None:
        self._stop.set()
        self._link.watched = False
        self._link.went_down.set()  # wakes the thread
        if self._thread is not None:
            self._thread.join(wait_s)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._link.went_down.wait()
            if self._stop.is_set():
                return
            try:
                self._directory.reconnect(PROBE_TIMEOUT_S)
            except Exception as exc:
                failures += 1
                self.failed_probes += 1
                if failures == 1:
                    log.info("site directory still unreachable (%s); trying every %.1f s",
                             " ".join(str(exc).split())[:200], self._probe_s)
                self._stop.wait(self._probe_s)
                continue
            failures = 0
            self.reconcile()

    def reconcile(self) -> None:
        for step in self.on_back:
            try:
                step()
            except Exception:
                log.exception("reconciling with the site directory: %s failed", step)
        self.reconciled += 1
