"""Logins, the rules: a proof-of-possession login for viewers and for admins (a challenge
encrypted to the *registered* certificate, answered on its token, under the label of its kind
of session), and who a session or admin token belongs to at every request.

Viewers' and admins' sessions are kept apart (two ``Sessions``), so a viewer's session token is
never an admin's.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from archiver.admins import BOOTSTRAP_ACTOR, AdminPrincipal, AdminRow, Admins, admin_validity_ms
from archiver.archive import Archive
from archiver.audit import AuditLog
from archiver.auth import Sessions, secret_matches
from archiver.directory import ViewerRow
from archiver.services.refused import Refused
from keyservice.certs import load_certificate
from keyservice.crypto import (
    admin_login_context,
    login_context,
    make_login_challenge,
    verify_login_proof,
)
from keyservice.errors import CertificateError
from keyservice.identity import fingerprint
from keyservice.keyscheme import KeyScheme, Recipient
from keyservice.wire import ErrorCode


@dataclass(frozen=True)
class IssuedChallenge:
    """A login challenge as the wire carries it (hex id, base64 ciphertext, PEM)."""

    challenge_id: str
    ciphertext: str
    key_scheme: str  # rsa-oaep-sha256, rsa-oaep-sha1 or ecdh-p256
    oaep_hash: str  # the deprecated old spelling, for viewers before issue 24
    archiver_certificate: str


@dataclass(frozen=True)
class ViewerSession:
    session_token: str
    fingerprint: str
    expires_ms: int


@dataclass(frozen=True)
class AdminSession:
    session_token: str
    name: str
    fingerprint: str
    actor: str
    expires_ms: int


@functools.lru_cache(maxsize=4096)
def certificate_validity_ms(der: bytes) -> tuple[int, int]:
    """(not before, not after) of a DER certificate, in ms since the epoch."""
    cert = x509.load_der_x509_certificate(der)
    return (int(cert.not_valid_before_utc.timestamp() * 1000),
            int(cert.not_valid_after_utc.timestamp() * 1000))


def check_certificate_validity(viewer: ViewerRow, now_ms: int) -> None:
    """Refuse a viewer whose certificate is outside its validity period (at every login and
    every request of a session, not only when the admin authorized it)."""
    not_before, not_after = certificate_validity_ms(viewer.certificate)
    if now_ms > not_after:
        when = dt.datetime.fromtimestamp(not_after / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M")
        raise Refused(ErrorCode.CERTIFICATE_EXPIRED, f"This viewer's certificate expired on "
                      f"{when} UTC; enrol a new identity and have the admin authorize it.",
                      fingerprint=viewer.fingerprint, not_after=when)
    if now_ms < not_before:
        when = dt.datetime.fromtimestamp(not_before / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M")
        raise Refused(ErrorCode.CERTIFICATE_NOT_YET_VALID, f"This viewer's certificate is not "
                      f"valid before {when} UTC; check the clocks.",
                      fingerprint=viewer.fingerprint)


def check_admin_validity(row: AdminRow, now_ms: int) -> None:
    not_before, not_after = admin_validity_ms(row)
    if not not_before <= now_ms <= not_after:
        raise Refused(ErrorCode.CERTIFICATE_EXPIRED, f"Admin {row.name}'s certificate is "
                      "outside its validity period; enrol a new one and have it added.",
                      fingerprint=row.fingerprint)


def presented_certificate(pem: str) -> tuple[x509.Certificate, str]:
    """The certificate a login names, and its fingerprint (hex)."""
    try:
        cert = load_certificate(pem.encode())
    except CertificateError as exc:
        raise Refused(ErrorCode.BAD_CERTIFICATE, str(exc)) from None
    return cert, fingerprint(cert).hex()


@dataclass
class LoginService:
    archive: Archive
    audit: AuditLog
    sessions: Sessions
    admins: Admins
    admin_sessions: Sessions
    admin_token_digest: bytes
    bootstrap_token: bool = True  # serve --no-bootstrap-token turns the admin token off

    # --- viewers -------------------------------------------------------------------------
    def viewer_challenge(self, certificate_pem: str) -> IssuedChallenge:
        cert, fp = presented_certificate(certificate_pem)
        # Never from the snapshot: a new login is a new trust decision, and a viewer revoked
        # through another Archiver while this one could not hear of it must not get in.
        viewer = self.archive.directory.viewer(fp, cached=False)
        if viewer is None:
            raise Refused(ErrorCode.NOT_ENROLLED, "This certificate is not authorized on this "
                          "Archiver; ask an admin to run 'fusion-archiver viewers add'.")
        if viewer.revoked_ms is not None:
            raise Refused(ErrorCode.REVOKED, "This viewer's certificate has been revoked.")
        check_certificate_validity(viewer, self.archive.clock())
        return self._issue(self.sessions, cert, KeyScheme(viewer.oaep_hash), login_context)

    def open_viewer_session(self, challenge_id: str, proof: str) -> ViewerSession:
        now = self.archive.clock()
        pending = self._take(self.sessions, challenge_id, proof, now, "request a new challenge")
        token, session = self.sessions.open_session(pending, now)
        self.audit.record(pending, "session.open", now)
        return ViewerSession(token, pending, session.expires_ms)

    def viewer_of(self, session_token: str) -> ViewerRow:
        """The active viewer a session token belongs to, checked at every request: revoked
        or outside its certificate's validity, it is refused at once."""
        now = self.archive.clock()
        session = self.sessions.session(session_token, now)
        if session is None:
            raise Refused(ErrorCode.SESSION_INVALID,
                          "The session token is unknown or expired; log in again.")
        viewer = self.archive.directory.viewer(session.fingerprint)
        if viewer is None or viewer.revoked_ms is not None:
            raise Refused(ErrorCode.REVOKED, "This viewer's certificate has been revoked.")
        check_certificate_validity(viewer, now)
        return viewer

    # --- admins --------------------------------------------------------------------------
    def admin_challenge(self, certificate_pem: str) -> IssuedChallenge:
        cert, fp = presented_certificate(certificate_pem)
        row = self.admins.store.get(fp)
        if row is None:
            raise Refused(ErrorCode.NOT_AN_ADMIN, "This certificate is not an admin's on this "
                          "Archiver; have an admin run 'fusion-archiver admins add'.",
                          fingerprint=fp)
        if row.revoked_ms is not None:
            raise Refused(ErrorCode.ADMIN_REVOKED, f"Admin {row.name} has been revoked.",
                          fingerprint=fp)
        check_admin_validity(row, self.archive.clock())
        return self._issue(self.admin_sessions, cert, KeyScheme(row.oaep_hash),
                           admin_login_context)

    def open_admin_session(self, challenge_id: str, proof: str) -> AdminSession:
        now = self.archive.clock()
        pending = self._take(self.admin_sessions, challenge_id, proof, now, "log in again")
        row = self.admins.store.get(pending)
        if row is None or row.revoked_ms is not None:  # revoked between challenge and proof
            raise Refused(ErrorCode.ADMIN_REVOKED, "This admin has been revoked.")
        token, session = self.admin_sessions.open_session(row.fingerprint, now)
        self.audit.record(row.actor, "admin.session.open", now, name=row.name,
                          fingerprint=row.fingerprint)
        return AdminSession(token, row.name, row.fingerprint, row.actor, session.expires_ms)

    def admin_of(self, token: str) -> AdminPrincipal:
        """Who acts with an admin credential: the bootstrap token, or a personal admin's
        session (looked up at every request: a revoked admin's session is refused at once)."""
        if secret_matches(token, self.admin_token_digest):
            if not self.bootstrap_token:
                raise Refused(ErrorCode.FORBIDDEN, "The bootstrap admin token is turned off on "
                              "this Archiver (serve --no-bootstrap-token); log in on your own "
                              "token with 'fusion-archiver admins login'.")
            return AdminPrincipal(BOOTSTRAP_ACTOR)
        now = self.archive.clock()
        session = self.admin_sessions.session(token, now)
        if session is None:
            raise Refused(ErrorCode.FORBIDDEN, "This is not the admin token, nor a valid admin "
                          "session (admin sessions expire: log in again with 'fusion-archiver "
                          "admins login').")
        row = self.admins.store.get(session.fingerprint)
        if row is None or row.revoked_ms is not None:
            raise Refused(ErrorCode.ADMIN_REVOKED, "This admin has been revoked.",
                          fingerprint=session.fingerprint)
        check_admin_validity(row, now)
        return AdminPrincipal(row.actor, row.fingerprint)

    # --- both ----------------------------------------------------------------------------
    def _issue(self, sessions: Sessions, cert: x509.Certificate, scheme: KeyScheme,
               context_of: Callable[[bytes, bytes, bytes], bytes]) -> IssuedChallenge:
        """A login challenge for a registered certificate, kept in ``sessions`` until answered.
        ``context_of`` (login_context, admin_login_context) binds the proof to this Archiver,
        this certificate and this challenge, under the label of its kind of session."""
        archive = self.archive
        # Encrypted to the *registered* certificate, so only its token can answer.
        ciphertext, secret = make_login_challenge(Recipient(cert, scheme), archive.rng)
        challenge_id = archive.rng(16)
        fp = fingerprint(cert)
        context = context_of(fingerprint(archive.signer.certificate), fp, challenge_id)
        sessions.add_challenge(challenge_id, fp.hex(), secret, context, archive.clock())
        return IssuedChallenge(
            challenge_id=challenge_id.hex(), ciphertext=base64.b64encode(ciphertext).decode(),
            key_scheme=scheme.label, oaep_hash=scheme.legacy_label,
            archiver_certificate=archive.signer.certificate.public_bytes(Encoding.PEM).decode())

    @staticmethod
    def _take(sessions: Sessions, challenge_id: str, proof: str, now: int, again: str) -> str:
        """The fingerprint whose challenge this proof answers; refused otherwise (each
        challenge is taken once, right or wrong)."""
        try:
            challenge = bytes.fromhex(challenge_id)
            raw_proof = base64.b64decode(proof, validate=True)
        except ValueError:
            raise Refused(ErrorCode.BAD_PROOF,
                          "The challenge id or proof is malformed.") from None
        pending = sessions.take_challenge(challenge, now)
        if pending is None or not verify_login_proof(pending.secret, pending.context, raw_proof):
            # Audited with the other refusals, aggregated per address (archiver/limits.py): a
            # flood of bad proofs cannot fill the disk with fsynced lines.
            raise Refused(ErrorCode.PROOF_REFUSED, "The proof of possession is wrong, expired "
                          f"or already used; {again}.", challenge_id=challenge_id[:64])
        return pending.fingerprint
