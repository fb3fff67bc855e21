"""This Archiver as a member of its site (issue 21): its entry in the directory's registry
(name, public URL, signing certificate), its heartbeat, and the cameras it holds.

Which Archiver records a camera is the directory's ``cameras.archiver``. Each Archiver re-reads
the cameras it holds (every ``REFRESH_S``, or at once through ``SiteMember.refresh()``, which an
admin change here and a NOTIFY from the directory call) and starts or stops pulling them, so
``cameras move`` takes effect without a restart: the old holder ends the camera's stream as a
removal does (its last segment archived, its chains ended), the new one starts a chain of its
own. A pushed camera is refused by every Archiver but its holder (421, naming the holder's URL).

A camera without an Archiver (added before the registry, or by a standalone Archiver of an older
release) is held by every Archiver that reads it, as before; a standalone Archiver (its SQLite
directory, no site) holds every camera whatever its name, so renaming the host changes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.serialization import Encoding

from archiver.archive import Archive
from archiver.audit import AuditLog
from archiver.directory import CameraRow, Directory
from archiver.directory.rows import ArchiverRow
from archiver.rtsp import PULLER_STOP_S, CameraPullers
from archiver.settings import Settings
from keyservice.errors import UsageError

log = logging.getLogger("archiver.site")

HEARTBEAT_S = 5.0  # how often this Archiver tells the directory it is alive
REFRESH_S = 2.0  # how often it re-reads the cameras it holds (a NOTIFY is sooner)
# An Archiver heard of within this is alive: another of its name, elsewhere, is refused at start
# (two Archivers of one name would both record, and release, each other's cameras).
ALIVE_MS = 30_000
# A moved camera's new holder waits at most this long for the previous one to let go of it.
HANDOVER_MAX_MS = 20_000
SIGNED_OFF_MS = 0  # the heartbeat of an Archiver that stopped cleanly: long ago


def name_clash(directory: Directory, name: str, url: str, now_ms: int) -> str | None:
    """Why this Archiver may not take ``name`` (None: it may): another Archiver of that name,
    at another URL, heartbeated within ``ALIVE_MS``. The same URL is this Archiver restarting."""
    row = directory.archiver(name)
    if row is None or row.url == url:
        return None
    heard = row.heartbeat_ms if row.heartbeat_ms is not None else row.registered_ms
    if now_ms - heard >= ALIVE_MS:
        return None  # gone (or moved to this URL): the name is free again
    return (f"Another Archiver named '{name}' is running at {row.url} (heard of "
            f"{max(0, now_ms - heard) / 1000:.0f} s ago); give this one its own --name, or "
            f"stop that one and start this one after {ALIVE_MS // 1000} s.")


def check_name(directory: Directory, settings: Settings, now_ms: int) -> None:
    """Refuse to start (UsageError, one sentence) if the name is taken (``name_clash``)."""
    clash = name_clash(directory, settings.archiver_name, settings.public_url, now_ms)
    if clash:
        raise UsageError(clash)


@dataclass(frozen=True)
class ArchiverStatus:
    """A member of the site as ``site archivers`` shows it."""

    name: str
    url: str
    certificate_sha256: str
    registered_ms: int
    heartbeat_ms: int | None
    heartbeat_age_ms: int | None
    alive: bool  # heard of within ALIVE_MS
    cameras_held: tuple[str, ...]
    this: bool  # the Archiver that answered


def archiver_statuses(directory: Directory, this: str, now_ms: int) -> list[ArchiverStatus]:
    """Every Archiver of the site, by name, with the cameras each holds."""
    held: dict[str, list[str]] = {}
    for cam in directory.cameras():
        if cam.archiver is not None:
            held.setdefault(cam.archiver, []).append(cam.name)
    out = []
    for row in directory.archivers():
        age = (None if row.heartbeat_ms in (None, SIGNED_OFF_MS)
               else max(0, now_ms - row.heartbeat_ms))
        out.append(ArchiverStatus(
            name=row.name, url=row.url,
            certificate_sha256=hashlib.sha256(row.certificate).hexdigest(),
            registered_ms=row.registered_ms,
            heartbeat_ms=None if row.heartbeat_ms == SIGNED_OFF_MS else row.heartbeat_ms,
            heartbeat_age_ms=age,
            alive=age is not None and age < ALIVE_MS, cameras_held=tuple(held.get(row.name, ())),
            this=row.name == this))
    return out


class SiteMember:
    """Registration, heartbeat and held cameras of one Archiver (``start()``/``stop()`` run
    them in a background thread; a failure there is logged and tried again, never stops
    recording)."""

    def __init__(self, archive: Archive, settings: Settings, audit: AuditLog,
                 rtsp: CameraPullers | None, clock: Callable[[], int]) -> None:
        self.archive = archive
        self.settings = settings
        self.audit = audit
        self.rtsp = rtsp
        self.clock = clock
        self.name = settings.archiver_name
        # Standalone: the SQLite directory of the data directory is a site of one.
        self.standalone = settings.directory_url is None
        self._held: dict[str, str | None] = {}  # camera -> the RTSP URL pulled (None: pushed)
        self._refresh_lock = threading.RLock()  # refresh() heartbeats after a release
        self._applied_ms: int | None = None  # the start of the last refresh that completed
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def directory(self) -> Directory:
        return self.archive.directory

    # --- who holds what -------------------------------------------------------------------
    def holds(self, camera: CameraRow, archivers: tuple[str, ...] = ()) -> bool:
        """Whether this Archiver records ``camera`` (see the module's note for None); of a
        redundant camera, each of its ``archivers`` does."""
        return (self.standalone or camera.archiver is None or camera.archiver == self.name
                or (camera.redundant and self.name in archivers))

    def holder_url(self, archiver: str) -> str | None:
        row = self.directory.archiver(archiver)
        return row.url if row is not None else None

    def known_archiver(self, name: str) -> ArchiverRow | None:
        return self.directory.archiver(name)

    def statuses(self) -> list[ArchiverStatus]:
        """The site's Archivers as `site archivers` lists them."""
        return archiver_statuses(self.directory, self.name, self.clock())

    def held(self) -> list[str]:
        """The cameras this Archiver recorded as of the last refresh."""
        with self._refresh_lock:
            return sorted(self._held)

    # --- registry -------------------------------------------------------------------------
    def register(self) -> None:
        """Enter (or update) this Archiver in the registry, refused if its name is taken."""
        now = self.clock()
        if not self.standalone:  # a standalone's data directory lock already makes it one
            check_name(self.directory, self.settings, now)
        cert = self.archive.signer.certificate.public_bytes(Encoding.DER)
        self.directory.register_archiver(ArchiverRow(self.name, self.settings.public_url,
                                                     cert, now, now))
        self.directory.heartbeat(self.name, now)
        log.info("registered in the site directory (%s) as '%s' at %s",
                 self.directory.description, self.name, self.settings.public_url)

    def heartbeat(self) -> None:
        """The time up to which this Archiver applied the directory (``refresh``): what a
        moved camera's new holder waits for; and, within ``ALIVE_MS``, that it is alive."""
        beat = self._applied_ms if self._applied_ms is not None else self.clock()
        if not self.directory.heartbeat(self.name, beat):
            # Deleted from the registry by hand: enter it again (its cameras did not move).
            self.register()

    # --- held cameras ---------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the cameras this Archiver holds: start pulling those it gained, end the
        streams of those it lost (moved elsewhere, or removed through another Archiver).
        Thread-safe; the NOTIFY listener may call it."""
        with self._refresh_lock:
            applied = self.clock()  # the directory as of now is applied once this returns
            cameras = self.directory.cameras()
            assigned = (self.directory.camera_archivers()
                        if any(cam.redundant for cam in cameras) else {})
            wanted = {cam.name: cam.rtsp_url for cam in cameras
                      if self.holds(cam, assigned.get(cam.name, ()))}
            released = [n for n in self._held if n not in wanted]
            for name in released:
                self._release(name)
            held = {}
            for name, url in wanted.items():
                if name in self._held and self._held[name] == url:
                    held[name] = url
                elif self._take(name, url):
                    held[name] = url
            self._held = held
            self._applied_ms = applied
            if released and self._thread is not None:
                # Tells the new holders at once that the stream here has ended (handover).
                self.heartbeat()

    def _take(self, camera: str, rtsp_url: str | None) -> bool:
        """Start recording ``camera``; False if a pulled camera's previous Archiver may
        still be pulling it (then the next refresh tries again)."""
        if rtsp_url and self.rtsp is not None:
            if self._thread is not None and not self._handed_over(camera):
                return False
            self.rtsp.start(camera, rtsp_url)
        if self._thread is not None:  # not at start: those are all "taken"
            log.info("camera %s: recorded by this Archiver (%s) from now on", camera, self.name)
        return True

    def _handed_over(self, camera: str) -> bool:
        """Whether a moved camera's previous Archiver has let go of it: its heartbeat says it
        applied the directory after the move (it heartbeats at once after a release), or it
        is not alive, or the move is ``HANDOVER_MAX_MS`` old (a stuck Archiver must not keep
        the camera unrecorded). Both pulling at once would record the move's seconds twice,
        each on its own chain. Compares two Archivers' clocks: they must agree (NTP)."""
        placements = self.directory.placements(camera)
        if len(placements) < 2 or placements[-1].archiver != self.name:
            return True
        before, since_ms = placements[-2].archiver, placements[-1].since_ms
        if before == self.name:
            return True
        row = self.directory.archiver(before)
        now = self.clock()
        if row is None or row.heartbeat_ms is None or now - row.heartbeat_ms >= ALIVE_MS:
            return True
        if row.heartbeat_ms > since_ms:
            return True
        if now - since_ms >= HANDOVER_MAX_MS:
            log.warning("camera %s: Archiver %s did not confirm it stopped recording it within "
                        "%d s of the move; recording it here anyway", camera, before,
                        HANDOVER_MAX_MS // 1000)
            return True
        return False

    def _release(self, camera: str) -> None:
        """End this Archiver's recording of ``camera`` as a removal does: the puller archives
        the segment it was building (sealed and signed), then the camera's chains end (its
        key state is dropped: a later return starts a new chain). The history stays here."""
        if self.rtsp is not None:
            self.rtsp.stop(camera, wait_s=PULLER_STOP_S)
        self.archive.health.forget(camera)
        self.archive.keys.forget_camera(camera)
        row = self.directory.camera(camera)
        to = row.archiver if row is not None and row.removed_ms is None else None
        log.info("camera %s: no longer recorded by this Archiver (%s)", camera,
                 f"moved to {to}" if to else "removed")
        if to:
            self.audit.record("archiver", "camera.released", self.clock(), camera=camera,
                              to=to)

    # --- the background thread ------------------------------------------------------------
    def start(self) -> None:
        """Register, take the cameras held, and heartbeat/refresh in a thread."""
        self.register()
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="site-member", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Refresh now (from the thread), e.g. on a NOTIFY."""
        self._wake.set()

    def stop(self) -> None:
        """Stop the thread and sign off: the name is free at once for an Archiver elsewhere
        (a crashed one frees it ``ALIVE_MS`` after its last heartbeat)."""
        self._stop.set()
        self._wake.set()
        if self._thread is None:
            return
        self._thread.join(10)
        try:
            self.directory.heartbeat(self.name, SIGNED_OFF_MS)
        except Exception as exc:
            log.warning("could not sign off from the site directory: %s", exc)

    def _run(self) -> None:
        next_beat = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_beat:
                try:
                    self.heartbeat()
                except Exception as exc:  # the directory is down: recording goes on
                    log.warning("heartbeat to the site directory failed: %s", exc)
                next_beat = time.monotonic() + HEARTBEAT_S
            try:
                self.refresh()
            except Exception as exc:
                log.warning("could not re-read the cameras this Archiver holds: %s", exc)
            self._wake.wait(REFRESH_S)
            self._wake.clear()
