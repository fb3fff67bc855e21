"""Typed FastAPI dependencies and the one error type routes raise."""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from typing import Annotated

from cryptography import x509
from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, Field

from archiver.admin import Admin
from archiver.admins import BOOTSTRAP_ACTOR, AdminRow, Admins, admin_validity_ms
from archiver.archive import Archive
from archiver.audit import AuditLog
from archiver.auth import Sessions, secret_matches
from archiver.db import ViewerRow
from archiver.limits import RefusalAudit
from archiver.rtsp import RtspSupervisor
from archiver.settings import Settings
from keyservice.names import CAMERA_NAME_PATTERN, is_camera_name
from keyservice.wire import ErrorCode


def _camera_name(name: str) -> str:
    # The pattern lets '.' and '..' through; keyservice.names refuses them (they become paths).
    if not is_camera_name(name):
        raise ValueError("not a camera name ('.' and '..' are refused)")
    return name


# A camera name in a request body and in a URL path: the rule of keyservice.names.
CameraName = Annotated[str, Field(pattern=CAMERA_NAME_PATTERN), AfterValidator(_camera_name)]
CameraPath = Annotated[str, Path(pattern=CAMERA_NAME_PATTERN), AfterValidator(_camera_name)]

class ApiError(Exception):
    """An error answered as JSON ``{"error": code, "message": sentence}`` with an HTTP status."""

    def __init__(self, status: int, code: ErrorCode, message: str,
                 body: dict[str, object] | None = None, **audit: object) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.body = body or {}  # more members of the JSON answer (e.g. a signed statement)
        self.audit = audit  # details for the audit line of a refusal (never a secret)


@dataclass
class Services:
    """Everything a request handler may need; built once by create_app."""

    settings: Settings
    archive: Archive
    sessions: Sessions
    audit: AuditLog
    admin_token_digest: bytes
    site_ca: tuple[x509.Certificate, ...] = ()
    rtsp: RtspSupervisor | None = None
    refusals: RefusalAudit | None = None
    metrics_token_digest: bytes | None = None
    # Personal admin identities (archiver/admins.py) and their sessions, apart from viewers'.
    admins: Admins | None = None
    admin_sessions: Sessions | None = None

    @functools.cached_property
    def admin(self) -> Admin:
        """The administrative operations (business rules of cameras and viewers)."""
        return Admin(self.archive, self.audit, self.sessions, self.site_ca, self.rtsp,
                     self.settings.pull_schemes)


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]
_bearer = HTTPBearer(auto_error=False)
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _token(credentials: HTTPAuthorizationCredentials | None, what: str) -> str:
    if credentials is None:
        raise ApiError(401, ErrorCode.UNAUTHENTICATED, f"Missing 'Authorization: Bearer' {what}.")
    return credentials.credentials


@dataclass(frozen=True)
class AdminPrincipal:
    """Who acts as admin: the bootstrap token (``fingerprint`` None: shared, not a person) or a
    personal admin logged in on the admin's own token."""

    actor: str
    fingerprint: str | None = None


def require_admin_principal(services: ServicesDep, credentials: BearerDep) -> AdminPrincipal:
    token = _token(credentials, "admin token or admin session token")
    if secret_matches(token, services.admin_token_digest):
        if not services.settings.bootstrap_token:
            raise ApiError(403, ErrorCode.FORBIDDEN, "The bootstrap admin token is turned off on "
                           "this Archiver (serve --no-bootstrap-token); log in on your own token "
                           "with 'fusion-archiver admins login'.")
        return AdminPrincipal(BOOTSTRAP_ACTOR)
    now = services.archive.clock()
    session = (services.admin_sessions.session(token, now)
               if services.admin_sessions is not None else None)
    if session is None or services.admins is None:
        raise ApiError(403, ErrorCode.FORBIDDEN, "This is not the admin token, nor a valid admin "
                       "session (admin sessions expire: log in again with 'fusion-archiver "
                       "admins login').")
    # Looked up at every request: a revoked admin's session is refused at once.
    row = services.admins.store.get(session.fingerprint)
    if row is None or row.revoked_ms is not None:
        raise ApiError(403, ErrorCode.ADMIN_REVOKED, "This admin has been revoked.",
                       fingerprint=session.fingerprint)
    check_admin_validity(row, now)
    return AdminPrincipal(row.actor, row.fingerprint)


def check_admin_validity(row: AdminRow, now_ms: int) -> None:
    not_before, not_after = admin_validity_ms(row)
    if not not_before <= now_ms <= not_after:
        raise ApiError(403, ErrorCode.CERTIFICATE_EXPIRED, f"Admin {row.name}'s certificate is "
                       "outside its validity period; enrol a new one and have it added.",
                       fingerprint=row.fingerprint)


AdminPrincipalDep = Annotated[AdminPrincipal, Depends(require_admin_principal)]


def require_admin(principal: AdminPrincipalDep) -> str:
    """The actor the audit log names: 'admin' (the bootstrap token) or 'NAME (FINGERPRINT)'."""
    return principal.actor


def require_viewer(services: ServicesDep, credentials: BearerDep) -> ViewerRow:
    token = _token(credentials, "session token (log in first)")
    now = services.archive.clock()
    session = services.sessions.session(token, now)
    if session is None:
        raise ApiError(401, ErrorCode.SESSION_INVALID,
                       "The session token is unknown or expired; log in again.")
    viewer = services.archive.db.viewer(session.fingerprint)
    if viewer is None or viewer.revoked_ms is not None:
        raise ApiError(403, ErrorCode.REVOKED, "This viewer's certificate has been revoked.")
    check_certificate_validity(viewer, now)
    return viewer


def check_certificate_validity(viewer: ViewerRow, now_ms: int) -> None:
    """Refuse a viewer whose certificate is outside its validity period (at every login and
    every request of a session, not only when the admin authorized it)."""
    not_before, not_after = certificate_validity_ms(viewer.certificate)
    if now_ms > not_after:
        when = dt.datetime.fromtimestamp(not_after / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M")
        raise ApiError(403, ErrorCode.CERTIFICATE_EXPIRED, f"This viewer's certificate expired on "
                       f"{when} UTC; enrol a new identity and have the admin authorize it.",
                       fingerprint=viewer.fingerprint, not_after=when)
    if now_ms < not_before:
        when = dt.datetime.fromtimestamp(not_before / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M")
        raise ApiError(403, ErrorCode.CERTIFICATE_NOT_YET_VALID, f"This viewer's certificate is not "
                       f"valid before {when} UTC; check the clocks.",
                       fingerprint=viewer.fingerprint)


@functools.lru_cache(maxsize=4096)
def certificate_validity_ms(der: bytes) -> tuple[int, int]:
    """(not before, not after) of a DER certificate, in ms since the epoch."""
    cert = x509.load_der_x509_certificate(der)
    return (int(cert.not_valid_before_utc.timestamp() * 1000),
            int(cert.not_valid_after_utc.timestamp() * 1000))


AdminDep = Annotated[str, Depends(require_admin)]
ViewerDep = Annotated[ViewerRow, Depends(require_viewer)]
