"""The site directory (issue 21): what belongs to the site, on SQLite (embedded, the data
directory's file) or PostgreSQL; see docs/architecture.md, "Site directory and local index".

    directory = open_directory(settings.directory_url, settings.data_dir)
"""

from archiver.directory.rows import (
    AdminRow,
    ArchiverRow,
    AuditEvent,
    CameraRow,
    HoldRow,
    NewViewer,
    Placement,
    ViewerRow,
)
from archiver.directory.store import Directory, open_directory

__all__ = ["AdminRow", "ArchiverRow", "AuditEvent", "CameraRow", "Directory", "HoldRow",
           "NewViewer", "Placement", "ViewerRow", "open_directory"]
