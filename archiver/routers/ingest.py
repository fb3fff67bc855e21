"""Camera ingest: ``PUT /ingest/{camera}/{name}``, as ffmpeg's HLS muxer sends it
(``-f hls -method PUT -headers "Authorization: Bearer TOKEN"``). MPEG-TS segments are encrypted
and archived; playlists are accepted and dropped (the index is ours)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from archiver.deps import ApiError, BearerDep, CameraPath, IngestDep, SettingsDep, services_of
from archiver.storage import StorageFailed, StorageFull
from keyservice.wire import ErrorCode

router = APIRouter(tags=["ingest"])
log = logging.getLogger("archiver")

NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$"
NamePath = Annotated[str, Path(pattern=NAME_PATTERN)]
SEGMENT_SUFFIXES = (".ts",)
PLAYLIST_LIMIT = 1024 * 1024


_INGEST_PATH = re.compile(r"^/ingest/([^/]+)/")
_TURN = "fusion.ingest_turn"
_COUNTED = "fusion.ingest_refusal_counted"  # the archive counted this upload's failure itself
_REASON_LIMIT = 4096


class UploadOutcomes:
    """ASGI middleware, outermost: every segment upload (``PUT /ingest/CAMERA/NAME.ts``) that
    is not answered 2xx is counted as refused for its camera, with the reason it was answered
    with, wherever in the stack it was refused (size and time limits, token, a body cut off,
    storage, an internal error). A camera does not read these answers (ffmpeg closes right
    after its body), so the count and the log line are the only way an admin learns of a loss.
    Only cameras that exist are counted: the health board keeps no entry for arbitrary names."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _INGEST_PATH.match(scope["path"]) if scope["type"] == "http" else None
        if (match is None or scope["method"] != "PUT"
                or not scope["path"].endswith(SEGMENT_SUFFIXES)):
            await self.app(scope, receive, send)
            return
        status: list[int] = []
        body = bytearray()

        async def watched_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not status:
                status.append(message["status"])
            elif (message["type"] == "http.response.body" and status and status[0] >= 300
                  and len(body) < _REASON_LIMIT):
                body.extend(message.get("body", b"")[:_REASON_LIMIT])
            await send(message)

        failure: str | None = None
        try:
            await self.app(scope, receive, watched_send)
        except BaseException as exc:
            failure = f"internal error ({type(exc).__name__})"
            raise
        finally:
            if not scope.get(_COUNTED):
                reason = (_refusal_reason(status[0], bytes(body)) if status
                          else failure or "no answer was given")
                if reason is not None:
                    await _count_refused(scope, match.group(1), reason)


def _refusal_reason(status: int, body: bytes) -> str | None:
    if 200 <= status < 300:
        return None
    try:
        message = str(json.loads(body)["message"])
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode("utf-8", "replace") or "no reason given"
    return f"HTTP {status}: {message}"


async def _count_refused(scope: Scope, camera: str, reason: str) -> None:
    services = services_of(scope)  # middleware has no dependencies
    if services is None:  # not started (or stopping): nothing to count into
        return
    try:
        await asyncio.to_thread(services.ingest.count_refused, camera, reason)
    except Exception:  # counting must not turn a refusal into a different answer
        log.warning("camera %s: could not count a refused segment (%s)", camera, reason)


# How long a camera's upload that arrived whole waits for an earlier one still arriving. A
# slow-loris (or a stuck connection) of the camera's own would otherwise hold back every later
# segment until --upload-timeout, and all of them would arrive late or be lost.
ORDER_WAIT_S = 5.0


class UploadOrder:
    """ASGI middleware that keeps each camera's uploads in the order they arrived.

    A camera sending faster than we encrypt (a burst, a reconnect) has several uploads in flight
    on separate connections. Route dependencies hop through worker threads, so without this the
    segments could be archived in any order. Requests are numbered here, in the order the server
    parsed their headers (before any thread hop); a segment is archived only once every earlier
    request of its camera has finished, whether it succeeded or failed.

    Bounded: an upload whose body is complete waits at most ``wait_s`` for earlier ones whose
    bodies are still arriving. Then it goes ahead, and those earlier ones are *overtaken*: when
    their bodies complete they are refused (409), never archived after a later segment. Earlier
    uploads already being archived are always waited for (that is bounded by the disk)."""

    def __init__(self, app: ASGIApp, wait_s: float = ORDER_WAIT_S) -> None:
        self.app = app
        self.wait_s = wait_s
        self._next: dict[str, int] = {}
        self._open: dict[str, set[int]] = {}
        self._arriving: dict[str, set[int]] = {}  # bodies still arriving
        self._overtaken: dict[str, set[int]] = {}
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
        self._arriving.setdefault(camera, set()).add(ticket)
        self._overtaken.setdefault(camera, set())
        changed = self._changed.setdefault(camera, asyncio.Condition())
        scope[_TURN] = (self, camera, ticket)
        try:
            await self.app(scope, receive, send)
        finally:
            async with changed:
                self._open[camera].discard(ticket)
                self._arriving[camera].discard(ticket)
                self._overtaken[camera].discard(ticket)
                changed.notify_all()
            if not self._open[camera]:
                del self._open[camera], self._arriving[camera], self._overtaken[camera]
                del self._changed[camera]

    async def wait_for_turn(self, camera: str, ticket: int) -> None:
        """Called once the upload's body is complete. Raises ApiError 409 if a later upload of
        the camera was archived before this one's body arrived."""
        changed = self._changed[camera]
        async with changed:
            self._arriving[camera].discard(ticket)
            if ticket in self._overtaken[camera]:
                raise ApiError(409, ErrorCode.UPLOAD_OVERTAKEN,
                               f"A later segment of camera '{camera}' was archived while this "
                               f"upload was still arriving (over {self.wait_s:.0f} s behind it); "
                               "this segment is not archived.")
            changed.notify_all()  # a later upload may be waiting for this body
            open_ = self._open[camera]
            try:
                async with asyncio.timeout(self.wait_s):
                    await changed.wait_for(lambda: min(open_) == ticket)
                return
            except TimeoutError:
                pass
            # Earlier uploads still arriving are overtaken; those being archived are awaited.
            overtaken = self._overtaken[camera]
            overtaken.update(t for t in self._arriving[camera] if t < ticket)
            await changed.wait_for(lambda: min(open_ - overtaken) == ticket)


async def _wait_for_turn(request: Request) -> None:
    turn = request.scope.get(_TURN)
    if turn is not None:  # always set when served through create_app
        order, camera, ticket = turn
        await order.wait_for_turn(camera, ticket)


def _check_camera(ingest: IngestDep, camera: str, credentials: BearerDep) -> None:
    if credentials is None:
        raise ApiError(401, ErrorCode.UNAUTHENTICATED, "Missing 'Authorization: Bearer' camera token.")
    ingest.check_camera_token(camera, credentials.credentials)


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, or an ApiError that says why not (it is the refusal's logged reason)."""
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
        declared = request.headers.get("content-length")
        raise ApiError(400, ErrorCode.INCOMPLETE_UPLOAD,
                       f"The upload was cut off: the client went away after {size} bytes"
                       + (f" of {declared}." if declared else " without the end of its body.")
                       ) from None
    return b"".join(chunks)


@router.put("/ingest/{camera}/{name}", status_code=201,
            responses={201: {"description": "Segment encrypted and archived durably"}},
            # The body is read as a raw stream; declared so that docs and API fuzzers send one.
            openapi_extra={"requestBody": {"required": True, "content": {
                media: {"schema": {"type": "string", "format": "binary"}}
                for media in ("video/mp2t", "application/octet-stream")}}})
async def put_segment(camera: CameraPath, name: NamePath, request: Request,
                      ingest: IngestDep, settings: SettingsDep,
                      credentials: BearerDep) -> Response:
    # Off the event loop: the check asks the site directory (a PostgreSQL round trip, up to the
    # pool's 10 s when it is away), which must not stall every other request meanwhile.
    await run_in_threadpool(_check_camera, ingest, camera, credentials)
    if not name.endswith(SEGMENT_SUFFIXES):
        await _read_body(request, PLAYLIST_LIMIT, settings.upload_timeout_s)
        return Response(status_code=204)
    data = await _read_body(request, settings.max_segment_bytes, settings.upload_timeout_s)
    if not data:
        raise ApiError(400, ErrorCode.EMPTY_SEGMENT, "The segment is empty.")
    await _wait_for_turn(request)  # an overtaken upload's 409 is counted by UploadOutcomes
    try:
        row = await run_in_threadpool(ingest.ingest, camera, data)
    except BaseException as exc:
        # Archive.ingest_segment counted this failure itself, with its reason.
        request.scope[_COUNTED] = True
        if isinstance(exc, StorageFull):
            raise ApiError(507, ErrorCode.STORAGE_FULL, str(exc)) from None
        if isinstance(exc, StorageFailed):
            raise ApiError(503, ErrorCode.STORAGE_FAILED, str(exc)) from None
        raise
    return Response(status_code=201, headers={"X-Fusion-Segment-Seq": str(row.seq)})


@router.delete("/ingest/{camera}/{name}", status_code=204)
async def delete_segment(camera: CameraPath, name: NamePath, ingest: IngestDep,
                         credentials: BearerDep) -> Response:
    """ffmpeg deletes old HLS segments; the archive keeps them (evidence), so this is a no-op."""
    await run_in_threadpool(_check_camera, ingest, camera, credentials)
    return Response(status_code=204)
