"""Camera ingest, the rules: which token may push to which camera, archiving a segment, and
counting what was refused (a camera cannot be told of anything, so its health shows it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from archiver.archive import Archive
from archiver.auth import secret_matches
from archiver.db import SegmentRow
from archiver.registry import SiteMember
from archiver.services.refused import Refused
from keyservice.wire import ErrorCode

log = logging.getLogger("archiver")


@dataclass
class IngestService:
    archive: Archive
    site: SiteMember | None = None  # None: every camera is this Archiver's (an embedder's)

    def check_camera_token(self, camera: str, token: str) -> None:
        """Refuse a token that is not ``camera``'s, with one answer for an unknown camera and a
        wrong token (the API does not confirm camera names)."""
        row = self.archive.directory.camera(camera)
        valid = (row is not None and row.removed_ms is None
                 and secret_matches(token, row.token_sha256))
        if not valid:
            raise Refused(ErrorCode.FORBIDDEN, f"This token is not valid for camera '{camera}'.")
        if row is not None and row.rtsp_url:
            # The Archiver pulls this camera and is its only source: a token issued before
            # pulled cameras got none must not push outside video into its signed archive.
            # Said only to a valid token, so that the answer does not confirm camera names.
            raise Refused(ErrorCode.PULLED_CAMERA, f"Camera '{camera}' is pulled by the "
                          "Archiver (RTSP); it accepts no pushed video.")
        if row is not None and self.site is not None and not self.site.holds(row):
            # Another Archiver of the site records it (cameras add --archiver, cameras move):
            # two Archivers recording one camera would split its chain between them. Said only
            # to a valid token, with where to send instead, so the camera's operator can fix it.
            holder = row.archiver or "?"
            url = self.site.holder_url(holder)
            raise Refused(ErrorCode.MISDIRECTED, f"Camera '{camera}' is recorded by Archiver "
                          f"'{holder}'" + (f" at {url}" if url else "") + "; send its video "
                          "there, not to this Archiver.", body={"archiver": holder,
                                                                "archiver_url": url})

    def ingest(self, camera: str, data: bytes) -> SegmentRow:
        """Encrypt, sign, append durably and index one segment (acknowledged on return)."""
        return self.archive.ingest_segment(camera, data)

    def count_refused(self, camera: str, reason: str) -> None:
        """Count a refused upload in the camera's health (an active camera's only)."""
        row = self.archive.directory.camera(camera)
        if row is not None and row.removed_ms is None and (
                self.site is None or self.site.holds(row)):
            self.archive.health.segment_refused(camera, reason)
