"""Typed FastAPI dependencies, the one error type routes raise, and the one map from a service's
refusal (``Refused``: a wire error code) to an HTTP status.

The one dependency-injection style of the routers: ``Annotated[..., Depends(...)]`` aliases
defined here. Only ``get_services`` and ``services_of`` read ``app.state``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, Field
from starlette.types import Scope

from archiver.admin import Admin
from archiver.admins import AdminPrincipal, Admins
from archiver.directory import ViewerRow
from archiver.services.cameras import CameraService
from archiver.services.container import ArchiverServices
from archiver.services.grants import GrantService
from archiver.services.ingest import IngestService
from archiver.services.logins import LoginService
from archiver.services.playback import PlaybackService
from archiver.services.refused import Refused
from archiver.services.retention import RetentionService
from archiver.services.routing import RoutingService
from archiver.settings import Settings
from keyservice.names import CAMERA_NAME_PATTERN, is_camera_name
from keyservice.wire import ErrorCode

__all__ = ["AdminDep", "AdminPrincipal", "AdminPrincipalDep", "AdminServiceDep", "AdminsDep",
           "ApiError", "BearerDep", "CameraName", "CameraPath", "CamerasDep", "GrantsDep",
           "IngestDep", "LoginsDep", "PlaybackDep", "RetentionDep", "RoutingDep", "Services",
           "ServicesDep",
           "SettingsDep", "ViewerDep", "api_error", "get_services", "http_status",
           "services_of"]

# The old name of the container, kept for callers.
Services = ArchiverServices


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


# The HTTP status of each refusal a service raises: the one place where a wire code becomes a
# status. A code missing here is a 400 (and a test, tests/archiver/test_services.py, checks
# that every code a service raises is here).
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.UNAUTHENTICATED: 401, ErrorCode.SESSION_INVALID: 401,
    ErrorCode.PROOF_REFUSED: 401,
    ErrorCode.FORBIDDEN: 403, ErrorCode.NOT_ENROLLED: 403, ErrorCode.REVOKED: 403,
    ErrorCode.CERTIFICATE_EXPIRED: 403, ErrorCode.CERTIFICATE_NOT_YET_VALID: 403,
    ErrorCode.NOT_AUTHORIZED: 403, ErrorCode.PULLED_CAMERA: 403,
    ErrorCode.GRANT_NOT_HELD: 403, ErrorCode.GRANT_PENDING: 403, ErrorCode.GRANT_REJECTED: 403,
    ErrorCode.GRANT_REVOKED: 403, ErrorCode.OUTSIDE_GRANT: 403, ErrorCode.OWN_GRANT: 403,
    ErrorCode.NOT_AN_ADMIN: 403, ErrorCode.ADMIN_REVOKED: 403,
    ErrorCode.UNKNOWN_CAMERA: 404, ErrorCode.UNKNOWN_VIEWER: 404, ErrorCode.UNKNOWN_HOLD: 404,
    ErrorCode.NO_RECORDING: 404, ErrorCode.UNKNOWN_GRANTEE: 404, ErrorCode.UNKNOWN_GRANT: 404,
    ErrorCode.UNKNOWN_ADMIN: 404,
    ErrorCode.CAMERA_EXISTS: 409, ErrorCode.VIEWER_EXISTS: 409, ErrorCode.GRANT_EXISTS: 409,
    ErrorCode.GRANT_STATE: 409, ErrorCode.ADMIN_EXISTS: 409, ErrorCode.AT_CAPACITY: 409,
    ErrorCode.RANGE_SPANS_ARCHIVERS: 409, ErrorCode.HOLDER_UNKNOWN: 503,
    ErrorCode.CONSOLIDATION_REFUSED: 502,
    ErrorCode.EXPIRED: 410,
    ErrorCode.UNKNOWN_ARCHIVER: 404,
    # Another Archiver of the site records this camera: the answer names its URL.
    ErrorCode.MISDIRECTED: 421,
    ErrorCode.BAD_CERTIFICATE: 422, ErrorCode.BAD_CAMERA_CHANGE: 422, ErrorCode.BAD_PROOF: 422,
    ErrorCode.BAD_CAMERA_NAME: 422, ErrorCode.BAD_RTSP_URL: 422, ErrorCode.BAD_RANGE: 422,
    ErrorCode.BAD_GRANT: 422, ErrorCode.GRANT_OUTSIDE_RANGE: 422, ErrorCode.GRANT_TO_SELF: 422,
    ErrorCode.BAD_ADMIN_NAME: 422, ErrorCode.INVALID_REQUEST: 422,
}


def http_status(code: ErrorCode) -> int:
    return HTTP_STATUS.get(code, 400)


def api_error(refused: Refused) -> ApiError:
    """A service's refusal as the HTTP error the app answers."""
    return ApiError(http_status(refused.code), refused.code, refused.message, refused.body,
                    **refused.audit)


# --- the services ------------------------------------------------------------------------------
def services_of(scope: Scope) -> ArchiverServices | None:
    """The app's services from an ASGI scope (for middleware, which has no dependencies); None
    before start or after stop."""
    app = scope.get("app")
    return getattr(getattr(app, "state", None), "services", None)


def get_services(request: Request) -> ArchiverServices:
    return request.app.state.services


ServicesDep = Annotated[ArchiverServices, Depends(get_services)]


def _settings(services: ServicesDep) -> Settings:
    return services.settings


def _admin(services: ServicesDep) -> Admin:
    return services.admin


def _admins(services: ServicesDep) -> Admins:
    return services.admins


def _cameras(services: ServicesDep) -> CameraService:
    return services.cameras


def _retention(services: ServicesDep) -> RetentionService:
    return services.retention


def _grants(services: ServicesDep) -> GrantService:
    return services.grants


def _logins(services: ServicesDep) -> LoginService:
    return services.logins


def _playback(services: ServicesDep) -> PlaybackService:
    return services.playback


def _routing(services: ServicesDep) -> RoutingService:
    return services.routing


def _ingest(services: ServicesDep) -> IngestService:
    return services.ingest


SettingsDep = Annotated[Settings, Depends(_settings)]
AdminServiceDep = Annotated[Admin, Depends(_admin)]
AdminsDep = Annotated[Admins, Depends(_admins)]
CamerasDep = Annotated[CameraService, Depends(_cameras)]
RetentionDep = Annotated[RetentionService, Depends(_retention)]
GrantsDep = Annotated[GrantService, Depends(_grants)]
LoginsDep = Annotated[LoginService, Depends(_logins)]
PlaybackDep = Annotated[PlaybackService, Depends(_playback)]
IngestDep = Annotated[IngestService, Depends(_ingest)]
RoutingDep = Annotated[RoutingService, Depends(_routing)]

_bearer = HTTPBearer(auto_error=False)
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _token(credentials: HTTPAuthorizationCredentials | None, what: str) -> str:
    if credentials is None:
        raise ApiError(401, ErrorCode.UNAUTHENTICATED, f"Missing 'Authorization: Bearer' {what}.")
    return credentials.credentials


# --- who is asking -----------------------------------------------------------------------------
def require_admin_principal(logins: LoginsDep, credentials: BearerDep) -> AdminPrincipal:
    token = _token(credentials, "admin token or admin session token")
    return logins.admin_of(token)  # a Refused is answered by the app's handler


AdminPrincipalDep = Annotated[AdminPrincipal, Depends(require_admin_principal)]


def require_admin(principal: AdminPrincipalDep) -> str:
    """The actor the audit log names: 'admin' (the bootstrap token) or 'NAME (FINGERPRINT)'."""
    return principal.actor


def require_viewer(logins: LoginsDep, credentials: BearerDep) -> ViewerRow:
    token = _token(credentials, "session token (log in first)")
    return logins.viewer_of(token)


AdminDep = Annotated[str, Depends(require_admin)]
ViewerDep = Annotated[ViewerRow, Depends(require_viewer)]
