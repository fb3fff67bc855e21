"""Admin API: cameras and viewers. Every change goes to the audit log."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import Annotated, Literal

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from archiver.auth import digest, new_secret
from archiver.cameras import CameraState
from archiver.db import CameraRow, ViewerRow
from archiver.deps import AdminDep, ApiError, Services, ServicesDep
from archiver.rtsp import PULLER_STOP_S, redact
from keyservice.certs import load_certificate, validate_viewer_certificate
from keyservice.errors import CertificateError, FormatError
from keyservice.format import validate_name
from keyservice.identity import OaepHash, fingerprint

router = APIRouter(prefix="/v1/admin", tags=["admin"])
CameraName = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
Fingerprint = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")]


class CameraCreate(BaseModel):
    name: CameraName
    rtsp_url: str | None = Field(default=None, max_length=2048, pattern=r"^[a-z][a-z0-9+.-]*:.+")


class CameraCreated(BaseModel):
    name: str
    ingest_url: str
    ingest_token: str
    rtsp_url: str | None


class CameraInfo(BaseModel):
    name: str
    rtsp_url: str | None = Field(description="Credentials redacted")
    created_ms: int
    segments: int
    first_ms: int | None
    last_ms: int | None
    state: CameraState
    last_segment_ms: int | None = Field(description="Arrival of the last segment (this run)")
    segments_last_minute: int
    bytes_last_minute: int
    gaps: int = Field(description="Gaps in the recording since the Archiver started")
    refused: int = Field(description="Segments that could not be archived since start")
    puller_restarts: int
    message: str = Field(description="Why an RTSP camera cannot be pulled, if it cannot")
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


class ClientCreate(BaseModel):
    certificate: str = Field(max_length=65536, description="PEM certificate of the viewer")
    cameras: list[CameraName] | Literal["all"]
    oaep_hash: Literal["sha1", "sha256"] | None = Field(
        default=None, description="Only for certificates without the enrolment extension")


class ClientInfo(BaseModel):
    fingerprint: str
    subject: str
    oaep_hash: str
    cameras: list[str] | Literal["all"]
    added_ms: int
    revoked_ms: int | None
    key_streams_deleted: bool
    not_after: str


class RevokeRequest(BaseModel):
    delete_key_streams: bool = False


class Revoked(BaseModel):
    fingerprint: str
    revoked: bool
    key_streams_deleted: bool


@router.post("/cameras", status_code=201)
def add_camera(body: CameraCreate, services: ServicesDep, actor: AdminDep) -> CameraCreated:
    archive = services.archive
    try:
        # The pattern alone lets '.' and '..' through; the name becomes an archive directory.
        validate_name(body.name)
    except FormatError as exc:
        raise ApiError(422, "bad_camera_name", str(exc)) from None
    if body.rtsp_url and body.rtsp_url.split(":", 1)[0] not in services.settings.pull_schemes:
        raise ApiError(422, "bad_rtsp_url", "The camera URL must start with one of: "
                       + ", ".join(f"{s}://" for s in services.settings.pull_schemes) + ".")
    token = new_secret()
    if not archive.db.add_camera(body.name, digest(token), body.rtsp_url, archive.clock()):
        raise ApiError(409, "camera_exists", f"A camera named '{body.name}' exists already "
                       "(names of removed cameras stay reserved: their archive is evidence).")
    services.audit.record(actor, "camera.add", archive.clock(), camera=body.name,
                          rtsp=bool(body.rtsp_url))
    if body.rtsp_url and services.rtsp is not None:
        services.rtsp.start(body.name, body.rtsp_url)
    return CameraCreated(name=body.name, rtsp_url=redact(body.rtsp_url) if body.rtsp_url else None,
                         ingest_token=token,
                         ingest_url=f"{services.settings.public_url}/ingest/{body.name}/index.m3u8")


@router.get("/cameras")
def list_cameras(services: ServicesDep, actor: AdminDep) -> list[CameraInfo]:
    archive = services.archive
    return [_camera_info(cam, services) for cam in archive.db.cameras()]


def _camera_info(cam: CameraRow, services: Services) -> CameraInfo:
    archive = services.archive
    recorded = archive.db.recorded_range(cam.name)
    first, last, count = recorded or (None, None, 0)
    health = archive.health.health(cam.name, archive.clock())
    return CameraInfo(name=cam.name, rtsp_url=redact(cam.rtsp_url) if cam.rtsp_url else None,
                      created_ms=cam.created_ms, segments=count, first_ms=first,
                      last_ms=last, **asdict(health),
                      retention_days=cam.retention_days or services.settings.retention_days,
                      retention_default=cam.retention_days is None,
                      holds=len(archive.db.holds(cam.name)),
                      expired_until_ms=archive.db.expired_until(cam.name))


@router.put("/cameras/{name}/retention")
def set_retention(name: Annotated[str, Path(pattern=r"^[A-Za-z0-9._-]{1,64}$")],
                  body: RetentionUpdate, services: ServicesDep, actor: AdminDep) -> CameraInfo:
    archive = services.archive
    before = archive.db.camera(name)  # a removed camera too: its archive still expires
    if before is None or not archive.db.set_retention(name, body.days):
        raise ApiError(404, "unknown_camera", f"There is no camera named '{name}'.")
    services.audit.record(actor, "camera.retention", archive.clock(), camera=name,
                          days=body.days or "default", before=before.retention_days or "default")
    after = archive.db.camera(name)
    assert after is not None
    return _camera_info(after, services)


@router.get("/storage")
def storage(services: ServicesDep, actor: AdminDep) -> StorageInfo:
    retention = services.archive.retention
    return StorageInfo(free_bytes=retention.free_bytes(),
                       min_free_bytes=services.settings.min_free_bytes,
                       retention_days=services.settings.retention_days,
                       below_watermark=retention.total.below_watermark,
                       files_removed=retention.total.files_removed,
                       bytes_reclaimed=retention.total.bytes_reclaimed,
                       key_records_shredded=retention.total.key_records_shredded)


@router.post("/holds", status_code=201)
def add_hold(body: HoldCreate, services: ServicesDep, actor: AdminDep) -> HoldInfo:
    archive = services.archive
    if archive.db.camera(body.camera) is None and not archive.db.expired_files(body.camera):
        raise ApiError(404, "unknown_camera", f"There is no camera named '{body.camera}'.")
    if body.to_ms < body.from_ms:
        raise ApiError(422, "bad_range", "The end of the hold is before its start.")
    # Under the retention lock: a pass in progress cannot remove the range after this returns.
    with archive.retention.lock:
        hold = archive.db.add_hold(body.camera, body.from_ms, body.to_ms, body.reason, actor,
                                   archive.clock())
    services.audit.record(actor, "hold.add", archive.clock(), hold_id=hold.hold_id,
                          camera=hold.camera, from_ms=hold.from_ms, to_ms=hold.to_ms,
                          reason=hold.reason)
    return HoldInfo(**asdict(hold))


@router.get("/holds")
def list_holds(services: ServicesDep, actor: AdminDep, camera: str | None = None) -> list[HoldInfo]:
    return [HoldInfo(**asdict(h)) for h in services.archive.db.holds(camera)]


@router.delete("/holds/{hold_id}")
def remove_hold(hold_id: int, services: ServicesDep, actor: AdminDep) -> HoldInfo:
    archive = services.archive
    hold = archive.db.remove_hold(hold_id)
    if hold is None:
        raise ApiError(404, "unknown_hold", f"There is no evidence hold {hold_id}.")
    services.audit.record(actor, "hold.remove", archive.clock(), hold_id=hold.hold_id,
                          camera=hold.camera, from_ms=hold.from_ms, to_ms=hold.to_ms,
                          reason=hold.reason)
    return HoldInfo(**asdict(hold))


@router.delete("/cameras/{name}", status_code=204)
def remove_camera(name: Annotated[str, Path(pattern=r"^[A-Za-z0-9._-]{1,64}$")],
                  services: ServicesDep, actor: AdminDep) -> None:
    archive = services.archive
    if not archive.db.remove_camera(name, archive.clock()):
        raise ApiError(404, "unknown_camera", f"There is no camera named '{name}'.")
    if services.rtsp is not None:
        # Wait for the puller to archive the segment it was building: removed means stopped.
        services.rtsp.stop(name, wait_s=PULLER_STOP_S)
    archive.health.forget(name)
    archive.keys.forget_camera(name)
    services.audit.record(actor, "camera.remove", archive.clock(), camera=name)


@router.post("/clients", status_code=201)
def add_client(body: ClientCreate, services: ServicesDep, actor: AdminDep) -> ClientInfo:
    archive = services.archive
    try:
        cert = load_certificate(body.certificate.encode())
        oaep = validate_viewer_certificate(
            cert, now=dt.datetime.now(dt.UTC), site_ca=services.site_ca,
            oaep_hash=OaepHash.from_label(body.oaep_hash) if body.oaep_hash else None)
    except CertificateError as exc:
        raise ApiError(422, "bad_certificate", str(exc)) from None
    cameras = None if body.cameras == "all" else sorted(set(body.cameras))
    known = {c.name for c in archive.db.cameras()}
    unknown = sorted(set(cameras or ()) - known)
    if unknown:
        raise ApiError(404, "unknown_camera", f"Unknown camera(s): {', '.join(unknown)}.")
    fp = fingerprint(cert).hex()
    archive.db.add_viewer(fp, cert.public_bytes(Encoding.DER), cert.subject.rfc4514_string(),
                          int(oaep), cameras, archive.clock())
    archive.authorization_changed(fp, None)
    services.audit.record(actor, "client.add", archive.clock(), fingerprint=fp,
                          subject=cert.subject.rfc4514_string(), cameras=cameras or "all",
                          oaep_hash=oaep.label)
    row = archive.db.viewer(fp)
    assert row is not None
    return _client_info(row)


@router.get("/clients")
def list_clients(services: ServicesDep, actor: AdminDep) -> list[ClientInfo]:
    return [_client_info(row) for row in services.archive.db.viewers()]


@router.post("/clients/{fp}/revoke")
def revoke_client(fp: Fingerprint, body: RevokeRequest, services: ServicesDep,
                  actor: AdminDep) -> Revoked:
    archive = services.archive
    if not archive.db.revoke_viewer(fp, archive.clock(), body.delete_key_streams):
        raise ApiError(404, "unknown_client", f"No viewer has the fingerprint {fp}.")
    archive.authorization_changed(fp, None)
    services.sessions.end_sessions_of(fp)
    services.audit.record(actor, "client.revoke", archive.clock(), fingerprint=fp,
                          delete_key_streams=body.delete_key_streams)
    return Revoked(fingerprint=fp, revoked=True, key_streams_deleted=body.delete_key_streams)


def _client_info(row: ViewerRow) -> ClientInfo:
    cert = x509.load_der_x509_certificate(row.certificate)
    return ClientInfo(
        fingerprint=row.fingerprint, subject=row.subject, oaep_hash=OaepHash(row.oaep_hash).label,
        cameras="all" if row.all_cameras else list(row.cameras), added_ms=row.added_ms,
        revoked_ms=row.revoked_ms, key_streams_deleted=row.key_streams_deleted,
        not_after=cert.not_valid_after_utc.isoformat())
