"""THE trust configuration of every HTTPS client of the project: the viewer's CLI, library and
browser viewer (client/), and fusion-archiver's admin commands.

One rule, one place: the CA given with ``--tls-ca`` (or, when a caller gives none, the file
named by ``FUSION_TLS_CA``) becomes the only trust anchor of an ``ssl.SSLContext``; with
neither, the system's CAs are trusted (which honours OpenSSL's ``SSL_CERT_FILE``). Every HTTP
client takes the context this returns, so no path of a program can verify the Archiver
against something other than what the user configured.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from keyservice.errors import TlsCaError

TLS_CA_ENV = "FUSION_TLS_CA"


def tls_ca_path(tls_ca: Path | None) -> Path | None:
    """The CA file in force: the one given, else ``FUSION_TLS_CA``'s (an empty value is none)."""
    if tls_ca is not None:
        return tls_ca
    env = os.environ.get(TLS_CA_ENV)
    return Path(env) if env else None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        # OpenSSL's words for a file that parses to no certificate (key only, garbage, DER).
        if "NO_CERTIFICATE" in str(exc) or "PEM" in str(exc):
            return "it holds no PEM certificate"
        return f"OpenSSL refused it ({exc.reason or exc})"
    if isinstance(exc, OSError):
        return (exc.strerror or str(exc)).lower()
    return str(exc)


def _self_signed(path: Path) -> bool:
    """Whether the file holds a self-signed certificate (without the CA flag it still anchors
    itself: an Archiver's self-signed certificate given as its own CA)."""
    # Imported here: only a CA file without a CA certificate gets this far, and an admin
    # command's start-up need not load cryptography's X.509 (issue 23).
    from cryptography import x509

    try:
        certificates = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError):
        return False
    return any(cert.issuer == cert.subject for cert in certificates)


def trust(tls_ca: Path | None = None) -> ssl.SSLContext:
    """The SSL context every HTTPS connection to the Archiver verifies with (see the module
    docstring). A CA file that cannot be used is refused here, before anything is sent."""
    path = tls_ca_path(tls_ca)
    if path is None:
        return ssl.create_default_context()
    if path.is_dir():
        raise TlsCaError(f"Cannot use {path} as the TLS CA (--tls-ca or {TLS_CA_ENV}): it is a "
                         "directory; give the site CA's certificate file (PEM).")
    try:
        context = ssl.create_default_context(cafile=str(path))
    except (OSError, ValueError) as exc:
        raise TlsCaError(f"Cannot use {path} as the TLS CA (--tls-ca or {TLS_CA_ENV}): "
                         f"{_reason(exc)}.") from None
    if context.cert_store_stats().get("x509_ca", 0) == 0 and not _self_signed(path):
        # A certificate a CA issued (the Archiver's own, say) loads, but trusts nothing:
        # verification would fail later with a misleading "unable to get local issuer".
        raise TlsCaError(f"Cannot use {path} as the TLS CA (--tls-ca or {TLS_CA_ENV}): it holds "
                         "no CA certificate (basicConstraints CA:TRUE); give the site CA's "
                         "certificate, not the Archiver's own.")
    return context
