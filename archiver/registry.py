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
from archiver.directory.leases import LeaseLocks
from archiver.directory.rows import ArchiverRow, LeaseRow
from archiver.rtsp import PULLER_STOP_S, CameraPullers
from archiver.settings import Settings
from archiver.storage_watch import DiskFailure
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
# Failover (issue 22). A standby looks this often whether a holder's lock is free.
LEASE_POLL_S = 0.5
# A holder's lease row lasts this long unrenewed (renewed at every refresh): the backstop when
# its lock outlives it (a black-holed link, before the keepalives end its session).
LEASE_TTL_MS = 15_000
# A standby waits this long per live standby ranked above it, for that one to take over first.
STANDBY_GRACE_S = 2.0


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
    """Every Archiver of the site, by name, with the cameras each holds (a redundant camera:
    each of its Archivers)."""
    held: dict[str, list[str]] = {}
    cameras = directory.cameras()
    assigned = directory.camera_archivers() if any(c.redundant for c in cameras) else {}
    for cam in cameras:
        holders = assigned.get(cam.name, ()) if cam.redundant else (cam.archiver,)
        for holder in holders:
            if holder is not None:
                held.setdefault(holder, []).append(cam.name)
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
        # Failover: only a site on PostgreSQL has leases (an SQLite directory is a site of one).
        self.failover = not self.standalone and self.directory.backend == "postgresql"
        self._locks: LeaseLocks | None = (LeaseLocks(settings.directory_url)
                                          if self.failover and settings.directory_url else None)
        self._watcher: threading.Thread | None = None
        # As of the last refresh: the cameras with standbys (not redundant), their Archivers in
        # rank order, who records each, and their leases.
        self._assigned: dict[str, tuple[str, ...]] = {}
        self._holders: dict[str, str | None] = {}
        self._leases: dict[str, LeaseRow] = {}
        self._free_since: dict[str, float] = {}  # camera -> when its lock was first seen free
        self._taken: set[str] = set()  # taken over: no handover to wait for
        self._lock_refused: set[str] = set()  # recorded here, lock held elsewhere (logged once)
        self.takeovers = 0  # cameras this Archiver took over since it started
        self.leases_lost = 0  # cameras taken from it while it could not reach the directory
        self._unreachable = False  # the last refresh failed (the directory, or the link, down)
        self._renewed_ms: int | None = None  # when this Archiver last renewed its leases
        # A disk that fails (issue 22): the cameras given to their standbys because this
        # Archiver could not archive them (not taken again while the disk fails), and why.
        self._disk_released: dict[str, str] = {}
        self._disk_failing: str | None = None  # the disk's last failure, until a probe passes
        self._takeover_refused: set[str] = set()  # logged once per failure of the disk
        self.storage_releases = 0
        if self.failover:
            archive.storage_watch.on_failing = self.wake

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
                        if self.failover or any(cam.redundant for cam in cameras) else {})
            wanted = {cam.name: cam.rtsp_url for cam in cameras
                      if self.holds(cam, assigned.get(cam.name, ()))}
            if self.failover:
                self._assigned = {cam.name: assigned[cam.name] for cam in cameras
                                  if cam.name in assigned and not cam.redundant}
                self._holders = {cam.name: cam.archiver for cam in cameras}
            if self.failover:
                self._check_disk()
                for name in self._disk_released:
                    wanted.pop(name, None)  # its standbys' now (or, when none could, later)
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
            if self.failover:
                self._keep_leases(applied)
            self._unreachable = False
            if released and self._thread is not None:
                # Tells the new holders at once that the stream here has ended (handover).
                self.heartbeat()

    def _take(self, camera: str, rtsp_url: str | None) -> bool:
        """Start recording ``camera``; False if a pulled camera's previous Archiver may
        still be pulling it (then the next refresh tries again)."""
        if rtsp_url and self.rtsp is not None:
            # Taken over from a holder whose lease lapsed: nobody to wait for (it is dead, or
            # records on under its own chains until it hears of the takeover).
            taken_over = camera in self._taken
            self._taken.discard(camera)
            if self._thread is not None and not taken_over and not self._handed_over(camera):
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
        self.archive.storage_watch.forget(camera)
        self._unlock(camera)
        row = self.directory.camera(camera)
        to = row.archiver if row is not None and row.removed_ms is None else None
        # Taken over while this Archiver could not see the directory: both recorded meanwhile,
        # each under its own chains and signature; this side ends here, as a move does.
        # (Unreachable: the last refresh failed, or this one comes long after the last one
        # that completed: its queries hung on a link that dropped packets.)
        # (Or its leases went unrenewed for their whole life, however its refreshes fared: a
        # standby takes an expired lease only, so this one certainly lapsed.)
        stalled = (self._applied_ms is not None
                   and self.clock() - self._applied_ms > 3 * REFRESH_S * 1000)
        expired = (self._renewed_ms is not None
                   and self.clock() - self._renewed_ms >= LEASE_TTL_MS)
        lapsed = (to is not None and (self._unreachable or stalled or expired)
                  and camera in self._assigned)
        if lapsed:
            self.leases_lost += 1
        log.info("camera %s: no longer recorded by this Archiver (%s)", camera,
                 f"taken over by {to} while this Archiver could not renew its lease; "
                 "a standby now" if lapsed else f"moved to {to}" if to else "removed")
        if to:
            self.audit.record("archiver", "camera.released", self.clock(), camera=camera,
                              to=to, **({"lease_lost": True} if lapsed else {}))

    # --- failover: leases ------------------------------------------------------------------
    def _keep_leases(self, now_ms: int) -> None:
        """Hold the lock, and renew the lease row, of each camera with standbys this Archiver
        records. A failure is logged: recording goes on whatever happens to the lease (a
        holder cannot tell a directory outage from its own link cut)."""
        mine = [name for name in self._held if name in self._assigned]
        try:
            self._lock_mine(mine)
            if self._locks is not None:
                for stray in self._locks.held() - set(mine):
                    self._locks.unlock(stray)  # not recorded here: its holder needs it
        except Exception as exc:  # its lock session is down: the lease row says so (locked 0)
            log.debug("could not take the lease locks: %s", exc)
        locked = self._locks.held() if self._locks is not None else frozenset()
        self.directory.renew_leases(self.name, mine, now_ms, LEASE_TTL_MS, locked)
        self._renewed_ms = now_ms
        self._leases = self.directory.leases() if self._assigned else {}

    def _lock_mine(self, mine: list[str]) -> None:
        """Take the lock of each camera this Archiver records and does not hold the lock of
        (after a takeover under a lock still held, or a lost lock session)."""
        if self._locks is None:
            return
        held = self._locks.held()
        for name in mine:
            if name in held:
                continue
            got = self._locks.try_lock(name)  # raises when PostgreSQL cannot be reached
            if not got and name not in self._lock_refused:
                log.warning("camera %s: its lease lock is still held by another session (the "
                            "Archiver it was taken from, cut off?); recording on, and taking "
                            "the lock once it is free", name)
            (self._lock_refused.discard if got else self._lock_refused.add)(name)

    def _unlock(self, camera: str) -> None:
        if self._locks is None:
            return
        try:
            self._locks.unlock(camera)
        except Exception as exc:  # a lost session holds no lock any more
            log.info("camera %s: could not free its lease lock: %s", camera, exc)

    def lease_status(self) -> dict[str, object]:
        """For health and /metrics: the cameras with standbys this Archiver records (holding
        their lock), those it stands by for, and the takeovers it made."""
        with self._refresh_lock:
            held = sorted(n for n in self._held if n in self._assigned)
            standby = sorted(n for n, order in self._assigned.items()
                             if self.name in order and n not in self._held)
        locked = self._locks.held() if self._locks is not None else frozenset()
        return {"failover": self.failover, "leases_held": held,
                "leases_locked": sorted(n for n in held if n in locked),
                "standby_for": standby, "takeovers": self.takeovers,
                "leases_lost": self.leases_lost, **self.disk_status()}

    def watch_leases(self) -> None:
        """One look at the locks of the cameras this Archiver records or stands by for: takes
        the lock of one it records without it, and takes over one whose holder is gone (its
        lock free though it held it, or its lease expired) when it is this Archiver's turn."""
        if self._locks is None:
            return
        assigned, holders = self._assigned, self._holders
        # Not while a refresh runs: it may be releasing one of them (and unlocking it).
        if self._refresh_lock.acquire(timeout=0):
            try:
                self._lock_mine([name for name in self._held if name in assigned])
            finally:
                self._refresh_lock.release()
        candidates = {name: order for name, order in assigned.items()
                      if self.name in order and holders.get(name) not in (None, self.name)}
        if not candidates:
            self._free_since.clear()
            return
        locked = self._locks.locked(candidates)
        now_ms, now = self.clock(), time.monotonic()
        cached = self._leases
        suspects = [name for name in candidates if name not in locked
                    or (name in cached and cached[name].expires_ms < now_ms)]
        for name in set(self._free_since) - set(suspects):
            self._free_since.pop(name, None)
        if not suspects:
            return
        # Fresh, not the last refresh's: a decision on a lease seconds old would take a camera
        # from a holder that renewed since (one that was cut off and is back).
        leases, alive = self.directory.leases(), self._alive(now_ms)
        for name in suspects:
            holder = holders[name]
            assert holder is not None
            lease = leases.get(name)
            if lease is not None and lease.holder != holder:
                continue  # it changed hands since the last refresh: look again after the next
            expired = lease is not None and lease.expires_ms < now_ms
            gone = (expired or (name not in locked and lease is not None and lease.locked)
                    or (lease is None and not alive.get(holder, False)))
            if not gone:
                self._free_since.pop(name, None)
                continue
            waited = now - self._free_since.setdefault(name, now)
            if self._my_turn(candidates[name], holder, alive, waited):
                self._take_over(name, holder, lease, expired)

    def _alive(self, now_ms: int) -> dict[str, bool]:
        return {row.name: row.heartbeat_ms not in (None, SIGNED_OFF_MS)
                and now_ms - (row.heartbeat_ms or 0) < ALIVE_MS
                for row in self.directory.archivers()}

    def _my_turn(self, order: tuple[str, ...], holder: str, alive: dict[str, bool],
                 waited_s: float) -> bool:
        """Standbys take over in rank order: this one once every live standby ranked above it
        had ``STANDBY_GRACE_S`` each to do it."""
        standbys = [name for name in order if name != holder]
        above = standbys[:standbys.index(self.name)]
        live_above = sum(1 for name in above if alive.get(name, False))
        return waited_s >= STANDBY_GRACE_S * live_above

    def _take_over(self, camera: str, holder: str, lease: LeaseRow | None,
                   expired: bool) -> None:
        # Under the refresh lock: a refresh that read the cameras before this takeover would
        # find the camera's lock stray and free it.
        with self._refresh_lock:
            self._take_over_locked(camera, holder, lease, expired)

    def _take_over_locked(self, camera: str, holder: str, lease: LeaseRow | None,
                          expired: bool) -> None:
        assert self._locks is not None
        if not self._disk_takes_writes(camera, holder):
            return  # a standby whose own disk fails records nothing: the next standby's turn
        # The lock decides between standbys; a lease expired under a lock still held (a
        # black-holed holder whose session the keepalives have not ended yet) is taken without
        # it: the compare-and-set of Directory.take_over still lets only one standby win.
        got = self._locks.try_lock(camera)
        if not got and not expired:
            return  # another standby was first (or the holder is back)
        why = "its lease expired" if expired else "its lease lock is free"
        now = self.clock()
        epoch = self.directory.take_over(camera, holder, self.name, now, LEASE_TTL_MS,
                                         epoch=lease.epoch if lease is not None else None,
                                         expired=expired, locked=got)
        if epoch is None:
            self._unlock(camera)  # the directory changed meanwhile: nothing to take
            return
        self._free_since.pop(camera, None)
        self.takeovers += 1
        self._taken.add(camera)
        log.warning("camera %s: taken over from Archiver %s (%s): recorded by this Archiver "
                    "from now on (lease epoch %d)", camera, holder, why, epoch)
        self.audit.record("archiver", "camera.takeover", now, camera=camera,
                          **{"from": holder}, epoch=epoch)
        self.refresh()

    # --- failover: a disk that fails (issue 22) ----------------------------------------------
    def _check_disk(self) -> None:
        """Under the refresh lock. Give each camera with standbys whose segments this
        Archiver's disk failed past the bound (archiver/storage_watch.py) to its standbys;
        once the disk takes writes again (a refresh later), be a plain standby again."""
        watch = self.archive.storage_watch
        due = watch.due([name for name in self._held if name in self._assigned])
        for name, failure in due.items():
            self._release_for_disk(name, failure)
        if due or self._disk_failing is None:
            return
        if watch.probe() is None:
            released = sorted(self._disk_released)
            self._disk_failing = None  # before the log line: health says ok once it is said
            self._disk_released.clear()
            self._takeover_refused.clear()
            log.warning("this Archiver's disk takes writes again: it records the cameras "
                        "the directory gives it and takes cameras over again%s",
                        f" (released while it failed: {', '.join(released)}; those a standby "
                        "took stay there)" if released else "")

    def _release_for_disk(self, camera: str, failure: DiskFailure) -> None:
        """End this Archiver's recording of ``camera`` as a move does, and let its first
        healthy standby take over at once: the lock freed, the lease row expired."""
        now = self.clock()
        self._held.pop(camera, None)
        self._disk_released[camera] = failure.message
        self._disk_failing = failure.message
        self.storage_releases += 1
        # The lease first (the standby's poll sees it within 0.5 s), then the puller's stop,
        # which may wait for the segment it is building. The row is renewed to expire at 0
        # (expired by every Archiver's clock) and not locked, then the lock is freed: this
        # Archiver does not renew it again (the camera is not held here any more), so no
        # standby waits for the TTL, and each sees the row expired once it sees the lock free.
        try:
            self.directory.renew_leases(self.name, [camera], 0, 0)
        except Exception as exc:  # the free lock alone tells the standbys (the row says locked)
            log.warning("camera %s: could not expire its lease row: %s", camera, exc)
        self._unlock(camera)
        if self.rtsp is not None:
            self.rtsp.stop(camera, wait_s=PULLER_STOP_S)
        self.archive.health.forget(camera)
        self.archive.keys.forget_camera(camera)
        self.archive.storage_watch.forget(camera)
        log.warning("camera %s: released to its standbys: this Archiver could not archive it "
                    "(%d segment(s) refused over %.1f s: %s); it takes no camera over until "
                    "its disk takes writes again", camera, failure.count,
                    max(0, now - failure.since_ms) / 1000, failure.message)
        try:  # the audit log may be on the failed disk: the release stands without it
            self.audit.record("archiver", "camera.released", now, camera=camera,
                              reason="storage_failed", failures=failure.count,
                              since_ms=failure.since_ms, message=failure.message)
        except Exception as exc:
            log.warning("camera %s: could not audit its release (%s)", camera, exc)

    def _disk_takes_writes(self, camera: str, holder: str) -> bool:
        """Before a takeover: whether this Archiver's own disk takes a write (a probe)."""
        why = self.archive.storage_watch.probe()
        if why is None:
            return True
        self._disk_failing = why
        if camera not in self._takeover_refused:  # once per failure, not every poll
            self._takeover_refused.add(camera)
            log.warning("camera %s: not taken over from Archiver %s: this Archiver cannot "
                        "archive (%s); its other standbys may take it", camera, holder, why)
        return False

    def disk_status(self) -> dict[str, object]:
        """For health and /metrics: whether this Archiver's disk failed (and is not known to
        take writes again), the cameras it released for it, how many releases."""
        return {"storage": "ok" if self._disk_failing is None else "failing",
                "storage_message": self._disk_failing,
                "storage_released": sorted(self._disk_released),
                "storage_releases": self.storage_releases}

    def _watch(self) -> None:
        failing = False
        while not self._stop.wait(LEASE_POLL_S):
            try:
                self.watch_leases()
            except Exception as exc:  # the directory is down: no failover until it is back
                if not failing:  # once per outage, not every half second
                    log.warning("could not look at the site's camera leases (no takeover "
                                "by this Archiver until it can): %s", exc)
                failing = True
            else:
                if failing:
                    log.info("the site's camera leases are readable again")
                failing = False

    # --- the background thread ------------------------------------------------------------
    def start(self) -> None:
        """Register, take the cameras held, and heartbeat/refresh in a thread."""
        self.register()
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="site-member", daemon=True)
        self._thread.start()
        if self._locks is not None:
            self._watcher = threading.Thread(target=self._watch, name="site-leases",
                                             daemon=True)
            self._watcher.start()

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
        if self._watcher is not None:
            self._watcher.join(10)
        if self._locks is not None:
            self._locks.close()  # its cameras' standbys take over (the rule: stay)
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
                self._unreachable = True  # recording goes on (a holder keeps its cameras)
                log.warning("could not re-read the cameras this Archiver holds: %s", exc)
            self._wake.wait(REFRESH_S)
            self._wake.clear()
