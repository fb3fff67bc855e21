"""A certificate carried as its DER bytes, parsed as X.509 only where a check needs it.

Importing ``cryptography.x509`` (or loading any certificate with it, which imports it) costs
a viewer's start more than anything it checks on the way to the first byte (issue 23,
start-up). On that path a certificate is used for three things only, none of which needs the
X.509 parser: its fingerprint (SHA-256 of its DER bytes: the pin, the login context, the
stream's addressee), its public key (the SubjectPublicKeyInfo of exactly those bytes, read
with asn1crypto, which the token layer loads anyway: the signatures it verifies, the keys it
wraps to) and its PEM text (sent to log in). ``DerCertificate`` offers exactly that, and
parses the certificate fully with ``cryptography.x509`` the first time anything else is asked
of it (subject, issuer, validity, extensions): site-CA validation, first use, ``--archiver-cert``
and messages get the full certificate as before (``full_certificate`` gives a real
``x509.Certificate`` where cryptography's own functions need one).

Nothing is checked less. The bytes must be a DER certificate whose SubjectPublicKeyInfo is a
key cryptography reads (else ValueError, as loading them with ``cryptography.x509`` raised),
and a certificate that passes a pin has the very bytes that were parsed in full when they were
pinned (first use or ``--archiver-cert`` parse them).

Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import sys
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.serialization import (
    Encoding,
    load_der_public_key,
)

from keyservice.errors import CertificateError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

__all__ = ["DerCertificate", "full_certificate", "is_certificate", "read_certificate"]

# One PEM certificate and nothing else but whitespace: the Archiver's answers and the usual
# files. Anything else (several blocks, a key, headers) goes to the full loader, which says
# what is wrong with it exactly as it always did.
_ONE_PEM = re.compile(rb"\A\s*-----BEGIN CERTIFICATE-----\r?\n([A-Za-z0-9+/=\r\n]+)"
                      rb"-----END CERTIFICATE-----\s*\Z")


def _spki(der: bytes) -> bytes:
    """The SubjectPublicKeyInfo of a DER certificate, as its bytes; ValueError if ``der`` is
    not one DER certificate (trailing bytes included)."""
    from asn1crypto import x509 as asn1_x509  # loaded by python-pkcs11 anyway

    try:
        cert = asn1_x509.Certificate.load(der, strict=True)
        # The three parts of a certificate, and the SPKI at its place in the TBS part.
        cert["signature_algorithm"]
        cert["signature_value"]
        tbs = cert["tbs_certificate"]
        # The versions cryptography reads (it refuses others: x509.InvalidVersion).
        if tbs["version"].native not in ("v1", "v3"):
            raise ValueError("an X.509 version cryptography does not read")
        return tbs["subject_public_key_info"].dump()
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"not a DER certificate: {exc}") from None


class DerCertificate:
    """An X.509 certificate as its DER bytes and public key; the full parse on first need.

    Stands in for an ``x509.Certificate`` wherever one is read (``public_bytes``,
    ``public_key``, ``subject``, ``not_valid_after_utc``, ...): anything beyond the bytes and
    the key is asked of the fully parsed certificate. Equal to (and hashed as) any certificate
    with the same DER bytes."""

    __slots__ = ("_der", "_full", "_key", "_spki")

    def __init__(self, der: bytes) -> None:
        """ValueError if ``der`` is not one DER certificate with a public key cryptography
        reads (cryptography's loader raised ValueError or UnsupportedAlgorithm for the same)."""
        self._der = bytes(der)
        self._spki = _spki(self._der)
        self._key: PublicKeyTypes | None = None
        self._full: x509.Certificate | None = None

    @property
    def der(self) -> bytes:
        """The certificate's DER bytes (what its fingerprint is a hash of)."""
        return self._der

    def public_key(self) -> PublicKeyTypes:
        """The key of its SubjectPublicKeyInfo (ValueError or UnsupportedAlgorithm, as
        ``x509.Certificate.public_key``, for a key cryptography does not read)."""
        if self._key is None:
            self._key = load_der_public_key(self._spki)
        return self._key

    def public_bytes(self, encoding: Encoding) -> bytes:
        """DER, or PEM as cryptography writes it (64-character lines)."""
        if encoding is Encoding.DER:
            return self._der
        if encoding is Encoding.PEM:
            text = base64.b64encode(self._der)
            lines = b"\n".join(text[i:i + 64] for i in range(0, len(text), 64))
            return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"
        return self.x509.public_bytes(encoding)

    @property
    def fingerprint(self) -> bytes:
        """SHA-256 of its DER bytes."""
        return hashlib.sha256(self._der).digest()

    @property
    def x509(self) -> x509.Certificate:
        """The certificate parsed in full (imports ``cryptography.x509``; once); CertificateError
        if cryptography does not read it."""
        if self._full is None:
            from cryptography import x509 as full_x509

            try:
                self._full = full_x509.load_der_x509_certificate(self._der)
            except (ValueError, full_x509.InvalidVersion):
                # Refused where it is first read in full, as loading it in full refused it.
                raise CertificateError("The certificate is not a readable X.509 certificate "
                                       f"(sha256 {self.fingerprint.hex()}).") from None
        return self._full

    def __getattr__(self, name: str) -> Any:
        # Only for what this class does not hold itself (subject, issuer, validity, ...).
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.x509, name)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DerCertificate):
            return self._der == other._der
        if is_certificate(other):
            return self._der == other.public_bytes(Encoding.DER)  # type: ignore[attr-defined]
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._der)

    def __repr__(self) -> str:
        return f"<DerCertificate sha256={self.fingerprint.hex()}>"


def is_certificate(value: object) -> bool:
    """True for a ``DerCertificate`` or an ``x509.Certificate`` (without importing
    ``cryptography.x509``: no ``x509.Certificate`` exists before it is imported)."""
    if isinstance(value, DerCertificate):
        return True
    module = sys.modules.get("cryptography.x509")
    return module is not None and isinstance(value, module.Certificate)


def full_certificate(cert: x509.Certificate | DerCertificate) -> x509.Certificate:
    """A real ``x509.Certificate`` (cryptography's verifiers take no stand-in)."""
    return cert.x509 if isinstance(cert, DerCertificate) else cert


def read_certificate(data: bytes) -> DerCertificate | None:
    """The common case of ``keyservice.certs.load_certificate`` (one certificate, PEM or DER)
    without the X.509 parser: one PEM block or DER bytes give a ``DerCertificate``. None for
    anything else, or bytes it cannot read: give those to the full loader, which accepts or
    refuses (CertificateError) them exactly as it always did."""
    der: bytes | None = data
    if b"-----BEGIN" in data:
        match = _ONE_PEM.match(data)
        der = None
        if match is not None:
            try:
                der = base64.b64decode(re.sub(rb"[\r\n]", b"", match.group(1)), validate=True)
            except (binascii.Error, ValueError):
                der = None
    if der is not None:
        try:
            return DerCertificate(der)
        except ValueError:
            pass
    return None
