"""The PKCS#11 token layer: THE ONLY module that imports ``pkcs11``.

Viewer private keys are generated inside a token (smartcard, TPM, HSM; SoftHSM for development)
and never leave it: this module asks the token to RSA-decrypt epoch openers and to sign, nothing
more. It also holds the Archiver's own ECDSA signing key.

Rules enforced here (measured on SoftHSM 2.6 and tpm2-pkcs11 1.9, see docs/tokens.md):
- one ``pkcs11.lib`` per module path per process, and every PKCS#11 call serialized through one
  lock per module: python-pkcs11 0.10 initialises modules without OS locking and releases the
  GIL, and SoftHSM crashes under concurrent threads;
- log in once per token per process (a second C_Login fails with UserAlreadyLoggedIn), and never
  retry a wrong PIN: tokens lock after a few failures;
- after a failed C_Decrypt the TPM leaves the session in OperationActive, so a fresh session is
  opened (before the old one is closed, which would otherwise log the token out);
- CKA_ALLOWED_MECHANISMS is never set (it crashes python-pkcs11);
- every ``pkcs11`` exception is mapped to the error family of ``keyservice.errors``.
"""

from __future__ import annotations

import atexit
import ctypes
import getpass
import hashlib
import hmac
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pkcs11
from asn1crypto.core import Integer as Asn1Integer
from asn1crypto.core import OctetString as Asn1OctetString
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from pkcs11 import Attribute, CertificateType, KeyType, Mechanism, ObjectClass, TokenFlag
from pkcs11 import exceptions as p11
from pkcs11._pkcs11 import DeriveMixin as _DeriveMixin
from pkcs11.mechanisms import KDF, MGF
from pkcs11.util.ec import encode_named_curve_parameters

from keyservice import certs
from keyservice.crypto import ec_open, ec_seal
from keyservice.errors import (
    CertificateError,
    IntegrityError,
    KeyServiceError,
    MechanismUnsupported,
    ModuleNotFound,
    ObjectExists,
    ObjectNotFound,
    PinIncorrect,
    PinLocked,
    TokenError,
    TokenNotFound,
    TokenRemoved,
    UsageError,
)
from keyservice.identity import OaepHash, Recipient, fingerprint
from keyservice.pkcs11uri import DEFAULT_MODULE, Pkcs11Uri

RSA_SIZES = (2048, 3072, 4096)
DEFAULT_RSA_BITS = 3072

_OAEP_PARAMS = {
    OaepHash.SHA1: (Mechanism.SHA_1, MGF.SHA1, None),
    OaepHash.SHA256: (Mechanism.SHA256, MGF.SHA256, None),
}
# DER prefix of a SHA-256 DigestInfo, for tokens (PIV cards) that only offer raw CKM_RSA_PKCS.
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
# HKDF info of the self-test / probe seal: distinct from epoch openers and login challenges.
_LABEL_EC_PROBE = b"FSE1 ec-token-probe\x00"
_REMOVED = (p11.DeviceRemoved, p11.TokenNotPresent, p11.SessionHandleInvalid, p11.SessionClosed)
# What a token answers to a ciphertext it cannot open (GeneralError: tpm2-pkcs11).
_BAD_CIPHERTEXT = (p11.EncryptedDataInvalid, p11.EncryptedDataLenRange, p11.DataInvalid,
                   p11.DataLenRange, p11.GeneralError, p11.FunctionFailed)
# What a token answers to a mechanism or parameter it does not support (SoftHSM: ArgumentsBad).
_UNSUPPORTED = (p11.ArgumentsBad, p11.MechanismInvalid, p11.MechanismParamInvalid,
                p11.FunctionNotSupported)


# --- error mapping ---------------------------------------------------------------------------
def _translate(exc: Exception, action: str, label: str) -> KeyServiceError:
    """One clear sentence for every PKCS#11 failure; never a raw pkcs11 exception."""
    where = f"token '{label}'"
    if isinstance(exc, p11.PinIncorrect):
        return PinIncorrect(f"The PIN for {where} is wrong; check it (the token locks after a few "
                            "wrong PINs, so it was not retried).")
    if isinstance(exc, p11.PinLocked):
        return PinLocked(f"The PIN of {where} is locked after too many wrong PINs; unblock it "
                         "with the SO PIN (e.g. pkcs11-tool --init-pin --login --login-type so).")
    if isinstance(exc, p11.PinLenRange | p11.PinInvalid):
        return PinIncorrect(f"The PIN for {where} has a length or characters the token rejects; "
                            "check it.")
    if isinstance(exc, p11.PinExpired):
        return TokenError(f"The PIN of {where} has expired; change it with the token's tool.")
    if isinstance(exc, _REMOVED):
        return TokenRemoved(f"{where.capitalize()} was removed or its session was lost while "
                            f"trying to {action}; reinsert it and try again.")
    if isinstance(exc, p11.MechanismInvalid | p11.MechanismParamInvalid | p11.FunctionNotSupported):
        return MechanismUnsupported(f"{where.capitalize()} does not support what is needed to "
                                    f"{action}; use a token with RSA-OAEP and RSA/ECDSA signing.")
    if isinstance(exc, p11.KeySizeRange):
        return MechanismUnsupported(f"{where.capitalize()} cannot make a key of that size; choose "
                                    "another --key size.")
    if isinstance(exc, p11.TokenWriteProtected | p11.SessionReadOnly):
        return TokenError(f"{where.capitalize()} is read-only, so it cannot {action}; use a "
                          "writable token.")
    if isinstance(exc, p11.DeviceMemory):
        return TokenError(f"{where.capitalize()} is full; delete unused identities "
                          "(fusion-keys delete) and try again.")
    if isinstance(exc, p11.UserNotLoggedIn):
        return TokenError(f"Not logged in to {where} while trying to {action}; open it with its "
                          "PIN.")
    name = type(exc).__name__
    return TokenError(f"{where.capitalize()} failed to {action} ({name}); check the token and "
                      "its module, and try again.")


def pin_tries_note(flags: int) -> str:
    """What the token says about remaining PIN tries (PKCS#11 gives flags, not a count)."""
    if flags & TokenFlag.USER_PIN_LOCKED:
        return " The token now reports the PIN locked."
    if flags & TokenFlag.USER_PIN_FINAL_TRY:
        return " The token reports ONE try left before the PIN locks."
    if flags & TokenFlag.USER_PIN_COUNT_LOW:
        return " The token reports that wrong PINs were given; few tries are left."
    return ""


@contextmanager
def _guard(action: str, label: str) -> Iterator[None]:
    try:
        yield
    except KeyServiceError:
        raise
    except p11.PKCS11Error as exc:
        raise _translate(exc, action, label) from None
    except NotImplementedError:  # python-pkcs11: an attribute type it cannot handle
        raise TokenError(f"Token '{label}' returned data this program cannot read while trying "
                         f"to {action}.") from None


# --- modules, slots, sessions ----------------------------------------------------------------
@dataclass
class _Slot:
    """Process-wide state of one token: the session that logged in, and the working session.

    python-pkcs11 calls C_Logout when it closes the session that logged in, which logs out every
    session of the token. So that session (the anchor) stays open until the token is closed, and
    a failed operation only replaces the working session (a fresh, already-logged-in one).
    """

    module: _Module
    slot_id: int
    label: str
    p11token: Any
    anchor: Any
    session: Any
    rw: bool
    pin_digest: bytes | None
    salt: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    generation: int = 0
    users: int = 0
    key_cache: dict[bytes, tuple[int, Any]] = field(default_factory=dict)

    def digest(self, pin: str) -> bytes:
        # Kept only to check a second open in this process; the PIN itself is not stored.
        return hashlib.sha256(self.salt + pin.encode("utf-8")).digest()

    def shut(self) -> None:
        """Close the working session, then the anchor (which logs the token out)."""
        for session in (self.session, self.anchor) if self.session is not self.anchor else (
                self.anchor,):
            if session is not None:
                try:
                    session.close()
                except p11.PKCS11Error:
                    pass
        self.session = self.anchor = None
        self.key_cache.clear()


@dataclass
class _Module:
    path: str
    lib: Any
    lock: threading.RLock = field(default_factory=threading.RLock)
    slots: dict[int, _Slot] = field(default_factory=dict)


_modules: dict[str, _Module] = {}
_registry_lock = threading.Lock()


def resolve_module_path(uri: Pkcs11Uri) -> str:
    """The module file to load: URI module-path, else $FUSION_PKCS11_MODULE, else SoftHSM."""
    path = uri.module_path or os.environ.get("FUSION_PKCS11_MODULE") or DEFAULT_MODULE
    if not os.path.isfile(path):
        hint = " (apt-get install softhsm2)" if "softhsm" in path else ""
        raise ModuleNotFound(f"The PKCS#11 module {path} does not exist; install it{hint} or fix "
                             "module-path in the token URI.")
    return os.path.realpath(path)


def _load_module(path: str) -> _Module:
    with _registry_lock:
        module = _modules.get(path)
        if module is not None:
            return module
        try:
            lib = pkcs11.lib(path)
        except p11.PKCS11Error as exc:
            if type(exc) is p11.PKCS11Error:  # python-pkcs11: dlopen or C_GetFunctionList failed
                raise ModuleNotFound(f"{path} could not be loaded as a PKCS#11 module; give the "
                                     "path of a PKCS#11 .so in module-path.") from None
            advice = ("; set SOFTHSM2_CONF to a config made by fusion-keys softhsm-init"
                      if "softhsm" in path else "; check the module's configuration")
            raise ModuleNotFound(f"The PKCS#11 module {path} failed to initialise "
                                 f"({type(exc).__name__}){advice}.") from None
        except (OSError, RuntimeError):
            raise ModuleNotFound(f"{path} could not be loaded as a PKCS#11 module; give the "
                                 "path of a PKCS#11 .so in module-path.") from None
        module = _Module(path=path, lib=lib)
        _modules[path] = module
        return module


def unload_module(module_path: str) -> None:
    """Close every session on a module and C_Finalize it (its Tokens become unusable).

    Needed before another process may talk to a software TPM: swtpm serves one client at a time.
    """
    path = os.path.realpath(module_path)
    with _registry_lock:
        module = _modules.pop(path, None)
    if module is None:
        return
    with module.lock:
        for slot in module.slots.values():
            slot.shut()
        module.slots.clear()
        try:
            module.lib.finalize()
        except p11.PKCS11Error:
            pass


def _unload_all() -> None:
    # At exit, finalize cleanly: the TPM module flushes its TPM handles only then; leaked
    # handles fill the TPM's few object slots ("out of memory for object contexts").
    for path in list(_modules):
        unload_module(path)


atexit.register(_unload_all)


def _open_session(p11token: Any, user_pin: object | None, rw: bool) -> tuple[Any, bool]:
    """Open a session, logging in when user_pin is given; RW if the token allows it."""
    if rw:
        try:
            return p11token.open(rw=True, user_pin=user_pin), True
        except (p11.TokenWriteProtected, p11.SessionReadOnly):
            pass
    # NB: if C_Login fails, python-pkcs11 leaves the just-opened session open until C_Finalize;
    # harmless, and the wrong PIN is reported at once and never retried.
    return p11token.open(rw=False, user_pin=user_pin), False


def _find_token(module: _Module, uri: Pkcs11Uri) -> Any:
    tokens = [t for t in module.lib.get_tokens()
              if t.flags & TokenFlag.TOKEN_INITIALIZED]
    labels = sorted(t.label for t in tokens)
    found = [t for t in tokens
             if (uri.token is None or t.label == uri.token)
             and (uri.serial is None or t.serial.decode("ascii", "replace").strip() == uri.serial)]
    if not tokens:  # a card reader without a card looks like this
        raise TokenNotFound(f"No token is present in module {module.path}: insert the card and "
                            "try again (for SoftHSM: create the token with fusion-keys "
                            "softhsm-init).")
    if not found:
        what = f"token '{uri.token}'" if uri.token else "token"
        if uri.serial:
            what += f" with serial {uri.serial}"
        have = ", ".join(repr(label) for label in labels) or "none"
        raise TokenNotFound(f"No {what} in module {module.path} (tokens present: {have}); check "
                            "token= in the URI, or create it (fusion-keys softhsm-init).")
    if len(found) > 1:
        raise TokenNotFound(f"{len(found)} tokens match the URI ({', '.join(labels)}); add "
                            "token=LABEL or serial=SERIAL to choose one.")
    return found[0]


def _resolve_pin(uri: Pkcs11Uri, pin: str | None, prompt: bool, label: str,
                 note: str = "") -> str:
    """PIN order: argument, URI pin-value, URI pin-source file, $FUSION_PIN, TTY prompt."""
    if pin is not None:
        return pin
    if uri.pin_value is not None:
        return uri.pin_value
    source = uri.pin_source_path()
    if source is not None:
        try:
            return Path(source).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise TokenError(f"Cannot read the PIN file {source} ({reason}); check pin-source in "
                             "the token URI and the file's permissions.") from None
    env = os.environ.get("FUSION_PIN")
    if env:
        return env
    if prompt and sys.stdin is not None and sys.stdin.isatty():
        if note:
            print(note.strip(), file=sys.stderr)
        return getpass.getpass(f"PIN for token '{label}': ")
    raise TokenError(f"No PIN given for token '{label}'; add pin-source=FILE (or pin-value) to "
                     "the token URI, set FUSION_PIN, or run the command interactively.")


# --- public data types -----------------------------------------------------------------------
@dataclass(frozen=True)
class IdentityInfo:
    """One key on a token as `fusion-keys list` shows it."""

    label: str
    id_hex: str
    kind: str                       # "rsa" (viewer identity) or "ec" (Archiver signing key)
    key_bits: int
    fingerprint_hex: str | None     # SHA-256 of the certificate; None if it has none yet
    oaep_hash: OaepHash | None
    not_after: datetime | None
    subject: str | None
    issuer: str | None = None
    # OAEP hashes this token opens with this key, measured (one decrypt each); () for keys
    # that cannot decrypt (signing-only PIV slots) or were not probed.
    oaep_hashes: tuple[OaepHash, ...] = ()


@dataclass(frozen=True)
class Adoption:
    """Result of `Token.adopt`: an existing key + certificate checked for use as a viewer."""

    label: str
    key_id: bytes
    certificate: x509.Certificate
    oaep_hash: OaepHash          # the best hash the token opens (SHA-256 where it can)
    recorded: bool               # the certificate records that hash itself
    decrypt_ms: float


@dataclass(frozen=True)
class Enrollment:
    """Result of `Token.enroll`: a certificate (stored on the token) or a CSR for a site CA."""

    label: str
    key_id: bytes
    key_bits: int
    oaep_hash: OaepHash
    certificate: x509.Certificate | None
    csr: x509.CertificateSigningRequest | None

    def pem(self) -> bytes:
        if self.certificate is not None:
            return self.certificate.public_bytes(Encoding.PEM)
        assert self.csr is not None
        return self.csr.public_bytes(Encoding.PEM)


@dataclass(frozen=True)
class ImportResult:
    label: str
    oaep_hash: OaepHash        # measured on the token
    recorded: bool             # True if the certificate itself records it (the CA kept the ext)


@dataclass(frozen=True)
class SelftestResult:
    label: str
    oaep_hash: OaepHash
    key_bits: int
    decrypt_ms: float
    fingerprint_hex: str


# --- token-backed private keys for cryptography's builders -----------------------------------
class _TokenRsaKey(rsa.RSAPrivateKey):
    """An RSA private key whose sign() runs on the token: certificates and CSRs are built with
    cryptography and signed without the private key ever being in host memory."""

    def __init__(self, token: Token, key_id: bytes, public: rsa.RSAPublicKey) -> None:
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

    def __copy__(self) -> _TokenRsaKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> _TokenRsaKey:
        return self


class _TokenEcKey(ec.EllipticCurvePrivateKey):
    """An ECDSA P-256 private key whose sign() runs on the token."""

    def __init__(self, token: Token, key_id: bytes, public: ec.EllipticCurvePublicKey) -> None:
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

    def __copy__(self) -> _TokenEcKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> _TokenEcKey:
        return self


def _ec_public_key(raw: bytes) -> ec.EllipticCurvePublicKey:
    # CKA_EC_POINT is a DER OCTET STRING around the point (some modules return the bare point).
    try:
        point = raw if len(raw) == 65 and raw[0] == 4 else Asn1OctetString.load(raw).native
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except (ValueError, TypeError):
        raise TokenError("The token returned an EC public key that is not a P-256 point; use a "
                         "token that supports P-256.") from None


def _certificate_template(cert: x509.Certificate, label: str, key_id: bytes) -> dict[Any, Any]:
    return {
        Attribute.CLASS: ObjectClass.CERTIFICATE,
        Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.LABEL: label,
        Attribute.ID: key_id,
        Attribute.SUBJECT: cert.subject.public_bytes(),
        Attribute.ISSUER: cert.issuer.public_bytes(),
        Attribute.SERIAL_NUMBER: Asn1Integer(cert.serial_number).dump(),
        Attribute.VALUE: cert.public_bytes(Encoding.DER),
    }


def _attribute(obj: Any, attribute: Any, default: Any) -> Any:
    """An attribute some modules do not report (then ``default``)."""
    try:
        return obj[attribute]
    except (p11.PKCS11Error, NotImplementedError):
        return default


def _check_name(name: str) -> None:
    if not name or len(name) > 64 or any(ord(c) < 32 for c in name):
        raise UsageError("An identity name must have 1 to 64 printable characters.")


# --- the token -------------------------------------------------------------------------------
class Token:
    """An open, logged-in PKCS#11 token. Safe to share between threads; close() when done."""

    def __init__(self, slot: _Slot, uri: Pkcs11Uri) -> None:
        self._slot = slot
        self._uri = uri
        self._closed = False

    # opening and closing
    @classmethod
    def open(cls, uri: str | Pkcs11Uri, *, pin: str | None = None,
             prompt: bool = False) -> Token:
        parsed = uri if isinstance(uri, Pkcs11Uri) else Pkcs11Uri.parse(uri)
        module = _load_module(resolve_module_path(parsed))
        name = parsed.token or "(unnamed)"
        with module.lock, _guard("open the token", name):
            p11token = _find_token(module, parsed)
            label = p11token.label
            flags = p11token.flags
        needs_login = bool(flags & TokenFlag.LOGIN_REQUIRED)
        pinpad = bool(flags & TokenFlag.PROTECTED_AUTHENTICATION_PATH)
        secret: str | None = None
        if needs_login and not (pinpad and pin is None and parsed.pin_value is None
                                and parsed.pin_source is None):
            # Resolved outside the lock: a prompt must not block other threads' token calls.
            secret = _resolve_pin(parsed, pin, prompt, label, pin_tries_note(flags))
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
    def _login(cls, module: _Module, p11token: Any, parsed: Pkcs11Uri, label: str,
               needs_login: bool, secret: str | None) -> Token:
        with module.lock, _guard("log in", label):
            slot = module.slots.get(p11token.slot.slot_id)
            if slot is None or slot.anchor is None:
                login: object | None = None
                if needs_login:
                    login = secret if secret is not None else pkcs11.PROTECTED_AUTH
                session, rw = _open_session(p11token, login, rw=True)
                slot = _Slot(module=module, slot_id=p11token.slot.slot_id, label=label,
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

    def __enter__(self) -> Token:
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
        return _token_kind(self._slot.p11token)

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
        slot.session, slot.rw = _open_session(slot.p11token, None, rw=slot.rw)
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
        return _ec_public_key(found[0][Attribute.EC_POINT])

    def _unused_id(self) -> bytes:
        while True:  # a random 16-byte CKA_ID: unique without coordinating with anyone
            key_id = secrets.token_bytes(16)
            if not self._objects(id=key_id):
                return key_id

    def _destroy_id(self, key_id: bytes) -> None:
        """Remove everything created under key_id (certificate first); best effort."""
        order = {ObjectClass.CERTIFICATE: 0, ObjectClass.PRIVATE_KEY: 1, ObjectClass.PUBLIC_KEY: 2}
        self._slot.key_cache.pop(key_id, None)
        try:
            objs = self._objects(id=key_id)
            for obj in sorted(objs, key=lambda o: order.get(o[Attribute.CLASS], 3)):
                obj.destroy()
        except p11.PKCS11Error:
            pass

    def _store_certificate(self, cert: x509.Certificate, label: str, key_id: bytes) -> None:
        self._session().create_object(_certificate_template(cert, label, key_id))

    def _mechanisms(self) -> set[Any]:
        return set(self._slot.p11token.slot.get_mechanisms())

    # private-key operations (callers hold the lock)
    def _sign_rsa(self, key_id: bytes, data: bytes) -> bytes:
        with self._lock, _guard("sign with its RSA key", self.label):
            key = self._key_by_id(key_id)
            if Mechanism.SHA256_RSA_PKCS in self._mechanisms():
                return bytes(key.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS))
            digest_info = _SHA256_DIGEST_INFO + hashlib.sha256(data).digest()
            return bytes(key.sign(digest_info, mechanism=Mechanism.RSA_PKCS))

    def _sign_ec(self, key_id: bytes, data: bytes) -> bytes:
        with self._lock, _guard("sign with its EC key", self.label):
            key = self._key_by_id(key_id)
            # Hash on the host, sign the digest on the token: CKM_ECDSA is the mechanism every
            # EC token has (SoftHSM, TPM, PIV), unlike CKM_ECDSA_SHA256.
            raw = bytes(key.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA))
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"),
                                    int.from_bytes(raw[half:], "big"))

    def _decrypt(self, key_id: bytes, ciphertext: bytes, oaep_hash: OaepHash) -> bytes:
        """One C_Decrypt with RSA-OAEP. Failures: IntegrityError / MechanismUnsupported."""
        with self._lock:
            with _guard("decrypt", self.label):
                key = self._key_by_id(key_id)
            try:
                return bytes(key.decrypt(ciphertext, mechanism=Mechanism.RSA_PKCS_OAEP,
                                         mechanism_param=_OAEP_PARAMS[oaep_hash]))
            except _REMOVED as exc:
                raise _translate(exc, "decrypt", self.label) from None
            except p11.PKCS11Error as exc:
                with _guard("open a fresh session", self.label):
                    self._renew_session()  # the TPM answers OperationActive otherwise
                if isinstance(exc, _UNSUPPORTED):
                    raise MechanismUnsupported(
                        f"Token '{self.label}' cannot RSA-OAEP-decrypt with "
                        f"{certs.oaep_hash_name(oaep_hash)}; the certificate must record a hash this "
                        "token supports (re-enrol with fusion-keys enroll).") from None
                if isinstance(exc, _BAD_CIPHERTEXT):
                    raise IntegrityError() from None
                raise _translate(exc, "decrypt", self.label) from None

    def _ecdh(self, key_id: bytes, peer_point: bytes) -> bytes:
        """The ECDH shared secret (x coordinate) of the token key with ``peer_point``: one
        C_DeriveKey into a session-only, readable secret, read, then destroyed."""
        with self._lock:
            with _guard("do ECDH", self.label):
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
            except _REMOVED as exc:
                raise _translate(exc, "do ECDH", self.label) from None
            except p11.PKCS11Error as exc:
                with _guard("open a fresh session", self.label):
                    self._renew_session()
                if isinstance(exc, _UNSUPPORTED):
                    raise MechanismUnsupported(
                        f"Token '{self.label}' cannot do ECDH (CKM_ECDH1_DERIVE) with this key, so "
                        "it cannot open streams for an EC viewer; enrol an RSA identity "
                        "(--key-type rsa).") from None
                if isinstance(exc, _BAD_CIPHERTEXT):
                    raise IntegrityError() from None
                raise _translate(exc, "do ECDH", self.label) from None

    def _probe_ecdh(self, key_id: bytes, certificate: x509.Certificate) -> bool:
        """True if the token opens an EC seal to this certificate with this key."""
        secret = secrets.token_bytes(32)
        probe = TokenIdentity(self, "probe", key_id, certificate)
        sealed = ec_seal(Recipient(certificate, OaepHash.ECDH_P256), _LABEL_EC_PROBE, secret)
        try:
            return hmac.compare_digest(ec_open(probe, _LABEL_EC_PROBE, sealed), secret)
        except TokenRemoved:
            raise
        except (MechanismUnsupported, IntegrityError, TokenError):
            return False

    def _probe_oaep(self, key_id: bytes, public: rsa.RSAPublicKey) -> OaepHash:
        """The best OAEP hash the token opens with this key: SHA-256, else SHA-1 (SoftHSM)."""
        secret = secrets.token_bytes(32)
        for oaep_hash in (OaepHash.SHA256, OaepHash.SHA1):
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

    def _oaep_hashes(self, key_id: bytes, public: rsa.RSAPublicKey) -> tuple[OaepHash, ...]:
        """Every OAEP hash the token opens with this key (best first); a removed token raises."""
        secret = secrets.token_bytes(32)
        found = []
        for oaep_hash in (OaepHash.SHA256, OaepHash.SHA1):
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

    # the public API
    def adopt(self, object_name: str | None = None, *,
              site_ca: tuple[x509.Certificate, ...] = (),
              now: datetime | None = None) -> Adoption:
        """Check an existing key + certificate (a site-issued identity, e.g. in PIV slot 9D) for
        use as a viewer: they match, the certificate is a valid viewer certificate (issued by
        ``site_ca`` when given), the token decrypts with the key, and with which OAEP hash."""
        name = object_name if object_name is not None else self._uri.object
        if name is None and self._uri.id is None:
            name = self._adoptable_label()
        ident = self.identity(name) if name is not None else self.identity()
        with self._lock:
            if isinstance(ident.public_key, ec.EllipticCurvePublicKey):
                ok = self._probe_ecdh(ident.key_id, ident.certificate)
                hashes_ok: tuple[OaepHash, ...] = (OaepHash.ECDH_P256,) if ok else ()
            else:
                hashes_ok = self._oaep_hashes(ident.key_id, ident.public_key)
        if not hashes_ok:
            # OpenSC takes a PIV key's public half from the certificate, so a certificate for
            # another key looks like a match until the card is asked to decrypt.
            raise CertificateError(f"Token '{self.label}' does not open what is encrypted to the "
                                   f"certificate of '{ident.label}' (RSA-OAEP or ECDH): "
                                   "the certificate belongs to another key, or this key cannot "
                                   "decrypt (use the key-management slot 9D); have the card's "
                                   "key certified again.")
        recorded = certs.read_oaep_hash(ident.certificate)
        if recorded is not None and recorded not in hashes_ok:
            raise CertificateError(f"The certificate of '{ident.label}' says its token opens "
                                   f"OAEP with {certs.oaep_hash_name(recorded)}, but token "
                                   f"'{self.label}' cannot; have the certificate reissued.")
        oaep_hash = recorded or hashes_ok[0]
        certs.validate_viewer_certificate(ident.certificate, now=now or datetime.now(UTC),
                                          site_ca=site_ca, oaep_hash=oaep_hash)
        result = self.selftest(ident.label)  # the full round trip, timed
        # An EC certificate needs no recorded hash: its scheme is fixed by the key type.
        return Adoption(ident.label, ident.key_id, ident.certificate, oaep_hash,
                        recorded is not None or oaep_hash.is_ec, result.decrypt_ms)

    def _adoptable_label(self) -> str:
        """The only key with a certificate; else PIV slot 9D (CKA_ID 03)."""
        candidates = [info for info in self.identities(probe=False) if info.fingerprint_hex]
        if len(candidates) == 1:
            return candidates[0].label
        piv_9d = [info for info in candidates if info.id_hex == "03"]
        if len(piv_9d) == 1:
            return piv_9d[0].label
        have = ", ".join(repr(info.label) for info in candidates) or "none"
        raise UsageError(f"Token '{self.label}' has {len(candidates)} keys with a certificate "
                         f"({have}); name one with ;object=NAME or ;id=%03 in the URI.")

    def identity(self, object_name: str | None = None) -> TokenIdentity:
        """The viewer identity named ``object_name`` (default: the URI's object or id)."""
        name = object_name if object_name is not None else self._uri.object
        key_id = None if object_name is not None else self._uri.id
        if name is None and key_id is None:
            raise UsageError("The token URI names no identity; add ;object=NAME to it.")
        with self._lock, _guard("read the identity", self.label):
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
            cert = certs.load_certificate(bytes(cert_obj[Attribute.VALUE]))
        if not certs.same_public_key(cert.public_key(), public):
            raise CertificateError(f"The certificate stored for '{label}' on token '{self.label}' "
                                   "belongs to another key; delete the identity and enrol again.")
        return TokenIdentity(self, label, key_id, cert)

    def identities(self, *, probe: bool = True) -> list[IdentityInfo]:
        """Every key on the token with its certificate details and, with ``probe``, the OAEP
        hashes the token opens with it (measured: one decrypt per hash and RSA key)."""
        result: list[IdentityInfo] = []
        to_probe: list[tuple[int, bytes, rsa.RSAPublicKey | x509.Certificate]] = []
        with self._lock, _guard("list its keys", self.label):
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
                if probe and kind == "rsa" and _attribute(key, Attribute.DECRYPT, True):
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
                    found = ((OaepHash.ECDH_P256,) if self._probe_ecdh(key_id, what) else ())
                else:
                    found = self._oaep_hashes(key_id, what)
                result[index] = replace(result[index], oaep_hashes=found)
        return sorted(result, key=lambda info: info.label)

    def supports_ec_viewers(self) -> bool:
        """Can this token make EC P-256 viewer keys and do ECDH with them?"""
        have = self._mechanisms()
        return all(m in have for m in (Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDH1_DERIVE,
                                       Mechanism.ECDSA))

    def enroll(self, name: str, *, bits: int = DEFAULT_RSA_BITS, days: int = certs.VIEWER_DAYS,
               csr: bool = False, now: datetime | None = None,
               key_type: str = "rsa") -> Enrollment:
        """Generate a viewer key pair on the token and a certificate (or CSR) signed by it.
        ``key_type`` "rsa" (``bits``) or "ec" (P-256, ECDH epoch openers)."""
        _check_name(name)
        if key_type == "ec":
            return self._enroll_ec(name, days=days, csr=csr, now=now or datetime.now(UTC))
        if key_type != "rsa":
            raise UsageError("The key type must be rsa or ec.")
        if bits not in RSA_SIZES:
            raise UsageError(f"RSA key size must be one of {', '.join(map(str, RSA_SIZES))}.")
        if not 1 <= days <= 3650:
            raise UsageError("Certificate validity must be 1 to 3650 days.")
        when = now or datetime.now(UTC)
        with self._lock, _guard("enrol a viewer identity", self.label):
            if self._objects(label=name):
                raise ObjectExists(f"Token '{self.label}' already has an object named '{name}'; "
                                   "choose another name or remove it with fusion-keys delete.")
            self._refuse_card_enrolment()
            self._require_mechanisms(Mechanism.RSA_PKCS_KEY_PAIR_GEN, Mechanism.RSA_PKCS_OAEP,
                                     purpose="make RSA viewer keys")
            self._check_key_size(bits)
            key_id = self._unused_id()
            try:
                public_obj, private_obj = self._session().generate_keypair(
                    KeyType.RSA, bits, id=key_id, label=name, store=True,
                    capabilities=(pkcs11.MechanismFlag.ENCRYPT | pkcs11.MechanismFlag.DECRYPT
                                  | pkcs11.MechanismFlag.SIGN | pkcs11.MechanismFlag.VERIFY),
                    public_template={Attribute.PRIVATE: False},
                    # The private key never leaves the token: SENSITIVE and not EXTRACTABLE
                    # (so ALWAYS_SENSITIVE / NEVER_EXTRACTABLE hold too), no UNWRAP or DERIVE.
                    private_template={Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                                      Attribute.EXTRACTABLE: False})
                public = self._rsa_public(public_obj)
                del public_obj, private_obj  # may be bound to a session _probe_oaep replaces
                oaep_hash = self._probe_oaep(key_id, public)
                signing_key = _TokenRsaKey(self, key_id, public)
                if csr:
                    request = certs.build_viewer_csr(signing_key, name, oaep_hash=oaep_hash)
                    return Enrollment(name, key_id, bits, oaep_hash, None, request)
                cert = certs.build_viewer_certificate(signing_key, name, oaep_hash=oaep_hash,
                                                      now=when, days=days)
                self._store_certificate(cert, name, key_id)
                return Enrollment(name, key_id, bits, oaep_hash, cert, None)
            except BaseException:
                self._destroy_id(key_id)  # nothing half-created is left on the token
                raise

    def _refuse_card_enrolment(self) -> None:
        if Mechanism.EC_KEY_PAIR_GEN not in self._mechanisms() and (
                Mechanism.RSA_PKCS_KEY_PAIR_GEN not in self._mechanisms()):
            raise MechanismUnsupported(
                f"Token '{self.label}' cannot generate keys through this PKCS#11 module (OpenSC's "
                "PIV driver cannot, for one). Put a key and a site-CA certificate on the card "
                "with the card's own tool (e.g. yubico-piv-tool -a generate -s 9d, then -a "
                "import-certificate -s 9d), then run fusion-keys adopt.")
        if self.kind == "ykcs11":
            raise UsageError(f"Token '{self.label}' is a PIV card (ykcs11): enrolment writes its "
                             "slot 9D and needs the card's management key as SO PIN; give "
                             "--so-pin-source FILE or set FUSION_SO_PIN.")

    def _enroll_ec(self, name: str, *, days: int, csr: bool, now: datetime) -> Enrollment:
        if not 1 <= days <= 3650:
            raise UsageError("Certificate validity must be 1 to 3650 days.")
        with self._lock, _guard("enrol a viewer identity", self.label):
            if self._objects(label=name):
                raise ObjectExists(f"Token '{self.label}' already has an object named '{name}'; "
                                   "choose another name or remove it with fusion-keys delete.")
            self._refuse_card_enrolment()
            self._require_mechanisms(Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDH1_DERIVE,
                                     Mechanism.ECDSA, purpose="make EC P-256 viewer keys")
            key_id = self._unused_id()
            try:
                public_obj, _ = self._session().generate_keypair(
                    KeyType.EC, id=key_id, label=name, store=True,
                    capabilities=pkcs11.MechanismFlag.SIGN | pkcs11.MechanismFlag.DERIVE,
                    # As for the signer: leave what the token derives itself unset (tpm2-pkcs11).
                    public_template={Attribute.EC_PARAMS: encode_named_curve_parameters(
                        "secp256r1"), Attribute.PRIVATE: False, Attribute.ENCRYPT: pkcs11.DEFAULT,
                        Attribute.WRAP: pkcs11.DEFAULT, Attribute.VERIFY: pkcs11.DEFAULT},
                    # Never leaves the token; SIGN for its own certificate, DERIVE for ECDH.
                    private_template={Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                                      Attribute.EXTRACTABLE: False, Attribute.SIGN: True,
                                      Attribute.DERIVE: True, Attribute.DECRYPT: pkcs11.DEFAULT,
                                      Attribute.UNWRAP: pkcs11.DEFAULT})
                public = _ec_public_key(public_obj[Attribute.EC_POINT])
                del public_obj
                signing_key = _TokenEcKey(self, key_id, public)
                cert = certs.build_viewer_certificate(signing_key, name,
                                                      oaep_hash=OaepHash.ECDH_P256, now=now,
                                                      days=days)
                if not self._probe_ecdh(key_id, cert):
                    raise MechanismUnsupported(
                        f"Token '{self.label}' made an EC key but cannot do ECDH with it, so it "
                        "cannot open streams; enrol with --key-type rsa.")
                if csr:
                    request = certs.build_viewer_csr(signing_key, name,
                                                     oaep_hash=OaepHash.ECDH_P256)
                    return Enrollment(name, key_id, 256, OaepHash.ECDH_P256, None, request)
                self._store_certificate(cert, name, key_id)
                return Enrollment(name, key_id, 256, OaepHash.ECDH_P256, cert, None)
            except BaseException:
                self._destroy_id(key_id)
                raise

    def import_certificate(self, cert: x509.Certificate,
                           object_name: str | None = None) -> ImportResult:
        """Store a CA-issued certificate next to the token key it belongs to."""
        public = cert.public_key()
        if not isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise CertificateError("The certificate holds neither an RSA nor an EC key, so it is "
                                   "not a viewer certificate from fusion-keys enroll --csr.")
        name = object_name if object_name is not None else self._uri.object
        with self._lock, _guard("import the certificate", self.label):
            match = None
            for key in self._private_keys(name):
                key_type = key[Attribute.KEY_TYPE]
                if key_type == KeyType.RSA:
                    mine: object = self._rsa_public(key)
                elif key_type == KeyType.EC:
                    mine = self._ec_public(bytes(key[Attribute.ID]))
                else:
                    continue
                if certs.same_public_key(mine, public):
                    match = key
                    break
            if match is None:
                where = f" '{name}'" if name else ""
                raise CertificateError(f"The certificate's public key belongs to no key{where} on "
                                       f"token '{self.label}'; it was issued for another token or "
                                       "identity.")
            label, key_id = match[Attribute.LABEL], bytes(match[Attribute.ID])
            if self._certificate_object(key_id) is not None:
                raise ObjectExists(f"'{label}' on token '{self.label}' already has a certificate; "
                                   "it is never overwritten (delete and enrol again to replace).")
            if isinstance(public, ec.EllipticCurvePublicKey):
                if not self._probe_ecdh(key_id, cert):
                    raise MechanismUnsupported(f"Token '{self.label}' cannot do ECDH with "
                                               f"'{label}', so it cannot open streams.")
                oaep_hash = OaepHash.ECDH_P256
            else:
                oaep_hash = self._probe_oaep(key_id, public)
            certs.validate_viewer_certificate(cert, now=datetime.now(UTC), oaep_hash=oaep_hash)
            self._store_certificate(cert, label, key_id)
        # EC: the key type fixes the scheme, nothing to record.
        return ImportResult(label, oaep_hash, oaep_hash.is_ec
                            or certs.read_oaep_hash(cert) is not None)

    def delete(self, object_name: str | None = None) -> int:
        """Remove an identity (certificate, private and public key); returns objects removed."""
        name = object_name if object_name is not None else self._uri.object
        if name is None:
            raise UsageError("The token URI names no identity to delete; add ;object=NAME.")
        with self._lock, _guard("delete the identity", self.label):
            objs = self._objects(label=name)
            ids = {bytes(o[Attribute.ID]) for o in objs
                   if o[Attribute.CLASS] == ObjectClass.PRIVATE_KEY}
            for key_id in ids:
                objs += self._objects(id=key_id)
                self._slot.key_cache.pop(key_id, None)
            unique = {o.handle: o for o in objs}
            if not unique:
                raise ObjectNotFound(f"Token '{self.label}' has no object named '{name}'; "
                                     "fusion-keys list shows what is there.")
            order = {ObjectClass.CERTIFICATE: 0, ObjectClass.PRIVATE_KEY: 1}
            for obj in sorted(unique.values(), key=lambda o: order.get(o[Attribute.CLASS], 2)):
                obj.destroy()
        return len(unique)

    def selftest(self, object_name: str | None = None) -> SelftestResult:
        """Wrap a random key to the certificate in software, unwrap on the token, compare."""
        ident = self.identity(object_name)
        secret = secrets.token_bytes(32)
        if isinstance(ident.public_key, ec.EllipticCurvePublicKey):
            oaep_hash = OaepHash.ECDH_P256
            sealed = ec_seal(Recipient(ident.certificate, oaep_hash), _LABEL_EC_PROBE, secret)
            start = time.perf_counter()
            try:
                opened = ec_open(ident, _LABEL_EC_PROBE, sealed)
            except IntegrityError:
                opened = b""
        else:
            recorded = certs.read_oaep_hash(ident.certificate)
            with self._lock:
                oaep_hash = recorded or self._probe_oaep(ident.key_id, ident.public_key)
            ciphertext = Recipient(ident.certificate, oaep_hash).encrypt(secret)
            start = time.perf_counter()
            try:
                opened = ident.rsa_decrypt(ciphertext, oaep_hash)
            except IntegrityError:
                opened = b""
        elapsed = (time.perf_counter() - start) * 1000
        if not hmac.compare_digest(opened, secret):
            raise TokenError(f"Self-test failed: token '{self.label}' could not open a key "
                             f"wrapped to '{ident.label}'; the token or certificate is broken.")
        return SelftestResult(ident.label, oaep_hash, ident.public_key.key_size, elapsed,
                              fingerprint(ident.certificate).hex())

    def ensure_signer(self, label: str, common_name: str) -> TokenSigner:
        """The Archiver's ECDSA P-256 signing key and self-signed certificate: load or create."""
        _check_name(label)
        with self._lock, _guard("prepare the signing key", self.label):
            keys = self._private_keys(label)
            if len(keys) > 1:
                raise ObjectExists(f"Token '{self.label}' has {len(keys)} keys named '{label}'; "
                                   "remove the extra ones.")
            if keys:
                key = keys[0]
                if key[Attribute.KEY_TYPE] != KeyType.EC:
                    raise ObjectExists(f"'{label}' on token '{self.label}' is not an EC signing "
                                       "key; choose another label.")
                key_id = bytes(key[Attribute.ID])
                public = self._ec_public(key_id)
                cert_obj = self._certificate_object(key_id)
                if cert_obj is not None:
                    cert = certs.load_certificate(bytes(cert_obj[Attribute.VALUE]))
                    if not certs.same_public_key(cert.public_key(), public):
                        raise CertificateError(f"The certificate stored for signing key '{label}' "
                                               "belongs to another key; delete both and restart.")
                    return TokenSigner(self, label, key_id, cert)
                cert = certs.build_archiver_certificate(_TokenEcKey(self, key_id, public),
                                                        common_name, now=datetime.now(UTC))
                self._store_certificate(cert, label, key_id)
                return TokenSigner(self, label, key_id, cert)
            if self._objects(label=label):
                raise ObjectExists(f"Token '{self.label}' already has an object named '{label}'; "
                                   "choose another label for the signing key.")
            self._require_mechanisms(Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA,
                                     purpose="make ECDSA signing keys")
            key_id = self._unused_id()
            try:
                public_obj, _ = self._session().generate_keypair(
                    KeyType.EC, id=key_id, label=label, store=True,
                    capabilities=pkcs11.MechanismFlag.SIGN,
                    # Leave ENCRYPT/VERIFY/DECRYPT unset: tpm2-pkcs11 rejects templates that
                    # contradict the usage it derives itself (GeneralError, a leaked TPM handle).
                    public_template={Attribute.EC_PARAMS: encode_named_curve_parameters(
                        "secp256r1"), Attribute.PRIVATE: False, Attribute.ENCRYPT: pkcs11.DEFAULT,
                        Attribute.WRAP: pkcs11.DEFAULT, Attribute.VERIFY: pkcs11.DEFAULT},
                    private_template={Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                                      Attribute.EXTRACTABLE: False, Attribute.SIGN: True,
                                      Attribute.DECRYPT: pkcs11.DEFAULT,
                                      Attribute.UNWRAP: pkcs11.DEFAULT,
                                      Attribute.DERIVE: pkcs11.DEFAULT})
                public = _ec_public_key(public_obj[Attribute.EC_POINT])
                cert = certs.build_archiver_certificate(_TokenEcKey(self, key_id, public),
                                                        common_name, now=datetime.now(UTC))
                self._store_certificate(cert, label, key_id)
            except BaseException:
                self._destroy_id(key_id)
                raise
        return TokenSigner(self, label, key_id, cert)

    def _require_mechanisms(self, *needed: Any, purpose: str) -> None:
        have = self._mechanisms()
        missing = [m.name for m in needed if m not in have]
        if missing:
            raise MechanismUnsupported(f"Token '{self.label}' cannot {purpose} (it lacks "
                                       f"{', '.join(missing)}); use another token.")

    def _check_key_size(self, bits: int) -> None:
        info = self._slot.p11token.slot.get_mechanism_info(Mechanism.RSA_PKCS_KEY_PAIR_GEN)
        low, high = info.min_key_length, info.max_key_length
        if high and not low <= bits <= high:
            raise MechanismUnsupported(f"Token '{self.label}' makes RSA keys of {low} to {high} "
                                       f"bits, not {bits}; choose another --key size.")


class TokenIdentity:
    """A viewer identity on a token; satisfies ``keyservice.identity.Identity`` (RSA keys) and
    ``EcIdentity`` (EC P-256 keys)."""

    def __init__(self, token: Token, label: str, key_id: bytes,
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
    def oaep_hash(self) -> OaepHash | None:
        if self.is_ec:
            return OaepHash.ECDH_P256
        return certs.read_oaep_hash(self.certificate)

    def ecdh(self, peer_point: bytes) -> bytes:
        """One CKM_ECDH1_DERIVE with the token key (EC identities); satisfies EcIdentity."""
        if not self.is_ec:
            raise IntegrityError()
        with self.token._lock:
            self.operations += 1
            return self.token._ecdh(self.key_id, peer_point)

    def rsa_decrypt(self, ciphertext: bytes, oaep_hash: OaepHash) -> bytes:
        """One C_Decrypt with CKM_RSA_PKCS_OAEP; any failure to open is IntegrityError."""
        with self.token._lock:  # the count stays exact when threads share this identity
            self.operations += 1
            return self.token._decrypt(self.key_id, ciphertext, oaep_hash)


class TokenSigner:
    """The Archiver's ECDSA P-256 key on its token; satisfies ``keyservice.identity.Signer``."""

    def __init__(self, token: Token, label: str, key_id: bytes,
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


# --- PIV cards -------------------------------------------------------------------------------
# CKA_ID of the PIV key slots in ykcs11 and OpenSC (9D, Key Management, is the decryption slot).
PIV_SLOT_IDS = {"9a": b"\x01", "9c": b"\x02", "9d": b"\x03", "9e": b"\x04"}


def _token_kind(p11token: Any) -> str:
    manufacturer = (p11token.manufacturer_id or "").strip()
    if manufacturer.startswith("Yubico"):
        return "ykcs11"
    if manufacturer == "piv_II":
        return "opensc-piv"
    return "generic"


def token_kind(uri: str | Pkcs11Uri) -> str:
    """The kind of token a URI names, without logging in (see ``Token.kind``)."""
    parsed = uri if isinstance(uri, Pkcs11Uri) else Pkcs11Uri.parse(uri)
    module = _load_module(resolve_module_path(parsed))
    with module.lock, _guard("read the token", parsed.token or "(unnamed)"):
        return _token_kind(_find_token(module, parsed))


@contextmanager
def _so_session(module: _Module, p11token: Any, so_pin: str, label: str,
                action: str) -> Iterator[Any]:
    """A read-write session logged in as SO (on a PIV card through ykcs11: the management key).
    A wrong one is reported at once and never retried."""
    with module.lock:
        try:
            session = p11token.open(rw=True, so_pin=so_pin)
        except (p11.PinIncorrect, p11.PinLenRange, p11.PinInvalid):
            raise PinIncorrect(f"The SO PIN (for a PIV card: the management key, 48 hex digits) "
                               f"of token '{label}' is wrong; check it (it was not retried).") from None
        except p11.PKCS11Error as exc:
            raise _translate(exc, action, label) from None
        try:
            with _guard(action, label):
                yield session
        finally:
            try:
                session.close()  # logs the SO out again
            except p11.PKCS11Error:
                pass


def enroll_piv(uri: str | Pkcs11Uri, name: str, *, so_pin: str, pin: str | None = None,
               prompt: bool = False, slot: str = "9d", bits: int = 2048,
               days: int = certs.VIEWER_DAYS, csr: bool = False,
               now: datetime | None = None, key_type: str = "rsa") -> Enrollment:
    """Enrol a viewer on a PIV card through ykcs11: a key pair generated in ``slot`` (SO login =
    management key), a certificate signed by that key (user PIN), stored in the slot (SO).

    PKCS#11 allows one login per token at a time, so the steps take turns: SO, user, SO. A key
    already in the slot is never replaced (it may be someone's identity): adopt it instead.
    """
    parsed = uri if isinstance(uri, Pkcs11Uri) else Pkcs11Uri.parse(uri)
    _check_name(name)
    key_id = PIV_SLOT_IDS.get(slot.lower())
    if key_id is None:
        raise UsageError(f"PIV slot must be one of {', '.join(PIV_SLOT_IDS)} (9d is the "
                         "key-management slot meant for decryption).")
    if not 1 <= days <= 3650:
        raise UsageError("Certificate validity must be 1 to 3650 days.")
    module = _load_module(resolve_module_path(parsed))
    with module.lock, _guard("open the token", parsed.token or "(unnamed)"):
        p11token = _find_token(module, parsed)
        label = p11token.label
        if p11token.slot.slot_id in module.slots:
            raise UsageError(f"Token '{label}' is already open in this process; close it first.")
    pin = _resolve_pin(parsed, pin, prompt, label)
    user_uri = Pkcs11Uri(token=parsed.token, serial=parsed.serial, module_path=parsed.module_path)
    # 1. user PIN first (so a wrong one costs nothing), and the slot must be free.
    with Token.open(user_uri, pin=pin) as tok, tok._lock, _guard("check the slot", label):
        if tok._private_keys(key_id=key_id):
            raise ObjectExists(f"Slot {slot} of token '{label}' already holds a key; it is never "
                               "replaced. Use it with fusion-keys adopt, or clear the slot with "
                               "the card's tool first.")
        if key_type == "rsa":
            tok._check_key_size(bits)
        elif key_type != "ec":
            raise UsageError("The key type must be rsa or ec.")
    # 2. the key pair, generated on the card (SO).
    ec_key = key_type == "ec"
    with _so_session(module, p11token, so_pin, label, "generate a key pair") as session:
        if ec_key:
            public_obj, _ = session.generate_keypair(
                KeyType.EC, id=key_id, label=name, store=True,
                capabilities=pkcs11.MechanismFlag.SIGN | pkcs11.MechanismFlag.DERIVE,
                public_template={Attribute.EC_PARAMS: encode_named_curve_parameters(
                    "secp256r1"), Attribute.PRIVATE: False},
                private_template={Attribute.PRIVATE: True, Attribute.SENSITIVE: True})
            public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey = _ec_public_key(
                public_obj[Attribute.EC_POINT])
        else:
            public_obj, _ = session.generate_keypair(
                KeyType.RSA, bits, id=key_id, label=name, store=True,
                capabilities=(pkcs11.MechanismFlag.ENCRYPT | pkcs11.MechanismFlag.DECRYPT
                              | pkcs11.MechanismFlag.SIGN | pkcs11.MechanismFlag.VERIFY),
                public_template={Attribute.PRIVATE: False},
                # ykcs11 refuses CKA_EXTRACTABLE in the template (AttributeTypeInvalid); a PIV
                # key never leaves the card anyway (tests check NEVER_EXTRACTABLE).
                private_template={Attribute.PRIVATE: True, Attribute.SENSITIVE: True})
            n = int.from_bytes(public_obj[Attribute.MODULUS], "big")
            e = int.from_bytes(public_obj[Attribute.PUBLIC_EXPONENT], "big")
            public = rsa.RSAPublicNumbers(e, n).public_key()
    # 3. which scheme works, and the certificate signed by the new key (user PIN).
    with Token.open(user_uri, pin=pin) as tok, tok._lock:
        key_label = tok._one_private_key(None, key_id)[Attribute.LABEL]
        signing_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
        if isinstance(public, ec.EllipticCurvePublicKey):
            oaep_hash = OaepHash.ECDH_P256
            signing_key = _TokenEcKey(tok, key_id, public)
            probe_cert = certs.build_viewer_certificate(signing_key, name, oaep_hash=oaep_hash,
                                                        now=now or datetime.now(UTC), days=days)
            if not tok._probe_ecdh(key_id, probe_cert):
                raise MechanismUnsupported(f"Token '{label}' cannot do ECDH with the new key; "
                                           "enrol with --key-type rsa.")
            bits = 256
        else:
            oaep_hash = tok._probe_oaep(key_id, public)
            signing_key = _TokenRsaKey(tok, key_id, public)
        if csr:
            request = certs.build_viewer_csr(signing_key, name, oaep_hash=oaep_hash)
            return Enrollment(key_label, key_id, bits, oaep_hash, None, request)
        cert = certs.build_viewer_certificate(signing_key, name, oaep_hash=oaep_hash,
                                              now=now or datetime.now(UTC), days=days)
    # 4. the certificate into the slot, replacing ykcs11's placeholder (SO).
    with _so_session(module, p11token, so_pin, label, "store the certificate") as session:
        session.create_object(_certificate_template(cert, key_label, key_id))
    return Enrollment(key_label, key_id, bits, oaep_hash, cert, None)


# --- creating tokens in this process (tests, developer setups) --------------------------------
def init_token(module_path: str, label: str, *, so_pin: str, pin: str) -> None:
    """Initialise the token in the first free slot, inside this process, and set its user PIN.

    SoftHSM reads its token directory once, at C_Initialize: a token made afterwards by
    softhsm2-util in another process stays invisible to this one. Initialising in-process (the
    free slot SoftHSM always offers) avoids that; the test fixtures rely on it.
    """
    raw_label = label.encode("utf-8")
    if not raw_label or len(raw_label) > 32:
        raise UsageError("A token label must have 1 to 32 bytes.")
    path = resolve_module_path(Pkcs11Uri(module_path=module_path))
    module = _load_module(path)
    with module.lock, _guard("initialise a token", label):
        if any(t.label == label for t in module.lib.get_tokens()):
            raise ObjectExists(f"A token labelled '{label}' already exists; choose another label.")
        free = [s for s in module.lib.get_slots(token_present=True)
                if not s.get_token().flags & TokenFlag.TOKEN_INITIALIZED]
        if not free:
            raise TokenError(f"Module {path} has no free slot to initialise a token in.")
        # python-pkcs11 has no C_InitToken; the module is already loaded, so dlopen returns the
        # same instance and this call acts on the same initialised library.
        init: Callable[..., int] = ctypes.CDLL(path).C_InitToken
        init.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        init.restype = ctypes.c_ulong
        so = so_pin.encode("utf-8")
        rv = init(free[0].slot_id, so, len(so), raw_label.ljust(32, b" "))
        if rv != 0:
            raise TokenError(f"Initialising token '{label}' failed (CKR 0x{rv:x}); check the SO "
                             "PIN length (4 to 255 for SoftHSM).")
        created = module.lib.get_token(token_label=label)
        with created.open(rw=True, so_pin=so_pin) as session:
            session.init_pin(pin)
