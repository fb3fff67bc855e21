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
from archiver.db import ViewerRow
from archiver.deps import AdminDep, ApiError, ServicesDep
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
    out = []
    now = archive.clock()
    for cam in archive.db.cameras():
        recorded = archive.db.recorded_range(cam.name)
        first, last, count = recorded or (None, None, 0)
        health = archive.health.health(cam.name, now)
        out.append(CameraInfo(name=cam.name, rtsp_url=redact(cam.rtsp_url) if cam.rtsp_url else None,
                              created_ms=cam.created_ms, segments=count, first_ms=first,
                              last_ms=last, **asdict(health)))
    return out


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
