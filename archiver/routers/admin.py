"""Admin API: cameras and viewers. Every change goes to the audit log."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Annotated, Literal

from cryptography import x509
from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from archiver.admin import AdminRefused
from archiver.cameras import CameraState
from archiver.db import ClientRow
from archiver.deps import AdminDep, ApiError, CameraName, CameraPath, ServicesDep
from archiver.rtsp import redact
from keyservice.identity import OaepHash
from keyservice.names import CAMERA_NAME_PATTERN
from keyservice.wire import ErrorCode

router = APIRouter(prefix="/v1/admin", tags=["admin"])
Fingerprint = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")]


class CameraCreate(BaseModel):
    # The character rule only: '.' and '..' get the admin's own bad_camera_name answer.
    name: str = Field(pattern=CAMERA_NAME_PATTERN)
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


class ViewerCreate(BaseModel):
    certificate: str = Field(max_length=65536, description="PEM certificate of the viewer")
    cameras: list[CameraName] | Literal["all"]
    oaep_hash: Literal["sha1", "sha256"] | None = Field(
        default=None, description="Only for certificates without the enrolment extension")


class ViewerInfo(BaseModel):
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


# The HTTP status of each refusal of archiver.admin.
_STATUS = {ErrorCode.BAD_CAMERA_NAME: 422, ErrorCode.BAD_RTSP_URL: 422,
           ErrorCode.CAMERA_EXISTS: 409, ErrorCode.UNKNOWN_CAMERA: 404,
           ErrorCode.BAD_CERTIFICATE: 422, ErrorCode.UNKNOWN_VIEWER: 404}


@contextmanager
def _refusals() -> Iterator[None]:
    try:
        yield
    except AdminRefused as exc:
        raise ApiError(_STATUS[exc.code], exc.code, exc.message) from None


@router.post("/cameras", status_code=201)
def add_camera(body: CameraCreate, services: ServicesDep, actor: AdminDep) -> CameraCreated:
    with _refusals():
        token = services.admin.add_camera(actor, body.name, body.rtsp_url)
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
def remove_camera(name: CameraPath, services: ServicesDep, actor: AdminDep) -> None:
    with _refusals():
        services.admin.remove_camera(actor, name)


# /clients: the old name of /viewers, kept as a deprecated alias for one release.
@router.post("/viewers", status_code=201)
@router.post("/clients", status_code=201, deprecated=True)
def add_viewer(body: ViewerCreate, services: ServicesDep, actor: AdminDep) -> ViewerInfo:
    cameras = None if body.cameras == "all" else list(body.cameras)
    with _refusals():
        row = services.admin.authorize_viewer(actor, body.certificate.encode(), cameras,
                                              body.oaep_hash)
    return _viewer_info(row)


@router.get("/viewers")
@router.get("/clients", deprecated=True)
def list_viewers(services: ServicesDep, actor: AdminDep) -> list[ViewerInfo]:
    return [_viewer_info(row) for row in services.archive.db.clients()]


@router.post("/viewers/{fp}/revoke")
@router.post("/clients/{fp}/revoke", deprecated=True)
def revoke_viewer(fp: Fingerprint, body: RevokeRequest, services: ServicesDep,
                  actor: AdminDep) -> Revoked:
    with _refusals():
        services.admin.revoke_viewer(actor, fp, body.delete_key_streams)
    return Revoked(fingerprint=fp, revoked=True, key_streams_deleted=body.delete_key_streams)


def _viewer_info(row: ClientRow) -> ViewerInfo:
    cert = x509.load_der_x509_certificate(row.certificate)
    return ViewerInfo(
        fingerprint=row.fingerprint, subject=row.subject, oaep_hash=OaepHash(row.oaep_hash).label,
        cameras="all" if row.all_cameras else list(row.cameras), added_ms=row.added_ms,
        revoked_ms=row.revoked_ms, key_streams_deleted=row.key_streams_deleted,
        not_after=cert.not_valid_after_utc.isoformat())
