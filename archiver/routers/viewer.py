"""Viewer API: proof-of-possession login, the cameras a viewer may watch, and fusion streams
(a recorded range, or live)."""

from __future__ import annotations

import base64
import datetime as dt
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated

import anyio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.types import Message, Receive, Scope, Send

from archiver.auth import Sessions
from archiver.cameras import GAP_TOLERANCE_MS, CameraState
from archiver.deps import (
    ApiError,
    CameraPath,
    Services,
    ServicesDep,
    ViewerDep,
    check_certificate_validity,
)
from keyservice.certs import load_certificate
from keyservice.crypto import login_context, make_login_challenge, verify_login_proof
from keyservice.errors import CertificateError
from keyservice.expiry import Expired, ExpiryStatement, sign_statement
from keyservice.format import DataStream
from keyservice.identity import fingerprint
from keyservice.keyscheme import KeyScheme, Recipient
from keyservice.wire import ErrorCode

log = logging.getLogger("archiver")
router = APIRouter(prefix="/v1", tags=["viewer"])
MEDIA_TYPE = "application/vnd.fusion-stream"
MAX_MS = 2**63 - 1  # SQLite integers are signed 64-bit: larger bounds were a 500
# A live stream starts at the viewer's clock (from_ms); further from the Archiver's than this,
# the clocks are wrong (and live must not become a way round the recorded-range request).
LIVE_MAX_CLOCK_DIFFERENCE_MS = 60_000  # catch-up stays well within live_max_lag
# The viewer's fresh random request nonce (16 bytes, hex): the stream's header repeats it under
# the Archiver's END signature, so a stream cannot be replayed as the answer to another request.
NonceQuery = Annotated[str, Query(pattern=r"^[0-9a-f]{32}$",
                                  description="16 random bytes, hex, fresh for every request")]


class ViewerStream(StreamingResponse):
    """A fusion stream whose every chunk must be taken by the viewer within send_timeout_s.
    Otherwise the response ends (without an end record, which the viewer reports as a
    truncation) and its task, generator and open archive files are released."""

    def __init__(self, content: AsyncIterator[bytes] | Iterator[bytes],
                 send_timeout_s: float) -> None:
        super().__init__(content, media_type=MEDIA_TYPE)
        self._send_timeout_s = send_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def bounded_send(message: Message) -> None:
            with anyio.fail_after(self._send_timeout_s):
                await send(message)

        try:
            await super().__call__(scope, receive, bounded_send)
        except TimeoutError:
            log.warning("dropped a viewer that stopped reading its fusion stream")
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


class ArchiverInfo(BaseModel):
    certificate: str
    fingerprint: str


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
def archiver_info(services: ServicesDep) -> ArchiverInfo:
    cert = services.archive.signer.certificate
    return ArchiverInfo(certificate=cert.public_bytes(Encoding.PEM).decode(),
                        fingerprint=fingerprint(cert).hex())


def presented_certificate(body: ChallengeRequest) -> tuple[x509.Certificate, str]:
    """The certificate a login names, and its fingerprint (hex); 422 if it does not parse."""
    try:
        cert = load_certificate(body.certificate.encode())
    except CertificateError as exc:
        raise ApiError(422, ErrorCode.BAD_CERTIFICATE, str(exc)) from None
    return cert, fingerprint(cert).hex()


@router.post("/sessions/challenge")
def challenge(body: ChallengeRequest, services: ServicesDep) -> Challenge:
    archive = services.archive
    cert, fp = presented_certificate(body)
    viewer = archive.db.viewer(fp)
    if viewer is None:
        raise ApiError(403, ErrorCode.NOT_ENROLLED, "This certificate is not authorized on this "
                       "Archiver; ask an admin to run 'fusion-archiver viewers add'.")
    if viewer.revoked_ms is not None:
        raise ApiError(403, ErrorCode.REVOKED, "This viewer's certificate has been revoked.")
    check_certificate_validity(viewer, archive.clock())
    return issue_challenge(services, services.sessions, cert, KeyScheme(viewer.oaep_hash),
                           login_context)


def issue_challenge(services: Services, sessions: Sessions, cert: x509.Certificate,
                    scheme: KeyScheme, context_of: Callable[[bytes, bytes, bytes], bytes]
                    ) -> Challenge:
    """A login challenge for a registered certificate (a viewer's or an admin's), kept in
    ``sessions`` until answered. ``context_of`` (login_context, admin_login_context) binds
    the proof to this Archiver, this certificate and this challenge, under the label of its
    kind of session."""
    archive = services.archive
    # Encrypted to the *registered* certificate, so only its token can answer.
    ciphertext, secret = make_login_challenge(Recipient(cert, scheme), archive.rng)
    challenge_id = archive.rng(16)
    fp = fingerprint(cert)
    context = context_of(fingerprint(archive.signer.certificate), fp, challenge_id)
    sessions.add_challenge(challenge_id, fp.hex(), secret, context, archive.clock())
    return Challenge(challenge_id=challenge_id.hex(),
                     ciphertext=base64.b64encode(ciphertext).decode(),
                     key_scheme=scheme.label, oaep_hash=scheme.legacy_label,
                     archiver_certificate=archive.signer.certificate.public_bytes(
                         Encoding.PEM).decode())


@router.post("/sessions", status_code=201)
def open_session(body: ProofRequest, services: ServicesDep) -> SessionInfo:
    archive = services.archive
    now = archive.clock()
    try:
        challenge_id = bytes.fromhex(body.challenge_id)
        proof = base64.b64decode(body.proof, validate=True)
    except ValueError:
        raise ApiError(422, ErrorCode.BAD_PROOF, "The challenge id or proof is malformed.") from None
    pending = services.sessions.take_challenge(challenge_id, now)
    if pending is None or not verify_login_proof(pending.secret, pending.context, proof):
        # Audited with the other refusals, aggregated per address (archiver/limits.py): a
        # flood of bad proofs cannot fill the disk with fsynced lines.
        raise ApiError(401, ErrorCode.PROOF_REFUSED, "The proof of possession is wrong, expired or "
                       "already used; request a new challenge.",
                       challenge_id=body.challenge_id[:64])
    token, session = services.sessions.open_session(pending.fingerprint, now)
    services.audit.record(pending.fingerprint, "session.open", now)
    return SessionInfo(session_token=token, fingerprint=pending.fingerprint,
                       expires_ms=session.expires_ms)


@router.get("/cameras")
def cameras(viewer: ViewerDep, services: ServicesDep) -> list[CameraView]:
    archive = services.archive
    now = archive.clock()
    out = []
    for cam in archive.db.cameras(include_removed=True):
        if not viewer.authorized_on(cam.name):
            continue
        first, last, count = archive.db.recorded_range(cam.name) or (None, None, 0)
        out.append(CameraView(name=cam.name, first_ms=first, last_ms=last, segments=count,
                              state=archive.health.health(cam.name, now).state))
    return out


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds")


def _authorize(viewer: ViewerDep, services: ServicesDep, camera: str) -> None:
    # One answer for "no such camera" and "not yours": a viewer cannot enumerate camera names.
    if services.archive.db.camera(camera) is None or not viewer.authorized_on(camera):
        raise ApiError(403, ErrorCode.NOT_AUTHORIZED, f"This viewer may not watch a camera named "
                       f"'{camera}' (or there is none).", fingerprint=viewer.fingerprint)


@router.get("/cameras/{camera}/recording",
            responses={200: {"content": {MEDIA_TYPE: {}}, "description": "A fusion stream"}})
async def recording(camera: CameraPath, viewer: ViewerDep, services: ServicesDep,
                    from_ms: Annotated[int, Query(ge=0, le=MAX_MS)],
                    to_ms: Annotated[int, Query(ge=0, le=MAX_MS)],
                    nonce: NonceQuery) -> StreamingResponse:
    _authorize(viewer, services, camera)
    archive = services.archive
    if to_ms < from_ms:
        raise ApiError(422, ErrorCode.BAD_RANGE, "The end of the range is before its start.")
    if not await run_in_threadpool(archive.has_recording, camera, from_ms, to_ms):
        expired = [e for e in await run_in_threadpool(archive.db.expired_files, camera)
                   if e.from_ms <= to_ms and e.to_ms >= from_ms]
        if expired:
            until = max(e.to_ms for e in expired)
            why = " and ".join(sorted({e.reason for e in expired}))
            # Signed with the key viewers pin: an unsigned "expired" would let a hostile
            # Archiver (or the wire) pass off withheld video as removed by retention.
            days = archive.retention.days_of(camera)
            statement = ExpiryStatement(
                camera=camera, from_ms=from_ms, to_ms=to_ms, nonce=nonce,
                made_ms=archive.clock(),
                expired=tuple(Expired(e.from_ms, e.to_ms, e.reason, e.removed_ms,
                                      days if e.reason == "retention" else None)
                              for e in expired))
            signed = await run_in_threadpool(sign_statement, archive.signer, statement)
            raise ApiError(410, ErrorCode.EXPIRED, f"The video of camera '{camera}' in the requested "
                           f"range has expired: it was removed ({why}; its keys destroyed) up "
                           f"to {_iso(until)}.", body={"expiry": signed})
        raise ApiError(404, ErrorCode.NO_RECORDING,
                       f"Camera '{camera}' has no recording in the requested range.")
    services.audit.record(viewer.fingerprint, "stream.playback", archive.clock(), camera=camera,
                          from_ms=from_ms, to_ms=to_ms)
    return ViewerStream(archive.playback(viewer, camera, from_ms, to_ms, bytes.fromhex(nonce)),
                         services.settings.stream_send_timeout_s)


@router.get("/cameras/{camera}/gaps")
async def gaps(camera: CameraPath, viewer: ViewerDep, services: ServicesDep,
               from_ms: Annotated[int, Query(ge=0, le=MAX_MS)],
               to_ms: Annotated[int, Query(ge=0, le=MAX_MS)]) -> Gaps:
    _authorize(viewer, services, camera)
    if to_ms < from_ms:
        raise ApiError(422, ErrorCode.BAD_RANGE, "The end of the range is before its start.")
    archive = services.archive
    # Up to now at most: the future is not a gap.
    until = min(to_ms, archive.clock())
    found = await run_in_threadpool(archive.db.gaps, camera, int(DataStream.VIDEO), from_ms,
                                    until, GAP_TOLERANCE_MS) if until >= from_ms else []
    return Gaps(camera=camera, from_ms=from_ms, to_ms=to_ms,
                gaps=[Gap(from_ms=a, to_ms=b) for a, b in found])


@router.get("/cameras/{camera}/live",
            responses={200: {"content": {MEDIA_TYPE: {}}, "description": "A live fusion stream"}})
async def live(camera: CameraPath, viewer: ViewerDep, services: ServicesDep, nonce: NonceQuery,
               duration_s: Annotated[float, Query(gt=0, le=86400)] = 3600,
               from_ms: Annotated[int | None, Query(ge=0, le=MAX_MS)] = None,
               ) -> StreamingResponse:
    """``from_ms``: the viewer's clock when it sent the request; the stream starts there (and
    its header says so), so a relay that holds the request back cannot skip its start."""
    _authorize(viewer, services, camera)
    archive = services.archive
    now = archive.clock()
    if from_ms is not None and abs(from_ms - now) > LIVE_MAX_CLOCK_DIFFERENCE_MS:
        raise ApiError(422, ErrorCode.BAD_RANGE,
                       f"The live start is {abs(from_ms - now) / 1000:.0f} s from the Archiver's "
                       f"clock (at most {LIVE_MAX_CLOCK_DIFFERENCE_MS // 1000} s): check both "
                       "clocks (NTP).")
    services.audit.record(viewer.fingerprint, "stream.live", now, camera=camera,
                          duration_s=duration_s)
    return ViewerStream(archive.live(viewer, camera, duration_s, bytes.fromhex(nonce), from_ms),
                         services.settings.stream_send_timeout_s)
