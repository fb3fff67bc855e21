"""The error codes of the Archiver's HTTP API (``{"error": code, "message": sentence}``), and
the limits of its batch enrolment.

One definition for both sides: the Archiver answers with these, the viewer maps them to its
exit codes (client/session.py), the admin CLI cuts its batches to the limits.     [pure]
"""

from __future__ import annotations

from enum import StrEnum

# POST /v1/admin/viewers/batch: at most this many certificates, in a body of at most this many
# bytes (one transaction and one audit fsync for all; fusion-archiver cuts larger sets).
VIEWER_BATCH_MAX = 500
VIEWER_BATCH_BYTES = 1024 * 1024


class ErrorCode(StrEnum):
    # authentication and sessions
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    SESSION_INVALID = "session_invalid"
    # viewers and their certificates
    BAD_CERTIFICATE = "bad_certificate"
    CERTIFICATE_EXPIRED = "certificate_expired"
    CERTIFICATE_NOT_YET_VALID = "certificate_not_yet_valid"
    NOT_ENROLLED = "not_enrolled"
    REVOKED = "revoked"
    UNKNOWN_VIEWER = "unknown_viewer"
    VIEWER_EXISTS = "viewer_exists"
    BAD_CAMERA_CHANGE = "bad_camera_change"
    BAD_PROOF = "bad_proof"
    PROOF_REFUSED = "proof_refused"
    NOT_AUTHORIZED = "not_authorized"
    # cameras and recordings
    BAD_CAMERA_NAME = "bad_camera_name"
    BAD_RTSP_URL = "bad_rtsp_url"
    CAMERA_EXISTS = "camera_exists"
    UNKNOWN_CAMERA = "unknown_camera"
    BAD_RANGE = "bad_range"
    NO_RECORDING = "no_recording"
    EXPIRED = "expired"
    UNKNOWN_HOLD = "unknown_hold"
    PULLED_CAMERA = "pulled_camera"
    AT_CAPACITY = "at_capacity"  # the Archiver takes no more (pulled) cameras: it would fall behind
    # a site of several Archivers (issue 21): the camera is recorded by another Archiver; an
    # Archiver name not in the site's registry
    MISDIRECTED = "misdirected"
    UNKNOWN_ARCHIVER = "unknown_archiver"
    # where a camera's range is recorded (viewers, issue 21 item 3)
    HELD_ELSEWHERE = "held_elsewhere"  # a 307 to the Archiver that holds the range
    RANGE_SPANS_ARCHIVERS = "range_spans_archivers"  # 409 with the placements: play the parts
    HOLDER_UNKNOWN = "holder_unknown"  # the holder is not in the site's registry
    # consolidation (issue 22): another Archiver's copy could not be had or did not verify
    CONSOLIDATION_REFUSED = "consolidation_refused"
    # access grants of past video
    BAD_GRANT = "bad_grant"
    GRANT_OUTSIDE_RANGE = "grant_outside_range"
    GRANT_NOT_HELD = "grant_not_held"
    GRANT_TO_SELF = "grant_to_self"
    UNKNOWN_GRANTEE = "unknown_grantee"
    GRANT_EXISTS = "grant_exists"
    UNKNOWN_GRANT = "unknown_grant"
    GRANT_PENDING = "grant_pending"
    GRANT_REJECTED = "grant_rejected"
    GRANT_REVOKED = "grant_revoked"
    GRANT_STATE = "grant_state"
    OUTSIDE_GRANT = "outside_grant"
    OWN_GRANT = "own_grant"  # the grantor cannot also be the approving admin
    # admins (personal admin identities, archiver/admins.py)
    BAD_ADMIN_NAME = "bad_admin_name"
    ADMIN_EXISTS = "admin_exists"
    UNKNOWN_ADMIN = "unknown_admin"
    NOT_AN_ADMIN = "not_an_admin"
    ADMIN_REVOKED = "admin_revoked"
    # uploads and limits
    TOO_LARGE = "too_large"
    TOO_MANY_REQUESTS = "too_many_requests"
    BODY_TIMEOUT = "body_timeout"
    UPLOAD_TIMEOUT = "upload_timeout"
    INCOMPLETE_UPLOAD = "incomplete_upload"
    EMPTY_SEGMENT = "empty_segment"
    UPLOAD_OVERTAKEN = "upload_overtaken"
    STORAGE_FULL = "storage_full"
    STORAGE_FAILED = "storage_failed"
    # the site directory (PostgreSQL) is unreachable: admin changes and new logins wait for it
    DIRECTORY_UNREACHABLE = "directory_unreachable"
    # anything else
    INVALID_REQUEST = "invalid_request"
    HTTP_ERROR = "http_error"
    INTERNAL_ERROR = "internal_error"
