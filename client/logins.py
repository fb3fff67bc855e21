"""A viewer logged in to one Archiver (``login``: proof of possession with the Archiver's
certificate pinned, or issued by the site CA) and a fusion stream asked of it (``stream``);
what a login starts from (the identity on the token, the certificates given to trust, the
camera name) and the signer of a verified stream (``Signer``).

Below both client.viewer (the library) and client.site (the site's Archivers, followed when
checked), which use them; client.viewer re-exports them. The command line's play path imports
this module, not client.viewer (grants, evidence, whole-range results: issue 23, start-up).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from client.pinning import KnownArchivers, PinDecision, check_archiver
from client.session import ArchiverSession, LoginResult
from keyservice.errors import CertificateError, UsageError
from keyservice.format import Mode
from keyservice.identity import Identity, fingerprint
from keyservice.names import CAMERA_NAME_RULE, is_camera_name
from keyservice.records import FrozenRecord
from keyservice.request_policy import StreamRequest

if TYPE_CHECKING:
    from cryptography import x509

# cryptography.x509 is imported where a certificate is read in full (--site-ca,
# --archiver-cert, a signer's names): play's way to the first byte reads certificates as DER
# bytes and keys only (keyservice.dercert; issue 23, start-up).

__all__ = ["Login", "Signer", "check_camera", "load_certificate_file", "load_site_ca", "login",
           "now_ms", "open_identity", "stream"]


def now_ms() -> int:
    """This machine's clock, in milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


def check_camera(name: str) -> str:
    """``name`` if it is a camera name (the Archiver's rule); UsageError otherwise."""
    if not is_camera_name(name):
        raise UsageError(f"{name!r} is not a camera name ({CAMERA_NAME_RULE}).")
    return name


def load_certificate_file(path: Path) -> x509.Certificate:
    """``keyservice.certs.load_certificate_file``: a certificate file (PEM or DER), parsed in
    full; UsageError if unreadable, CertificateError (naming the file) if no certificate."""
    from keyservice.certs import load_certificate_file as load

    return load(path)


def load_site_ca(path: Path) -> tuple[x509.Certificate, ...]:
    """The site CA certificate(s) of ``--site-ca`` (a PEM file may hold several, e.g. a
    renewed CA beside the old one): UsageError if unreadable, CertificateError (naming the
    file) if it holds no certificate or one that is not a CA."""
    from cryptography import x509

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"Cannot read --site-ca {path}: {exc.strerror or exc}.") from None
    try:
        found = tuple(x509.load_pem_x509_certificates(data)) if b"-----BEGIN" in data \
            else (x509.load_der_x509_certificate(data),)
    except ValueError:
        raise CertificateError(f"--site-ca {path} is not a readable certificate (PEM or "
                               "DER); give your site CA's certificate.") from None
    for cert in found:
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise CertificateError(f"--site-ca {path} holds {cert.subject.rfc4514_string()}, "
                                   "which is not a CA certificate; give your site CA's "
                                   "certificate.")
    return found


@contextmanager
def open_identity(uri: str, *, pin: str | None = None, prompt: bool = False) -> Iterator[Identity]:
    """The viewer key on a token (PKCS#11 URI), open for the ``with`` block. The PIN comes from
    ``pin``, the URI (pin-value/pin-source), FUSION_PIN, or a prompt if ``prompt``; a wrong
    PIN raises PinIncorrect and is never retried."""
    # Imported here: the token layer loads a PKCS#11 module, which help and offline
    # verification do not need. The runtime path only: the viewer never provisions.
    from keyservice.token import RuntimeToken
    token = RuntimeToken.open(uri, pin=pin, prompt=prompt)
    try:
        yield token.identity()
    finally:
        token.close()


@dataclass(eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class Signer(FrozenRecord):
    """The Archiver that signed a verified stream: the certificate the stream's header
    carries (the one logged in to, pinned or issued by the site CA), whose key verified every
    manifest and the end record. Its subject names the Archiver (CN = its name in the site
    when the site CA issued it)."""

    certificate: x509.Certificate

    def __str__(self) -> str:
        return f"{self.subject} (sha256 {self.fingerprint})"

    @property
    def name(self) -> str | None:
        """Its certificate's common name (the Archiver's name), None without one."""
        from cryptography.x509.oid import NameOID

        names = self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else None

    @property
    def issuer(self) -> str:
        """Who issued its certificate (RFC 4514): the site CA, or itself (self-signed)."""
        return self.certificate.issuer.rfc4514_string()

    @property
    def fingerprint(self) -> str:
        """SHA-256 of its certificate, hex."""
        return fingerprint(self.certificate).hex()

    @property
    def subject(self) -> str:
        """Its certificate's subject (RFC 4514)."""
        return self.certificate.subject.rfc4514_string()



@dataclass(eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class Login(FrozenRecord):
    """A logged-in session: the Archiver's answer and how its certificate was trusted
    (pinned already, given explicitly, or trusted on first use and pinned now)."""

    url: str
    result: LoginResult
    pin: PinDecision

    @property
    def archiver_fingerprint(self) -> bytes:
        """SHA-256 of the Archiver's certificate: every stream must be signed by it."""
        return self.result.archiver_fingerprint

    @property
    def viewer_fingerprint(self) -> str:
        """This viewer's certificate fingerprint (hex), as the Archiver knows it."""
        return self.result.viewer_fingerprint


def login(session: ArchiverSession, identity: Identity, *,
          archiver_cert: x509.Certificate | None = None, known: KnownArchivers | None = None,
          allow_first_use: bool = True, site_ca: Sequence[x509.Certificate] = ()) -> Login:
    """Prove possession of the token to the Archiver, with its certificate pinned: it must be
    ``archiver_cert`` if given (which then replaces an older pin), else the one pinned for the
    URL in ``known`` (default: the user's known_archivers file), else it is trusted on first use
    and pinned (unless ``allow_first_use`` is False). With ``site_ca`` (``--site-ca``), a
    signing certificate the site CA issued is accepted without a pin, and any other refused
    (pins still apply beside it: client.pinning.check_archiver). The check runs before the
    token is used, so an impersonator gets nothing from it. HTTPS trust is the session's."""
    store = known if known is not None else KnownArchivers.default()
    decisions: list[PinDecision] = []

    def check(cert: x509.Certificate) -> None:
        decisions.append(check_archiver(session.url, cert, store=store, explicit=archiver_cert,
                                        allow_first_use=allow_first_use, site_ca=site_ca))

    result = session.login(identity, check)
    return Login(session.url, result, decisions[-1])



def stream(session: ArchiverSession, request: StreamRequest, *, grant_id: str | None = None,
           copy_of: str | None = None) -> AbstractContextManager[Iterator[bytes]]:
    """The fusion stream that answers ``request``, as received chunks: a recorded range, a
    live stream, or (``grant_id``) a range under an access grant; ``copy_of``: another
    Archiver's recording the session's Archiver consolidated (issue 22, item 4). The request's
    nonce is the one sent; give the same request to the Player (``player_for``)."""
    camera = request.cameras[0]
    if request.mode == Mode.LIVE:
        return session.live(camera, (request.to_ms - request.from_ms) / 1000, request)
    if grant_id is not None:
        return session.grant_recording(grant_id, request)
    return session.recording(camera, request.from_ms, request.to_ms, request, copy_of)
