"""Authorization changes made through other Archivers of the site (issue 21, item 4).

A viewer added, changed or revoked through any Archiver must take effect on all of them: the
key manager of each must wrap (or stop wrapping) chains for it, and a revoked viewer's open
streams and sessions must end everywhere. Two ways in, one effect:

- **PostgreSQL LISTEN/NOTIFY.** The Archiver that made a change announces it on ``CHANNEL``
  once its audit entry is in the directory (``SiteChanges.announce``, the audit writer's
  hook); every other Archiver listens on a dedicated connection (psycopg 3, autocommit,
  ``notifies()`` in a thread) and reconnects when it is lost.
- **Polling, the fallback.** Every ``poll_s`` the viewers' authorizations (no certificates)
  are read and compared with the last ones seen: a notification that was lost (a dropped
  connection, an Archiver that announced nothing because its directory write failed), or a
  site with NOTIFY turned off, still converges.

Either way the change is worked out by comparing the viewer's row with what this Archiver saw
last (``diff``), so a notification carries no authority: it only says where to look. What a
change does to this Archiver is the caller's ``apply`` (archiver/services/site_sync.py): the
same calls a local change makes. Nothing here is on the ingest path; a directory that is down
is logged and tried again, and recording goes on.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from archiver.directory.engine import is_postgres, redacted

if TYPE_CHECKING:
    from archiver.directory.rows import AuditEvent
    from archiver.directory.store import Directory

log = logging.getLogger("archiver.site")
CHANNEL = "fusion_site_viewers"
# The audit actions of an authorization change (archiver/admin.py); viewer.expired is not one
# (each Archiver sees an expiry itself).
VIEWER_ACTIONS = frozenset({"viewer.add", "viewer.cameras", "viewer.revoke"})
RECONNECT_S = (0.5, 1.0, 2.0, 5.0)  # back-off of the listening connection
WAKE_S = 0.5  # how often the thread looks whether it should stop
# A batch enrolment announces up to 500 viewers in one commit: the notifications that arrive
# within DRAIN_S of the first are applied together (_receive), up to about NOTIFY_BATCH.
DRAIN_S = 0.05
NOTIFY_BATCH = 500

# A viewer's authorization: (revoked_ms, its cameras or None for all, whether its key streams
# were deleted), Directory.viewer_states.
ViewerState = tuple[int | None, tuple[str, ...] | None, bool]


@dataclass(frozen=True)
class ViewerChange:
    """What changed for one viewer, as this Archiver must apply it.

    ``granted``: it may now hold keys it may not have held (added, re-authorized, cameras
    added): its chains are joined or restart (KeyManager.authorization_changed).
    Otherwise it lost ``cameras`` (None: all; ``revoked``: its certificate was revoked, at
    ``at_ms``): no key of a later key period than the change's (KeyManager.access_removed).
    ``shred``: its key streams were deleted (``viewers revoke --delete-key-streams``): this
    Archiver deletes its own too; alone (``shred_only``) when it was revoked already."""

    fingerprint: str
    granted: bool
    cameras: list[str] | None = None
    revoked: bool = False
    at_ms: int | None = None
    shred: bool = False
    shred_only: bool = False


def diff(fingerprint: str, before: ViewerState | None, after: ViewerState | None,
         renewed: bool = False) -> ViewerChange | None:
    """The change from ``before`` to ``after`` (None: no such viewer), by the rules of
    archiver/admin.py; ``renewed``: it was authorized again on the same cameras (its epoch
    renews although its row reads the same). None if nothing is to be done."""
    was_active = before is not None and before[0] is None
    shred = after is not None and after[2] and not (before is not None and before[2])
    if after is None or after[0] is not None:
        if before is not None and not was_active and (after is None or after[0] == before[0]):
            # Revoked already when last seen; its key streams may have been deleted since.
            return ViewerChange(fingerprint, False, None, True, before[0], shred=True,
                                shred_only=True) if shred else None
        # Also when never seen, or revoked at another time than seen: added (again) and
        # revoked between two polls, it may have logged in, opened a stream, or been wrapped
        # into a chain started meanwhile.
        return ViewerChange(fingerprint, False, None, True, None if after is None else after[0],
                            shred=shred)
    if not was_active:
        return ViewerChange(fingerprint, True)
    assert before is not None
    old, new = before[1], after[1]
    if old == new:
        return ViewerChange(fingerprint, True) if renewed else None
    if new is None or (old is not None and set(new) - set(old)):
        return ViewerChange(fingerprint, True)  # some camera added: as admin.py, a grant
    # Only removed: from all to some is a removal of "all" (None), as admin.py does.
    return ViewerChange(fingerprint, False, None if old is None else sorted(set(old) - set(new)))


class SiteChanges:
    """Listens for the site's authorization changes and applies those made elsewhere.

    ``start()`` takes the current authorizations as seen (the key manager reads the same rows
    when it first needs them) and starts the thread; ``stop()`` ends it. ``announce`` is the
    audit writer's hook (AuditLog.on_synced)."""

    def __init__(self, directory: Directory, archiver: str,
                 apply: Callable[[ViewerChange], None], *, url: str | None,
                 listen: bool = True, poll_s: float = 5.0,
                 apply_grants: Callable[[list[str]], None] | None = None) -> None:
        """``apply``: one change; ``apply_grants``: viewers granted keys, several at once (a
        batch enrolment made elsewhere), else ``apply`` one by one."""
        self._directory = directory
        self._archiver = archiver
        self._apply = apply
        self._apply_grants = apply_grants
        self._url = url if url and is_postgres(url) else None
        self._listen = listen and self._url is not None and directory.backend == "postgresql"
        self._poll_s = poll_s
        self._seen: dict[str, ViewerState] = {}
        self._baseline = False  # _seen holds every viewer as of a reading
        self._lock = threading.Lock()  # _seen, and one change applied at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self._directory_down = False
        self._listen_failed = False
        # Counters (tests, /metrics-worthy): changes applied, by the way they were learnt.
        self.applied_notify = 0
        self.applied_poll = 0
        self.polls = 0
        self.connected = threading.Event()  # set while LISTEN is in place

    @property
    def listening(self) -> bool:
        return self._listen

    def start(self) -> None:
        try:
            self._seen = dict(self._directory.viewer_states())
            self._baseline = True
        except Exception:  # the first poll takes them: recording must start anyway
            log.warning("could not read the site's viewers at start; polling for them")
        self._thread = threading.Thread(target=self._run, daemon=True, name="fusion-site-notify")
        self._thread.start()

    def stop(self, wait_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(wait_s)
        self._close_connection()

    # --- what this Archiver changed --------------------------------------------------
    def announce(self, events: list[AuditEvent]) -> None:
        """Our own audit rows, just committed to the directory: for each authorization change,
        take the viewer's row as seen (our admin applied it already: the poll must not apply
        it twice) and NOTIFY the others."""
        changed = []
        for event in events:
            if event.action not in VIEWER_ACTIONS or event.actor == "archiver":
                continue
            fp = json.loads(event.entry).get("fingerprint")
            if isinstance(fp, str):
                changed.append((fp, event.action))
        if not changed:
            return
        with self._lock:
            rows = self._directory.viewers_named(list(dict.fromkeys(fp for fp, _ in changed)))
            for fp, _ in changed:
                row = rows.get(fp)  # a batch enrolment's, read in one query
                self._remember(fp, None if row is None else (
                    row.revoked_ms, None if row.all_cameras else tuple(sorted(row.cameras)),
                    row.key_streams_deleted))
        if self._directory.backend != "postgresql":
            return
        from sqlalchemy import text

        # Through the pool (not the listening connection, which only listens); delivered to
        # the listeners when this commits. Best effort: the others' poll catches a lost one.
        with self._directory.engine.begin() as conn:
            for fp, action in changed:
                conn.execute(text("SELECT pg_notify(:channel, :payload)"), {
                    "channel": CHANNEL, "payload": json.dumps(
                        {"archiver": self._archiver, "fingerprint": fp, "action": action})})

    def _remember(self, fp: str, state: ViewerState | None) -> None:
        if state is None:
            self._seen.pop(fp, None)
        else:
            self._seen[fp] = state

    # --- what others changed ---------------------------------------------------------
    def poll_once(self) -> int:
        """Compare every viewer's authorization with what was seen; apply the differences.
        Returns how many were applied (raises the directory's failure)."""
        states = self._directory.viewer_states()
        applied = 0
        with self._lock:
            self.polls += 1
            if not self._baseline:
                # The first reading (the one at start failed): the key manager reads the same
                # rows when it first needs them; there is nothing to apply yet.
                self._seen.update(states)
                self._baseline = True
                return 0
            for fp in set(states) | set(self._seen):
                change = diff(fp, self._seen.get(fp), states.get(fp))
                self._remember(fp, states.get(fp))
                if change is not None:
                    applied += self._run_apply(change, "poll")
        self.applied_poll += applied
        return applied

    def notified(self, payload: str) -> bool:
        """A notification: the viewer it names is read again and its change applied. False if
        it was ours, unreadable, or changed nothing here."""
        return self.notified_many([payload]) > 0

    def notified_many(self, payloads: list[str]) -> int:
        """Notifications received together: the viewers they name read again in one query and
        their changes applied, the grants together. Returns how many were applied."""
        renewed: dict[str, bool] = {}
        for payload in payloads:
            try:
                message = json.loads(payload)
                fp, origin = str(message["fingerprint"]), str(message["archiver"])
                added = message.get("action") == "viewer.add"
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a malformed site notification")
                continue
            if origin != self._archiver:
                renewed[fp] = renewed.get(fp, False) or added
        if not renewed:
            return 0
        rows = self._directory.viewers_named(list(renewed))
        with self._lock:
            changes = []
            for fp, was_added in renewed.items():
                row = rows.get(fp)
                state = None if row is None else (
                    row.revoked_ms, None if row.all_cameras else tuple(sorted(row.cameras)),
                    row.key_streams_deleted)
                change = diff(fp, self._seen.get(fp), state, renewed=was_added)
                self._remember(fp, state)
                if change is not None:
                    changes.append(change)
            together = self._apply_grants is not None
            grants = [c for c in changes if together and c.granted]
            applied = self._run_grants(grants, "notify") if grants else 0
            applied += sum(self._run_apply(c, "notify") for c in changes
                           if not (together and c.granted))
        self.applied_notify += applied
        return applied

    def _run_grants(self, grants: list[ViewerChange], how: str) -> int:
        assert self._apply_grants is not None
        log.info("site: %d viewer(s) authorized through another Archiver (%s): %s",
                 len(grants), how, ", ".join(c.fingerprint[:16] for c in grants[:5])
                 + (", ..." if len(grants) > 5 else ""))
        try:
            self._apply_grants([c.fingerprint for c in grants])
        except Exception:
            log.exception("could not apply the authorization of %d viewer(s)", len(grants))
            return 0
        return len(grants)

    def _run_apply(self, change: ViewerChange, how: str) -> int:
        log.info("site: viewer %s %s through another Archiver (%s)", change.fingerprint[:16],
                 "authorized" if change.granted else "revoked" if change.revoked
                 else f"lost {', '.join(change.cameras or ['all cameras'])}", how)
        try:
            self._apply(change)
        except Exception:
            log.exception("could not apply the change of viewer %s", change.fingerprint[:16])
            return 0
        return 1

    # --- the thread ------------------------------------------------------------------
    def _run(self) -> None:
        next_poll = time.monotonic() + self._poll_s
        reconnect_at, failures = 0.0, 0
        while not self._stop.is_set():
            now = time.monotonic()
            if self._listen and self._conn is None and now >= reconnect_at:
                if self._connect():
                    failures = 0
                    next_poll = now  # what was announced while not listening: poll at once
                else:
                    reconnect_at = now + RECONNECT_S[min(failures, len(RECONNECT_S) - 1)]
                    failures += 1
            wait = max(0.0, min(WAKE_S, next_poll - time.monotonic()))
            if self._conn is not None:
                self._receive(wait)
            else:
                self._stop.wait(wait)
            if time.monotonic() >= next_poll and not self._stop.is_set():
                next_poll = time.monotonic() + self._poll_s
                self._poll_logged()

    def _poll_logged(self) -> None:
        try:
            self.poll_once()
            if self._directory_down:
                log.info("site: the directory answers again")
            self._directory_down = False
        except Exception as exc:
            if not self._directory_down:  # once per outage; recording goes on
                log.warning("site: cannot poll the directory for authorization changes (%s); "
                            "trying again every %.1f s", exc, self._poll_s)
            self._directory_down = True

    def _connect(self) -> bool:
        import psycopg

        url = self._url or ""
        # libpq's own URL (SQLAlchemy's "postgresql+psycopg://" is not one).
        libpq_url = "postgresql://" + url.split("://", 1)[1]
        try:
            conn = psycopg.connect(libpq_url, autocommit=True, connect_timeout=5)
            conn.execute(f"LISTEN {CHANNEL}")
        except Exception as exc:
            if not self._listen_failed:  # once per outage
                log.warning("site: cannot listen for changes at %s (%s); polling meanwhile",
                            redacted(url), " ".join(str(exc).split()))
            self._listen_failed = True
            return False
        self._listen_failed = False
        self._conn = conn
        self.connected.set()
        log.info("site: listening for authorization changes")
        return True

    def _receive(self, wait: float) -> None:
        # A whole packet of notifications is taken (stopping inside one would lose the rest of
        # it), then what else arrives within DRAIN_S: a batch enrolment announces its viewers
        # in one commit, and they are applied together (one read, the grants at once).
        try:
            payloads = [note.payload for note in self._conn.notifies(timeout=wait, stop_after=1)]
            if payloads and not self._stop.is_set():
                payloads += [note.payload for note in self._conn.notifies(
                    timeout=DRAIN_S, stop_after=NOTIFY_BATCH)]
        except Exception as exc:
            log.warning("site: the listening connection was lost (%s); reconnecting",
                        " ".join(str(exc).split()))
            self._close_connection()
            return
        if payloads:
            try:
                self.notified_many(payloads)
            except Exception as exc:  # the directory failed reading the rows: the poll
                log.warning("site: could not apply %d notification(s) (%s)", len(payloads), exc)

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        self.connected.clear()
        if conn is not None:
            try:
                conn.close()
            except Exception:
                log.debug("closing the listening connection failed", exc_info=True)
