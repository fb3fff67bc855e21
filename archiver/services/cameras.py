"""Cameras as admins and viewers see them: recorded range, health, retention and holds (admins);
the cameras a viewer may watch, and the gaps in a camera's recording.

One answer for "no such camera" and "not yours" to a viewer: a viewer cannot enumerate camera
names.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from archiver.archive import Archive
from archiver.cameras import GAP_TOLERANCE_MS, CameraHealth, CameraState
from archiver.directory import CameraRow, ViewerRow
from archiver.services.refused import Refused
from archiver.settings import Settings
from keyservice.format import DataStream
from keyservice.wire import ErrorCode

# Held while a camera is admitted and added (archiver.admin): the limit is not raced past.
ADMISSION_LOCK = threading.Lock()


def admit_pulled_camera(archive: Archive) -> None:
    """Refuse a new pulled (RTSP) camera the Archiver cannot take, and say why: at its
    configured limit (``--max-rtsp-cameras``), or already not keeping up (a pulled camera is
    ``behind``). Beyond its cores every camera would fall behind, silently; refused, the admin
    knows at once. Pushed cameras cost the Archiver encryption only and are not limited here."""
    settings = archive.settings
    # This Archiver's own pulls only: in a site, the other Archivers' cameras cost it nothing.
    pulled = [cam.name for cam in archive.directory.cameras() if cam.rtsp_url and (
        settings.directory_url is None or cam.archiver in (None, settings.archiver_name))]
    limit = settings.max_rtsp_cameras
    if limit and len(pulled) >= limit:
        raise Refused(ErrorCode.AT_CAPACITY, f"This Archiver pulls {len(pulled)} RTSP cameras, "
                      f"its limit (--max-rtsp-cameras {limit}); add the camera to another "
                      "Archiver, or raise the limit if its cores keep up (docs/cameras.md).")
    now = archive.clock()
    for name in pulled:
        health = archive.health.health(name, now)
        # Not only "behind": far behind, a camera shows "stalled" between its late segments
        # (measured: 800 cameras on 2 cores, 798 stalled, none "behind", a camera was taken).
        if health.not_keeping_up:
            raise Refused(ErrorCode.AT_CAPACITY, f"This Archiver is not keeping up: camera "
                          f"'{name}' was archived up to {(health.max_lag_ms or 0) / 1000:.0f} s "
                          "after capture in the last minute; it takes no more RTSP cameras "
                          "until it keeps up (fewer cameras, or more cores).")


@dataclass(frozen=True)
class CameraStatus:
    """A camera as an admin sees it."""

    camera: CameraRow
    first_ms: int | None
    last_ms: int | None
    segments: int
    health: CameraHealth
    retention_days: int  # the camera's, or the site default
    retention_default: bool
    holds: int
    expired_until_ms: int | None
    archivers: tuple[str, ...] = ()  # primary then standbys (empty: one Archiver)


@dataclass(frozen=True)
class CameraView:
    """A camera as a viewer authorized on it sees it."""

    name: str
    first_ms: int | None
    last_ms: int | None
    segments: int
    state: CameraState
    archiver: str | None = None  # the site's Archiver that records it now (None: this one)


@dataclass
class CameraService:
    archive: Archive
    settings: Settings

    # --- admins --------------------------------------------------------------------------
    def statuses(self) -> list[CameraStatus]:
        """The cameras being recorded (removed ones are not), by name."""
        assigned = self.archive.directory.camera_archivers()
        return [self._status(cam, assigned.get(cam.name, ()))
                for cam in self.archive.directory.cameras()]

    def status(self, name: str) -> CameraStatus:
        """One camera, removed ones too (their archive still expires)."""
        cam = self.archive.directory.camera(name)
        if cam is None:
            raise Refused(ErrorCode.UNKNOWN_CAMERA, f"There is no camera named '{name}'.")
        return self._status(cam, self.archive.directory.camera_archivers(name).get(name, ()))

    def _status(self, cam: CameraRow, archivers: tuple[str, ...]) -> CameraStatus:
        db = self.archive.db
        first, last, count = db.recorded_range(cam.name) or (None, None, 0)
        return CameraStatus(
            camera=cam, first_ms=first, last_ms=last, segments=count,
            health=self.archive.health.health(cam.name, self.archive.clock()),
            retention_days=cam.retention_days or self.settings.retention_days,
            retention_default=cam.retention_days is None, holds=len(self.archive.directory.holds(cam.name)),
            expired_until_ms=db.expired_until(cam.name), archivers=archivers)

    # --- viewers -------------------------------------------------------------------------
    def of_viewer(self, viewer: ViewerRow) -> list[CameraView]:
        """The cameras this viewer may watch (removed ones too: their archive stays)."""
        archive = self.archive
        now = archive.clock()
        out = []
        for cam in archive.directory.cameras(include_removed=True):
            if not viewer.authorized_on(cam.name):
                continue
            first, last, count = archive.db.recorded_range(cam.name) or (None, None, 0)
            out.append(CameraView(cam.name, first, last, count,
                                  archive.health.health(cam.name, now).state,
                                  cam.archiver or self.settings.archiver_name))
        return out

    def authorize(self, viewer: ViewerRow, camera: str) -> None:
        """Refuse a camera the viewer may not watch, with one answer for "no such camera" and
        "not yours"."""
        if self.archive.directory.camera(camera) is None or not viewer.authorized_on(camera):
            raise Refused(ErrorCode.NOT_AUTHORIZED, f"This viewer may not watch a camera named "
                          f"'{camera}' (or there is none).", fingerprint=viewer.fingerprint)

    def gaps(self, viewer: ViewerRow, camera: str, from_ms: int,
             to_ms: int) -> list[tuple[int, int]]:
        """Where the index has no video of ``camera`` in [from_ms, to_ms] (unsigned: the
        fusion stream's signed segment times are what the viewer verifies)."""
        self.authorize(viewer, camera)
        if to_ms < from_ms:
            raise Refused(ErrorCode.BAD_RANGE, "The end of the range is before its start.")
        # Up to now at most: the future is not a gap.
        until = min(to_ms, self.archive.clock())
        if until < from_ms:
            return []
        return self.archive.db.gaps(camera, int(DataStream.VIDEO), from_ms, until,
                                    GAP_TOLERANCE_MS)
