"""The site directory: what belongs to the site rather than to one Archiver's files (cameras
and which Archiver records each; viewers, their cameras and revocations; evidence holds and
retention settings; access grants; admins; the Archiver registry; the audit log), over
SQLAlchemy Core on SQLite (the embedded default) or PostgreSQL. Every query of these tables is
here; the Archiver's local index (segments, manifests, key streams...) is archiver/db.py's.

Nothing secret is stored: camera tokens only as SHA-256 hashes, viewers and admins as public
certificates, access grants as the opaque ciphertext their grantor sent.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as SATimeoutError

from archiver.directory import schema as t
from archiver.directory.engine import (
    SNAPSHOT,
    SQLITE_FILE,
    WRITE,
    PoolSwitch,
    check_url,
    postgres_engine,
    redacted,
    sqlite_engine,
    where,
)
from archiver.directory.migrate import upgrade
from archiver.directory.rows import (
    AdminRow,
    ArchiverRow,
    AuditEvent,
    CameraRow,
    HoldRow,
    LeaseRow,
    NewViewer,
    Placement,
    ViewerRow,
)
from archiver.directory.snapshot import (
    MISSING,
    DirectoryLink,
    DirectorySnapshot,
    DirectoryUnreachable,
    wall_ms,
)
from archiver.grants import RESULT, TRANSITIONS, AccessGrantRow, GrantState
from archiver.storage import StorageFailed, StorageFull
from keyservice.errors import UsageError

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("archiver.directory")


class Directory:
    """The site directory behind one engine. ``open_directory`` makes one (and migrates it);
    ``close()`` gives its connections back.

    On PostgreSQL, ``link`` says whether it answers and ``snapshot`` holds the rows last read
    (archiver/directory/snapshot.py): while it is unreachable every query fails at once with
    DirectoryUnreachable, and the reads of the recording and serving paths (cameras, viewers,
    holds, Archivers, placements) answer from the snapshot instead. Reads that must be
    current say ``cached=False`` (a new login). SQLite: neither (a standalone Archiver)."""

    def __init__(self, engine: Engine, pool: PoolSwitch | None = None,
                 description: str = "", *, location: str | None = None,
                 clock: Callable[[], int] = wall_ms) -> None:
        self._engine = engine
        self._pool = pool
        self.description = description  # where it is, without a password
        self.backend = engine.dialect.name  # "sqlite" or "postgresql"
        self._insert = postgresql.insert if self.backend == "postgresql" else sqlite.insert
        self._clock = clock
        remote = self.backend == "postgresql"
        self.link = DirectoryLink(location or description, clock) if remote else None
        self.snapshot = DirectorySnapshot() if remote else None

    @property
    def reachable(self) -> bool:
        """False while the site's PostgreSQL is unreachable (always True on SQLite)."""
        return self.link is None or self.link.up

    def reconnect(self, timeout_s: float = 2.0) -> None:
        """After an outage: raises unless the server answers; then a fresh pool, the link up,
        the snapshot read again in full (snapshot.py's watch calls it)."""
        if self._pool is None or self.link is None:
            return
        self._pool.probe(timeout_s)
        self._pool.renew()
        self.link.back()
        self.load_snapshot()

    def load_snapshot(self) -> None:
        """Read every row the snapshot keeps (at start, and when the directory is back)."""
        if self.snapshot is None:
            return
        p = t.camera_placements.c
        self.snapshot.load(
            self.cameras(include_removed=True), self.viewers(), self.holds(), self.archivers(),
            [(r[0], r[1], r[2]) for r in self._rows(select(p.camera, p.archiver, p.since_ms)
                                                    .order_by(p.camera, p.since_ms))],
            self._clock(), self.camera_archivers())

    def _cached(self, read: Callable[[], Any], last: Callable[[], Any],
                keep: Callable[[Any], None]) -> Any:
        """``read()`` from the directory, kept in the snapshot (``keep``); while the directory
        is unreachable, ``last()`` (what the snapshot holds) if it knows."""
        if self.snapshot is None:
            return read()
        try:
            value = read()
        except DirectoryUnreachable:
            found = last()
            if found is MISSING:
                raise
            return found
        keep(value)
        return value

    def _guard(self) -> None:
        # While down, nothing waits on the server (a pool timeout per segment would stall
        # ingest): only the watch tries it (reconnect). Without a watch (an embedder, a
        # command), every query tries, as before.
        if self.link is not None and not self.link.up and self.link.watched:
            raise self.link.refusal()

    def close(self) -> None:
        self._engine.dispose()
        if self._pool is not None:
            self._pool.close()

    @property
    def engine(self) -> Engine:
        return self._engine

    # --- connections ------------------------------------------------------------------
    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction (SQLite: BEGIN IMMEDIATE); a database failure is the
        archive's StorageFull or StorageFailed, answered 507/503 like the index's."""
        self._guard()
        try:
            with self._engine.connect() as conn:
                conn.execution_options(**{WRITE: True})
                with conn.begin():
                    yield conn
        except IntegrityError:
            raise
        except _failures() as exc:
            raise self._failure(exc) from None

    def _rows(self, statement: Any, params: dict[str, Any] | None = None) -> list[Any]:
        self._guard()
        try:
            with self._engine.connect() as conn:
                rows = list(conn.execute(statement, params).all())
        except _failures() as exc:
            raise self._failure(exc) from None
        self._answered()
        return rows

    def _answered(self) -> None:
        if self.link is not None:
            if not self.link.up:  # unwatched: the query that got through brings it back
                self.link.back()
            self.link.answered()

    def _failure(self, exc: Exception) -> StorageFull | StorageFailed:
        original = exc.orig if isinstance(exc, DBAPIError) else exc
        code = getattr(original, "sqlite_errorcode", 0) & 0xFF
        if isinstance(original, sqlite3.Error) and code == sqlite3.SQLITE_FULL:
            return StorageFull("The disk is full; the site directory could not be updated.",
                               "Free space; the Archiver resumes by itself.")
        if self.link is not None and _unreachable(original):
            return self.link.failed(" ".join(str(original).split())[:200])
        log.warning("site directory failure: %s", original)
        return StorageFailed(f"The site directory ({self.description}) failed: "
                             f"{type(original).__name__}.")

    # --- cameras ----------------------------------------------------------------------
    def add_camera(self, name: str, token_sha256: bytes, rtsp_url: str | None, now_ms: int,
                   retention_days: int | None = None, archiver: str | None = None,
                   standbys: Sequence[str] = (), redundant: bool = False) -> bool:
        """False if a camera of that name exists (removed cameras keep their name: evidence).
        ``archiver`` records it (its primary); ``standbys``, in order, take over when it is
        down, or (``redundant``) record it at the same time."""
        with self._write() as conn:
            done = conn.execute(self._insert(t.cameras).values(
                name=name, token_sha256=token_sha256, rtsp_url=rtsp_url, created_ms=now_ms,
                removed_ms=None, retention_days=retention_days, archiver=archiver,
                redundant=int(redundant),
            ).on_conflict_do_nothing(index_elements=["name"]).returning(t.cameras.c.name))
            # RETURNING, not rowcount: psycopg reports no count for an INSERT through SQLAlchemy.
            added = done.first() is not None
            if added and archiver is not None:
                conn.execute(insert(t.camera_placements).values(
                    camera=name, since_ms=now_ms, archiver=archiver))
                if standbys:
                    conn.execute(insert(t.camera_archivers), [
                        {"camera": name, "rank": rank, "archiver": who}
                        for rank, who in enumerate((archiver, *standbys))])
            return added

    def camera_archivers(self, name: str | None = None) -> dict[str, tuple[str, ...]]:
        """The ordered Archivers (primary first, then standbys) of ``name`` (every camera's if
        None); a camera of one Archiver has no entry."""
        a = t.camera_archivers.c
        query = select(a.camera, a.archiver).order_by(a.camera, a.rank)
        if name is not None:
            query = query.where(a.camera == name)

        def read() -> dict[str, tuple[str, ...]]:
            found: dict[str, list[str]] = {}
            for camera, archiver in self._rows(query):
                found.setdefault(camera, []).append(archiver)
            return {camera: tuple(names) for camera, names in found.items()}

        snap = self.snapshot
        return self._cached(read, lambda: snap.camera_archivers(name) if snap else MISSING,
                            lambda found: snap.put_camera_archivers(name, found) if snap
                            else None)

    def cameras(self, include_removed: bool = False) -> list[CameraRow]:
        query = select(*_columns(t.cameras, CameraRow)).order_by(t.cameras.c.name)
        if not include_removed:
            query = query.where(t.cameras.c.removed_ms.is_(None))
        snap = self.snapshot
        return self._cached(
            lambda: [_camera_row(row) for row in self._rows(query)],
            lambda: snap.cameras(include_removed) if snap else MISSING,
            lambda rows: snap.put_cameras(rows, include_removed) if snap else None)

    def camera(self, name: str) -> CameraRow | None:
        def read() -> CameraRow | None:
            rows = self._rows(_CAMERA, {"name": name})  # every segment's token check: prebuilt
            return _camera_row(rows[0]) if rows else None

        snap = self.snapshot
        return self._cached(read, lambda: snap.camera(name) if snap else MISSING,
                            lambda row: snap.put_camera(name, row) if snap else None)

    def remove_camera(self, name: str, now_ms: int) -> bool:
        with self._write() as conn:
            return conn.execute(update(t.cameras).where(
                t.cameras.c.name == name, t.cameras.c.removed_ms.is_(None)).values(
                removed_ms=now_ms)).rowcount == 1

    def set_retention(self, name: str, days: int | None) -> bool:
        """A camera's retention period in days (None: the site default)."""
        with self._write() as conn:
            return conn.execute(update(t.cameras).where(t.cameras.c.name == name).values(
                retention_days=days)).rowcount == 1

    # --- viewers ----------------------------------------------------------------------
    def add_viewer(self, fingerprint: str, certificate: bytes, subject: str, oaep_hash: int,
                   cameras: Iterable[str] | None, now_ms: int) -> None:
        """Authorize (or re-authorize) a viewer; cameras None means all cameras, present and
        future."""
        self.add_viewers([NewViewer(fingerprint, certificate, subject, oaep_hash,
                                    None if cameras is None else tuple(cameras))], now_ms)

    def add_viewers(self, viewers: Sequence[NewViewer], now_ms: int) -> None:
        """``add_viewer`` for many, in one transaction (batch enrolment: one commit, one fsync,
        whatever their number)."""
        if not viewers:
            return
        with self._write() as conn:
            conn.execute(delete(t.viewer_cameras).where(
                t.viewer_cameras.c.fingerprint.in_([v.fingerprint for v in viewers])))
            stmt = self._insert(t.viewers)
            conn.execute(stmt.on_conflict_do_update(index_elements=["fingerprint"], set_={
                "oaep_hash": stmt.excluded.oaep_hash, "all_cameras": stmt.excluded.all_cameras,
                "revoked_ms": None}), [
                {"fingerprint": v.fingerprint, "certificate": v.certificate,
                 "subject": v.subject, "oaep_hash": v.oaep_hash,
                 "all_cameras": int(v.cameras is None), "added_ms": now_ms,
                 "revoked_ms": None, "key_streams_deleted": 0} for v in viewers])
            cameras = [{"fingerprint": v.fingerprint, "camera": c}
                       for v in viewers for c in v.cameras or ()]
            if cameras:
                conn.execute(insert(t.viewer_cameras), cameras)

    def set_viewer_cameras(self, fingerprint: str, cameras: Iterable[str] | None) -> bool:
        """Replace an active viewer's cameras (None: all); False if there is no such viewer."""
        wanted = list(cameras or ())
        with self._write() as conn:
            if conn.execute(update(t.viewers).where(
                    t.viewers.c.fingerprint == fingerprint, t.viewers.c.revoked_ms.is_(None)
            ).values(all_cameras=int(cameras is None))).rowcount != 1:
                return False
            conn.execute(delete(t.viewer_cameras).where(
                t.viewer_cameras.c.fingerprint == fingerprint))
            if wanted:
                conn.execute(insert(t.viewer_cameras), [
                    {"fingerprint": fingerprint, "camera": c} for c in wanted])
            return True

    def viewers(self) -> list[ViewerRow]:
        cams = t.viewer_cameras.c
        snap = self.snapshot
        return self._cached(
            lambda: self._viewer_rows(
                select(*_VIEWER_COLUMNS).order_by(t.viewers.c.added_ms),
                select(cams.fingerprint, cams.camera).order_by(cams.camera)),
            lambda: snap.viewers() if snap else MISSING,
            lambda rows: snap.put_viewers(rows) if snap else None)

    def viewer(self, fingerprint: str, *, cached: bool = True) -> ViewerRow | None:
        """One viewer (every login and stream start asks: the statements are prebuilt).
        ``cached=False``: never from the snapshot (a new login needs the directory)."""
        def read() -> ViewerRow | None:
            found = self._viewer_rows(_VIEWER, _VIEWER_CAMERAS, {"fp": fingerprint})
            return found[0] if found else None

        snap = self.snapshot
        return self._cached(read, lambda: snap.viewer(fingerprint) if snap and cached
                            else MISSING,
                            lambda row: snap.put_viewer(fingerprint, row) if snap else None)

    def viewers_named(self, fingerprints: Sequence[str]) -> dict[str, ViewerRow]:
        """The viewers among ``fingerprints``, by fingerprint (a batch enrolment's: one query,
        not one per viewer)."""
        wanted = list(fingerprints)
        if len(wanted) == 1:  # the prebuilt statement every login uses
            row = self.viewer(wanted[0])
            return {} if row is None else {row.fingerprint: row}
        cams = t.viewer_cameras.c

        def read() -> dict[str, ViewerRow]:
            rows = self._viewer_rows(
                select(*_VIEWER_COLUMNS).where(t.viewers.c.fingerprint.in_(wanted)),
                select(cams.fingerprint, cams.camera).where(cams.fingerprint.in_(wanted))
                .order_by(cams.camera))
            return {row.fingerprint: row for row in rows}

        def last() -> Any:
            found = {fp: snap.viewer(fp) for fp in wanted} if snap else {}
            if snap is None or any(row is MISSING for row in found.values()):
                return MISSING
            return {fp: row for fp, row in found.items() if row is not None}

        def keep(rows: dict[str, ViewerRow]) -> None:
            if snap is not None:
                for fp in wanted:
                    snap.put_viewer(fp, rows.get(fp))

        snap = self.snapshot
        return self._cached(read, last, keep)

    def _viewer_rows(self, viewers: Any, cameras: Any,
                     params: dict[str, Any] | None = None) -> list[ViewerRow]:
        self._guard()
        try:
            # One snapshot for both queries (a viewer and its cameras as of one commit).
            with self._engine.connect() as conn:
                conn.execution_options(**{SNAPSHOT: True})
                rows = conn.execute(viewers, params).all()
                camera_rows = conn.execute(cameras, params).all() if rows else []
        except _failures() as exc:
            raise self._failure(exc) from None
        self._answered()
        by_viewer: dict[str, list[str]] = {}
        for fp, cam in camera_rows:
            by_viewer.setdefault(fp, []).append(cam)
        return [ViewerRow(fp, bytes(cert), subject, oaep, bool(all_cams),
                          tuple(by_viewer.get(fp, ())), added, revoked, bool(deleted))
                for fp, cert, subject, oaep, all_cams, added, revoked, deleted in rows]

    def viewer_states(self) -> dict[str, tuple[int | None, tuple[str, ...] | None, bool]]:
        """Every viewer's authorization, without its certificate: fingerprint -> (revoked_ms,
        its cameras, None for all, whether its key streams were deleted). What
        archiver/directory/notify.py polls and compares. Kept in the snapshot, but never
        answered from it: a poll that cannot reach the directory must fail."""
        v, cams = t.viewers.c, t.viewer_cameras.c
        self._guard()
        try:
            with self._engine.connect() as conn:
                conn.execution_options(**{SNAPSHOT: True})
                rows = conn.execute(select(v.fingerprint, v.revoked_ms, v.all_cameras,
                                           v.key_streams_deleted)).all()
                camera_rows = conn.execute(select(cams.fingerprint, cams.camera).order_by(
                    cams.fingerprint, cams.camera)).all()
        except _failures() as exc:
            raise self._failure(exc) from None
        self._answered()
        by_viewer: dict[str, list[str]] = {}
        for fp, cam in camera_rows:
            by_viewer.setdefault(fp, []).append(cam)
        states = {fp: (revoked, None if all_cams else tuple(by_viewer.get(fp, ())),
                       bool(deleted)) for fp, revoked, all_cams, deleted in rows}
        if self.snapshot is not None:
            self.snapshot.put_states(states)
        return states

    def revoke_viewer(self, fingerprint: str, now_ms: int) -> bool:
        """Revoked from now (a revoked viewer stays revoked at its first time); False if
        unknown."""
        v = t.viewers.c
        with self._write() as conn:
            return conn.execute(update(t.viewers).where(v.fingerprint == fingerprint).values(
                revoked_ms=func.coalesce(v.revoked_ms, now_ms))).rowcount == 1

    def mark_key_streams_deleted(self, fingerprint: str) -> None:
        """Record that the viewer's key streams were deleted (archiver/db.py deletes them from
        the local index)."""
        with self._write() as conn:
            conn.execute(update(t.viewers).where(t.viewers.c.fingerprint == fingerprint).values(
                key_streams_deleted=1))

    # --- evidence holds ---------------------------------------------------------------
    def add_hold(self, camera: str, from_ms: int, to_ms: int, reason: str, created_by: str,
                 now_ms: int) -> HoldRow:
        with self._write() as conn:
            done = conn.execute(insert(t.holds).values(
                camera=camera, from_ms=from_ms, to_ms=to_ms, reason=reason,
                created_by=created_by, created_ms=now_ms))
            hold_id = int(done.inserted_primary_key[0])
        return HoldRow(hold_id, camera, from_ms, to_ms, reason, created_by, now_ms)

    def holds(self, camera: str | None = None) -> list[HoldRow]:
        query = select(*_columns(t.holds, HoldRow)).order_by(t.holds.c.hold_id)
        if camera:
            query = query.where(t.holds.c.camera == camera)
        snap = self.snapshot
        return self._cached(lambda: [HoldRow(*row) for row in self._rows(query)],
                            lambda: snap.holds(camera or None) if snap else MISSING,
                            lambda rows: snap.put_holds(camera or None, rows) if snap else None)

    def remove_hold(self, hold_id: int) -> HoldRow | None:
        with self._write() as conn:
            row = conn.execute(select(*_columns(t.holds, HoldRow)).where(
                t.holds.c.hold_id == hold_id)).first()
            if row is None:
                return None
            conn.execute(delete(t.holds).where(t.holds.c.hold_id == hold_id))
            return HoldRow(*row)

    # --- access grants (archiver/grants.py; the rules are archiver/services/grants.py) ------
    def add_access_grant(self, row: AccessGrantRow, blob: bytes) -> bool:
        """Store a grant as it came (its blob opaque); False if its id exists already."""
        values = {name: getattr(row, name) for name in _names(AccessGrantRow)}
        values["state"] = str(row.state)
        with self._write() as conn:
            return conn.execute(self._insert(t.access_grants).values(**values, blob=blob)
                                .on_conflict_do_nothing(index_elements=["grant_id"])
                                .returning(t.access_grants.c.grant_id)).first() is not None

    def access_grant(self, grant_id: str) -> AccessGrantRow | None:
        rows = self._rows(select(*_columns(t.access_grants, AccessGrantRow)).where(
            t.access_grants.c.grant_id == grant_id))
        return _grant_row(rows[0]) if rows else None

    def access_grant_blob(self, grant_id: str) -> bytes | None:
        rows = self._rows(select(t.access_grants.c.blob).where(
            t.access_grants.c.grant_id == grant_id))
        return bytes(rows[0][0]) if rows else None

    def access_grants(self, state: GrantState | None = None,
                      party: str | None = None) -> list[AccessGrantRow]:
        """All grants (newest first), or those in ``state``, or those ``party`` made or got."""
        g = t.access_grants.c
        query = select(*_columns(t.access_grants, AccessGrantRow)).order_by(
            g.created_ms.desc(), g.grant_id)
        if state is not None:
            query = query.where(g.state == str(state))
        if party is not None:
            query = query.where(or_(g.grantor == party, g.grantee == party))
        return [_grant_row(r) for r in self._rows(query)]

    def decide_access_grant(self, grant_id: str, decision: str, actor: str, now_ms: int,
                            note: str | None) -> AccessGrantRow | None:
        """Apply an admin decision if the grant is in a state that allows it (in one statement:
        two admins deciding at once cannot both apply); returns the grant as it is afterwards
        (unchanged if the decision did not apply), None if unknown."""
        g = t.access_grants.c
        with self._write() as conn:
            conn.execute(update(t.access_grants).where(
                g.grant_id == grant_id, g.state.in_([str(s) for s in TRANSITIONS[decision]])
            ).values(state=str(RESULT[decision]), decided_ms=now_ms, decided_by=actor,
                     note=func.coalesce(note, g.note)))
        return self.access_grant(grant_id)

    # --- admins (archiver/admins.py has the rules) ------------------------------------
    def add_admin(self, row: AdminRow) -> bool:
        """False if the fingerprint or the name exists already (revoked admins included)."""
        try:
            with self._write() as conn:
                conn.execute(insert(t.admins).values(
                    **{name: getattr(row, name) for name in _names(AdminRow)}))
        except IntegrityError:
            return False
        return True

    def admin(self, fp: str) -> AdminRow | None:
        rows = self._rows(_ADMINS.where(t.admins.c.fingerprint == fp))
        return _admin_row(rows[0]) if rows else None

    def find_admin(self, who: str) -> AdminRow | None:
        """By name, full fingerprint or a unique fingerprint prefix (8 hex digits at least)."""
        a = t.admins.c
        found = self._rows(_ADMINS.where(or_(a.name == who, a.fingerprint == who)))
        if not found and 8 <= len(who) <= 64 and all(ch in "0123456789abcdef" for ch in who):
            found = self._rows(_ADMINS.where(func.substr(a.fingerprint, 1, len(who)) == who))
        return _admin_row(found[0]) if len(found) == 1 else None

    def admins(self) -> list[AdminRow]:
        return [_admin_row(r) for r in self._rows(_ADMINS.order_by(t.admins.c.added_ms,
                                                                     t.admins.c.name))]

    def revoke_admin(self, fp: str, actor: str, now_ms: int) -> bool:
        """False if unknown or revoked already."""
        a = t.admins.c
        with self._write() as conn:
            return conn.execute(update(t.admins).where(
                a.fingerprint == fp, a.revoked_ms.is_(None)).values(
                revoked_ms=now_ms, revoked_by=actor)).rowcount == 1

    def active_admins(self) -> int:
        return int(self._rows(select(func.count()).select_from(t.admins).where(
            t.admins.c.revoked_ms.is_(None)))[0][0])

    # --- the Archiver registry --------------------------------------------------------
    def register_archiver(self, row: ArchiverRow) -> None:
        """Add an Archiver to the site, or update its URL and certificate."""
        stmt = self._insert(t.archivers).values(
            **{name: getattr(row, name) for name in _names(ArchiverRow)})
        with self._write() as conn:
            conn.execute(stmt.on_conflict_do_update(index_elements=["name"], set_={
                "url": stmt.excluded.url, "certificate": stmt.excluded.certificate}))

    def heartbeat(self, name: str, now_ms: int) -> bool:
        with self._write() as conn:
            return conn.execute(update(t.archivers).where(t.archivers.c.name == name).values(
                heartbeat_ms=now_ms)).rowcount == 1

    def archivers(self) -> list[ArchiverRow]:
        snap = self.snapshot
        return self._cached(
            lambda: [ArchiverRow(r[0], r[1], bytes(r[2]), r[3], r[4]) for r in self._rows(
                select(*_columns(t.archivers, ArchiverRow)).order_by(t.archivers.c.name))],
            lambda: snap.archivers() if snap else MISSING,
            lambda rows: snap.put_archivers(rows) if snap else None)

    def cameras_held(self, archiver: str) -> list[str]:
        """The cameras (not removed) that ``archiver`` records."""
        c = t.cameras.c
        return [r[0] for r in self._rows(select(c.name).where(
            and_(c.archiver == archiver, c.removed_ms.is_(None))).order_by(c.name))]

    def archiver(self, name: str) -> ArchiverRow | None:
        def read() -> ArchiverRow | None:
            rows = self._rows(select(*_columns(t.archivers, ArchiverRow)).where(
                t.archivers.c.name == name))
            return ArchiverRow(rows[0][0], rows[0][1], bytes(rows[0][2]), rows[0][3],
                               rows[0][4]) if rows else None

        snap = self.snapshot
        return self._cached(read, lambda: snap.archiver(name) if snap else MISSING,
                            lambda row: snap.put_archiver(name, row) if snap else None)

    # --- where cameras are recorded ---------------------------------------------------
    def move_camera(self, name: str, to: str, now_ms: int) -> bool:
        """From ``now_ms`` on, ``to`` records the camera (False: no such camera, or it is
        removed, or ``to`` already records it). What was recorded before stays where it is."""
        c = t.cameras.c
        with self._write() as conn:
            moved = conn.execute(update(t.cameras).where(
                c.name == name, c.removed_ms.is_(None),
                or_(c.archiver.is_(None), c.archiver != to)).values(archiver=to)).rowcount == 1
            if moved:
                conn.execute(insert(t.camera_placements).values(
                    camera=name, since_ms=now_ms, archiver=to))
            return moved

    def placements(self, camera: str, from_ms: int | None = None,
                   to_ms: int | None = None) -> list[Placement]:
        """Where ``camera`` was recorded, oldest first: the placements that overlap
        [from_ms, to_ms) (all of them without bounds). Empty for a camera never placed (one
        added by a standalone Archiver: it holds all of its history)."""
        p = t.camera_placements.c
        snap = self.snapshot
        rows = self._cached(
            lambda: [(r[0], r[1]) for r in self._rows(
                select(p.archiver, p.since_ms).where(p.camera == camera).order_by(p.since_ms))],
            lambda: snap.placements(camera) if snap else MISSING,
            lambda found: snap.put_placements(camera, found) if snap else None)
        found = []
        for i, (archiver, since_ms) in enumerate(rows):
            until_ms = rows[i + 1][1] if i + 1 < len(rows) else None
            if (to_ms is None or since_ms < to_ms) and (
                    from_ms is None or until_ms is None or until_ms > from_ms):
                found.append(Placement(camera, archiver, since_ms, until_ms))
        return found

    # --- leases: who records a camera with standbys (issue 22) ---------------------------
    def leases(self) -> dict[str, LeaseRow]:
        """Every camera's lease, by camera (only cameras with standbys have one)."""
        return {row[0]: LeaseRow(*row[:4], locked=bool(row[4])) for row in self._rows(
            select(*_columns(t.camera_leases, LeaseRow)))}

    def renew_leases(self, holder: str, cameras: Sequence[str], now_ms: int,
                     ttl_ms: int, locked: Iterable[str] = ()) -> None:
        """``holder`` records ``cameras`` (the directory said so): their leases are its until
        ``now_ms + ttl_ms``, with whether it holds their lock (``locked``); a lease another
        Archiver held (a move) starts a new epoch."""
        locked = set(locked)
        if not cameras:
            return
        lease, c = t.camera_leases, t.cameras.c
        with self._write() as conn:
            # Only those it still records: a takeover committed since the caller read the
            # cameras must not be renewed back (FOR SHARE waits for it, then re-reads the row).
            mine = [row[0] for row in conn.execute(select(c.name).where(
                c.name.in_(list(cameras)), c.archiver == holder, c.removed_ms.is_(None))
                .with_for_update(read=True))]
            if not mine:
                return
            stmt = self._insert(lease).values([
                {"camera": name, "holder": holder, "epoch": 1, "expires_ms": now_ms + ttl_ms,
                 "locked": int(name in locked)} for name in mine])
            stmt = stmt.on_conflict_do_update(index_elements=["camera"], set_={
                "holder": stmt.excluded.holder, "expires_ms": stmt.excluded.expires_ms,
                "locked": stmt.excluded.locked,
                "epoch": case((lease.c.holder == stmt.excluded.holder, lease.c.epoch),
                              else_=lease.c.epoch + 1)})
            conn.execute(stmt)

    def take_over(self, camera: str, holder: str, to: str, now_ms: int, ttl_ms: int,
                  epoch: int | None = None, expired: bool = False,
                  locked: bool = False) -> int | None:
        """``to`` records ``camera`` from ``now_ms`` on, in place of ``holder`` whose lease
        lapsed: in one transaction the camera's Archiver, a placement (so a range across the
        failover plays part by part, as across a move) and the lease's next epoch, returned.
        None if ``holder`` no longer records it (another standby was first, or it moved), or
        the lease is no longer the one seen (``epoch``; ``expired``: it must still be)."""
        c = t.cameras.c
        lease = t.camera_leases
        with self._write() as conn:
            if epoch is not None:
                # The lease as the standby saw it, still: not renewed since (a holder that came
                # back), nor taken by another standby.
                row = conn.execute(select(lease.c.epoch, lease.c.expires_ms, lease.c.holder)
                                   .where(lease.c.camera == camera).with_for_update()).first()
                if (row is None or row[0] != epoch or row[2] != holder
                        or (expired and row[1] >= now_ms)):
                    return None
            # Compare-and-set on the holder: of two standbys that both saw it lapse, one wins.
            if conn.execute(update(t.cameras).where(
                    c.name == camera, c.removed_ms.is_(None), c.archiver == holder,
                    c.redundant == 0).values(archiver=to)).rowcount != 1:
                return None
            conn.execute(insert(t.camera_placements).values(
                camera=camera, since_ms=now_ms, archiver=to))
            stmt = self._insert(lease).values(camera=camera, holder=to, epoch=1,
                                              expires_ms=now_ms + ttl_ms, locked=int(locked))
            stmt = stmt.on_conflict_do_update(index_elements=["camera"], set_={
                "holder": to, "expires_ms": now_ms + ttl_ms, "locked": int(locked),
                "epoch": lease.c.epoch + 1})
            return int(conn.execute(stmt.returning(lease.c.epoch)).scalar_one())

    # --- the site's audit log ---------------------------------------------------------
    def append_audit(self, event: AuditEvent) -> None:
        with self._write() as conn:
            conn.execute(insert(t.audit_events).values(
                **{name: getattr(event, name) for name in _names(AuditEvent)}))

    def append_audits(self, events: list[AuditEvent]) -> None:
        """Several lines of one Archiver's log in one transaction (all or none: a line that is
        there already fails them all, with IntegrityError)."""
        if not events:
            return
        with self._write() as conn:
            conn.execute(insert(t.audit_events), [
                {name: getattr(event, name) for name in _names(AuditEvent)} for event in events])

    def audit_events(self, archiver: str | None = None, since_ms: int | None = None,
                     limit: int = 1000) -> list[AuditEvent]:
        """The site's audit log in time order (each Archiver's entries in its own order)."""
        e = t.audit_events.c
        query = select(*_columns(t.audit_events, AuditEvent)).order_by(
            e.ts_ms, e.archiver, e.seq).limit(limit)
        if archiver is not None:
            query = query.where(e.archiver == archiver)
        if since_ms is not None:
            query = query.where(e.ts_ms >= since_ms)
        return [AuditEvent(*row) for row in self._rows(query)]

    def last_audit_seq(self, archiver: str) -> int:
        """The last line number of ``archiver``'s log the directory has (0: none)."""
        value = self._rows(select(func.max(t.audit_events.c.seq)).where(
            t.audit_events.c.archiver == archiver))[0][0]
        return int(value or 0)


@functools.cache
def _failures() -> tuple[type[Exception], ...]:
    """What makes a directory call the archive's StorageFailed (503), not a traceback: a
    database error, or no connection within the pool's timeout (SQLAlchemy's pool on SQLite,
    psycopg's on PostgreSQL). Evaluated only when an exception is raised: an SQLite Archiver
    does not load psycopg."""
    from psycopg_pool import PoolTimeout

    return (DBAPIError, SATimeoutError, PoolTimeout)


def _unreachable(original: BaseException) -> bool:
    """A failure to reach PostgreSQL (refused, reset, shut down, no connection in time), not
    an error of the query: the outage path (snapshot.py). A server that became read-only (a
    leader demoted by Patroni under a connection kept open) is one too: the watch's new pool
    finds the writable one (target_session_attrs=read-write)."""
    import psycopg
    from psycopg_pool import PoolTimeout

    return isinstance(original, PoolTimeout | psycopg.OperationalError | psycopg.InterfaceError
                      | psycopg.errors.ReadOnlySqlTransaction)


def _names(cls: type) -> tuple[str, ...]:
    return tuple(cls.__dataclass_fields__)  # type: ignore[attr-defined]


def _columns(table: Any, cls: type) -> list[Any]:
    """The table's columns in the row dataclass's order (ViewerRow's cameras are not one)."""
    return [table.c[name] for name in _names(cls)]


_VIEWER_COLUMNS = [t.viewers.c[name] for name in (
    "fingerprint", "certificate", "subject", "oaep_hash", "all_cameras", "added_ms",
    "revoked_ms", "key_streams_deleted")]
_ADMINS = select(*_columns(t.admins, AdminRow))
# The statements of the hot reads, built once (building one costs more than running it).
_CAMERA = select(*_columns(t.cameras, CameraRow)).where(t.cameras.c.name == bindparam("name"))
_VIEWER = select(*_VIEWER_COLUMNS).where(t.viewers.c.fingerprint == bindparam("fp"))
_VIEWER_CAMERAS = (select(t.viewer_cameras.c.fingerprint, t.viewer_cameras.c.camera)
                   .where(t.viewer_cameras.c.fingerprint == bindparam("fp"))
                   .order_by(t.viewer_cameras.c.camera))


def _camera_row(values: Any) -> CameraRow:
    return CameraRow(*values[:-1], redundant=bool(values[-1]))


def _grant_row(values: Any) -> AccessGrantRow:
    return AccessGrantRow(*values[:8], GrantState(values[8]), *values[9:])


def _admin_row(values: Any) -> AdminRow:
    return AdminRow(values[0], values[1], bytes(values[2]), *values[3:])


def open_directory(url: str | None, data_dir: Path) -> Directory:
    """The site directory: PostgreSQL at ``url``, else the SQLite file of the data directory
    (the index's, opened by archiver/db.py first so that its legacy migrations have run).
    Brought to the newest revision (a backup first when an SQLite file is migrated)."""
    if url:
        check_url(url)
        try:
            engine, pool = postgres_engine(url)
        except Exception as exc:
            reason = " ".join(str(exc).split())  # libpq's message is several lines
            raise UsageError(f"The site directory at {redacted(url)} cannot be reached "
                             f"({reason}).",
                             "Check the URL, the password and that PostgreSQL listens "
                             "there.") from None
        directory = Directory(engine, pool, redacted(url), location=where(url))
    else:
        path = data_dir / SQLITE_FILE
        directory = Directory(sqlite_engine(path), None, str(path.name))
    try:
        upgrade(directory.engine, None if url else data_dir)
        directory.load_snapshot()  # what recording goes on with if the directory goes down
    except BaseException:
        directory.close()
        raise
    return directory
