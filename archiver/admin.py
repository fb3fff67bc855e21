"""The Archiver's administration without HTTP: add and remove cameras, authorize and revoke viewers.

The business rules live here, once: the admin API (routers/admin.py) and the benchmark generator
(bench/generate.py) both call them, so neither can skip the site-CA check, the key rotation, the
end of a revoked viewer's sessions or the audit entry. Refusals are ``AdminRefused`` with a wire
error code (``Refused``); archiver/deps.py chooses the HTTP status.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from archiver.archive import Archive
from archiver.audit import AuditLog
from archiver.auth import Sessions, digest, new_secret
from archiver.consolidated import shred_viewer_in_parts
from archiver.directory import NewViewer, ViewerRow
from archiver.registry import SiteMember
from archiver.rtsp import PULLER_STOP_S, CameraPullers
from archiver.services.cameras import ADMISSION_LOCK, admit_pulled_camera
from archiver.services.refused import Refused
from keyservice.certs import load_certificate, validate_viewer_certificate
from keyservice.errors import CertificateError, UsageError
from keyservice.identity import fingerprint
from keyservice.keyscheme import KeyScheme
from keyservice.names import validate_camera_name
from keyservice.wire import ErrorCode


@dataclass
class CameraChange:
    """A viewer's cameras before and after a change (None: all cameras), and the difference
    ("all" in ``added`` or ``removed`` when it moved to or from all cameras)."""

    before: list[str] | None
    after: list[str] | None
    added: list[str]
    removed: list[str]


def _cameras_text(row: ViewerRow) -> str:
    return "all cameras" if row.all_cameras else ", ".join(row.cameras) or "no camera"


# An administrative change refused: the services' one refusal type (the old name, kept for
# callers such as bench/generate.py).
AdminRefused = Refused


@dataclass(frozen=True)
class CameraMove:
    """A ``cameras move``: from which Archiver (None: none was named) to which, whether it
    moved (False: ``to`` recorded it already), and since when ``to`` records it."""

    camera: str
    from_archiver: str | None
    to: str
    moved: bool
    since_ms: int


@dataclass(frozen=True)
class ViewerRequest:
    """A certificate to authorize (PEM) on ``cameras`` (None: all, present and future);
    ``oaep_hash``: the key scheme's label, only for RSA certificates not made by fusion-keys."""

    pem: bytes
    cameras: list[str] | None
    oaep_hash: str | None = None


@dataclass(frozen=True)
class Authorization:
    """A viewer as authorized, and whether it was active already on the same cameras (then only
    its epoch renewed: its next chain records come under a new epoch opener; its chains run on)."""

    viewer: ViewerRow
    reauthorized: bool


@dataclass
class Admin:
    """What an administrative change touches: the archive (index, keys, health), the audit log,
    viewer sessions, the site CA that viewer certificates must chain to, and the RTSP pullers."""

    archive: Archive
    audit: AuditLog
    sessions: Sessions | None = None
    site_ca: tuple[x509.Certificate, ...] = ()
    rtsp: CameraPullers | None = None
    pull_schemes: tuple[str, ...] = ()
    # This Archiver in its site (None: an embedder's Admin, which pulls what it adds itself).
    site: SiteMember | None = None

    # --- cameras -----------------------------------------------------------------------
    def add_camera(self, actor: str, name: str, rtsp_url: str | None = None,
                   archiver: str | None = None, standbys: Sequence[str] = (),
                   redundant: bool = False) -> str | None:
        """Create a camera recorded by ``archiver`` (a name in the site's registry; default:
        this Archiver), with ``standbys`` in the order they take over (or, ``redundant``,
        record it at the same time); returns its ingest token (shown once, only its digest is
        kept), or None for a pulled (RTSP) camera: the Archiver is its only source, so no token
        exists that could push outside video into its signed archive."""
        archive = self.archive
        try:
            validate_camera_name(name)  # the name becomes an archive directory
        except UsageError as exc:
            raise Refused(ErrorCode.BAD_CAMERA_NAME, str(exc)) from None
        if rtsp_url and rtsp_url.split(":", 1)[0] not in self.pull_schemes:
            raise Refused(ErrorCode.BAD_RTSP_URL, "The camera URL must start with one of: "
                               + ", ".join(f"{s}://" for s in self.pull_schemes) + ".")
        holder = self._site_archiver(archiver) if self.site is not None else None
        standbys = self._standbys(holder, standbys, redundant, rtsp_url)
        if self.site is not None and self.site.standalone:
            # Unplaced, as before the registry: a standalone Archiver holds all its history,
            # whatever its (host) name becomes.
            holder = None
        token = new_secret()
        # Counted and added under one lock: two adds at the limit cannot both pass.
        with ADMISSION_LOCK:
            if rtsp_url and (self.site is None or holder in (None, self.site.name)):
                admit_pulled_camera(archive)
            # A pulled camera's row still needs a digest: one of a secret nobody is given.
            added = archive.directory.add_camera(name, digest(token), rtsp_url, archive.clock(),
                                                 archiver=holder, standbys=standbys,
                                                 redundant=redundant)
        if not added:
            raise Refused(ErrorCode.CAMERA_EXISTS, f"A camera named '{name}' exists already "
                               "(names of removed cameras stay reserved: their archive is "
                               "evidence).")
        self.audit.record(actor, "camera.add", archive.clock(), camera=name, rtsp=bool(rtsp_url),
                          **({"archiver": holder} if holder else {}),
                          **({"standbys": list(standbys)} if standbys else {}),
                          **({"redundant": True} if redundant else {}))
        if self.site is not None:
            self.site.refresh()  # pulled at once if this Archiver holds it (else its holder)
        elif rtsp_url and self.rtsp is not None:
            self.rtsp.start(name, rtsp_url)
        return None if rtsp_url else token

    def _standbys(self, primary: str | None, standbys: Sequence[str], redundant: bool,
                  rtsp_url: str | None) -> tuple[str, ...]:
        """The standbys checked: Archivers of the site, each once, none the primary; and
        redundant archiving only of a pulled camera with at least one standby (a pushed camera
        sends each segment to one Archiver)."""
        if not standbys and not redundant:
            return ()
        if self.site is None or self.site.standalone or primary is None:
            raise Refused(ErrorCode.UNKNOWN_ARCHIVER, "This Archiver is not in a site (no "
                          "--directory): there is no other Archiver to stand by.")
        checked = tuple(self._site_archiver(name) for name in standbys)
        if len({primary, *checked}) != 1 + len(checked):
            raise Refused(ErrorCode.INVALID_REQUEST, "Name each of the camera's Archivers once "
                          f"(given: {', '.join((primary, *checked))}).")
        if redundant and (not checked or not rtsp_url):
            raise Refused(ErrorCode.INVALID_REQUEST, "Redundant archiving needs a pulled camera "
                          "(--rtsp) and at least two Archivers (--archivers a1,a2): each of them "
                          "pulls it.")
        return checked

    def _site_archiver(self, name: str | None) -> str:
        """``name`` if it is an Archiver of the site (this one if None), else refused with the
        names there are."""
        assert self.site is not None
        if name is None or name == self.site.name:
            return self.site.name
        if self.site.standalone:
            raise Refused(ErrorCode.UNKNOWN_ARCHIVER, f"This Archiver ({self.site.name}) is "
                          "not in a site (no --directory): it records all its cameras itself.")
        if self.site.known_archiver(name) is None:
            known = ", ".join(a.name for a in self.archive.directory.archivers()) or "none"
            raise Refused(ErrorCode.UNKNOWN_ARCHIVER, f"No Archiver named '{name}' is in this "
                          f"site (known: {known}); 'fusion-archiver site archivers' lists them.")
        return name

    def move_camera(self, actor: str, name: str, to: str) -> CameraMove:
        """From now on ``to`` records the camera: the Archiver that recorded it ends its stream
        (its last segment archived, its chains ended) and ``to`` starts, each within a refresh
        (``archiver/registry.py``); what was recorded stays playable where it is."""
        archive = self.archive
        if self.site is None or self.site.standalone:
            raise Refused(ErrorCode.UNKNOWN_ARCHIVER, "This Archiver is not in a site (no "
                          "--directory): there is no other Archiver to move a camera to.")
        target = self._site_archiver(to)
        row = archive.directory.camera(name)
        if row is None or row.removed_ms is not None:
            raise Refused(ErrorCode.UNKNOWN_CAMERA, f"There is no camera named '{name}'.")
        now = archive.clock()
        if row.archiver == target:
            return CameraMove(name, row.archiver, target, False, now)
        if not archive.directory.move_camera(name, target, now):
            raise Refused(ErrorCode.UNKNOWN_CAMERA, f"There is no camera named '{name}'.")
        self.audit.record(actor, "camera.move", now, camera=name, **{"from": row.archiver},
                          to=target)
        self.site.refresh()  # this Archiver's part at once; the others' within a refresh
        return CameraMove(name, row.archiver, target, True, now)

    def remove_camera(self, actor: str, name: str) -> None:
        """Stop recording a camera; its archive stays (evidence) and its name stays reserved."""
        archive = self.archive
        if not archive.directory.remove_camera(name, archive.clock()):
            raise Refused(ErrorCode.UNKNOWN_CAMERA, f"There is no camera named '{name}'.")
        if self.rtsp is not None:
            # Wait for the puller to archive the segment it was building: removed means stopped.
            self.rtsp.stop(name, wait_s=PULLER_STOP_S)
        archive.health.forget(name)
        archive.keys.forget_camera(name)
        self.audit.record(actor, "camera.remove", archive.clock(), camera=name)

    # --- viewers -----------------------------------------------------------------------
    def viewers(self) -> list[ViewerRow]:
        """Every viewer ever authorized, revoked ones too (oldest first)."""
        return self.archive.directory.viewers()

    def viewer(self, fp: str) -> ViewerRow | None:
        return self.archive.directory.viewer(fp)

    def authorize_viewer(self, actor: str, pem: bytes, cameras: list[str] | None,
                         oaep_hash: str | None = None) -> ViewerRow:
        """Authorize a viewer certificate on ``cameras`` (None: all, present and future); the
        keys of its cameras rotate at once, so it gets nothing recorded before."""
        return self.authorize(actor, pem, cameras, oaep_hash).viewer

    def authorize(self, actor: str, pem: bytes, cameras: list[str] | None,
                  oaep_hash: str | None = None) -> Authorization:
        """``authorize_viewer``, telling whether the viewer was active already."""
        return self.authorize_many(actor, [ViewerRequest(pem, cameras, oaep_hash)])[0]

    def authorize_many(self, actor: str, requests: Sequence[ViewerRequest]
                       ) -> list[Authorization]:
        """Batch enrolment: ``authorize`` for each request, all of them or none (a refusal of
        one names it and authorizes nobody), in one directory transaction and one audit fsync.
        Each viewer still gets its own audit entry and its own epoch; they join the running
        chains of their cameras at their next rotation, as one viewer does."""
        archive = self.archive
        known: set[str] | None = None
        checked: list[tuple[NewViewer, str]] = []
        numbers: dict[str, int] = {}
        for number, request in enumerate(requests, 1):
            if request.cameras and known is None:
                # Only named cameras are looked up (viewers of all cameras need no query).
                known = {c.name for c in archive.directory.cameras()}
            try:
                viewer, label = self._checked(request, known or set())
            except Refused as exc:
                raise self._in_batch(exc, number, len(requests)) from None
            if viewer.fingerprint in numbers:
                raise Refused(ErrorCode.VIEWER_EXISTS, f"Certificates {numbers[viewer.fingerprint]}"
                              f" and {number} of the batch are the same certificate "
                              f"({viewer.fingerprint[:16]}); nobody was authorized.")
            numbers[viewer.fingerprint] = number
            checked.append((viewer, label))
        before = archive.directory.viewers_named(list(numbers))
        for viewer, _ in checked:
            existing = before.get(viewer.fingerprint)
            if existing is not None and existing.revoked_ms is None and viewer.cameras != (
                    None if existing.all_cameras else tuple(sorted(existing.cameras))):
                # Adding again used to replace the viewer's cameras silently (one was
                # dropped): changing them is its own, explicit command. Adding again with the
                # same cameras only re-authorizes (its keys rotate), as before.
                fp = viewer.fingerprint[:16]
                raise self._in_batch(Refused(
                    ErrorCode.VIEWER_EXISTS, f"Viewer {fp} is authorized already, on "
                    f"{_cameras_text(existing)}; change its cameras with 'fusion-archiver "
                    f"viewers cameras {fp} --add CAMS', '--remove CAMS' or '--set CAMS'."),
                    numbers[viewer.fingerprint], len(requests))
        archive.directory.add_viewers([viewer for viewer, _ in checked], archive.clock())
        archive.viewers_authorized(list(numbers))
        self.audit.record_many(actor, "viewer.add", archive.clock(), [
            {"fingerprint": viewer.fingerprint, "subject": viewer.subject,
             # (A grantee on no camera used to be audited as "all".)
             "cameras": "all" if viewer.cameras is None else list(viewer.cameras),
             "oaep_hash": label}
            for viewer, label in checked])
        after = archive.directory.viewers_named(list(numbers))
        return [Authorization(after[fp], fp in before and before[fp].revoked_ms is None)
                for fp in numbers]

    @staticmethod
    def _in_batch(refused: Refused, number: int, size: int) -> Refused:
        """A refusal of one certificate of a batch, naming it (a single one as it was)."""
        if size > 1:
            refused.message = (f"Certificate {number} of {size}: {refused.message} Nobody in "
                               "this batch was authorized.")
            refused.args = (refused.message,)
        return refused

    def _checked(self, request: ViewerRequest, known_cameras: set[str]
                 ) -> tuple[NewViewer, str]:
        """A request of ``authorize_many`` checked (the certificate chains to the site CA and
        is valid now, its cameras exist): the viewer to add and its key scheme's audit label."""
        try:
            cert = load_certificate(request.pem)
            oaep = validate_viewer_certificate(
                cert, now=dt.datetime.now(dt.UTC), site_ca=self.site_ca,
                oaep_hash=KeyScheme.from_label(request.oaep_hash) if request.oaep_hash else None)
        except CertificateError as exc:
            raise Refused(ErrorCode.BAD_CERTIFICATE, str(exc)) from None
        wanted = None if request.cameras is None else sorted(set(request.cameras))
        unknown = sorted(set(wanted or ()) - known_cameras)
        if unknown:
            raise Refused(ErrorCode.UNKNOWN_CAMERA, f"Unknown camera(s): {', '.join(unknown)}.")
        viewer = NewViewer(fingerprint(cert).hex(), cert.public_bytes(Encoding.DER),
                           cert.subject.rfc4514_string(), int(oaep),
                           None if wanted is None else tuple(wanted))
        return viewer, oaep.legacy_label

    def change_viewer_cameras(self, actor: str, fp: str, add: list[str], remove: list[str],
                              set_to: list[str] | Literal["all"] | None = None) -> CameraChange:
        """Add cameras to an active viewer, remove some, or set them all (``set_to``: a list,
        or "all" for all cameras, present and future). Keys rotate on a change, as when a viewer
        is authorized: a camera added now gives nothing recorded before."""
        archive = self.archive
        row = archive.directory.viewer(fp)
        if row is None:
            raise Refused(ErrorCode.UNKNOWN_VIEWER, f"No viewer has the fingerprint {fp}.")
        if row.revoked_ms is not None:
            raise Refused(ErrorCode.UNKNOWN_VIEWER, f"Viewer {fp[:16]} is revoked; "
                               "authorize its certificate again with 'viewers add'.")
        if set_to is not None and (add or remove):
            raise Refused(ErrorCode.BAD_CAMERA_CHANGE,
                               "Give either the cameras to set, or cameras to add and remove.")
        if set_to is None and not (add or remove):
            raise Refused(ErrorCode.BAD_CAMERA_CHANGE,
                               "Give cameras to add, to remove, or to set.")
        both = sorted(set(add) & set(remove))
        if both:
            raise Refused(ErrorCode.BAD_CAMERA_CHANGE, f"Camera(s) {', '.join(both)} both "
                               "added and removed: give each once.")
        known = {c.name for c in archive.directory.cameras()}
        named = set(add) | (set(set_to) if isinstance(set_to, list) else set())
        unknown = sorted(named - known)
        if unknown:
            raise Refused(ErrorCode.UNKNOWN_CAMERA,
                               f"Unknown camera(s): {', '.join(unknown)}.")
        before: set[str] | None = None if row.all_cameras else set(row.cameras)
        after: set[str] | None
        if set_to is not None:
            after = None if set_to == "all" else set(set_to)
        elif before is None:
            if remove:
                raise Refused(ErrorCode.BAD_CAMERA_CHANGE, f"Viewer {fp[:16]} is "
                                   "authorized on all cameras; set the ones it keeps "
                                   "('--set CAMS').")
            after = None
        else:
            after = (before | set(add)) - set(remove)
        if after is not None and not after:
            raise Refused(ErrorCode.BAD_CAMERA_CHANGE, f"Viewer {fp[:16]} would be "
                               "authorized on no camera; revoke it instead ('viewers revoke').")
        if before is not None and after is not None:
            added, removed = sorted(after - before), sorted(before - after)
        else:  # to or from all cameras (or all to all)
            added = ["all"] if after is None and before is not None else []
            removed = ["all"] if before is None and after is not None else []
        change = CameraChange(before=None if before is None else sorted(before),
                              after=None if after is None else sorted(after),
                              added=added, removed=removed)
        if change.before == change.after:
            return change  # nothing changed: no rotation, no audit entry
        archive.directory.set_viewer_cameras(fp, change.after)
        if change.added:
            archive.authorization_changed(fp, None)
        else:  # only removed: no chain needs to restart before the next key period
            archive.access_removed(fp, change.removed if before is not None else None)
        self.audit.record(actor, "viewer.cameras", archive.clock(), fingerprint=fp,
                          before=change.before or "all", cameras=change.after or "all",
                          added=change.added, removed=change.removed)
        return change

    def revoke_viewer(self, actor: str, fp: str, delete_key_streams: bool = False) -> None:
        """Revoke a viewer: no new keys for it from now on (keys rotate), its sessions end; with
        ``delete_key_streams`` its stored key records go too (crypto-shredding for it)."""
        archive = self.archive
        if not archive.directory.revoke_viewer(fp, archive.clock()):
            raise Refused(ErrorCode.UNKNOWN_VIEWER, f"No viewer has the fingerprint {fp}.")
        if delete_key_streams:
            # The key streams are this Archiver's (its local index); the directory records
            # that they were deleted.
            archive.db.delete_key_streams(fp)
            shred_viewer_in_parts(archive.settings.data_dir, fp)  # other Archivers' copies
            archive.directory.mark_key_streams_deleted(fp)
        # Its cameras keep the current key period's key (it holds that one already) and
        # switch to chains without it from the next period on.
        archive.access_removed(fp, None)
        if self.sessions is not None:
            self.sessions.end_sessions_of(fp)
        self.audit.record(actor, "viewer.revoke", archive.clock(), fingerprint=fp,
                          delete_key_streams=delete_key_streams)
