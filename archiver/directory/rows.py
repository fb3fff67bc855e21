"""The site directory's rows, as the services see them (moved here from archiver/db.py and
archiver/admins.py, which re-export them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CameraRow:
    name: str
    token_sha256: bytes
    rtsp_url: str | None
    created_ms: int
    removed_ms: int | None
    retention_days: int | None = None  # None: the site default
    archiver: str | None = None  # the Archiver that records it (None: the one that added it)
    redundant: bool = False  # every assigned Archiver records it at once (issue 22)


@dataclass(frozen=True)
class ViewerRow:
    fingerprint: str
    certificate: bytes
    subject: str
    oaep_hash: int
    all_cameras: bool
    cameras: tuple[str, ...]
    added_ms: int
    revoked_ms: int | None
    key_streams_deleted: bool

    def authorized_on(self, camera: str) -> bool:
        return self.revoked_ms is None and (self.all_cameras or camera in self.cameras)


@dataclass(frozen=True)
class NewViewer:
    """A viewer to authorize: its certificate (DER), key scheme and cameras (None: all cameras,
    present and future)."""

    fingerprint: str
    certificate: bytes
    subject: str
    oaep_hash: int
    cameras: tuple[str, ...] | None


@dataclass(frozen=True)
class HoldRow:
    """An evidence hold: video of ``camera`` in [from_ms, to_ms] survives retention."""

    hold_id: int
    camera: str
    from_ms: int
    to_ms: int
    reason: str
    created_by: str
    created_ms: int


def actor_of(name: str, fp: str) -> str:
    """A personal admin's actor in the audit log: the unique name and the fingerprint prefix
    other commands print."""
    return f"{name} ({fp[:16]})"


@dataclass(frozen=True)
class AdminRow:
    fingerprint: str
    name: str
    certificate: bytes  # DER
    subject: str
    oaep_hash: int
    added_ms: int
    added_by: str
    revoked_ms: int | None
    revoked_by: str | None

    @property
    def actor(self) -> str:
        return actor_of(self.name, self.fingerprint)


@dataclass(frozen=True)
class ArchiverRow:
    """A member of the site: its name, the URL viewers reach it at, its signing certificate
    (DER), when it registered and when it was last heard of."""

    name: str
    url: str
    certificate: bytes
    registered_ms: int
    heartbeat_ms: int | None


@dataclass(frozen=True)
class Placement:
    """Where a camera was recorded: by ``archiver`` from ``since_ms`` until ``until_ms`` (None:
    it still is)."""

    camera: str
    archiver: str
    since_ms: int
    until_ms: int | None


@dataclass(frozen=True)
class AuditEvent:
    """One line of an Archiver's audit log, as the site directory keeps it."""

    archiver: str
    seq: int
    ts_ms: int
    actor: str
    action: str
    entry: str
    line_sha256: str


@dataclass(frozen=True)
class LeaseRow:
    """Who records a camera with standbys (issue 22): ``holder`` until ``expires_ms`` unless it
    renews; ``epoch`` grows at each change of holder; ``locked``: the holder held the camera's
    advisory lock when it last renewed (only then does a free lock mean it is gone)."""

    camera: str
    holder: str
    epoch: int
    expires_ms: int
    locked: bool = False
