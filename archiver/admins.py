"""Admins are people: each admin has a certificate on the admin's own PKCS#11 token and logs in
by proof of possession (as viewers do), so the audit log names the person who acted, and a
second person's approval can be told apart from the first person's request.

The admin token in the data directory (``admin-token``) stays as the bootstrap credential: it
adds the first admins, and it is the embedded default of a demo. Its actor in the audit log is
``admin``; a personal admin's actor is ``NAME (FINGERPRINT PREFIX)``.

The admins are the site's: their table is the site directory's (archiver/directory/), which
has its queries; here are the rules. Nothing secret is stored: certificates are public.
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
from archiver.directory import Directory
from archiver.directory.engine import SQLITE_FILE
from archiver.directory.rows import AdminRow
from archiver.services.refused import Refused
from keyservice.certs import load_certificate, validate_viewer_certificate
from keyservice.errors import CertificateError
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


# An admin change refused: the services' one refusal type (the old name, kept for callers).
AdminRefused = Refused


@dataclass(frozen=True)
class AdminPrincipal:
    """Who acts as admin: the bootstrap token (``fingerprint`` None: shared, not a person) or a
    personal admin logged in on the admin's own token."""

    actor: str
    fingerprint: str | None = None


class AdminStore:
    """The admins table, in the site directory (archiver/directory/store.py has its queries)."""

    def __init__(self, directory: Directory) -> None:
        self._directory = directory

    def close(self) -> None:
        """Nothing of its own to close: the directory is the archive's."""

    def add(self, row: AdminRow) -> bool:
        """False if the fingerprint or the name exists already (revoked admins included)."""
        return self._directory.add_admin(row)

    def get(self, fp: str) -> AdminRow | None:
        return self._directory.admin(fp)

    def find(self, who: str) -> AdminRow | None:
        """By name, full fingerprint or a unique fingerprint prefix (8 hex digits at least)."""
        return self._directory.find_admin(who)

    def all(self) -> list[AdminRow]:
        return self._directory.admins()

    def revoke(self, fp: str, actor: str, now_ms: int) -> bool:
        """False if unknown or revoked already."""
        return self._directory.revoke_admin(fp, actor, now_ms)


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
            raise Refused(ErrorCode.BAD_ADMIN_NAME, f"'{name}' is not an admin name: "
                               "a lower-case letter, then up to 63 of a-z 0-9 . _ - ('admin' is "
                               "the bootstrap token's).")
        try:
            cert = load_certificate(pem)
            oaep = validate_viewer_certificate(
                cert, now=dt.datetime.now(dt.UTC), site_ca=self.site_ca,
                oaep_hash=KeyScheme.from_label(oaep_hash) if oaep_hash else None)
        except CertificateError as exc:
            raise Refused(ErrorCode.BAD_CERTIFICATE, str(exc)) from None
        fp = fingerprint(cert).hex()
        now = self.clock()
        row = AdminRow(fp, name, cert.public_bytes(Encoding.DER), cert.subject.rfc4514_string(),
                       int(oaep), now, actor, None, None)
        if not self.store.add(row):
            raise Refused(ErrorCode.ADMIN_EXISTS, f"An admin named '{name}' or with "
                               "this certificate exists already (names and certificates of "
                               "revoked admins stay reserved: the audit log names them).")
        self.audit.record(actor, "admin.add", now, name=name, fingerprint=fp,
                          subject=row.subject)
        return row

    def revoke(self, actor: str, who: str) -> AdminRow:
        row = self.store.find(who)
        if row is None:
            raise Refused(ErrorCode.UNKNOWN_ADMIN, f"No admin (or more than one) is "
                               f"named or has the fingerprint '{who}'; see 'admins list'.")
        now = self.clock()
        if not self.store.revoke(row.fingerprint, actor, now):
            raise Refused(ErrorCode.ADMIN_REVOKED, f"Admin {row.name} is revoked "
                               "already.")
        # At once: the session tokens of a revoked admin are worth nothing from now on.
        self.sessions.end_sessions_of(row.fingerprint)
        self.audit.record(actor, "admin.revoke", now, name=row.name, fingerprint=row.fingerprint)
        after = self.store.get(row.fingerprint)
        assert after is not None
        return after


def active_admins(data_dir: Path, directory_url: str | None = None) -> int:
    """Admins not revoked, read before the Archiver starts (0 if there is no index yet)."""
    if directory_url:
        from archiver.directory import open_directory
        directory = open_directory(directory_url, data_dir)
        try:
            return directory.active_admins()
        finally:
            directory.close()
    db_path = data_dir / SQLITE_FILE
    if not db_path.exists():
        return 0
    try:
        # Read-only, without migrating: the Archiver migrates when it opens the file.
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM admins WHERE revoked_ms IS NULL")
                       .fetchone()[0])
    except sqlite3.OperationalError:  # an index from before admins (no table yet)
        return 0


def admin_validity_ms(row: AdminRow) -> tuple[int, int]:
    cert = x509.load_der_x509_certificate(row.certificate)
    return (int(cert.not_valid_before_utc.timestamp() * 1000),
            int(cert.not_valid_after_utc.timestamp() * 1000))
