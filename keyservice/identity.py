"""Recipients, identities and signers: the three small interfaces the crypto core needs.

- A ``Recipient`` is a viewer's *public* certificate: the Archiver encrypts to it in software.
- An ``Identity`` can RSA-OAEP-decrypt for that certificate: a PKCS#11 token in real use
  (``keyservice.token``), a software key only in tests and test vectors.
- A ``Signer`` is the Archiver's own signing key (ECDSA P-256 on its token).

This module is pure: no I/O, no ``pkcs11``.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from keyservice.errors import CertificateError, IntegrityError


class OaepHash(enum.IntEnum):
    """Hash of RSA-OAEP (label hash = MGF1 hash). Fixed per viewer at enrolment.

    SHA-1 only because SoftHSM 2.6 hard-codes it; OAEP's security does not rest on
    SHA-1 collision resistance, but SHA-256 is used wherever the token can.
    """

    SHA1 = 1
    SHA256 = 2
    # Not an OAEP hash: EC P-256 viewers (ephemeral-static ECDH, HKDF-SHA256, AES key wrap; see
    # the spec). It travels in the same byte (epoch openers, the Archiver's viewer table, the
    # login challenge), so the scheme is always fixed by the viewer's certificate.
    ECDH_P256 = 16

    def algorithm(self) -> hashes.HashAlgorithm:
        if self is OaepHash.ECDH_P256:
            raise ValueError("ECDH-P256 is not an RSA-OAEP hash.")
        return hashes.SHA1() if self is OaepHash.SHA1 else hashes.SHA256()  # noqa: S303

    @property
    def label(self) -> str:
        return {OaepHash.SHA1: "sha1", OaepHash.SHA256: "sha256",
                OaepHash.ECDH_P256: "ecdh-p256"}[self]

    @property
    def is_ec(self) -> bool:
        return self is OaepHash.ECDH_P256

    @classmethod
    def from_label(cls, text: str) -> OaepHash:
        try:
            return {"sha1": cls.SHA1, "sha-1": cls.SHA1, "sha256": cls.SHA256,
                    "sha-256": cls.SHA256, "ecdh-p256": cls.ECDH_P256}[text.lower()]
        except KeyError:
            raise CertificateError(f"Unknown OAEP hash {text!r}; use sha256 or sha1.") from None


def fingerprint(cert: x509.Certificate) -> bytes:
    """SHA-256 over the certificate's DER: how viewers and Archivers are named."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()


@runtime_checkable
class Identity(Protocol):
    """Something that can open what was encrypted to ``certificate`` (one RSA-OAEP decrypt)."""

    certificate: x509.Certificate

    def rsa_decrypt(self, ciphertext: bytes, oaep_hash: OaepHash) -> bytes: ...


@runtime_checkable
class EcIdentity(Protocol):
    """An EC P-256 viewer identity: the token computes ECDH with a peer point (one
    CKM_ECDH1_DERIVE); everything around it (HKDF, key unwrap, labels) is pure code."""

    certificate: x509.Certificate

    def ecdh(self, peer_point: bytes) -> bytes: ...


@runtime_checkable
class Signer(Protocol):
    """The Archiver's signing key: ECDSA P-256 with SHA-256, DER-encoded signatures."""

    certificate: x509.Certificate

    def sign(self, data: bytes) -> bytes: ...


@dataclass(frozen=True)
class Recipient:
    """A viewer as the Archiver sees it: a public certificate and the OAEP hash its token opens."""

    certificate: x509.Certificate
    oaep_hash: OaepHash

    def __post_init__(self) -> None:
        key = self.certificate.public_key()
        if self.oaep_hash is OaepHash.ECDH_P256:
            if not (isinstance(key, ec.EllipticCurvePublicKey)
                    and isinstance(key.curve, ec.SECP256R1)):
                raise CertificateError("The viewer certificate does not hold an EC P-256 key.")
        elif not isinstance(key, rsa.RSAPublicKey):
            raise CertificateError("The viewer certificate does not hold an RSA public key.")

    @property
    def fingerprint(self) -> bytes:
        return fingerprint(self.certificate)

    def encrypt(self, plaintext: bytes) -> bytes:
        """RSA-OAEP (RSA viewers only; EC viewers: keyservice.crypto.ec_seal)."""
        key = self.certificate.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise TypeError("EC viewers are sealed to with keyservice.crypto.ec_seal.")
        algorithm = self.oaep_hash.algorithm()
        return key.encrypt(plaintext, padding.OAEP(padding.MGF1(algorithm), algorithm, None))


def verify_signature(cert: x509.Certificate, data: bytes, signature: bytes) -> None:
    """Check an Archiver signature; any failure is the opaque IntegrityError."""
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise IntegrityError()
    try:
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise IntegrityError() from None


@dataclass
class SoftwareIdentity:
    """An RSA key in host memory. For tests and test vectors only: real viewers use a token."""

    certificate: x509.Certificate
    private_key: rsa.RSAPrivateKey
    operations: int = 0

    def rsa_decrypt(self, ciphertext: bytes, oaep_hash: OaepHash) -> bytes:
        self.operations += 1
        algorithm = oaep_hash.algorithm()
        try:
            return self.private_key.decrypt(
                ciphertext, padding.OAEP(padding.MGF1(algorithm), algorithm, None))
        except ValueError:
            raise IntegrityError() from None


@dataclass
class SoftwareEcIdentity:
    """An EC P-256 key in host memory. For tests and test vectors only."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey
    operations: int = 0

    def ecdh(self, peer_point: bytes) -> bytes:
        self.operations += 1
        try:
            peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), peer_point)
        except ValueError:
            raise IntegrityError() from None
        return self.private_key.exchange(ec.ECDH(), peer)


@dataclass
class SoftwareSigner:
    """An ECDSA key in host memory. For tests and test vectors only."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data, ec.ECDSA(hashes.SHA256()))
