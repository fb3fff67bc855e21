"""Camera ingest: ``PUT /ingest/{camera}/{name}``, as ffmpeg's HLS muxer sends it
(``-f hls -method PUT -headers "Authorization: Bearer TOKEN"``). MPEG-TS segments are encrypted
and archived; playlists are accepted and dropped (the index is ours)."""

from __future__ import annotations

import asyncio
import re
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from archiver.auth import secret_matches
from archiver.deps import ApiError, BearerDep, CameraPath, ServicesDep
from archiver.storage import StorageFailed, StorageFull
from keyservice.wire import ErrorCode

router = APIRouter(tags=["ingest"])

NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$"
NamePath = Annotated[str, Path(pattern=NAME_PATTERN)]
SEGMENT_SUFFIXES = (".ts",)
PLAYLIST_LIMIT = 1024 * 1024


_INGEST_PATH = re.compile(r"^/ingest/([^/]+)/")
_TURN = "fusion.ingest_turn"


class UploadOrder:
    """ASGI middleware that keeps each camera's uploads in the order they arrived.

    A camera sending faster than we encrypt (a burst, a reconnect) has several uploads in flight
    on separate connections. Route dependencies hop through worker threads, so without this the
    segments could be archived in any order. Requests are numbered here, in the order the server
    parsed their headers (before any thread hop); a segment is archived only once every earlier
    request of its camera has finished, whether it succeeded or failed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._next: dict[str, int] = {}
        self._open: dict[str, set[int]] = {}
        self._changed: dict[str, asyncio.Condition] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _INGEST_PATH.match(scope["path"]) if scope["type"] == "http" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        camera = match.group(1)
        ticket = self._next.get(camera, 0)
        self._next[camera] = ticket + 1
        self._open.setdefault(camera, set()).add(ticket)
        changed = self._changed.setdefault(camera, asyncio.Condition())
        scope[_TURN] = (self, camera, ticket)
        try:
            await self.app(scope, receive, send)
        finally:
            async with changed:
                self._open[camera].discard(ticket)
                changed.notify_all()
            if not self._open[camera]:
                del self._open[camera], self._changed[camera]

    async def wait_for_turn(self, camera: str, ticket: int) -> None:
        changed = self._changed[camera]
        async with changed:
            await changed.wait_for(lambda: min(self._open[camera]) == ticket)


async def _wait_for_turn(request: Request) -> None:
    turn = request.scope.get(_TURN)
    if turn is not None:  # always set when served through create_app
        order, camera, ticket = turn
        await order.wait_for_turn(camera, ticket)


def _check_camera(services: ServicesDep, camera: str, credentials: BearerDep) -> None:
    if credentials is None:
        raise ApiError(401, ErrorCode.UNAUTHENTICATED, "Missing 'Authorization: Bearer' camera token.")
    token = credentials.credentials
    row = services.archive.db.camera(camera)
    valid = row is not None and row.removed_ms is None and secret_matches(token, row.token_sha256)
    # One answer for unknown camera and wrong token: the API does not confirm camera names.
    if not valid:
        raise ApiError(403, ErrorCode.FORBIDDEN, f"This token is not valid for camera '{camera}'.")
    if row is not None and row.rtsp_url:
        # The Archiver pulls this camera and is its only source: a token issued before pulled
        # cameras got none must not push outside video into its signed archive. Said only to
        # a valid token, so that the answer does not confirm camera names.
        raise ApiError(403, ErrorCode.PULLED_CAMERA, f"Camera '{camera}' is pulled by the "
                       "Archiver (RTSP); it accepts no pushed video.")


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, ErrorCode.TOO_LARGE,
                                   f"The upload exceeds the limit of {limit} bytes.")
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, ErrorCode.UPLOAD_TIMEOUT,
                       f"The upload did not complete within {timeout_s:.0f} s.") from None
    except ClientDisconnect:
        # Cut off mid-upload: nothing is archived.
        raise ApiError(400, ErrorCode.INCOMPLETE_UPLOAD, "The upload was cut off.") from None
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
        raise ApiError(400, ErrorCode.EMPTY_SEGMENT, "The segment is empty.")
    try:
        await _wait_for_turn(request)
        row = await run_in_threadpool(services.archive.ingest_segment, camera, data)
    except StorageFull as exc:
        raise ApiError(507, ErrorCode.STORAGE_FULL, str(exc)) from None
    except StorageFailed as exc:
        raise ApiError(503, ErrorCode.STORAGE_FAILED, str(exc)) from None
    return Response(status_code=201, headers={"X-Fusion-Segment-Seq": str(row.seq)})


@router.delete("/ingest/{camera}/{name}", status_code=204)
async def delete_segment(camera: CameraPath, name: NamePath, services: ServicesDep,
                         credentials: BearerDep) -> Response:
    """ffmpeg deletes old HLS segments; the archive keeps them (evidence), so this is a no-op."""
    _check_camera(services, camera, credentials)
    return Response(status_code=204)
