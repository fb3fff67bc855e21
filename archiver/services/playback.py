"""Fusion streams for viewers, the rules: a recorded range (or a signed statement that it
expired), and live. Every stream is bound to the viewer's fresh request nonce and audited before
it starts.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from cryptography import x509

from archiver.archive import Archive
from archiver.audit import AuditLog
from archiver.directory import ViewerRow
from archiver.services.cameras import CameraService
from archiver.services.refused import Refused
from keyservice.expiry import Expired, ExpiryStatement, sign_statement
from keyservice.wire import ErrorCode

# A live stream starts at the viewer's clock (from_ms); further from the Archiver's than this,
# the clocks are wrong (and live must not become a way round the recorded-range request).
LIVE_MAX_CLOCK_DIFFERENCE_MS = 60_000  # catch-up stays well within live_max_lag


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds")


# A kept copy of another Archiver's recording (archiver/consolidation.py): (its Archiver,
# viewer fingerprint, camera, from, to, nonce, still authorized) -> its stream, or None.
CopyStream = Callable[[str, str, str, int, int, bytes, Callable[[], bool]],
                      Iterator[bytes] | None]


@dataclass
class PlaybackService:
    archive: Archive
    audit: AuditLog
    cameras: CameraService
    copies: CopyStream | None = None

    @property
    def certificate(self) -> x509.Certificate:
        """The certificate of the Archiver's signing key (what viewers pin)."""
        return self.archive.signer.certificate

    def recording(self, viewer: ViewerRow, camera: str, from_ms: int, to_ms: int,
                  nonce: bytes, copy_of: str | None = None) -> Iterator[bytes]:
        """The fusion stream of [from_ms, to_ms]. Video that retention (or disk space) removed
        is refused with a statement signed by the key viewers pin (``Refused.body["expiry"]``):
        an unsigned "expired" would let a hostile Archiver pass off withheld video as removed."""
        self.cameras.authorize(viewer, camera)
        archive = self.archive
        if to_ms < from_ms:
            raise Refused(ErrorCode.BAD_RANGE, "The end of the range is before its start.")
        if copy_of is not None:
            # Another Archiver's recording consolidated here, asked for by name: served as it
            # signed it (the viewer verifies it against that signer); never this Archiver's
            # own recording under another's name, nor the reverse.
            copied = None if self.copies is None else self.copies(
                copy_of, viewer.fingerprint, camera, from_ms, to_ms, nonce,
                self._still_authorized(viewer, camera))
            if copied is None:
                raise Refused(ErrorCode.NO_RECORDING,
                              f"This Archiver holds no consolidated copy of Archiver "
                              f"'{copy_of}''s recording of camera '{camera}' in the requested "
                              "range.")
            self.audit.record(viewer.fingerprint, "stream.playback", archive.clock(),
                              camera=camera, from_ms=from_ms, to_ms=to_ms, copy_of=copy_of)
            return copied
        if not archive.has_recording(camera, from_ms, to_ms):
            expired = [e for e in archive.db.expired_files(camera)
                       if e.from_ms <= to_ms and e.to_ms >= from_ms]
            if expired:
                until = max(e.to_ms for e in expired)
                why = " and ".join(sorted({e.reason for e in expired}))
                days = archive.retention.days_of(camera)
                statement = ExpiryStatement(
                    camera=camera, from_ms=from_ms, to_ms=to_ms, nonce=nonce.hex(),
                    made_ms=archive.clock(),
                    expired=tuple(Expired(e.from_ms, e.to_ms, e.reason, e.removed_ms,
                                          days if e.reason == "retention" else None)
                                  for e in expired))
                raise Refused(ErrorCode.EXPIRED, f"The video of camera '{camera}' in the "
                              f"requested range has expired: it was removed ({why}; its keys "
                              f"destroyed) up to {_iso(until)}.",
                              body={"expiry": sign_statement(archive.signer, statement)})
            raise Refused(ErrorCode.NO_RECORDING,
                          f"Camera '{camera}' has no recording in the requested range.")
        self.audit.record(viewer.fingerprint, "stream.playback", archive.clock(), camera=camera,
                          from_ms=from_ms, to_ms=to_ms)
        return archive.playback(viewer, camera, from_ms, to_ms, nonce)

    def _still_authorized(self, viewer: ViewerRow, camera: str) -> Callable[[], bool]:
        """Cheap until the viewer's authorization changed in this process, then the
        directory says (as a stream from the archive re-checks it)."""
        archive, fp = self.archive, viewer.fingerprint
        seen = [archive.authorization_changes(fp), True]

        def check() -> bool:
            changes = archive.authorization_changes(fp)
            if seen[1] and changes != seen[0]:
                seen[0] = changes
                now = archive.directory.viewer(fp)
                seen[1] = now is not None and now.authorized_on(camera)
            return bool(seen[1])
        return check

    def live(self, viewer: ViewerRow, camera: str, nonce: bytes, duration_s: float,
             from_ms: int | None = None) -> AsyncIterator[bytes]:
        """A live fusion stream for ``duration_s``; ``from_ms`` is the viewer's clock when it
        asked (the stream starts there and its header says so, so a relay that holds the
        request back cannot skip its start)."""
        self.cameras.authorize(viewer, camera)
        archive = self.archive
        now = archive.clock()
        if from_ms is not None and abs(from_ms - now) > LIVE_MAX_CLOCK_DIFFERENCE_MS:
            raise Refused(ErrorCode.BAD_RANGE,
                          f"The live start is {abs(from_ms - now) / 1000:.0f} s from the "
                          f"Archiver's clock (at most {LIVE_MAX_CLOCK_DIFFERENCE_MS // 1000} s): "
                          "check both clocks (NTP).")
        self.audit.record(viewer.fingerprint, "stream.live", now, camera=camera,
                          duration_s=duration_s)
        return archive.live(viewer, camera, duration_s, nonce, from_ms)
