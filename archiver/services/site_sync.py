"""A site member's side of authorization changes made through other Archivers: what
archiver/directory/notify.py learns is applied here exactly as archiver/admin.py applies a
local change (the key manager told, open streams re-check and a revoked viewer's end, its
sessions end)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from archiver.consolidated import shred_viewer_in_parts
from archiver.directory.notify import SiteChanges, ViewerChange
from archiver.directory.snapshot import DirectoryWatch

if TYPE_CHECKING:
    from archiver.archive import Archive
    from archiver.auth import Sessions
    from archiver.services.container import ArchiverServices


def apply_viewer_change(archive: Archive, sessions: Sessions, change: ViewerChange) -> None:
    if change.granted:
        archive.authorization_changed(change.fingerprint, None)
        return
    if not change.shred_only:
        # At the revocation's own time: a key period after it gives the viewer nothing, even
        # if this Archiver learns of it after that period began.
        archive.access_removed(change.fingerprint, change.cameras, change.at_ms)
        if change.revoked:
            sessions.end_sessions_of(change.fingerprint)
    if change.shred:
        # Crypto-shredding for the viewer on every Archiver, not only the one asked: its chain
        # records and epoch openers here go too.
        archive.db.delete_key_streams(change.fingerprint)
        shred_viewer_in_parts(archive.settings.data_dir, change.fingerprint)


def start_site_changes(services: ArchiverServices) -> SiteChanges | None:
    """In a site (a directory URL): start listening for other Archivers' changes, and announce
    ours once audited. None for a standalone Archiver, which has nobody to hear from."""
    settings = services.settings
    if not settings.directory_url:
        return None
    archive, sessions = services.archive, services.sessions
    site = SiteChanges(archive.directory, settings.archiver_name,
                       lambda change: apply_viewer_change(archive, sessions, change),
                       url=settings.directory_url, listen=settings.site_notify,
                       poll_s=settings.site_poll_s, apply_grants=archive.viewers_authorized)
    site.start()
    services.audit.on_synced = site.announce
    return site


def start_directory_watch(services: ArchiverServices,
                          changes: SiteChanges | None) -> DirectoryWatch | None:
    """In a site: the watch that sees the directory come back after an outage
    (archiver/directory/snapshot.py) and reconciles at once, without a restart: the changes
    other Archivers made meanwhile applied (a revocation: its sessions end here, no key of a
    period after it), this Archiver's heartbeat and held cameras, the audit rows it could not
    write. None for a standalone Archiver."""
    directory = services.archive.directory
    if directory.link is None:
        return None
    watch = DirectoryWatch(directory)
    if changes is not None:
        watch.on_back.append(changes.poll_once)
    watch.on_back.append(services.site.wake)
    watch.on_back.append(services.audit.flush_soon)
    watch.start()
    return watch
