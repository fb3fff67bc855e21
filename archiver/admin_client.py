"""A Python admin client over the Archiver's HTTP API, with typed results: cameras, retention
and storage, viewers, evidence holds, access grants, admins.

    with AdminClient("https://archiver.example:8443", token, tls_ca=Path("site-ca.pem")) as admin:
        hold = admin.add_hold("door", from_ms, to_ms, "case 12")
        for grant in admin.grants(state="pending"):
            admin.approve_grant(grant.grant_id, note="checked")

``fusion-archiver``'s admin commands (archiver/admin_cli.py) are a thin layer over it. The token
is the bootstrap admin token or a personal admin's session token (archiver/admin_login.py).
A refusal is ``AdminRefused`` (a ``RequestRefused``) carrying the wire error code and the HTTP
status; a failure of the Archiver is ``AdminFailed`` (an ``ArchiverFailed``).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import httpx

from keyservice.errors import ArchiverFailed, RequestRefused, UsageError
from keyservice.exits import unreachable
from keyservice.tls import trust as tls_trust
from keyservice.wire import VIEWER_BATCH_BYTES, VIEWER_BATCH_MAX

__all__ = ["AdminClient", "AdminFailed", "AdminInfo", "AdminRefused", "ArchiverInfo",
           "CameraChange", "CameraCreated", "CameraInfo", "CameraMoved", "GrantInfo", "HoldInfo",
           "Revoked", "StorageInfo", "ViewerInfo", "raise_for_refusal", "viewer_batches"]

Cameras = list[str] | Literal["all"]
GrantState = Literal["pending", "approved", "rejected", "revoked"]


class AdminRefused(RequestRefused):
    """The Archiver refused an admin request (4xx): ``code`` is its wire error code (None if
    the answer had none), ``status`` the HTTP status."""

    def __init__(self, message: str, code: str | None, status: int) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        # The names every KeyServiceError uses for what the Archiver said.
        self.wire_code = code
        self.http_status = status


class AdminFailed(ArchiverFailed):
    """The Archiver failed (5xx), or answered something that is not its API."""

    def __init__(self, message: str, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        # The names every KeyServiceError uses for what the Archiver said.
        self.wire_code = code
        self.http_status = status


def raise_for_refusal(response: httpx.Response) -> None:
    """An Archiver's refusal (4xx: AdminRefused) or failure (5xx: AdminFailed), with its own
    sentence and the status; nothing for a success."""
    if response.status_code < 400:
        return
    code = None
    try:
        body = response.json()
        message, code = body["message"], body.get("error")
    except (ValueError, KeyError, TypeError, AttributeError):
        message = response.text[:200] or response.reason_phrase
    text = f"{message} (HTTP {response.status_code})"
    if response.status_code >= 500:
        raise AdminFailed(text, code, response.status_code)
    raise AdminRefused(text, code, response.status_code)


# --- typed results (the members of the API's JSON answers) --------------------------------------
@dataclass(frozen=True, kw_only=True)
class CameraCreated:
    name: str
    ingest_url: str | None  # None for a pulled (RTSP) camera
    ingest_token: str | None  # shown once; None for a pulled camera
    rtsp_url: str | None
    archiver: str | None = None  # the Archiver of the site that records it
    standbys: list[str] = field(default_factory=list)  # in the order they take over
    redundant: bool = False  # all of them record it at once


@dataclass(frozen=True, kw_only=True)
class CameraMoved:
    camera: str
    from_archiver: str | None
    to: str
    moved: bool  # False: ``to`` recorded it already
    since_ms: int


@dataclass(frozen=True, kw_only=True)
class ArchiverInfo:
    """A member of the site (``site archivers``)."""

    name: str
    url: str
    certificate_sha256: str
    registered_ms: int
    heartbeat_ms: int | None
    heartbeat_age_ms: int | None
    alive: bool
    cameras_held: list[str]
    this: bool = False  # the Archiver that answered


@dataclass(frozen=True, kw_only=True)
class CameraInfo:
    name: str
    archiver: str | None = None  # the Archiver of the site that records it
    rtsp_url: str | None  # credentials redacted
    created_ms: int
    segments: int
    first_ms: int | None
    last_ms: int | None
    state: str
    last_segment_ms: int | None
    segments_last_minute: int
    bytes_last_minute: int
    gaps: int
    refused: int
    last_refusal: str
    puller_restarts: int
    message: str
    stream_faults: int = 0
    timestamp_jumps: int = 0
    lag_ms: int | None = None  # from the end of the last segment's capture to its archiving
    max_lag_ms: int | None = None  # the most in the last minute
    overruns: int = 0
    before_restart: bool = False
    retention_days: int
    retention_default: bool
    holds: int
    archivers: list[str] = field(default_factory=list)  # primary, then standbys (empty: one)
    redundant: bool = False
    expired_until_ms: int | None


@dataclass(frozen=True, kw_only=True)
class StorageInfo:
    free_bytes: int
    min_free_bytes: int
    retention_days: int  # the site default
    below_watermark: bool
    files_removed: int
    bytes_reclaimed: int
    key_records_shredded: int


@dataclass(frozen=True, kw_only=True)
class ViewerInfo:
    fingerprint: str
    subject: str
    key_scheme: str | None = None  # rsa-oaep-sha256, rsa-oaep-sha1 or ecdh-p256
    oaep_hash: str  # the deprecated old spelling (sha256, sha1, ecdh-p256)
    cameras: Cameras
    added_ms: int
    revoked_ms: int | None
    key_streams_deleted: bool
    not_after: str
    reauthorized: bool = False


@dataclass(frozen=True, kw_only=True)
class CameraChange:
    fingerprint: str
    subject: str
    before: Cameras
    cameras: Cameras
    added: list[str]
    removed: list[str]


@dataclass(frozen=True, kw_only=True)
class Revoked:
    fingerprint: str
    revoked: bool
    key_streams_deleted: bool


@dataclass(frozen=True, kw_only=True)
class HoldInfo:
    hold_id: int
    camera: str
    from_ms: int
    to_ms: int
    reason: str
    created_by: str
    created_ms: int


@dataclass(frozen=True, kw_only=True)
class GrantInfo:
    grant_id: str
    camera: str
    from_ms: int
    to_ms: int
    grantor: str
    grantee: str
    keys: int
    created_ms: int
    state: str
    decided_ms: int | None
    decided_by: str | None
    note: str | None


@dataclass(frozen=True, kw_only=True)
class AdminInfo:
    name: str
    fingerprint: str
    subject: str
    actor: str  # how the audit log names this admin
    added_ms: int
    added_by: str
    revoked_ms: int | None
    revoked_by: str | None
    not_after: str


T = TypeVar("T")


def _typed(cls: type[T], obj: Any) -> T:
    """An answer as ``cls``; members the client does not know are ignored (a newer Archiver)."""
    if not isinstance(obj, dict):
        raise AdminFailed(f"The Archiver's answer is not a {cls.__name__}; is it a Fusion "
                          "Archiver?")
    try:
        return cls(**{f.name: obj[f.name] for f in fields(cls)  # type: ignore[arg-type]
                      if f.name in obj})
    except TypeError:
        raise AdminFailed(f"The Archiver's {cls.__name__} answer lacks members; is it a Fusion "
                          "Archiver of this version?") from None


def _typed_list(cls: type[T], obj: Any) -> list[T]:
    if not isinstance(obj, list):
        raise AdminFailed(f"The Archiver's answer is not a list of {cls.__name__}.")
    return [_typed(cls, item) for item in obj]


def viewer_batches(certificate_pems: Sequence[str], cameras: Cameras) -> list[list[str]]:
    """Certificates cut into ``add_viewers`` batches, in order, each within the Archiver's
    limits (VIEWER_BATCH_MAX certificates; the body, with room for its JSON, in
    VIEWER_BATCH_BYTES)."""
    room = VIEWER_BATCH_BYTES - 4096  # the JSON around the certificates
    each = len(json.dumps(cameras)) + 128  # every entry's cameras, member names, key scheme
    batches: list[list[str]] = []
    size = 0
    for pem in certificate_pems:
        cost = len(json.dumps(pem)) + each
        if not batches or len(batches[-1]) >= VIEWER_BATCH_MAX or size + cost > room:
            batches.append([])
            size = 0
        batches[-1].append(pem)
        size += cost
    return batches


class AdminClient:
    """The admin API of one Archiver. ``tls_ca``: the CA to verify its HTTPS certificate with
    (else FUSION_TLS_CA, else the system's; keyservice.tls), or ``verify`` to give the context."""

    def __init__(self, url: str, token: str, *, tls_ca: Path | None = None,
                 verify: ssl.SSLContext | None = None, timeout: float = 30) -> None:
        if not token:
            raise UsageError("No admin token: give the admin token or an admin session token.")
        self.url = url.rstrip("/")
        try:
            self._http = httpx.Client(base_url=self.url, timeout=timeout,
                                      verify=verify if verify is not None else tls_trust(tls_ca),
                                      headers={"Authorization": f"Bearer {token}"},
                                      follow_redirects=False)
        except httpx.InvalidURL as exc:
            raise UsageError(f"The Archiver URL {url!r} is not usable: {exc}.") from None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _call(self, method: str, path: str, body: Any = None,
              params: dict[str, str] | None = None) -> Any:
        try:
            response = self._http.request(method, path, json=body, params=params)
        except httpx.InvalidURL as exc:
            raise UsageError(f"The Archiver URL {self.url!r} is not usable: {exc}.") from None
        except httpx.TransportError as exc:
            raise unreachable(self.url, exc) from None
        raise_for_refusal(response)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise AdminFailed(f"The Archiver's answer to {path} is not JSON; is {self.url} "
                              "really a Fusion Archiver?") from None

    # --- cameras ---------------------------------------------------------------------------
    def add_camera(self, name: str, rtsp_url: str | None = None,
                   archiver: str | None = None, standbys: Sequence[str] = (),
                   redundant: bool = False) -> CameraCreated:
        """Add a camera, recorded by ``archiver`` (a name of the site's registry; default: the
        Archiver this client talks to), with ``standbys`` that take over in order when it is
        down (or, ``redundant``, record it at the same time); its ingest token is shown once
        (None for a pulled camera)."""
        body: dict[str, Any] = {"name": name, "rtsp_url": rtsp_url}
        if archiver is not None:
            body["archiver"] = archiver
        if standbys:
            body["standbys"] = list(standbys)
        if redundant:
            body["redundant"] = True
        return _typed(CameraCreated, self._call("POST", "/v1/admin/cameras", body))

    def move_camera(self, camera: str, to: str) -> CameraMoved:
        """From now on the site's Archiver ``to`` records ``camera`` (its history stays where
        it was recorded)."""
        return _typed(CameraMoved, self._call("POST", f"/v1/admin/cameras/{_seg(camera)}/move",
                                              {"to": to}))

    def consolidate(self, camera: str, from_ms: int | None = None,
                    to_ms: int | None = None) -> dict[str, Any]:
        """The Archiver fills its gaps in ``camera`` from the Archivers that recorded them
        (their parts copied as they signed them): what it copied, part by part."""
        params = {k: str(v) for k, v in (("from_ms", from_ms), ("to_ms", to_ms)) if v is not None}
        try:  # a copy of hours of video takes longer than an admin call
            response = self._http.request(
                "POST", f"/v1/admin/cameras/{_seg(camera)}/consolidate", params=params,
                timeout=600)
        except httpx.TransportError as exc:
            raise unreachable(self.url, exc) from None
        raise_for_refusal(response)
        return response.json()

    def site_archivers(self) -> list[ArchiverInfo]:
        """The Archivers of the site: URL, certificate fingerprint, heartbeat, cameras held."""
        return _typed_list(ArchiverInfo, self._call("GET", "/v1/admin/site/archivers"))

    def cameras(self) -> list[CameraInfo]:
        return _typed_list(CameraInfo, self._call("GET", "/v1/admin/cameras"))

    def set_retention(self, camera: str, days: int | None) -> CameraInfo:
        """Days to keep ``camera``'s video (None: the site default)."""
        return _typed(CameraInfo, self._call("PUT", f"/v1/admin/cameras/{_seg(camera)}/retention",
                                             {"days": days}))

    def remove_camera(self, camera: str) -> None:
        """Stop recording a camera; its archive is kept."""
        self._call("DELETE", f"/v1/admin/cameras/{_seg(camera)}")

    def storage(self) -> StorageInfo:
        return _typed(StorageInfo, self._call("GET", "/v1/admin/storage"))

    # --- viewers ---------------------------------------------------------------------------
    def add_viewer(self, certificate_pem: str, cameras: Cameras,
                   key_scheme: str | None = None) -> ViewerInfo:
        """Authorize a viewer certificate on ``cameras`` (or "all"); ``key_scheme`` only for
        an RSA certificate without the enrolment extension (rsa-oaep-sha256, rsa-oaep-sha1)."""
        return _typed(ViewerInfo, self._call("POST", "/v1/admin/viewers", {
            "certificate": certificate_pem, "cameras": cameras, "key_scheme": key_scheme}))

    def add_viewers(self, certificate_pems: Sequence[str], cameras: Cameras,
                    key_scheme: str | None = None) -> list[ViewerInfo]:
        """Batch enrolment: ``add_viewer`` for each certificate, all of them or none, in one
        request (at most VIEWER_BATCH_MAX certificates in VIEWER_BATCH_BYTES: cut larger sets
        with ``viewer_batches``)."""
        return _typed_list(ViewerInfo, self._call("POST", "/v1/admin/viewers/batch", {
            "viewers": [{"certificate": pem, "cameras": cameras, "key_scheme": key_scheme}
                        for pem in certificate_pems]}))

    def viewers(self) -> list[ViewerInfo]:
        return _typed_list(ViewerInfo, self._call("GET", "/v1/admin/viewers"))

    def change_viewer_cameras(self, fingerprint: str, add: list[str] | None = None,
                              remove: list[str] | None = None,
                              set_to: Cameras | None = None) -> CameraChange:
        body: dict[str, Any] = {"add": add or [], "remove": remove or []}
        if set_to is not None:
            body["set"] = set_to
        return _typed(CameraChange, self._call(
            "POST", f"/v1/admin/viewers/{_seg(fingerprint)}/cameras", body))

    def revoke_viewer(self, fingerprint: str, delete_key_streams: bool = False) -> Revoked:
        return _typed(Revoked, self._call("POST", f"/v1/admin/viewers/{_seg(fingerprint)}/revoke",
                                          {"delete_key_streams": delete_key_streams}))

    # --- evidence holds --------------------------------------------------------------------
    def add_hold(self, camera: str, from_ms: int, to_ms: int, reason: str) -> HoldInfo:
        return _typed(HoldInfo, self._call("POST", "/v1/admin/holds", {
            "camera": camera, "from_ms": from_ms, "to_ms": to_ms, "reason": reason}))

    def holds(self, camera: str | None = None) -> list[HoldInfo]:
        return _typed_list(HoldInfo, self._call("GET", "/v1/admin/holds",
                                                params={"camera": camera} if camera else None))

    def remove_hold(self, hold_id: int) -> HoldInfo:
        return _typed(HoldInfo, self._call("DELETE", f"/v1/admin/holds/{int(hold_id)}"))

    # --- access grants ---------------------------------------------------------------------
    def grants(self, state: GrantState | None = None) -> list[GrantInfo]:
        """Access grants (newest first), or those in ``state``."""
        return _typed_list(GrantInfo, self._call("GET", "/v1/admin/grants",
                                                 params={"state": state} if state else None))

    def decide_grant(self, grant_id: str, decision: Literal["approve", "reject", "revoke"],
                     note: str | None = None) -> GrantInfo:
        return _typed(GrantInfo, self._call(
            "POST", f"/v1/admin/grants/{_seg(grant_id)}/{decision}", {"note": note}))

    def approve_grant(self, grant_id: str, note: str | None = None) -> GrantInfo:
        return self.decide_grant(grant_id, "approve", note)

    def reject_grant(self, grant_id: str, note: str | None = None) -> GrantInfo:
        return self.decide_grant(grant_id, "reject", note)

    def revoke_grant(self, grant_id: str, note: str | None = None) -> GrantInfo:
        return self.decide_grant(grant_id, "revoke", note)

    # --- admins ----------------------------------------------------------------------------
    def add_admin(self, certificate_pem: str, name: str,
                  key_scheme: str | None = None) -> AdminInfo:
        return _typed(AdminInfo, self._call("POST", "/v1/admin/admins", {
            "certificate": certificate_pem, "name": name, "key_scheme": key_scheme}))

    def admins(self) -> list[AdminInfo]:
        return _typed_list(AdminInfo, self._call("GET", "/v1/admin/admins"))

    # --- the audit log -----------------------------------------------------------------
    def audit(self, since_ms: int = 0, archiver: str | None = None,
              limit: int = 1000) -> tuple[bool, list[AuditEntryInfo]]:
        """(whether it is the site's log, its entries oldest first from ``since_ms``)."""
        params = {"since_ms": str(since_ms), "limit": str(limit)}
        if archiver:
            params["archiver"] = archiver
        body = self._call("GET", "/v1/admin/audit", params=params)
        if not isinstance(body, dict):
            raise AdminFailed("The Archiver's audit log answer is not an object.")
        return bool(body.get("site")), _typed_list(AuditEntryInfo, body.get("entries"))

    def revoke_admin(self, who: str) -> AdminInfo:
        """By name, fingerprint or a unique fingerprint prefix."""
        return _typed(AdminInfo, self._call(
            "POST", f"/v1/admin/admins/{_seg(who.strip().lower())}/revoke"))


@dataclass(frozen=True, kw_only=True)
class AuditEntryInfo:
    archiver: str  # the Archiver that wrote it
    seq: int  # its line in that Archiver's audit.jsonl
    ts_ms: int
    actor: str
    action: str
    entry: dict[str, Any]


def _seg(value: str) -> str:
    """A value as one path segment (reserved characters escaped)."""
    return quote(value, safe="")
