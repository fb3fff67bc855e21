"""Key schemes: how a 32-byte key is wrapped to a viewer's certificate and unwrapped on its
token. The one module that knows RSA from EC.

Modelled on age (``age.go``): a ``Recipient`` wraps, an ``Identity`` unwraps, and an identity
that cannot unwrap a key raises one opaque error, ``IncorrectIdentity``, whatever the reason
(another scheme, another key, another purpose, altered bytes). Everything else (epoch openers,
login challenges, grants, evidence) calls ``wrap``/``unwrap`` with a ``WrapContext`` from
``keyservice.labels`` and never asks which kind of key it holds.

Schemes (``KeyScheme``; its value is the byte the format stores: an epoch opener's scheme byte,
a grant's ``kind``, the Archiver's viewer table):

- ``RSA_OAEP_SHA256`` / ``RSA_OAEP_SHA1``: RSA-OAEP (label hash = MGF1 hash), plaintext
  ``context.oaep_prefix || key``. SHA-1 only because SoftHSM 2.6 hard-codes it.
- ``ECDH_P256``: ephemeral-static ECDH with the viewer's P-256 key, HKDF-SHA256 (salt binds
  both public points, info is ``context.ecdh_info``), AES key wrap: ``enc || AES-KW(K, key)``.

Token-backed and software identities hold only the private-key primitive (``RsaOaepKey``:
one OAEP decryption; ``EcdhKey``: one ECDH) and delegate ``unwrap`` to ``unwrap_with``.

Pure: no I/O, no ``pkcs11``.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keyservice.dercert import is_certificate
from keyservice.errors import CertificateError, IntegrityError
from keyservice.labels import LABEL_EC_SALT, WrapContext
from keyservice.records import FrozenRecord

if TYPE_CHECKING:  # certificates are only read here (a DerCertificate stands in for one)
    from cryptography import x509

__all__ = ["EC_POINT_LEN", "WRAPPED_KEY_LEN", "EcdhKey", "Identity", "IncorrectIdentity",
           "KeyScheme", "Recipient", "Rng", "RsaOaepKey", "WrappedKey", "ec_open", "ec_seal",
           "same_public_key", "signing_public_key", "unwrap_with"]

Rng = Callable[[int], bytes]

WRAPPED_KEY_LEN = 32  # every wrapped key is 32 bytes (KEKs, login secrets, package keys)
EC_POINT_LEN = 65  # uncompressed SEC1 point: 04 || x || y
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


class KeyScheme(enum.IntEnum):
    """How keys are wrapped to a viewer, fixed by its certificate at enrolment.

    The value is the format's scheme byte (unchanged from format v2's ``oaep_hash`` byte).
    ``label`` is the name the admin surface shows; ``legacy_label`` is the spelling of the
    JSON fields still named ``oaep_hash`` (login challenges, evidence ``keys.sealed``).
    """

    RSA_OAEP_SHA1 = 1
    RSA_OAEP_SHA256 = 2
    ECDH_P256 = 16
    # Deprecated spellings (the enum was ``OaepHash`` before issue 24); same members.
    SHA1 = 1
    SHA256 = 2

    def algorithm(self) -> hashes.HashAlgorithm:
        """The OAEP hash (label hash = MGF1 hash) of an RSA-OAEP scheme."""
        if self is KeyScheme.ECDH_P256:
            raise ValueError("ECDH-P256 has no OAEP hash.")
        return hashes.SHA1() if self is KeyScheme.RSA_OAEP_SHA1 else hashes.SHA256()  # noqa: S303

    @property
    def label(self) -> str:
        return _LABELS[self]

    @property
    def legacy_label(self) -> str:
        return _LEGACY_LABELS[self]

    @property
    def is_ec(self) -> bool:
        """True for ECDH-P256 (for display: callers wrap and unwrap without asking)."""
        return self is KeyScheme.ECDH_P256

    @classmethod
    def from_label(cls, text: str) -> KeyScheme:
        """Any spelling, new (``rsa-oaep-sha256``) or old (``sha256``, ``sha-1``)."""
        try:
            return _FROM_LABEL[text.strip().lower()]
        except KeyError:
            raise CertificateError(
                f"Unknown key scheme {text!r}; use rsa-oaep-sha256, rsa-oaep-sha1 or "
                "ecdh-p256.") from None

    @classmethod
    def of_certificate(cls, certificate: x509.Certificate,
                       oaep: KeyScheme | None = None) -> KeyScheme:
        """The scheme of a viewer certificate's key: ECDH-P256 for a P-256 key, else ``oaep``
        (the RSA-OAEP scheme its token opens). CertificateError for any other key."""
        key = certificate.public_key()
        if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            return cls.ECDH_P256
        if isinstance(key, rsa.RSAPublicKey) and oaep is not None and not oaep.is_ec:
            return oaep
        raise CertificateError("The viewer certificate holds neither an EC P-256 key nor an "
                               "RSA key with an RSA-OAEP scheme.")


_LABELS = {KeyScheme.RSA_OAEP_SHA1: "rsa-oaep-sha1", KeyScheme.RSA_OAEP_SHA256: "rsa-oaep-sha256",
           KeyScheme.ECDH_P256: "ecdh-p256"}
_LEGACY_LABELS = {KeyScheme.RSA_OAEP_SHA1: "sha1", KeyScheme.RSA_OAEP_SHA256: "sha256",
                  KeyScheme.ECDH_P256: "ecdh-p256"}
_FROM_LABEL = {**{v: k for k, v in _LABELS.items()}, **{v: k for k, v in _LEGACY_LABELS.items()},
               "sha-1": KeyScheme.RSA_OAEP_SHA1, "sha-256": KeyScheme.RSA_OAEP_SHA256}


class IncorrectIdentity(IntegrityError):
    """This identity cannot unwrap this key (as age's ErrIncorrectIdentity). Opaque on
    purpose: another scheme, another key, another purpose and altered bytes all look alike,
    so a hostile sender learns nothing from which check failed."""

    def __init__(self) -> None:
        super().__init__("The wrapped key does not open with this identity: it was made for "
                         "another key or purpose, or altered.")


@dataclass(eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class WrappedKey(FrozenRecord):
    """A wrapped key as it travels (age's stanza): its scheme and its bytes."""

    scheme: KeyScheme
    body: bytes


@runtime_checkable
class Identity(Protocol):
    """A viewer identity (age's Identity): unwraps what was wrapped to ``certificate``.

    ``unwrap`` returns the 32-byte key or raises ``IncorrectIdentity``; token errors (a removed
    token, an unsupported mechanism) pass through.
    """

    certificate: x509.Certificate

    def unwrap(self, wrapped: WrappedKey, context: WrapContext) -> bytes: ...


@runtime_checkable
class RsaOaepKey(Protocol):
    """The private-key primitive of an RSA viewer: one RSA-OAEP decryption (on its token)."""

    certificate: x509.Certificate

    def rsa_decrypt(self, ciphertext: bytes, scheme: KeyScheme) -> bytes: ...


@runtime_checkable
class EcdhKey(Protocol):
    """The private-key primitive of an EC P-256 viewer: one ECDH with a peer point (one
    CKM_ECDH1_DERIVE on its token)."""

    certificate: x509.Certificate

    def ecdh(self, peer_point: bytes) -> bytes: ...


# frozen=True kept (subclasses are frozen dataclasses, e.g. the test vectors' seeded one);
# eq, hash, repr: FrozenRecord's.
@dataclass(frozen=True, eq=False, repr=False)
class Recipient(FrozenRecord):
    """A viewer as the Archiver sees it (age's Recipient): a public certificate and the
    scheme its token opens. ``wrap`` is all a caller needs."""

    certificate: x509.Certificate
    scheme: KeyScheme

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", KeyScheme(self.scheme))
        key = self.certificate.public_key()
        if self.scheme is KeyScheme.ECDH_P256:
            if not (isinstance(key, ec.EllipticCurvePublicKey)
                    and isinstance(key.curve, ec.SECP256R1)):
                raise CertificateError("The viewer certificate does not hold an EC P-256 key.")
        elif not isinstance(key, rsa.RSAPublicKey):
            raise CertificateError("The viewer certificate does not hold an RSA public key.")

    @property
    def fingerprint(self) -> bytes:
        return hashlib.sha256(self.certificate.public_bytes(Encoding.DER)).digest()

    @property
    def oaep_hash(self) -> KeyScheme:
        """Deprecated name of ``scheme``."""
        return self.scheme

    def wrap(self, key: bytes, context: WrapContext, rng: Rng = os.urandom) -> WrappedKey:
        """``key`` (32 bytes) wrapped to this viewer for ``context``'s purpose. ``rng`` feeds
        the ECDH ephemeral key (deterministic in test vectors); RSA-OAEP uses ``encrypt``."""
        if len(key) != WRAPPED_KEY_LEN:
            raise ValueError("A wrapped key is 32 bytes.")
        if self.scheme is KeyScheme.ECDH_P256:
            return WrappedKey(self.scheme, _ecdh_wrap(self.certificate, context.ecdh_info, key,
                                                      rng))
        return WrappedKey(self.scheme, self.encrypt(context.oaep_prefix + key))

    def encrypt(self, plaintext: bytes) -> bytes:
        """The RSA-OAEP primitive under ``wrap`` (overridable: the test vectors seed it)."""
        key = self.certificate.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise TypeError("Only RSA-OAEP recipients encrypt; use wrap.")
        algorithm = self.scheme.algorithm()
        return key.encrypt(plaintext, padding.OAEP(padding.MGF1(algorithm), algorithm, None))


def unwrap_with(key: object, wrapped: WrappedKey, context: WrapContext) -> bytes:
    """``Identity.unwrap`` for any identity holding a private-key primitive (``RsaOaepKey`` or
    ``EcdhKey``, on a token or in memory). IncorrectIdentity on any failure to open."""
    try:
        return _unwrap(key, wrapped, context)
    except IntegrityError:
        raise IncorrectIdentity() from None


def _unwrap(key: object, wrapped: WrappedKey, context: WrapContext) -> bytes:
    certificate = getattr(key, "certificate", None)
    if not is_certificate(certificate):
        raise IntegrityError()
    public = certificate.public_key()
    if wrapped.scheme is KeyScheme.ECDH_P256:
        if not (isinstance(key, EcdhKey) and isinstance(public, ec.EllipticCurvePublicKey)):
            raise IntegrityError()  # an RSA identity has no key for an ECDH-wrapped key
        return _ecdh_unwrap(key, public, context.ecdh_info, wrapped.body)
    if not (isinstance(key, RsaOaepKey) and isinstance(public, rsa.RSAPublicKey)):
        raise IntegrityError()  # an EC identity has no key for an RSA-OAEP-wrapped key
    plaintext = key.rsa_decrypt(wrapped.body, wrapped.scheme)
    prefix = context.oaep_prefix
    # The prefix keeps the token from being an oracle: an opener is never a challenge.
    if (len(plaintext) != len(prefix) + WRAPPED_KEY_LEN
            or not hmac.compare_digest(plaintext[:len(prefix)], prefix)):
        raise IntegrityError()
    return plaintext[len(prefix):]


# --- ECDH-P256: ephemeral-static ECDH + HKDF-SHA256 + AES key wrap -------------------------
def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def _ecdh_wrapping_key(shared: bytes, enc: bytes, recipient_point: bytes, info: bytes) -> bytes:
    # As HPKE's DHKEM(P-256, HKDF-SHA256): the KDF input binds the ephemeral and the recipient
    # public keys; ``info`` separates purposes (epoch openers with their epoch id, challenges).
    return HKDF(hashes.SHA256(), 32, salt=LABEL_EC_SALT + enc + recipient_point,
                info=info).derive(shared)


def _ecdh_wrap(certificate: x509.Certificate, info: bytes, secret: bytes, rng: Rng) -> bytes:
    public = certificate.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise TypeError("ECDH-P256 needs an EC P-256 recipient.")
    while True:  # a scalar in [1, n-1] from the rng (deterministic rngs make test vectors)
        scalar = int.from_bytes(rng(32), "big")
        if 1 <= scalar < _P256_ORDER:
            break
    ephemeral = ec.derive_private_key(scalar, ec.SECP256R1())
    enc = _point(ephemeral.public_key())
    shared = ephemeral.exchange(ec.ECDH(), public)
    wrapping_key = _ecdh_wrapping_key(shared, enc, _point(public), info)
    return enc + aes_key_wrap(wrapping_key, secret)


def _ecdh_unwrap(key: EcdhKey, public: ec.EllipticCurvePublicKey, info: bytes,
                 ciphertext: bytes) -> bytes:
    if len(ciphertext) != EC_POINT_LEN + WRAPPED_KEY_LEN + 8:
        raise IntegrityError()
    enc, wrapped = ciphertext[:EC_POINT_LEN], ciphertext[EC_POINT_LEN:]
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), enc)  # on the curve
    except ValueError:
        raise IntegrityError() from None
    shared = key.ecdh(enc)
    wrapping_key = _ecdh_wrapping_key(shared, enc, _point(public), info)
    try:
        return aes_key_unwrap(wrapping_key, wrapped)
    except InvalidUnwrap:
        raise IntegrityError() from None


# --- deprecated: the ECDH primitive under its old names (keyservice.crypto.ec_seal/ec_open) --
def ec_seal(recipient: Recipient, info: bytes, secret: bytes, rng: Rng = os.urandom) -> bytes:
    """Deprecated: ``Recipient.wrap``. ``enc || AES-KW(K, secret)`` with HKDF info ``info``."""
    return _ecdh_wrap(recipient.certificate, info, secret, rng)


def ec_open(identity: object, info: bytes, ciphertext: bytes) -> bytes:
    """Deprecated: ``Identity.unwrap``. The secret of an ``ec_seal`` ciphertext."""
    return unwrap_with(identity, WrappedKey(KeyScheme.ECDH_P256, ciphertext),
                       WrapContext(b"", info))


def same_public_key(a: rsa.RSAPublicKey | ec.EllipticCurvePublicKey | object,
                    b: rsa.RSAPublicKey | ec.EllipticCurvePublicKey | object) -> bool:
    """True when both are the same public key (compared as SubjectPublicKeyInfo DER)."""
    if not isinstance(a, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return False
    if not isinstance(b, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return False
    spki = Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    return a.public_bytes(*spki) == b.public_bytes(*spki)


# --- the Archiver's signing key -----------------------------------------------------------
def signing_public_key(certificate: x509.Certificate, *, p256_only: bool = False
                       ) -> ec.EllipticCurvePublicKey:
    """The ECDSA key of an Archiver certificate (``p256_only``: on P-256, as every Archiver
    key is); IntegrityError for any other key."""
    try:
        key = certificate.public_key()
    except ValueError:
        raise IntegrityError() from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise IntegrityError()
    if p256_only and not isinstance(key.curve, ec.SECP256R1):
        raise IntegrityError()
    return key
