"""AuditService: the audit log as admins read it: the site's (every Archiver's lines, from the
directory) when this Archiver is in a site, else its own file (archiver/audit.py)."""

from __future__ import annotations

from archiver.archive import Archive
from archiver.audit import AuditEntry, read_audit
from archiver.settings import Settings


class AuditService:
    def __init__(self, archive: Archive, settings: Settings) -> None:
        self._archive = archive
        self._settings = settings

    @property
    def site(self) -> bool:
        """True when the log read is the site's."""
        return bool(self._settings.directory_url)

    def entries(self, since_ms: int = 0, only: str | None = None,
                limit: int = 1000) -> list[AuditEntry]:
        """Oldest first from ``since_ms``, at most ``limit``; ``only``: one Archiver's."""
        return read_audit(self._settings.audit_log_path,
                          self._archive.directory if self.site else None,
                          self._settings.archiver_name, since_ms=since_ms, only=only,
                          limit=limit)
