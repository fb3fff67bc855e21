"""Token-backed private keys for cryptography's certificate and CSR builders."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from keyservice.token.runtime import RuntimeToken


# --- token-backed private keys for cryptography's builders -----------------------------------
class TokenRsaKey(rsa.RSAPrivateKey):
    """An RSA private key whose sign() runs on the token: certificates and CSRs are built with
    cryptography and signed without the private key ever being in host memory."""

    def __init__(self, token: RuntimeToken, key_id: bytes, public: rsa.RSAPublicKey) -> None:
        self._token = token
        self._key_id = key_id
        self._public = public

    def sign(self, data: bytes, pad: Any, algorithm: Any) -> bytes:
        if not isinstance(pad, padding.PKCS1v15) or not isinstance(algorithm, hashes.SHA256):
            raise TypeError("Token RSA keys sign only PKCS#1 v1.5 with SHA-256.")
        return self._token._sign_rsa(self._key_id, data)

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def decrypt(self, ciphertext: bytes, pad: Any) -> bytes:
        raise TypeError("Decrypt through TokenIdentity.rsa_decrypt.")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        raise TypeError("The private key stays on the token and cannot be exported.")

    def private_bytes(self, encoding: Any, format: Any, encryption_algorithm: Any) -> bytes:
        raise TypeError("The private key stays on the token and cannot be exported.")

    def __copy__(self) -> TokenRsaKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> TokenRsaKey:
        return self


class TokenEcKey(ec.EllipticCurvePrivateKey):
    """An ECDSA P-256 private key whose sign() runs on the token."""

    def __init__(self, token: RuntimeToken, key_id: bytes, public: ec.EllipticCurvePublicKey) -> None:
        self._token = token
        self._key_id = key_id
        self._public = public

    def sign(self, data: bytes, signature_algorithm: Any) -> bytes:
        if not (isinstance(signature_algorithm, ec.ECDSA)
                and isinstance(signature_algorithm.algorithm, hashes.SHA256)):
            raise TypeError("Token EC keys sign only ECDSA with SHA-256.")
        return self._token._sign_ec(self._key_id, data)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def exchange(self, algorithm: Any, peer_public_key: Any) -> bytes:
        raise TypeError("The Archiver signing key only signs.")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise TypeError("The private key stays on the token and cannot be exported.")

    def private_bytes(self, encoding: Any, format: Any, encryption_algorithm: Any) -> bytes:
        raise TypeError("The private key stays on the token and cannot be exported.")

    def __copy__(self) -> TokenEcKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> TokenEcKey:
        return self


