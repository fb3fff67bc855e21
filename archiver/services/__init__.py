"""The Archiver's service layer: the rules of grants, holds and retention, logins, cameras,
playback and ingest, callable from Python without HTTP (routers/ are adapters over it).

``archiver.services.container.create_services(settings)`` builds them all (``create_app`` uses
it); every refusal is a ``Refused`` carrying a wire ``ErrorCode``.
"""

from __future__ import annotations

from archiver.services.refused import Refused

__all__ = ["Refused"]
