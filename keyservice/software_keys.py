"""Keys in host memory, for tests and test vectors only: real viewers and Archivers keep
theirs on a token (keyservice.token). Re-exported by keyservice.identity, where they were
defined before issue 23 (a viewer's start no longer builds their classes).

Pure: no I/O, no ``pkcs11``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from keyservice.errors import IntegrityError
from keyservice.keyscheme import KeyScheme, WrappedKey, unwrap_with
from keyservice.labels import WrapContext

if TYPE_CHECKING:
    from cryptography import x509

__all__ = ["SoftwareEcIdentity", "SoftwareIdentity", "SoftwareSigner"]


@dataclass
class SoftwareIdentity:
    """An RSA key in host memory. For tests and test vectors only: real viewers use a token."""

    certificate: x509.Certificate
    private_key: rsa.RSAPrivateKey
    operations: int = 0

    def unwrap(self, wrapped: WrappedKey, context: WrapContext) -> bytes:
        return unwrap_with(self, wrapped, context)

    def rsa_decrypt(self, ciphertext: bytes, scheme: KeyScheme) -> bytes:
        self.operations += 1
        algorithm = scheme.algorithm()
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

    def unwrap(self, wrapped: WrappedKey, context: WrapContext) -> bytes:
        return unwrap_with(self, wrapped, context)

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
