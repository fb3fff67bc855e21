"""Viewer API: proof-of-possession login, the cameras a viewer may watch, and fusion streams
(a recorded range, or live). HTTP only: the rules are archiver/services/ (logins, cameras,
playback)."""

from __future__ import annotations

from typing import Annotated

from cryptography.hazmat.primitives.serialization import Encoding
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from archiver.cameras import CameraState
from archiver.deps import (
    CameraPath,
    CamerasDep,
    LoginsDep,
    PlaybackDep,
    RoutingDep,
    SettingsDep,
    ViewerDep,
)
from archiver.routers.site import redirect_if_elsewhere
from archiver.routers.streams import (
    MAX_MS,
    STREAM_RESPONSES,
    NonceQuery,
    TimeQuery,
    ViewerStream,
)
from keyservice.identity import fingerprint
from keyservice.names import CAMERA_NAME_PATTERN

router = APIRouter(prefix="/v1", tags=["viewer"])


class ArchiverInfo(BaseModel):
    certificate: str
    fingerprint: str
    name: str = Field(description="This Archiver's name in its site (serve --name)")


class ChallengeRequest(BaseModel):
    certificate: str = Field(max_length=65536)


class Challenge(BaseModel):
    challenge_id: str
    ciphertext: str
    key_scheme: str = Field(description="How the secret is wrapped: rsa-oaep-sha256, "
                            "rsa-oaep-sha1 or ecdh-p256")
    oaep_hash: str = Field(description="Deprecated old spelling of key_scheme (sha256, "
                           "sha1, ecdh-p256), for viewers before issue 24")
    archiver_certificate: str


class ProofRequest(BaseModel):
    challenge_id: str = Field(max_length=64)
    proof: str = Field(max_length=128)


class SessionInfo(BaseModel):
    session_token: str
    fingerprint: str
    expires_ms: int


class CameraView(BaseModel):
    name: str
    first_ms: int | None
    last_ms: int | None
    segments: int
    state: CameraState
    archiver: str | None = Field(default=None, description="The Archiver of the site that "
                                 "records it now (its name; the range above is this one's)")


class Gap(BaseModel):
    from_ms: int
    to_ms: int


class Gaps(BaseModel):
    """Where the recording index has no video in a range (unsigned: the fusion stream's signed
    segment times are what the viewer verifies)."""

    camera: str
    from_ms: int
    to_ms: int
    gaps: list[Gap]


@router.get("/archiver")
def archiver_info(playback: PlaybackDep, settings: SettingsDep) -> ArchiverInfo:
    cert = playback.certificate
    return ArchiverInfo(certificate=cert.public_bytes(Encoding.PEM).decode(),
                        fingerprint=fingerprint(cert).hex(), name=settings.archiver_name)


@router.post("/sessions/challenge")
def challenge(body: ChallengeRequest, logins: LoginsDep) -> Challenge:
    issued = logins.viewer_challenge(body.certificate)
    return Challenge(challenge_id=issued.challenge_id, ciphertext=issued.ciphertext,
                     key_scheme=issued.key_scheme, oaep_hash=issued.oaep_hash,
                     archiver_certificate=issued.archiver_certificate)


@router.post("/sessions", status_code=201)
def open_session(body: ProofRequest, logins: LoginsDep) -> SessionInfo:
    session = logins.open_viewer_session(body.challenge_id, body.proof)
    return SessionInfo(session_token=session.session_token, fingerprint=session.fingerprint,
                       expires_ms=session.expires_ms)


@router.get("/cameras")
def cameras(viewer: ViewerDep, cameras: CamerasDep) -> list[CameraView]:
    return [CameraView(name=c.name, first_ms=c.first_ms, last_ms=c.last_ms, segments=c.segments,
                       state=c.state, archiver=c.archiver) for c in cameras.of_viewer(viewer)]


# A stream or gap request for a range another Archiver of the site holds is answered with a
# 307 to it (archiver/routers/site.py), after the viewer's authorization on the camera: the
# placements are told only to a viewer who may watch it.
SITE_RESPONSES: dict[int | str, dict[str, object]] = {
    307: {"description": "Another Archiver of the site holds the range (Location: it)"},
    409: {"description": "The range was recorded by several Archivers: the placements"}}


@router.get("/cameras/{camera}/recording", responses={**STREAM_RESPONSES, **SITE_RESPONSES},
            response_model=None)
async def recording(request: Request, camera: CameraPath, viewer: ViewerDep,
                    playback: PlaybackDep, cameras: CamerasDep, routing: RoutingDep,
                    settings: SettingsDep, from_ms: TimeQuery, to_ms: TimeQuery,
                    nonce: NonceQuery,
                    copy_of: Annotated[str | None, Query(
                        pattern=CAMERA_NAME_PATTERN, description="Another Archiver's recording "
                        "consolidated here (the placements' copy_here), asked of its copy "
                        "here")] = None) -> StreamingResponse | JSONResponse:
    await run_in_threadpool(cameras.authorize, viewer, camera)
    if copy_of is None and to_ms >= from_ms and (redirect := await redirect_if_elsewhere(
            request, routing, camera, from_ms, to_ms)) is not None:
        return redirect
    stream = await run_in_threadpool(playback.recording, viewer, camera, from_ms, to_ms,
                                     bytes.fromhex(nonce), copy_of)
    return ViewerStream(stream, settings.stream_send_timeout_s)


@router.get("/cameras/{camera}/gaps", responses=SITE_RESPONSES, response_model=None)
async def gaps(request: Request, camera: CameraPath, viewer: ViewerDep, cameras: CamerasDep,
               routing: RoutingDep, from_ms: TimeQuery, to_ms: TimeQuery) -> Gaps | JSONResponse:
    await run_in_threadpool(cameras.authorize, viewer, camera)
    if to_ms >= from_ms and (redirect := await redirect_if_elsewhere(
            request, routing, camera, from_ms, to_ms)) is not None:
        return redirect
    found = await run_in_threadpool(cameras.gaps, viewer, camera, from_ms, to_ms)
    return Gaps(camera=camera, from_ms=from_ms, to_ms=to_ms,
                gaps=[Gap(from_ms=a, to_ms=b) for a, b in found])


@router.get("/cameras/{camera}/live",
            responses={200: {"content": STREAM_RESPONSES[200]["content"],
                             "description": "A live fusion stream"}, **SITE_RESPONSES},
            response_model=None)
async def live(request: Request, camera: CameraPath, viewer: ViewerDep, playback: PlaybackDep,
               cameras: CamerasDep, routing: RoutingDep, settings: SettingsDep,
               nonce: NonceQuery, duration_s: Annotated[float, Query(gt=0, le=86400)] = 3600,
               from_ms: Annotated[int | None, Query(ge=0, le=MAX_MS)] = None,
               ) -> StreamingResponse | JSONResponse:
    """``from_ms``: the viewer's clock when it sent the request; the stream starts there (and
    its header says so), so a relay that holds the request back cannot skip its start. Live
    is the camera's current Archiver's (a 307 to it from any other)."""
    await run_in_threadpool(cameras.authorize, viewer, camera)
    if (redirect := await redirect_if_elsewhere(request, routing, camera, from_ms,
                                                None)) is not None:
        return redirect
    # Off the event loop, as recording's: the authorization asks the site directory.
    stream = await run_in_threadpool(playback.live, viewer, camera, bytes.fromhex(nonce),
                                     duration_s, from_ms)
    return ViewerStream(stream, settings.stream_send_timeout_s)
