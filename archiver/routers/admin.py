"""Admin API: cameras, viewers, retention, evidence holds, storage. HTTP only: the rules (and
the audit entries) are archiver/admin.py and archiver/services/ (cameras, retention)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Literal

from cryptography import x509
from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from archiver.admin import ViewerRequest, ViewerRow
from archiver.cameras import CameraState
from archiver.deps import (
    AdminDep,
    AdminServiceDep,
    CameraName,
    CameraPath,
    CamerasDep,
    RetentionDep,
    ServicesDep,
)
from archiver.rtsp import redact
from archiver.services.cameras import CameraStatus
from keyservice.keyscheme import KeyScheme
from keyservice.names import CAMERA_NAME_PATTERN
from keyservice.wire import VIEWER_BATCH_MAX

router = APIRouter(prefix="/v1/admin", tags=["admin"])
Fingerprint = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")]
# A row id: SQLite's integers are 64-bit signed (a larger one was a 500, found by schemathesis).
HoldId = Annotated[int, Path(ge=1, le=2**63 - 1)]


# An Archiver's name follows the camera names' character rule (archiver/settings.py).
ArchiverName = Annotated[str, Field(pattern=CAMERA_NAME_PATTERN)]


class CameraCreate(BaseModel):
    # The character rule only: '.' and '..' get the admin's own bad_camera_name answer.
    name: str = Field(pattern=CAMERA_NAME_PATTERN)
    rtsp_url: str | None = Field(default=None, max_length=2048, pattern=r"^[a-z][a-z0-9+.-]*:.+")
    archiver: ArchiverName | None = Field(default=None, description="The Archiver of the site "
                                          "that records it (default: this one)")
    standbys: list[ArchiverName] = Field(default_factory=list, max_length=7, description=(
        "The Archivers that take over, in this order, when the one recording it is down"))
    redundant: bool = Field(default=False, description="All its Archivers record it at once "
                            "(a pulled camera only)")


class CameraCreated(BaseModel):
    name: str
    ingest_url: str | None = Field(description="None for a pulled (RTSP) camera")
    ingest_token: str | None = Field(description="Shown once; None for a pulled (RTSP) camera, "
                                     "which accepts no pushed video")
    rtsp_url: str | None
    archiver: str | None = Field(default=None, description="The Archiver that records it "
                                 "(the ingest URL is its)")
    standbys: list[str] = Field(default_factory=list)
    redundant: bool = False


class CameraMoveRequest(BaseModel):
    to: ArchiverName


class CameraMoved(BaseModel):
    camera: str
    from_archiver: str | None
    to: str
    moved: bool = Field(description="False: the camera was recorded there already")
    since_ms: int


class ArchiverInfo(BaseModel):
    name: str
    url: str
    certificate_sha256: str = Field(description="SHA-256 of its signing certificate (DER)")
    registered_ms: int
    heartbeat_ms: int | None
    heartbeat_age_ms: int | None
    alive: bool = Field(description="Heard of in the last 30 s")
    cameras_held: list[str]
    this: bool = Field(description="The Archiver that answered")


class CameraInfo(BaseModel):
    name: str
    archiver: str | None = Field(default=None, description="The Archiver of the site that "
                                 "records it (None: each that reads it, as before the "
                                 "registry); the recorded range and health are the answering "
                                 "Archiver's")
    archivers: list[str] = Field(default_factory=list, description="Its Archivers in order "
                                 "(primary, then standbys); empty: one Archiver")
    redundant: bool = Field(default=False, description="All of them record it at once")
    rtsp_url: str | None = Field(description="Credentials redacted")
    created_ms: int
    segments: int
    first_ms: int | None
    last_ms: int | None
    state: CameraState
    last_segment_ms: int | None = Field(description="Arrival of the last segment (saved "
                                        "across restarts)")
    segments_last_minute: int
    bytes_last_minute: int
    gaps: int = Field(description="Gaps in the recording since the Archiver started")
    refused: int = Field(description="Segments that could not be archived since start "
                         "(uploads refused, cut off or failed)")
    last_refusal: str = Field(description="Why the last refused segment was refused")
    puller_restarts: int
    message: str = Field(description="Why an RTSP camera cannot be pulled, why a camera is "
                         "stalled, or why its stream or timestamps are bad")
    stream_faults: int = Field(default=0, description="RTSP: segments cut or frames dropped "
                               "to keep the pull's buffer bounded, since start")
    timestamp_jumps: int = Field(default=0, description="Segments whose timestamps jumped "
                                 "between two frames since start (the jump is not signed as "
                                 "video)")
    lag_ms: int | None = Field(default=None, description="From the end of the capture of the "
                               "last segment to its archiving")
    max_lag_ms: int | None = Field(default=None, description="The most a segment lagged in the "
                                   "last minute (over 10 s: the camera is 'behind')")
    overruns: int = Field(default=0, description="Pulled segments placed at their arrival since "
                          "start: their clock was further behind than the Archiver believes")
    before_restart: bool = Field(default=False, description="The state is the last one known "
                                 "before the Archiver restarted (the camera was not heard of "
                                 "since)")
    retention_days: int = Field(description="Days video is kept (the camera's or the site's)")
    retention_default: bool = Field(description="True if the site default applies")
    holds: int = Field(description="Evidence holds on the camera")
    expired_until_ms: int | None = Field(description="End of the latest video retention removed")


class RetentionUpdate(BaseModel):
    days: int | None = Field(ge=1, le=36500, description="None: the site default")


class HoldCreate(BaseModel):
    camera: CameraName
    from_ms: int = Field(ge=0, le=2**62)
    to_ms: int = Field(ge=0, le=2**62)
    reason: str = Field(min_length=1, max_length=1000)


class HoldInfo(BaseModel):
    hold_id: int
    camera: str
    from_ms: int
    to_ms: int
    reason: str
    created_by: str
    created_ms: int


class StorageInfo(BaseModel):
    free_bytes: int
    min_free_bytes: int
    retention_days: int = Field(description="The site default")
    below_watermark: bool = Field(description="Free space is below the threshold and no "
                                  "unheld video of a past day is left to remove")
    files_removed: int = Field(description="Archive days removed since start")
    bytes_reclaimed: int
    key_records_shredded: int


class ViewerCreate(BaseModel):
    certificate: str = Field(max_length=65536, description="PEM certificate of the viewer")
    cameras: list[CameraName] | Literal["all"]
    key_scheme: Literal["rsa-oaep-sha256", "rsa-oaep-sha1", "sha256", "sha1"] | None = Field(
        default=None, description="Only for RSA certificates without the enrolment extension")
    oaep_hash: Literal["rsa-oaep-sha256", "rsa-oaep-sha1", "sha256", "sha1"] | None = Field(
        default=None, description="Deprecated: the old name of key_scheme")


class ViewerBatch(BaseModel):
    viewers: list[ViewerCreate] = Field(min_length=1, max_length=VIEWER_BATCH_MAX,
                                        description="Certificates to authorize, all or none")


class ViewerInfo(BaseModel):
    fingerprint: str
    subject: str
    key_scheme: str = Field(description="rsa-oaep-sha256, rsa-oaep-sha1 or ecdh-p256")
    oaep_hash: str = Field(description="Deprecated old spelling: sha256, sha1, ecdh-p256")
    cameras: list[str] | Literal["all"]
    added_ms: int
    revoked_ms: int | None
    key_streams_deleted: bool
    not_after: str
    reauthorized: bool = Field(default=False, description="It was authorized already, on the "
                               "same cameras: only its epoch renewed")


class CameraChangeRequest(BaseModel):
    add: list[CameraName] = Field(default_factory=list, description="Cameras to add")
    remove: list[CameraName] = Field(default_factory=list, description="Cameras to remove")
    set: list[CameraName] | Literal["all"] | None = Field(
        default=None, description="The cameras it has from now on (instead of add/remove)")


class CameraChangeInfo(BaseModel):
    fingerprint: str
    subject: str
    before: list[str] | Literal["all"]
    cameras: list[str] | Literal["all"]
    added: list[str] = Field(description="'all' when it moved to all cameras")
    removed: list[str] = Field(description="'all' when it moved from all cameras")


class RevokeRequest(BaseModel):
    delete_key_streams: bool = False


class Revoked(BaseModel):
    fingerprint: str
    revoked: bool
    key_streams_deleted: bool


@router.post("/cameras", status_code=201)
def add_camera(body: CameraCreate, admin: AdminServiceDep, services: ServicesDep,
               actor: AdminDep) -> CameraCreated:
    token = admin.add_camera(actor, body.name, body.rtsp_url, body.archiver, body.standbys,
                             body.redundant)
    holder = body.archiver or services.site.name
    # The camera sends to the Archiver that records it, wherever the command was sent.
    base = services.site.holder_url(holder) or services.settings.public_url
    return CameraCreated(name=body.name, rtsp_url=redact(body.rtsp_url) if body.rtsp_url else None,
                         ingest_token=token,
                         archiver=None if services.site.standalone else holder,
                         standbys=body.standbys, redundant=body.redundant,
                         ingest_url=None if token is None else
                         f"{base}/ingest/{body.name}/index.m3u8")


@router.post("/cameras/{name}/move")
def move_camera(name: CameraPath, body: CameraMoveRequest, admin: AdminServiceDep,
                actor: AdminDep) -> CameraMoved:
    return CameraMoved(**asdict(admin.move_camera(actor, name, body.to)))


@router.get("/site/archivers")
def site_archivers(services: ServicesDep, actor: AdminDep) -> list[ArchiverInfo]:
    return [ArchiverInfo(**{**asdict(s), "cameras_held": list(s.cameras_held)})
            for s in services.site.statuses()]


@router.get("/cameras")
def list_cameras(cameras: CamerasDep, actor: AdminDep) -> list[CameraInfo]:
    return [_camera_info(status) for status in cameras.statuses()]


def _camera_info(status: CameraStatus) -> CameraInfo:
    cam = status.camera
    return CameraInfo(name=cam.name, archiver=cam.archiver, archivers=list(status.archivers),
                      redundant=cam.redundant,
                      rtsp_url=redact(cam.rtsp_url) if cam.rtsp_url else None,
                      created_ms=cam.created_ms, segments=status.segments,
                      first_ms=status.first_ms, last_ms=status.last_ms, **asdict(status.health),
                      retention_days=status.retention_days,
                      retention_default=status.retention_default, holds=status.holds,
                      expired_until_ms=status.expired_until_ms)


@router.put("/cameras/{name}/retention")
def set_retention(name: CameraPath, body: RetentionUpdate, retention: RetentionDep,
                  cameras: CamerasDep, actor: AdminDep) -> CameraInfo:
    retention.set_retention(actor, name, body.days)
    return _camera_info(cameras.status(name))


@router.get("/storage")
def storage(retention: RetentionDep, actor: AdminDep) -> StorageInfo:
    return StorageInfo(**asdict(retention.storage()))


@router.post("/holds", status_code=201)
def add_hold(body: HoldCreate, retention: RetentionDep, actor: AdminDep) -> HoldInfo:
    return HoldInfo(**asdict(retention.add_hold(actor, body.camera, body.from_ms, body.to_ms,
                                                body.reason)))


@router.get("/holds")
def list_holds(retention: RetentionDep, actor: AdminDep,
               camera: str | None = None) -> list[HoldInfo]:
    return [HoldInfo(**asdict(h)) for h in retention.holds(camera)]


@router.delete("/holds/{hold_id}")
def remove_hold(hold_id: HoldId, retention: RetentionDep, actor: AdminDep) -> HoldInfo:
    return HoldInfo(**asdict(retention.remove_hold(actor, hold_id)))


@router.delete("/cameras/{name}", status_code=204)
def remove_camera(name: CameraPath, admin: AdminServiceDep, actor: AdminDep) -> None:
    admin.remove_camera(actor, name)


# /clients: the old name of /viewers, kept as a deprecated alias for one release.
@router.post("/viewers", status_code=201)
@router.post("/clients", status_code=201, deprecated=True)
def add_viewer(body: ViewerCreate, admin: AdminServiceDep, actor: AdminDep) -> ViewerInfo:
    cameras = None if body.cameras == "all" else list(body.cameras)
    done = admin.authorize(actor, body.certificate.encode(), cameras,
                           body.key_scheme or body.oaep_hash)
    info = _viewer_info(done.viewer)
    info.reauthorized = done.reauthorized
    return info


@router.post("/viewers/batch", status_code=201)
def add_viewers(body: ViewerBatch, admin: AdminServiceDep, actor: AdminDep) -> list[ViewerInfo]:
    """Batch enrolment: every certificate authorized in one transaction, or none (the refusal
    names the certificate)."""
    done = admin.authorize_many(actor, [
        ViewerRequest(v.certificate.encode(), None if v.cameras == "all" else list(v.cameras),
                      v.key_scheme or v.oaep_hash) for v in body.viewers])
    infos = []
    for authorization in done:
        infos.append(_viewer_info(authorization.viewer))
        infos[-1].reauthorized = authorization.reauthorized
    return infos


@router.get("/viewers")
@router.get("/clients", deprecated=True)
def list_viewers(admin: AdminServiceDep, actor: AdminDep) -> list[ViewerInfo]:
    return [_viewer_info(row) for row in admin.viewers()]


@router.post("/viewers/{fp}/cameras")
def change_viewer_cameras(fp: Fingerprint, body: CameraChangeRequest, admin: AdminServiceDep,
                          actor: AdminDep) -> CameraChangeInfo:
    change = admin.change_viewer_cameras(actor, fp, list(body.add), list(body.remove), body.set)
    row = admin.viewer(fp)
    assert row is not None
    return CameraChangeInfo(fingerprint=fp, subject=row.subject,
                            before="all" if change.before is None else change.before,
                            cameras="all" if change.after is None else change.after,
                            added=change.added, removed=change.removed)


@router.post("/viewers/{fp}/revoke")
@router.post("/clients/{fp}/revoke", deprecated=True)
def revoke_viewer(fp: Fingerprint, body: RevokeRequest, admin: AdminServiceDep,
                  actor: AdminDep) -> Revoked:
    admin.revoke_viewer(actor, fp, body.delete_key_streams)
    return Revoked(fingerprint=fp, revoked=True, key_streams_deleted=body.delete_key_streams)


def _viewer_info(row: ViewerRow) -> ViewerInfo:
    cert = x509.load_der_x509_certificate(row.certificate)
    return ViewerInfo(
        fingerprint=row.fingerprint, subject=row.subject, key_scheme=KeyScheme(row.oaep_hash).label,
        oaep_hash=KeyScheme(row.oaep_hash).legacy_label,
        cameras="all" if row.all_cameras else list(row.cameras), added_ms=row.added_ms,
        revoked_ms=row.revoked_ms, key_streams_deleted=row.key_streams_deleted,
        not_after=cert.not_valid_after_utc.isoformat())
