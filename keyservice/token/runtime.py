"""The viewer's runtime path: open a token, find an identity, decrypt, ECDH, sign.

After a failed C_Decrypt the TPM leaves the session in OperationActive, so a fresh session is
opened (before the old one is closed, which would otherwise log the token out).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pkcs11
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, TokenFlag
from pkcs11 import exceptions as p11
from pkcs11._pkcs11 import DeriveMixin as _DeriveMixin
from pkcs11.mechanisms import KDF

from keyservice.dercert import DerCertificate
from keyservice.errors import (
    CertificateError,
    IntegrityError,
    MechanismUnsupported,
    ObjectExists,
    ObjectNotFound,
    PinIncorrect,
    PinLocked,
    TokenError,
    TokenRemoved,
    UsageError,
)
from keyservice.keyscheme import KeyScheme, Recipient, WrappedKey, same_public_key, unwrap_with
from keyservice.labels import TOKEN_PROBE_CONTEXT, WrapContext
from keyservice.pkcs11uri import Pkcs11Uri
from keyservice.records import FrozenRecord
from keyservice.token.session import (
    BAD_CIPHERTEXT,
    OAEP_PARAMS,
    REMOVED,
    SHA256_DIGEST_INFO,
    UNSUPPORTED,
    LoadedModule,
    TokenSlot,
    ec_public_key,
    find_token,
    guard,
    kind_of_token,
    load_module,
    open_session,
    pin_tries_note,
    read_attribute,
    resolve_module_path,
    resolve_pin,
    translate,
)

if TYPE_CHECKING:
    from cryptography import x509

# keyservice.certs (X.509 building, validation, the OAEP-hash extension) is imported where it
# is used: a viewer's identity is read as DER bytes and a key (keyservice.dercert), so that
# opening a stream needs no X.509 parser (issue 23, start-up).


@dataclass(eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's (start-up)
class IdentityInfo(FrozenRecord):
    """One key on a token as `fusion-keys list` shows it."""

    label: str
    id_hex: str
    kind: str                       # "rsa" (viewer identity) or "ec" (Archiver signing key)
    key_bits: int
    fingerprint_hex: str | None     # SHA-256 of the certificate; None if it has none yet
    oaep_hash: KeyScheme | None
    not_after: datetime | None
    subject: str | None
    issuer: str | None = None
    # OAEP hashes this token opens with this key, measured (one decrypt each); () for keys
    # that cannot decrypt (signing-only PIV slots) or were not probed.
    oaep_hashes: tuple[KeyScheme, ...] = ()


# --- the token (runtime) -------------------------------------------------------------------------------
class RuntimeToken:
    """An open, logged-in PKCS#11 token: what a viewer needs at run time (identities, decrypt, ECDH,
    sign). Safe to share between threads; close() when done. Provisioning: ``Token``."""

    def __init__(self, slot: TokenSlot, uri: Pkcs11Uri) -> None:
        self._slot = slot
        self._uri = uri
        self._closed = False

    # opening and closing
    @classmethod
    def open(cls, uri: str | Pkcs11Uri, *, pin: str | None = None,
             prompt: bool = False) -> RuntimeToken:
        """Open the token a PKCS#11 URI names (module, token, object) for runtime use:
        decryption and signing with keys already on it, never provisioning. The PIN comes
        from ``pin``, the URI's pin-value/pin-source, FUSION_PIN, or (``prompt``) a prompt
        on the terminal; a pin-pad reader asks on its own. A wrong PIN raises PinIncorrect
        and is never retried (the token counts failures). Close it with ``close()``."""
        parsed = uri if isinstance(uri, Pkcs11Uri) else Pkcs11Uri.parse(uri)
        module = load_module(resolve_module_path(parsed))
        name = parsed.token or "(unnamed)"
        with module.lock, guard("open the token", name):
            p11token = find_token(module, parsed)
            label = p11token.label
            flags = p11token.flags
        needs_login = bool(flags & TokenFlag.LOGIN_REQUIRED)
        pinpad = bool(flags & TokenFlag.PROTECTED_AUTHENTICATION_PATH)
        secret: str | None = None
        if needs_login and not (pinpad and pin is None and parsed.pin_value is None
                                and parsed.pin_source is None):
            # Resolved outside the lock: a prompt must not block other threads' token calls.
            secret = resolve_pin(parsed, pin, prompt, label, pin_tries_note(flags))
        try:
            return cls._login(module, p11token, parsed, label, needs_login, secret)
        except (PinIncorrect, PinLocked) as exc:
            # A PIV card blocks after 3 wrong PINs: say what the token reports, never retry.
            with module.lock:
                try:
                    now_flags = p11token.slot.get_token().flags
                except p11.PKCS11Error:
                    now_flags = 0
            note = pin_tries_note(now_flags)
            if note and note.strip() not in str(exc):
                raise type(exc)(str(exc) + note) from None
            raise

    @classmethod
    def _login(cls, module: LoadedModule, p11token: Any, parsed: Pkcs11Uri, label: str,
               needs_login: bool, secret: str | None) -> RuntimeToken:
        with module.lock, guard("log in", label):
            slot = module.slots.get(p11token.slot.slot_id)
            if slot is None or slot.anchor is None:
                login: object | None = None
                if needs_login:
                    login = secret if secret is not None else pkcs11.PROTECTED_AUTH
                session, rw = open_session(p11token, login, rw=True)
                slot = TokenSlot(module=module, slot_id=p11token.slot.slot_id, label=label,
                             p11token=p11token, anchor=session, session=session, rw=rw,
                             pin_digest=None)
                if secret is not None:
                    slot.pin_digest = slot.digest(secret)
                module.slots[slot.slot_id] = slot
            elif (secret is not None and slot.pin_digest is not None
                  and not hmac.compare_digest(slot.digest(secret), slot.pin_digest)):
                # Already logged in here with another PIN; a second C_Login is impossible, so
                # compare with the PIN the token accepted instead of silently ignoring this one.
                raise PinIncorrect(f"The PIN for token '{label}' differs from the one this process "
                                   "already logged in with; check it.")
            slot.users += 1
        return cls(slot, parsed)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        slot = self._slot
        with slot.module.lock:
            slot.users -= 1
            if slot.users <= 0:
                slot.shut()
                if slot.module.slots.get(slot.slot_id) is slot:
                    del slot.module.slots[slot.slot_id]

    def __enter__(self) -> RuntimeToken:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def label(self) -> str:
        return self._slot.label

    @property
    def uri(self) -> Pkcs11Uri:
        return self._uri

    @property
    def kind(self) -> str:
        """'ykcs11', 'opensc-piv' (PIV cards; fixed key slots) or 'generic'."""
        return kind_of_token(self._slot.p11token)

    @property
    def _lock(self) -> threading.RLock:
        return self._slot.module.lock

    def _session(self) -> Any:
        if self._closed or self._slot.session is None:
            raise TokenError(f"Token '{self.label}' was closed; open it again.")
        return self._slot.session

    def _renew_session(self) -> None:
        """Replace the shared session (after a failed operation left it OperationActive)."""
        slot = self._slot
        old = self._session()
        # No login needed: the anchor session keeps the token logged in for this process.
        slot.session, slot.rw = open_session(slot.p11token, None, rw=slot.rw)
        slot.generation += 1
        if old is not slot.anchor:  # the anchor stays open; closing it would log out
            try:
                old.close()
            except p11.PKCS11Error:
                pass

    # object lookup (callers hold the lock)
    def _objects(self, **attrs: Any) -> list[Any]:
        template = {getattr(Attribute, k.upper()): v for k, v in attrs.items()}
        return list(self._session().get_objects(template))

    def _private_keys(self, label: str | None = None, key_id: bytes | None = None) -> list[Any]:
        template: dict[str, Any] = {"class": ObjectClass.PRIVATE_KEY}
        if label is not None:
            template["label"] = label
        if key_id is not None:
            template["id"] = key_id
        return self._objects(**template)

    def _one_private_key(self, label: str | None, key_id: bytes | None) -> Any:
        keys = self._private_keys(label, key_id)
        what = f"'{label}'" if label is not None else f"with id {key_id.hex() if key_id else '?'}"
        if not keys:
            present = sorted({k[Attribute.LABEL] for k in self._private_keys()})
            have = ", ".join(repr(p) for p in present) or "none"
            raise ObjectNotFound(f"Token '{self.label}' has no private key {what} (present: "
                                 f"{have}); check object= in the URI or enrol it.")
        if len(keys) > 1:
            raise ObjectExists(f"Token '{self.label}' has {len(keys)} private keys {what}; name "
                               "one by id= in the URI.")
        return keys[0]

    def _key_by_id(self, key_id: bytes) -> Any:
        """The private key object for key_id, cached for the current session (finding it costs a
        C_FindObjects round trip per operation otherwise)."""
        cached = self._slot.key_cache.get(key_id)
        if cached is not None and cached[0] == self._slot.generation:
            return cached[1]
        key = self._one_private_key(None, key_id)
        self._slot.key_cache[key_id] = (self._slot.generation, key)
        return key

    def _certificate_object(self, key_id: bytes) -> Any | None:
        found = self._objects(**{"class": ObjectClass.CERTIFICATE, "id": key_id})
        return found[0] if found else None

    def _rsa_public(self, key: Any) -> rsa.RSAPublicKey:
        n = int.from_bytes(key[Attribute.MODULUS], "big")
        e = int.from_bytes(key[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()

    def _ec_public(self, key_id: bytes) -> ec.EllipticCurvePublicKey:
        found = self._objects(**{"class": ObjectClass.PUBLIC_KEY, "id": key_id})
        if not found:
            raise ObjectNotFound(f"Token '{self.label}' keeps no public key for this signing key; "
                                 "delete the key and let it be created again.")
        return ec_public_key(found[0][Attribute.EC_POINT])

    def _mechanisms(self) -> set[Any]:
        return set(self._slot.p11token.slot.get_mechanisms())

    # private-key operations (callers hold the lock)
    def _sign_rsa(self, key_id: bytes, data: bytes) -> bytes:
        with self._lock, guard("sign with its RSA key", self.label):
            key = self._key_by_id(key_id)
            if Mechanism.SHA256_RSA_PKCS in self._mechanisms():
                return bytes(key.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS))
            digest_info = SHA256_DIGEST_INFO + hashlib.sha256(data).digest()
            return bytes(key.sign(digest_info, mechanism=Mechanism.RSA_PKCS))

    def _sign_ec(self, key_id: bytes, data: bytes) -> bytes:
        with self._lock, guard("sign with its EC key", self.label):
            key = self._key_by_id(key_id)
            # Hash on the host, sign the digest on the token: CKM_ECDSA is the mechanism every
            # EC token has (SoftHSM, TPM, PIV), unlike CKM_ECDSA_SHA256.
            raw = bytes(key.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA))
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"),
                                    int.from_bytes(raw[half:], "big"))

    def _decrypt(self, key_id: bytes, ciphertext: bytes, oaep_hash: KeyScheme) -> bytes:
        """One C_Decrypt with RSA-OAEP. Failures: IntegrityError / MechanismUnsupported."""
        with self._lock:
            with guard("decrypt", self.label):
                key = self._key_by_id(key_id)
            try:
                return bytes(key.decrypt(ciphertext, mechanism=Mechanism.RSA_PKCS_OAEP,
                                         mechanism_param=OAEP_PARAMS[oaep_hash]))
            except REMOVED as exc:
                raise translate(exc, "decrypt", self.label) from None
            except p11.PKCS11Error as exc:
                with guard("open a fresh session", self.label):
                    self._renew_session()  # the TPM answers OperationActive otherwise
                if isinstance(exc, UNSUPPORTED):
                    from keyservice import certs

                    raise MechanismUnsupported(
                        f"Token '{self.label}' cannot RSA-OAEP-decrypt with "
                        f"{certs.oaep_hash_name(oaep_hash)}; the certificate must record a hash this "
                        "token supports (re-enrol with fusion-keys enroll).") from None
                if isinstance(exc, BAD_CIPHERTEXT):
                    raise IntegrityError() from None
                raise translate(exc, "decrypt", self.label) from None

    def _ecdh(self, key_id: bytes, peer_point: bytes) -> bytes:
        """The ECDH shared secret (x coordinate) of the token key with ``peer_point``: one
        C_DeriveKey into a session-only, readable secret, read, then destroyed."""
        with self._lock:
            with guard("do ECDH", self.label):
                key = self._key_by_id(key_id)
            try:
                # Called unbound: ykcs11 reports CKA_DERIVE false on PIV keys yet derives, and
                # python-pkcs11 offers derive_key only where CKA_DERIVE is true.
                derived = _DeriveMixin.derive_key(
                    key, KeyType.GENERIC_SECRET, 256, mechanism=Mechanism.ECDH1_DERIVE,
                    mechanism_param=(KDF.NULL, None, peer_point),
                    template={Attribute.TOKEN: False, Attribute.SENSITIVE: False,
                              Attribute.EXTRACTABLE: True})
                try:
                    return bytes(derived[Attribute.VALUE])
                finally:
                    try:
                        derived.destroy()
                    except p11.PKCS11Error:
                        pass
            except REMOVED as exc:
                raise translate(exc, "do ECDH", self.label) from None
            except p11.PKCS11Error as exc:
                with guard("open a fresh session", self.label):
                    self._renew_session()
                if isinstance(exc, UNSUPPORTED):
                    raise MechanismUnsupported(
                        f"Token '{self.label}' cannot do ECDH (CKM_ECDH1_DERIVE) with this key, so "
                        "it cannot open streams for an EC viewer; enrol an RSA identity "
                        "(--key-type rsa).") from None
                if isinstance(exc, BAD_CIPHERTEXT):
                    raise IntegrityError() from None
                raise translate(exc, "do ECDH", self.label) from None

    def _probe_ecdh(self, key_id: bytes, certificate: x509.Certificate) -> bool:
        """True if the token opens an EC seal to this certificate with this key."""
        secret = secrets.token_bytes(32)
        probe = TokenIdentity(self, "probe", key_id, certificate)
        sealed = Recipient(certificate, KeyScheme.ECDH_P256).wrap(secret, TOKEN_PROBE_CONTEXT)
        try:
            return hmac.compare_digest(probe.unwrap(sealed, TOKEN_PROBE_CONTEXT), secret)
        except TokenRemoved:
            raise
        except (MechanismUnsupported, IntegrityError, TokenError):
            return False

    def _probe_oaep(self, key_id: bytes, public: rsa.RSAPublicKey) -> KeyScheme:
        """The best OAEP hash the token opens with this key: SHA-256, else SHA-1 (SoftHSM)."""
        secret = secrets.token_bytes(32)
        for oaep_hash in (KeyScheme.RSA_OAEP_SHA256, KeyScheme.RSA_OAEP_SHA1):
            algorithm = oaep_hash.algorithm()
            ciphertext = public.encrypt(secret, padding.OAEP(padding.MGF1(algorithm), algorithm,
                                                             None))
            try:
                if hmac.compare_digest(self._decrypt(key_id, ciphertext, oaep_hash), secret):
                    return oaep_hash
            except (MechanismUnsupported, IntegrityError):
                continue
        raise MechanismUnsupported(f"Token '{self.label}' cannot RSA-OAEP-decrypt with SHA-256 or "
                                   "SHA-1, so it cannot open fusion streams; use another token.")

    def _oaep_hashes(self, key_id: bytes, public: rsa.RSAPublicKey) -> tuple[KeyScheme, ...]:
        """Every OAEP hash the token opens with this key (best first); a removed token raises."""
        secret = secrets.token_bytes(32)
        found = []
        for oaep_hash in (KeyScheme.RSA_OAEP_SHA256, KeyScheme.RSA_OAEP_SHA1):
            algorithm = oaep_hash.algorithm()
            ciphertext = public.encrypt(secret, padding.OAEP(padding.MGF1(algorithm), algorithm,
                                                             None))
            try:
                if hmac.compare_digest(self._decrypt(key_id, ciphertext, oaep_hash), secret):
                    found.append(oaep_hash)
            except TokenRemoved:
                raise
            except (MechanismUnsupported, IntegrityError, TokenError):
                continue  # e.g. a signing-only key, or a hash this module lacks
        return tuple(found)

    def identity(self, object_name: str | None = None) -> TokenIdentity:
        """The viewer identity named ``object_name`` (default: the URI's object or id)."""
        name = object_name if object_name is not None else self._uri.object
        key_id = None if object_name is not None else self._uri.id
        if name is None and key_id is None:
            raise UsageError("The token URI names no identity; add ;object=NAME to it.")
        with self._lock, guard("read the identity", self.label):
            key = self._one_private_key(name, key_id)
            label, key_id = key[Attribute.LABEL], bytes(key[Attribute.ID])
            key_type = key[Attribute.KEY_TYPE]
            if key_type not in (KeyType.RSA, KeyType.EC):
                raise ObjectNotFound(f"'{label}' on token '{self.label}' is neither an RSA nor "
                                     "an EC viewer identity.")
            public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey = (
                self._rsa_public(key) if key_type == KeyType.RSA else self._ec_public(key_id))
            cert_obj = self._certificate_object(key_id)
            if cert_obj is None:
                raise ObjectNotFound(f"'{label}' on token '{self.label}' has a key but no "
                                     "certificate yet; store the CA-issued one with fusion-keys "
                                     "import-cert.")
            cert = _token_certificate(bytes(cert_obj[Attribute.VALUE]))
        if not same_public_key(cert.public_key(), public):
            raise CertificateError(f"The certificate stored for '{label}' on token '{self.label}' "
                                   "belongs to another key; delete the identity and enrol again.")
        return TokenIdentity(self, label, key_id, cert)

    def identities(self, *, probe: bool = True) -> list[IdentityInfo]:
        """Every key on the token with its certificate details and, with ``probe``, the OAEP
        hashes the token opens with it (measured: one decrypt per hash and RSA key)."""
        from cryptography import x509

        from keyservice import certs

        result: list[IdentityInfo] = []
        to_probe: list[tuple[int, bytes, rsa.RSAPublicKey | x509.Certificate]] = []
        with self._lock, guard("list its keys", self.label):
            for key in self._private_keys():
                key_id = bytes(key[Attribute.ID])
                key_type = key[Attribute.KEY_TYPE]
                if key_type == KeyType.RSA:
                    kind, bits = "rsa", len(key[Attribute.MODULUS]) * 8
                elif key_type == KeyType.EC:
                    kind, bits = "ec", 256
                else:
                    continue
                cert_obj = self._certificate_object(key_id)
                cert = None
                if cert_obj is not None:
                    try:
                        cert = certs.load_certificate(bytes(cert_obj[Attribute.VALUE]))
                    except CertificateError:
                        cert = None
                summary = certs.summarize(cert) if cert is not None else None
                if probe and kind == "rsa" and read_attribute(key, Attribute.DECRYPT, True):
                    to_probe.append((len(result), key_id, self._rsa_public(key)))
                elif probe and kind == "ec" and cert is not None:
                    to_probe.append((len(result), key_id, cert))
                result.append(IdentityInfo(
                    label=key[Attribute.LABEL], id_hex=key_id.hex(), kind=kind, key_bits=bits,
                    fingerprint_hex=summary.fingerprint_hex if summary else None,
                    oaep_hash=summary.oaep_hash if summary else None,
                    not_after=summary.not_after if summary else None,
                    subject=summary.subject if summary else None,
                    issuer=cert.issuer.rfc4514_string() if cert is not None else None))
            # Probed only now: a failed probe replaces the session, and with it the objects
            # the loop above iterated over.
            for index, key_id, what in to_probe:
                if isinstance(what, x509.Certificate):  # EC: can the token do ECDH with it?
                    found = ((KeyScheme.ECDH_P256,) if self._probe_ecdh(key_id, what) else ())
                else:
                    found = self._oaep_hashes(key_id, what)
                result[index] = replace(result[index], oaep_hashes=found)
        return sorted(result, key=lambda info: info.label)


def _token_certificate(value: bytes) -> x509.Certificate:
    """The certificate a token stores (DER, CKA_VALUE), as its bytes and key: the full X.509
    parse waits for whoever needs more (keyservice.dercert). CertificateError as
    keyservice.certs.load_certificate says it if the bytes are no certificate."""
    try:
        return DerCertificate(value)  # type: ignore[return-value]
    except ValueError:
        from keyservice import certs

        return certs.load_certificate(value)  # says what is wrong with it, or reads it


class TokenIdentity:
    """A viewer identity on a token: a ``keyservice.keyscheme.Identity`` (``unwrap``), over the
    token's private-key primitive (``RsaOaepKey`` for RSA keys, ``EcdhKey`` for EC P-256)."""

    def __init__(self, token: RuntimeToken, label: str, key_id: bytes,
                 certificate: x509.Certificate) -> None:
        self.token = token
        self.label = label
        self.key_id = key_id
        self.certificate = certificate
        self.operations = 0  # private-key operations done (the viewer reports it)
        public = certificate.public_key()
        assert isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        self.public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey = public

    @property
    def is_ec(self) -> bool:
        return isinstance(self.public_key, ec.EllipticCurvePublicKey)

    @property
    def oaep_hash(self) -> KeyScheme | None:
        if self.is_ec:
            return KeyScheme.ECDH_P256
        from keyservice import certs

        return certs.read_oaep_hash(self.certificate)

    def unwrap(self, wrapped: WrappedKey, context: WrapContext) -> bytes:
        """One private-key operation on the token; IncorrectIdentity if the key does not open."""
        return unwrap_with(self, wrapped, context)

    def ecdh(self, peer_point: bytes) -> bytes:
        """One CKM_ECDH1_DERIVE with the token key (EC identities); satisfies EcdhKey."""
        if not self.is_ec:
            raise IntegrityError()
        with self.token._lock:
            self.operations += 1
            return self.token._ecdh(self.key_id, peer_point)

    def rsa_decrypt(self, ciphertext: bytes, oaep_hash: KeyScheme) -> bytes:
        """One C_Decrypt with CKM_RSA_PKCS_OAEP; any failure to open is IntegrityError."""
        with self.token._lock:  # the count stays exact when threads share this identity
            self.operations += 1
            return self.token._decrypt(self.key_id, ciphertext, oaep_hash)


class TokenSigner:
    """The Archiver's ECDSA P-256 key on its token; satisfies ``keyservice.identity.Signer``."""

    def __init__(self, token: RuntimeToken, label: str, key_id: bytes,
                 certificate: x509.Certificate) -> None:
        self.token = token
        self.label = label
        self.key_id = key_id
        self.certificate = certificate
        self.operations = 0

    def sign(self, data: bytes) -> bytes:
        """ECDSA P-256 with SHA-256, DER-encoded."""
        with self.token._lock:
            self.operations += 1
            return self.token._sign_ec(self.key_id, data)


