"""The embedding API: every service of an Archiver, built from its settings, without HTTP.

    with create_services(settings) as services:
        services.retention.add_hold("alice", "door", from_ms, to_ms, "case 12")

``create_app(settings)`` serves the same object (archiver/deps.py hands its parts to the
routers). Background work (camera health, retention passes, RTSP pullers) is the app's; an
embedder that wants it calls ``services.archive.retention.run()`` etc. itself.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from cryptography import x509

from archiver.admin import Admin
from archiver.admins import Admins, AdminStore
from archiver.archive import Archive, wall_clock_ms
from archiver.audit import AuditLog
from archiver.auth import Sessions, digest, ensure_admin_token
from archiver.consolidation import Consolidator, Exporter
from archiver.datadir import secure_data_dir
from archiver.limits import RefusalAudit
from archiver.registry import SiteMember
from archiver.rtsp import CameraPullers, RtspSupervisor
from archiver.rtsp_workers import RtspWorkerPool
from archiver.services.audit import AuditService
from archiver.services.cameras import CameraService
from archiver.services.grants import GrantService
from archiver.services.ingest import IngestService
from archiver.services.logins import LoginService
from archiver.services.playback import PlaybackService
from archiver.services.retention import RetentionService
from archiver.services.routing import RoutingService
from archiver.settings import Settings
from archiver.signing import open_signer
from keyservice.certs import load_certificate
from keyservice.identity import Signer, fingerprint

log = logging.getLogger("archiver")


@dataclass
class ArchiverServices:
    """An open Archiver: its archive, audit log and sessions, and the services over them.
    ``close()`` (or ``with``) records the stop in the audit log and closes the files."""

    settings: Settings
    archive: Archive
    audit: AuditLog
    sessions: Sessions  # viewers'
    admin_sessions: Sessions  # personal admins', apart from viewers'
    admins: Admins
    admin_token_digest: bytes
    metrics_token_digest: bytes | None = None
    site_ca: tuple[x509.Certificate, ...] = ()
    rtsp: CameraPullers | None = None
    refusals: RefusalAudit | None = None

    @functools.cached_property
    def admin(self) -> Admin:
        """Cameras and viewers: add, remove, authorize, change, revoke (archiver/admin.py)."""
        return Admin(self.archive, self.audit, self.sessions, self.site_ca, self.rtsp,
                     self.settings.pull_schemes, self.site)

    @functools.cached_property
    def site(self) -> SiteMember:
        """This Archiver in its site: registry, heartbeat, the cameras it holds."""
        return SiteMember(self.archive, self.settings, self.audit, self.rtsp, self.archive.clock)

    @functools.cached_property
    def consolidation(self) -> Consolidator:
        """Gaps in this Archiver's cameras filled from other Archivers' signed recordings."""
        return Consolidator(self.archive, self.settings, self.audit)

    @functools.cached_property
    def exporter(self) -> Exporter:
        """The other side: this Archiver's signed records, for another Archiver of the site."""
        return Exporter(self.archive, self.settings.archiver_name, self.archive.clock,
                        self.audit)

    @functools.cached_property
    def audit_log(self) -> AuditService:
        """The audit log as admins read it (the site's in a site)."""
        return AuditService(self.archive, self.settings)

    @functools.cached_property
    def cameras(self) -> CameraService:
        return CameraService(self.archive, self.settings)

    @functools.cached_property
    def retention(self) -> RetentionService:
        return RetentionService(self.archive, self.audit, self.settings)

    @functools.cached_property
    def grants(self) -> GrantService:
        return GrantService(self.archive, self.audit, self.admins.store)

    @functools.cached_property
    def logins(self) -> LoginService:
        return LoginService(self.archive, self.audit, self.sessions, self.admins,
                            self.admin_sessions, self.admin_token_digest,
                            self.settings.bootstrap_token)

    @functools.cached_property
    def playback(self) -> PlaybackService:
        return PlaybackService(self.archive, self.audit, self.cameras, self.consolidation.stream)

    @functools.cached_property
    def routing(self) -> RoutingService:
        """Which Archiver of the site answers for a camera's range (redirects, placements)."""
        return RoutingService(self.archive.directory, self.settings.archiver_name,
                              self.archive.clock, self.consolidation.holds_copy)

    @functools.cached_property
    def ingest(self) -> IngestService:
        return IngestService(self.archive, self.site)

    def start_pullers(self) -> None:
        """Start pulling every RTSP camera this Archiver holds (the app does at start, then
        ``site.start()`` keeps them current)."""
        self.site.refresh()

    def close(self) -> None:
        """Record the stop and close the audit log, the admins' table and the archive."""
        try:
            if self.refusals is not None:
                self.refusals.flush()
        except Exception:  # a full disk: the refused-access summary is lost, not the stop
            log.warning("could not write the refused-access summary to the audit log")
        try:
            self.audit.record("archiver", "stop", self.archive.clock())
        finally:
            self.audit.close()
            self.admins.store.close()
            self.archive.close()

    def __enter__(self) -> ArchiverServices:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _camera_pullers(archive: Archive, settings: Settings,
                    clock: Callable[[], int]) -> CameraPullers:
    """What pulls the RTSP cameras: worker processes (``settings.rtsp_workers``, default one
    per core) or, with 0, threads in this process."""

    def ingest(camera: str, data: bytes, closed_at: float, *,
               session: int | None = None, captured_by: float | None = None) -> object:
        # The segment arrived when its last packet reached the puller, not when this process
        # got to it: under load the two differ, and placing it on the wall clock (and the lag
        # an admin sees) must not count the queue. Taken as an age, so a test clock works too.
        now, wall = clock(), time.time()
        age_ms = max(0, round((wall - closed_at) * 1000))
        captured_ms = (None if captured_by is None
                       else now - max(0, round((wall - captured_by) * 1000)))
        return archive.ingest_segment(camera, data, now_ms=now - age_ms, session=session,
                                      captured_by_ms=captured_ms)

    def fault(camera: str, message: str) -> None:
        archive.health.stream_fault(camera, message, clock())

    workers = settings.rtsp_worker_count
    if workers == 0:
        return RtspSupervisor(ingest, archive.health.puller_failed, fault,
                              settings.rtsp_max_segment_bytes, settings.rtsp_max_segment_s)
    return RtspWorkerPool(ingest, archive.health.puller_failed, fault,
                          settings.rtsp_max_segment_bytes, settings.rtsp_max_segment_s, workers)


def create_services(settings: Settings, signer: Signer | None = None,
                    clock: Callable[[], int] = wall_clock_ms,
                    free_bytes: Callable[[], int] | None = None) -> ArchiverServices:
    """Open the Archiver of ``settings.data_dir`` (made and migrated if needed): its signer (the
    default SoftHSM token in the data directory unless ``signer`` is given), archive, audit log,
    admin and metrics tokens, sessions and services. The caller closes it."""
    secure_data_dir(settings.data_dir)
    archive = Archive(settings, signer or open_signer(settings), clock=clock,
                      free_bytes=free_bytes)
    try:
        admin_token, created = ensure_admin_token(settings.admin_token_path)
        if created:
            log.warning("created the admin token in %s (mode 0600)", settings.admin_token_path)
        metrics_token, _ = ensure_admin_token(settings.metrics_token_path)
        # What viewers pin: printed at every start, so the admin can hand it out (it is also
        # what 'fusion-archiver certificate' prints).
        log.info("Archiver certificate fingerprint (SHA-256): %s (viewers check it on first "
                 "use; 'fusion-archiver certificate' prints the certificate to pin)",
                 fingerprint(archive.signer.certificate).hex())
        # In a site every entry also goes to the directory: one audit log for the site.
        audit = AuditLog(settings.audit_log_path,
                         archive.directory if settings.directory_url else None,
                         settings.archiver_name, retry_s=settings.site_poll_s)
    except BaseException:
        archive.close()
        raise
    audit.record("archiver", "start", clock(), recovery=archive.recovery_actions)
    refusals = RefusalAudit(audit, clock, settings.refusal_window_s)

    def expired(fp: str, not_after_ms: int) -> None:
        try:
            audit.record("archiver", "viewer.expired", clock(), fingerprint=fp,
                         not_after_ms=not_after_ms, effect="no key material from now on")
        except Exception:  # ingest must not fail over it; the next start reports it again
            log.warning("could not audit the expiry of viewer %s", fp[:16])
        log.warning("viewer %s: certificate expired; it gets no key material from now on",
                    fp[:16])

    archive.keys.on_expired = expired

    def removed(camera: str, file: str, from_ms: int, to_ms: int, reason: str) -> None:
        audit.record("archiver", "retention.remove", clock(), camera=camera, file=file,
                     from_ms=from_ms, to_ms=to_ms, reason=reason)

    archive.retention.on_removed = removed
    archive.retention.ensure_reserve()
    rtsp = _camera_pullers(archive, settings, clock)
    site_ca = tuple(load_certificate(p.read_bytes()) for p in settings.site_ca_files)
    admin_sessions = Sessions(settings.challenge_ttl_s, settings.session_ttl_s)
    services = ArchiverServices(
        settings=settings, archive=archive, audit=audit,
        sessions=Sessions(settings.challenge_ttl_s, settings.session_ttl_s),
        admin_sessions=admin_sessions,
        admins=Admins(AdminStore(archive.directory), audit, admin_sessions, clock, site_ca),
        admin_token_digest=digest(admin_token), metrics_token_digest=digest(metrics_token),
        site_ca=site_ca, rtsp=rtsp, refusals=refusals)
    # Files made above by this start (SQLite, token, audit) get the same treatment.
    secure_data_dir(settings.data_dir)
    return services
