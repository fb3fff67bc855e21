"""Login: proof of possession of a viewer's (or an admin's) token. The Archiver wraps a
random secret to the certificate logging in (``LOGIN_CHALLENGE_CONTEXT``); the token unwraps
it and answers with an HMAC over a context that binds the Archiver, the certificate and the
challenge. The answer never reveals the secret.

Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyservice.dercert import read_certificate
from keyservice.errors import ArchiverFailed, CertificateError
from keyservice.keyscheme import Identity, KeyScheme, Recipient, Rng, WrappedKey
from keyservice.labels import (
    LABEL_ADMIN_LOGIN_CONTEXT,
    LABEL_LOGIN_CONTEXT,
    LABEL_LOGIN_PROOF,
    LOGIN_CHALLENGE_CONTEXT,
)
from keyservice.records import FrozenRecord

if TYPE_CHECKING:
    from cryptography import x509

SECRET_LEN = 32  # login challenge secret


def _proof(secret: bytes, context: bytes) -> bytes:
    proof_key = HKDF(hashes.SHA256(), 32, salt=None, info=LABEL_LOGIN_PROOF).derive(secret)
    return hmac.new(proof_key, context, hashlib.sha256).digest()


def make_login_challenge(recipient: Recipient, rng: Rng = os.urandom) -> tuple[bytes, bytes]:
    """(wrapped secret for the viewer, secret the Archiver keeps to check the answer)."""
    secret = rng(SECRET_LEN)
    return recipient.wrap(secret, LOGIN_CHALLENGE_CONTEXT, rng).body, secret


def answer_login_challenge(identity: Identity, ciphertext: bytes, scheme: KeyScheme,
                           context: bytes) -> bytes:
    """Unwrap a challenge on the token and answer with an HMAC over ``context``.

    The challenge's wrap context is its own (IncorrectIdentity otherwise): a hostile Archiver
    cannot send an epoch opener as a "challenge" and use the viewer's token to open it. The
    answer never reveals the secret, only a MAC keyed by a value derived from it.
    """
    secret = identity.unwrap(WrappedKey(KeyScheme(scheme), ciphertext), LOGIN_CHALLENGE_CONTEXT)
    return _proof(secret, context)


def verify_login_proof(secret: bytes, context: bytes, proof: bytes) -> bool:
    return hmac.compare_digest(_proof(secret, context), proof)


@dataclass(eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class LoginChallenge(FrozenRecord):
    """The Archiver's login challenge (a viewer's or an admin's), as its JSON answer carries
    it: the Archiver's certificate, the challenge id, and the secret wrapped to the
    certificate logging in with its scheme (``key_scheme``; Archivers before issue 24 send
    only ``oaep_hash``, which names the same scheme)."""

    @property
    def oaep_hash(self) -> KeyScheme:
        """Deprecated name of ``key_scheme``."""
        return self.key_scheme


    # Its DER bytes and key (a keyservice.dercert.DerCertificate): the pin and the login
    # context need its fingerprint only; X.509 is parsed where a check asks for more.
    archiver_certificate: x509.Certificate
    challenge_id: bytes
    ciphertext: bytes
    key_scheme: KeyScheme

    @classmethod
    def from_answer(cls, answer: Any) -> LoginChallenge:
        """ArchiverFailed if the answer is not a well-formed challenge."""
        try:  # a non-mapping answer fails its first lookup with TypeError
            return cls(_certificate(str(answer["archiver_certificate"]).encode()),
                       bytes.fromhex(answer["challenge_id"]),
                       base64.b64decode(answer["ciphertext"], validate=True),
                       KeyScheme.from_label(str(answer.get("key_scheme")
                                                or answer["oaep_hash"])))
        except (AttributeError, KeyError, TypeError, ValueError, binascii.Error,
                CertificateError):
            raise ArchiverFailed("The Archiver's login challenge is malformed.") from None


def _certificate(data: bytes) -> x509.Certificate:
    """The Archiver's certificate as DER bytes and key (keyservice.dercert): its fingerprint
    is all the login needs; anything unusual is read, or refused, by the full loader."""
    cert = read_certificate(data)
    if cert is not None:
        return cert  # type: ignore[return-value]
    from keyservice.certs import load_certificate

    return load_certificate(data)


def login_context(archiver_fingerprint: bytes, viewer_fingerprint: bytes,
                  challenge_id: bytes) -> bytes:
    """What a login proof is a MAC over: binds it to this Archiver, this viewer and this
    challenge, so a proof cannot be relayed to another Archiver or replayed."""
    return LABEL_LOGIN_CONTEXT + archiver_fingerprint + viewer_fingerprint + challenge_id


def admin_login_context(archiver_fingerprint: bytes, admin_fingerprint: bytes,
                        challenge_id: bytes) -> bytes:
    """What an admin's login proof is a MAC over: as ``login_context``, under its own label, so
    a viewer's login proof can never open an admin session (one certificate may be both)."""
    return LABEL_ADMIN_LOGIN_CONTEXT + archiver_fingerprint + admin_fingerprint + challenge_id
