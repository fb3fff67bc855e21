"""Admins are people (archiver/admins.py): an admin's proof-of-possession login, and adding,
listing and revoking admins. The login is the viewers' (a challenge encrypted to the registered
certificate, answered on the admin's token) under its own context label, and yields a
short-lived admin session token that admin requests carry instead of the bootstrap token.

The login paths are under /v1/sessions: the per-address login rate limit (limits.py) covers them.
"""

from __future__ import annotations

import base64
from typing import Annotated, Literal

from cryptography import x509
from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from archiver.admins import AdminRefused, AdminRow, Admins
from archiver.auth import Sessions
from archiver.deps import AdminDep, ApiError, ServicesDep, check_admin_validity
from archiver.routers.viewer import (
    Challenge,
    ChallengeRequest,
    ProofRequest,
    issue_challenge,
    presented_certificate,
)
from keyservice.crypto import admin_login_context, verify_login_proof
from keyservice.keyscheme import KeyScheme
from keyservice.wire import ErrorCode

router = APIRouter(prefix="/v1", tags=["admins"])
# An admin's name, full fingerprint or unique fingerprint prefix.
AdminPath = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]


class AdminCreate(BaseModel):
    certificate: str = Field(max_length=65536, description="PEM certificate on the admin's token")
    name: str = Field(max_length=64, description="Unique, never reused: the audit log's actor")
    key_scheme: Literal["rsa-oaep-sha256", "rsa-oaep-sha1", "sha256", "sha1"] | None = Field(
        default=None, description="Only for RSA certificates without the enrolment extension")
    oaep_hash: Literal["rsa-oaep-sha256", "rsa-oaep-sha1", "sha256", "sha1"] | None = Field(
        default=None, description="Deprecated: the old name of key_scheme")


class AdminInfo(BaseModel):
    name: str
    fingerprint: str
    subject: str
    actor: str = Field(description="How the audit log names this admin")
    added_ms: int
    added_by: str
    revoked_ms: int | None
    revoked_by: str | None
    not_after: str


class AdminSessionInfo(BaseModel):
    session_token: str
    name: str
    fingerprint: str
    actor: str
    expires_ms: int


def _admins(services: ServicesDep) -> tuple[Admins, Sessions]:
    if services.admins is None or services.admin_sessions is None:  # pragma: no cover
        raise ApiError(503, ErrorCode.INTERNAL_ERROR, "Admin identities are not available.")
    return services.admins, services.admin_sessions


def _info(row: AdminRow) -> AdminInfo:
    cert = x509.load_der_x509_certificate(row.certificate)
    return AdminInfo(name=row.name, fingerprint=row.fingerprint, subject=row.subject,
                     actor=row.actor, added_ms=row.added_ms, added_by=row.added_by,
                     revoked_ms=row.revoked_ms, revoked_by=row.revoked_by,
                     not_after=cert.not_valid_after_utc.isoformat())


# --- login -------------------------------------------------------------------------------------
@router.post("/sessions/admin/challenge")
def admin_challenge(body: ChallengeRequest, services: ServicesDep) -> Challenge:
    admins, sessions = _admins(services)
    archive = services.archive
    cert, fp = presented_certificate(body)
    row = admins.store.get(fp)
    if row is None:
        raise ApiError(403, ErrorCode.NOT_AN_ADMIN, "This certificate is not an admin's on this "
                       "Archiver; have an admin run 'fusion-archiver admins add'.", fingerprint=fp)
    if row.revoked_ms is not None:
        raise ApiError(403, ErrorCode.ADMIN_REVOKED, f"Admin {row.name} has been revoked.",
                       fingerprint=fp)
    check_admin_validity(row, archive.clock())
    return issue_challenge(services, sessions, cert, KeyScheme(row.oaep_hash), admin_login_context)


@router.post("/sessions/admin", status_code=201)
def open_admin_session(body: ProofRequest, services: ServicesDep) -> AdminSessionInfo:
    admins, sessions = _admins(services)
    now = services.archive.clock()
    try:
        challenge_id = bytes.fromhex(body.challenge_id)
        proof = base64.b64decode(body.proof, validate=True)
    except ValueError:
        raise ApiError(422, ErrorCode.BAD_PROOF, "The challenge id or proof is malformed.") from None
    pending = sessions.take_challenge(challenge_id, now)
    if pending is None or not verify_login_proof(pending.secret, pending.context, proof):
        raise ApiError(401, ErrorCode.PROOF_REFUSED, "The proof of possession is wrong, expired or "
                       "already used; log in again.", challenge_id=body.challenge_id[:64])
    row = admins.store.get(pending.fingerprint)
    if row is None or row.revoked_ms is not None:  # revoked between challenge and proof
        raise ApiError(403, ErrorCode.ADMIN_REVOKED, "This admin has been revoked.")
    token, session = sessions.open_session(row.fingerprint, now)
    services.audit.record(row.actor, "admin.session.open", now, name=row.name,
                          fingerprint=row.fingerprint)
    return AdminSessionInfo(session_token=token, name=row.name, fingerprint=row.fingerprint,
                            actor=row.actor, expires_ms=session.expires_ms)


# --- managing admins ---------------------------------------------------------------------------
@router.post("/admin/admins", status_code=201)
def add_admin(body: AdminCreate, services: ServicesDep, actor: AdminDep) -> AdminInfo:
    admins, _ = _admins(services)
    try:
        row = admins.add(actor, body.certificate.encode(), body.name,
                         body.key_scheme or body.oaep_hash)
    except AdminRefused as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None
    return _info(row)


@router.get("/admin/admins")
def list_admins(services: ServicesDep, actor: AdminDep) -> list[AdminInfo]:
    admins, _ = _admins(services)
    return [_info(row) for row in admins.store.all()]


@router.post("/admin/admins/{who}/revoke")
def revoke_admin(who: AdminPath, services: ServicesDep, actor: AdminDep) -> AdminInfo:
    admins, _ = _admins(services)
    try:
        row = admins.revoke(actor, who.strip().lower())
    except AdminRefused as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None
    return _info(row)
