"""Retention settings and evidence holds, the rules: how long each camera's video is kept, the
ranges that survive retention until released, and the archive disk as retention sees it. Every
change is audited (before it is answered).
"""

from __future__ import annotations

from dataclasses import dataclass

from archiver.archive import Archive
from archiver.audit import AuditLog
from archiver.directory import HoldRow
from archiver.services.refused import Refused
from archiver.settings import Settings
from keyservice.wire import ErrorCode


@dataclass(frozen=True)
class StorageStatus:
    free_bytes: int
    min_free_bytes: int
    retention_days: int  # the site default
    below_watermark: bool  # below the threshold with no unheld video of a past day left
    files_removed: int  # since start
    bytes_reclaimed: int
    key_records_shredded: int


@dataclass
class RetentionService:
    archive: Archive
    audit: AuditLog
    settings: Settings

    def set_retention(self, actor: str, camera: str, days: int | None) -> None:
        """A camera's retention period in days (None: the site default). A removed camera
        too: its archive still expires."""
        if days is not None and days < 1:
            raise Refused(ErrorCode.INVALID_REQUEST, "The retention period must be at least "
                          "1 day.")
        directory = self.archive.directory
        before = directory.camera(camera)
        if before is None or not directory.set_retention(camera, days):
            raise Refused(ErrorCode.UNKNOWN_CAMERA, f"There is no camera named '{camera}'.")
        self.audit.record(actor, "camera.retention", self.archive.clock(), camera=camera,
                          days=days or "default", before=before.retention_days or "default")

    def storage(self) -> StorageStatus:
        retention = self.archive.retention
        return StorageStatus(free_bytes=retention.free_bytes(),
                             min_free_bytes=self.settings.min_free_bytes,
                             retention_days=self.settings.retention_days,
                             below_watermark=retention.total.below_watermark,
                             files_removed=retention.total.files_removed,
                             bytes_reclaimed=retention.total.bytes_reclaimed,
                             key_records_shredded=retention.total.key_records_shredded)

    # --- evidence holds ------------------------------------------------------------------
    def add_hold(self, actor: str, camera: str, from_ms: int, to_ms: int,
                 reason: str) -> HoldRow:
        """Protect ``camera``'s video in [from_ms, to_ms] from retention until released."""
        archive = self.archive
        if archive.directory.camera(camera) is None and not archive.db.expired_files(camera):
            raise Refused(ErrorCode.UNKNOWN_CAMERA, f"There is no camera named '{camera}'.")
        if to_ms < from_ms:
            raise Refused(ErrorCode.BAD_RANGE, "The end of the hold is before its start.")
        if not reason.strip():
            raise Refused(ErrorCode.INVALID_REQUEST, "A hold needs a reason (it is audited).")
        # Under the retention lock: a pass in progress cannot remove the range after this
        # returns.
        with archive.retention.lock:
            hold = archive.directory.add_hold(camera, from_ms, to_ms, reason, actor, archive.clock())
        self.audit.record(actor, "hold.add", archive.clock(), hold_id=hold.hold_id,
                          camera=hold.camera, from_ms=hold.from_ms, to_ms=hold.to_ms,
                          reason=hold.reason)
        return hold

    def holds(self, camera: str | None = None) -> list[HoldRow]:
        return self.archive.directory.holds(camera)

    def remove_hold(self, actor: str, hold_id: int) -> HoldRow:
        """Release a hold: its video is subject to retention again."""
        archive = self.archive
        hold = archive.directory.remove_hold(hold_id)
        if hold is None:
            raise Refused(ErrorCode.UNKNOWN_HOLD, f"There is no evidence hold {hold_id}.")
        self.audit.record(actor, "hold.remove", archive.clock(), hold_id=hold.hold_id,
                          camera=hold.camera, from_ms=hold.from_ms, to_ms=hold.to_ms,
                          reason=hold.reason)
        return hold
