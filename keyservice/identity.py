"""Recipients, identities and signers: the small interfaces the crypto core needs.

- A ``Recipient`` is a viewer's *public* certificate and its ``KeyScheme``: the Archiver wraps
  keys to it in software (``keyservice.keyscheme``, re-exported here).
- An ``Identity`` unwraps what was wrapped to that certificate: a PKCS#11 token in real use
  (``keyservice.token``), a software key (below) only in tests and test vectors.
- A ``Signer`` is the Archiver's own signing key (ECDSA P-256 on its token).

Deprecated names, kept importable: ``OaepHash`` (now ``KeyScheme``; ``OaepHash.SHA256`` is
``KeyScheme.RSA_OAEP_SHA256``) and ``EcIdentity`` (now ``keyscheme.EcdhKey``).

This module is pure: no I/O, no ``pkcs11``.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from keyservice.errors import IntegrityError
from keyservice.keyscheme import (
    EcdhKey,
    Identity,
    IncorrectIdentity,
    KeyScheme,
    Recipient,
    RsaOaepKey,
    WrappedKey,
    signing_public_key,
)
from keyservice.labels import WrapContext

if TYPE_CHECKING:  # read only, never parsed here (a DerCertificate stands in for one)
    from cryptography import x509

    # Re-exported (below, on first use) for type checkers too.
    from keyservice.software_keys import SoftwareEcIdentity as SoftwareEcIdentity
    from keyservice.software_keys import SoftwareIdentity as SoftwareIdentity
    from keyservice.software_keys import SoftwareSigner as SoftwareSigner

# The software keys (tests and test vectors only) live in keyservice.software_keys, imported on
# first use: a viewer's start does not build their classes (issue 23). Importable from here.
_SOFTWARE = frozenset({"SoftwareEcIdentity", "SoftwareIdentity", "SoftwareSigner"})


def __getattr__(name: str) -> object:
    if name in _SOFTWARE:
        from keyservice import software_keys

        return getattr(software_keys, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Deprecated names (before issue 24).
OaepHash = KeyScheme
EcIdentity = EcdhKey

# The software keys are documented in keyservice.software_keys (still importable from here).
__all__ = ["EcIdentity", "EcdhKey", "Identity", "IncorrectIdentity", "KeyScheme", "OaepHash",
           "Recipient", "RsaOaepKey", "Signer", "WrapContext", "WrappedKey", "fingerprint",
           "verify_signature"]


def fingerprint(cert: x509.Certificate) -> bytes:
    """SHA-256 over the certificate's DER: how viewers and Archivers are named."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()


@runtime_checkable
class Signer(Protocol):
    """The Archiver's signing key: ECDSA P-256 with SHA-256, DER-encoded signatures."""

    certificate: x509.Certificate

    def sign(self, data: bytes) -> bytes: ...


def verify_signature(cert: x509.Certificate, data: bytes, signature: bytes) -> None:
    """Check an Archiver signature; any failure is the opaque IntegrityError."""
    key = signing_public_key(cert)
    try:
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise IntegrityError() from None
