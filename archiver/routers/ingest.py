"""Camera ingest: ``PUT /ingest/{camera}/{name}``, as ffmpeg's HLS muxer sends it
(``-f hls -method PUT -headers "Authorization: Bearer TOKEN"``). MPEG-TS segments are encrypted
and archived; playlists are accepted and dropped (the index is ours)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from archiver.auth import secret_matches
from archiver.deps import ApiError, BearerDep, ServicesDep
from archiver.storage import StorageFailed, StorageFull

router = APIRouter(tags=["ingest"])

NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$"
CameraPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
NamePath = Annotated[str, Path(pattern=NAME_PATTERN)]
SEGMENT_SUFFIXES = (".ts",)
PLAYLIST_LIMIT = 1024 * 1024


def _check_camera(services: ServicesDep, camera: str, credentials: BearerDep) -> None:
    if credentials is None:
        raise ApiError(401, "unauthenticated", "Missing 'Authorization: Bearer' camera token.")
    token = credentials.credentials
    row = services.archive.db.camera(camera)
    valid = row is not None and row.removed_ms is None and (
        secret_matches(token, row.token_sha256)
        or (services.rtsp is not None and services.rtsp.accepts(camera, token)))
    # One answer for unknown camera and wrong token: the API does not confirm camera names.
    if not valid:
        raise ApiError(403, "forbidden", f"This token is not valid for camera '{camera}'.")


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "too_large",
                                   f"The upload exceeds the limit of {limit} bytes.")
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, "upload_timeout",
                       f"The upload did not complete within {timeout_s:.0f} s.") from None
    except ClientDisconnect:
        # Cut off mid-upload: nothing is archived.
        raise ApiError(400, "incomplete_upload", "The upload was cut off.") from None
    return b"".join(chunks)


@router.put("/ingest/{camera}/{name}", status_code=201,
            responses={201: {"description": "Segment encrypted and archived durably"}},
            # The body is read as a raw stream; declared so that docs and API fuzzers send one.
            openapi_extra={"requestBody": {"required": True, "content": {
                media: {"schema": {"type": "string", "format": "binary"}}
                for media in ("video/mp2t", "application/octet-stream")}}})
async def put_segment(camera: CameraPath, name: NamePath, request: Request,
                      services: ServicesDep, credentials: BearerDep) -> Response:
    _check_camera(services, camera, credentials)
    settings = services.settings
    if not name.endswith(SEGMENT_SUFFIXES):
        await _read_body(request, PLAYLIST_LIMIT, settings.upload_timeout_s)
        return Response(status_code=204)
    data = await _read_body(request, settings.max_segment_bytes, settings.upload_timeout_s)
    if not data:
        raise ApiError(400, "empty_segment", "The segment is empty.")
    try:
        row = await run_in_threadpool(services.archive.ingest_segment, camera, data)
    except StorageFull as exc:
        raise ApiError(507, "storage_full", str(exc)) from None
    except StorageFailed as exc:
        raise ApiError(503, "storage_failed", str(exc)) from None
    return Response(status_code=201, headers={"X-Fusion-Segment-Seq": str(row.seq)})


@router.delete("/ingest/{camera}/{name}", status_code=204)
async def delete_segment(camera: CameraPath, name: NamePath, services: ServicesDep,
                         credentials: BearerDep) -> Response:
    """ffmpeg deletes old HLS segments; the archive keeps them (evidence), so this is a no-op."""
    _check_camera(services, camera, credentials)
    return Response(status_code=204)
