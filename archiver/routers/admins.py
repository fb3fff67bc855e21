"""Admins are people (archiver/admins.py): an admin's proof-of-possession login, and adding,
listing and revoking admins. The login is the viewers' (a challenge encrypted to the registered
certificate, answered on the admin's token) under its own context label, and yields a
short-lived admin session token that admin requests carry instead of the bootstrap token.

The login paths are under /v1/sessions: the per-address login rate limit (limits.py) covers them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from cryptography import x509
from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from archiver.admins import AdminRow
from archiver.deps import AdminDep, AdminsDep, LoginsDep
from archiver.routers.viewer import Challenge, ChallengeRequest, ProofRequest

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


def _info(row: AdminRow) -> AdminInfo:
    cert = x509.load_der_x509_certificate(row.certificate)
    return AdminInfo(name=row.name, fingerprint=row.fingerprint, subject=row.subject,
                     actor=row.actor, added_ms=row.added_ms, added_by=row.added_by,
                     revoked_ms=row.revoked_ms, revoked_by=row.revoked_by,
                     not_after=cert.not_valid_after_utc.isoformat())


# --- login -------------------------------------------------------------------------------------
@router.post("/sessions/admin/challenge")
def admin_challenge(body: ChallengeRequest, logins: LoginsDep) -> Challenge:
    issued = logins.admin_challenge(body.certificate)
    return Challenge(challenge_id=issued.challenge_id, ciphertext=issued.ciphertext,
                     key_scheme=issued.key_scheme, oaep_hash=issued.oaep_hash,
                     archiver_certificate=issued.archiver_certificate)


@router.post("/sessions/admin", status_code=201)
def open_admin_session(body: ProofRequest, logins: LoginsDep) -> AdminSessionInfo:
    session = logins.open_admin_session(body.challenge_id, body.proof)
    return AdminSessionInfo(session_token=session.session_token, name=session.name,
                            fingerprint=session.fingerprint, actor=session.actor,
                            expires_ms=session.expires_ms)


# --- managing admins ---------------------------------------------------------------------------
@router.post("/admin/admins", status_code=201)
def add_admin(body: AdminCreate, admins: AdminsDep, actor: AdminDep) -> AdminInfo:
    return _info(admins.add(actor, body.certificate.encode(), body.name,
                            body.key_scheme or body.oaep_hash))


@router.get("/admin/admins")
def list_admins(admins: AdminsDep, actor: AdminDep) -> list[AdminInfo]:
    return [_info(row) for row in admins.store.all()]


@router.post("/admin/admins/{who}/revoke")
def revoke_admin(who: AdminPath, admins: AdminsDep, actor: AdminDep) -> AdminInfo:
    return _info(admins.revoke(actor, who.strip().lower()))
