"""Admins are people: each admin has a certificate on the admin's own PKCS#11 token and logs in
by proof of possession (as viewers do), so the audit log names the person who acted, and a
second person's approval can be told apart from the first person's request.

The admin token in the data directory (``admin-token``) stays as the bootstrap credential: it
adds the first admins, and it is the embedded default of a demo. Its actor in the audit log is
``admin``; a personal admin's actor is ``NAME (FINGERPRINT PREFIX)``.

Kept apart from db.py (its own table and connection on the same SQLite file), like grants.py.
Nothing secret is stored: certificates are public.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from archiver.audit import AuditLog
from archiver.auth import Sessions
from archiver.storage import IndexConnection
from keyservice.certs import load_certificate, validate_viewer_certificate
from keyservice.errors import CertificateError, RequestRefused
from keyservice.identity import fingerprint
from keyservice.keyscheme import KeyScheme
from keyservice.wire import ErrorCode

BOOTSTRAP_ACTOR = "admin"  # the admin token's actor in the audit log (shared, not a person)
ADMIN_NAME_PATTERN = r"^[a-z][a-z0-9._-]{0,63}$"
_NAME = re.compile(ADMIN_NAME_PATTERN)


def is_admin_name(name: str) -> bool:
    # Lower case, no spaces: one spelling per person in the audit log; never "admin", which is
    # the bootstrap token's actor.
    return bool(_NAME.fullmatch(name)) and name != BOOTSTRAP_ACTOR


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


_SELECT = ("SELECT fingerprint, name, certificate, subject, oaep_hash, added_ms, added_by, "
           "revoked_ms, revoked_by FROM admins")


def _row(values: tuple) -> AdminRow:
    return AdminRow(values[0], values[1], bytes(values[2]), *values[3:])


class AdminRefused(RequestRefused):
    """An admin change refused: wire error code, HTTP status and one sentence (a
    KeyServiceError like every refusal: ``wire_code`` and ``http_status`` as on the client)."""

    def __init__(self, status: int, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.wire_code = code.value
        self.http_status = status


class AdminStore:
    """The admins table (migration 5), one connection serialized by a lock."""

    def __init__(self, path: Path) -> None:
        self._index = IndexConnection(path, "admin")

    def close(self) -> None:
        self._index.close()

    def _execute(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        return self._index.execute(sql, args)

    def add(self, row: AdminRow) -> bool:
        """False if the fingerprint or the name exists already (revoked admins included)."""
        try:
            self._execute("INSERT INTO admins (fingerprint, name, certificate, subject, "
                          "oaep_hash, added_ms, added_by, revoked_ms, revoked_by) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          (row.fingerprint, row.name, row.certificate, row.subject,
                           row.oaep_hash, row.added_ms, row.added_by, None, None))
        except sqlite3.IntegrityError:
            return False
        return True

    def get(self, fp: str) -> AdminRow | None:
        found = self._execute(_SELECT + " WHERE fingerprint = ?", (fp,)).fetchone()
        return _row(found) if found else None

    def find(self, who: str) -> AdminRow | None:
        """By name, full fingerprint or a unique fingerprint prefix (8 hex digits at least)."""
        found = self._execute(_SELECT + " WHERE name = ? OR fingerprint = ?", (who, who)).fetchall()
        if not found and re.fullmatch(r"[0-9a-f]{8,64}", who):
            found = self._execute(_SELECT + " WHERE fingerprint LIKE ?", (who + "%",)).fetchall()
        return _row(found[0]) if len(found) == 1 else None

    def all(self) -> list[AdminRow]:
        return [_row(r) for r in self._execute(_SELECT + " ORDER BY added_ms, name").fetchall()]

    def revoke(self, fp: str, actor: str, now_ms: int) -> bool:
        """False if unknown or revoked already."""
        cursor = self._execute("UPDATE admins SET revoked_ms = ?, revoked_by = ? "
                               "WHERE fingerprint = ? AND revoked_ms IS NULL", (now_ms, actor, fp))
        return cursor.rowcount == 1


@dataclass
class Admins:
    """The business rules of admin identities: the certificate is checked as a viewer's is (the
    same enrolment, the site CA when given), every change is audited, and a revoked admin's
    sessions end at once."""

    store: AdminStore
    audit: AuditLog
    sessions: Sessions
    clock: Callable[[], int]
    site_ca: tuple[x509.Certificate, ...] = ()

    def add(self, actor: str, pem: bytes, name: str, oaep_hash: str | None = None) -> AdminRow:
        if not is_admin_name(name):
            raise AdminRefused(422, ErrorCode.BAD_ADMIN_NAME, f"'{name}' is not an admin name: "
                               "a lower-case letter, then up to 63 of a-z 0-9 . _ - ('admin' is "
                               "the bootstrap token's).")
        try:
            cert = load_certificate(pem)
            oaep = validate_viewer_certificate(
                cert, now=dt.datetime.now(dt.UTC), site_ca=self.site_ca,
                oaep_hash=KeyScheme.from_label(oaep_hash) if oaep_hash else None)
        except CertificateError as exc:
            raise AdminRefused(422, ErrorCode.BAD_CERTIFICATE, str(exc)) from None
        fp = fingerprint(cert).hex()
        now = self.clock()
        row = AdminRow(fp, name, cert.public_bytes(Encoding.DER), cert.subject.rfc4514_string(),
                       int(oaep), now, actor, None, None)
        if not self.store.add(row):
            raise AdminRefused(409, ErrorCode.ADMIN_EXISTS, f"An admin named '{name}' or with "
                               "this certificate exists already (names and certificates of "
                               "revoked admins stay reserved: the audit log names them).")
        self.audit.record(actor, "admin.add", now, name=name, fingerprint=fp,
                          subject=row.subject)
        return row

    def revoke(self, actor: str, who: str) -> AdminRow:
        row = self.store.find(who)
        if row is None:
            raise AdminRefused(404, ErrorCode.UNKNOWN_ADMIN, f"No admin (or more than one) is "
                               f"named or has the fingerprint '{who}'; see 'admins list'.")
        now = self.clock()
        if not self.store.revoke(row.fingerprint, actor, now):
            raise AdminRefused(409, ErrorCode.ADMIN_REVOKED, f"Admin {row.name} is revoked "
                               "already.")
        # At once: the session tokens of a revoked admin are worth nothing from now on.
        self.sessions.end_sessions_of(row.fingerprint)
        self.audit.record(actor, "admin.revoke", now, name=row.name, fingerprint=row.fingerprint)
        after = self.store.get(row.fingerprint)
        assert after is not None
        return after


def active_admins(db_path: Path) -> int:
    """Admins not revoked, read before the Archiver starts (0 if there is no index yet)."""
    if not db_path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM admins WHERE revoked_ms IS NULL")
                       .fetchone()[0])
    except sqlite3.OperationalError:  # an index from before admins (no table yet)
        return 0


def admin_validity_ms(row: AdminRow) -> tuple[int, int]:
    cert = x509.load_der_x509_certificate(row.certificate)
    return (int(cert.not_valid_before_utc.timestamp() * 1000),
            int(cert.not_valid_after_utc.timestamp() * 1000))
