"""The PKCS#11 session layer: modules, slots, sessions, the per-module lock, error mapping.

Rules enforced here (measured on SoftHSM 2.6 and tpm2-pkcs11 1.9, see docs/tokens.md):
- one ``pkcs11.lib`` per module path per process, and every PKCS#11 call serialized through one
  lock per module: python-pkcs11 0.10 initialises modules without OS locking and releases the
  GIL, and SoftHSM crashes under concurrent threads;
- log in once per token per process (a second C_Login fails with UserAlreadyLoggedIn), and never
  retry a wrong PIN: tokens lock after a few failures;
- every ``pkcs11`` exception is mapped to the error family of ``keyservice.errors``.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import secrets
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pkcs11
from asn1crypto.core import OctetString as Asn1OctetString
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Mechanism, TokenFlag
from pkcs11 import exceptions as p11
from pkcs11.mechanisms import MGF

from keyservice.errors import (
    KeyServiceError,
    MechanismUnsupported,
    ModuleNotFound,
    ObjectExists,
    PinIncorrect,
    PinLocked,
    TokenError,
    TokenNotFound,
    TokenRemoved,
    UsageError,
)
from keyservice.keyscheme import KeyScheme
from keyservice.pkcs11uri import DEFAULT_MODULE, Pkcs11Uri

OAEP_PARAMS = {
    KeyScheme.RSA_OAEP_SHA1: (Mechanism.SHA_1, MGF.SHA1, None),
    KeyScheme.RSA_OAEP_SHA256: (Mechanism.SHA256, MGF.SHA256, None),
}
# DER prefix of a SHA-256 DigestInfo, for tokens (PIV cards) that only offer raw CKM_RSA_PKCS.
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
REMOVED = (p11.DeviceRemoved, p11.TokenNotPresent, p11.SessionHandleInvalid, p11.SessionClosed)
# What a token answers to a ciphertext it cannot open (GeneralError: tpm2-pkcs11).
BAD_CIPHERTEXT = (p11.EncryptedDataInvalid, p11.EncryptedDataLenRange, p11.DataInvalid,
                   p11.DataLenRange, p11.GeneralError, p11.FunctionFailed)
# What a token answers to a mechanism or parameter it does not support (SoftHSM: ArgumentsBad).
UNSUPPORTED = (p11.ArgumentsBad, p11.MechanismInvalid, p11.MechanismParamInvalid,
                p11.FunctionNotSupported)


# --- error mapping ---------------------------------------------------------------------------
def translate(exc: Exception, action: str, label: str) -> KeyServiceError:
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
    if isinstance(exc, REMOVED):
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
def guard(action: str, label: str) -> Iterator[None]:
    try:
        yield
    except KeyServiceError:
        raise
    except p11.PKCS11Error as exc:
        raise translate(exc, action, label) from None
    except NotImplementedError:  # python-pkcs11: an attribute type it cannot handle
        raise TokenError(f"Token '{label}' returned data this program cannot read while trying "
                         f"to {action}.") from None


# --- modules, slots, sessions ----------------------------------------------------------------
# eq/repr off: process state compared by identity and never printed; each generated
# method is compiled at every start (issue 23, start-up).
@dataclass(eq=False, repr=False)
class TokenSlot:
    """Process-wide state of one token: the session that logged in, and the working session.

    python-pkcs11 calls C_Logout when it closes the session that logged in, which logs out every
    session of the token. So that session (the anchor) stays open until the token is closed, and
    a failed operation only replaces the working session (a fresh, already-logged-in one).
    """

    module: LoadedModule
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


@dataclass(eq=False, repr=False)  # as TokenSlot
class LoadedModule:
    path: str
    lib: Any
    lock: threading.RLock = field(default_factory=threading.RLock)
    slots: dict[int, TokenSlot] = field(default_factory=dict)


_modules: dict[str, LoadedModule] = {}
_registry_lock = threading.Lock()


def resolve_module_path(uri: Pkcs11Uri) -> str:
    """The module file to load: URI module-path, else $FUSION_PKCS11_MODULE, else SoftHSM."""
    path = uri.module_path or os.environ.get("FUSION_PKCS11_MODULE") or DEFAULT_MODULE
    if not os.path.isfile(path):
        hint = " (apt-get install softhsm2)" if "softhsm" in path else ""
        raise ModuleNotFound(f"The PKCS#11 module {path} does not exist; install it{hint} or fix "
                             "module-path in the token URI.")
    return os.path.realpath(path)


def load_module(path: str) -> LoadedModule:
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
        _clear_openssl_errors()
        module = LoadedModule(path=path, lib=lib)
        _modules[path] = module
        return module


def _clear_openssl_errors() -> None:
    """Empties this thread's OpenSSL error queue after a module's C_Initialize.

    SoftHSM 2.6 probes the "rdrand" engine at initialisation and leaves the failure on the
    queue of the system's libcrypto (fixed upstream in SoftHSMv2 pull request 859). Python's
    ssl module uses that same libcrypto, and a stale entry makes the next TLS handshake in this
    thread fail with NO_SUCH_ENGINE: an admin or viewer that enrols a key and then talks to an
    Archiver over HTTPS in one process could not connect."""
    try:
        libcrypto = ctypes.CDLL("libcrypto.so.3")
    except OSError:  # another OpenSSL generation: nothing of ours shares its queue
        return
    libcrypto.ERR_clear_error()


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


def open_session(p11token: Any, user_pin: object | None, rw: bool) -> tuple[Any, bool]:
    """Open a session, logging in when user_pin is given; RW if the token allows it."""
    if rw:
        try:
            return p11token.open(rw=True, user_pin=user_pin), True
        except (p11.TokenWriteProtected, p11.SessionReadOnly):
            pass
    # NB: if C_Login fails, python-pkcs11 leaves the just-opened session open until C_Finalize;
    # harmless, and the wrong PIN is reported at once and never retried.
    return p11token.open(rw=False, user_pin=user_pin), False


def _is_softhsm(path: str) -> bool:
    return "softhsm" in os.path.basename(str(path)).lower()


def softhsm_conf_hint() -> str:
    """Where SoftHSM looked for tokens: a new shell without SOFTHSM2_CONF reads the system's
    configuration, not the directory the token was created in."""
    conf = os.environ.get("SOFTHSM2_CONF")
    where = (f"SOFTHSM2_CONF is {conf}" if conf else
             "SOFTHSM2_CONF is not set, so the system's /etc/softhsm/softhsm2.conf was read")
    return (f"SoftHSM finds its tokens through SOFTHSM2_CONF ({where}); export SOFTHSM2_CONF="
            "DIR/softhsm2.conf of the directory the token was made in (fusion-keys softhsm-init "
            "prints the line), in this shell too.")


def find_token(module: LoadedModule, uri: Pkcs11Uri) -> Any:
    tokens = [t for t in module.lib.get_tokens()
              if t.flags & TokenFlag.TOKEN_INITIALIZED]
    labels = sorted(t.label for t in tokens)
    found = [t for t in tokens
             if (uri.token is None or t.label == uri.token)
             and (uri.serial is None or t.serial.decode("ascii", "replace").strip() == uri.serial)]
    if not tokens:  # a card reader without a card looks like this
        if _is_softhsm(module.path):
            raise TokenNotFound(f"No token is present in module {module.path}: "
                                f"{softhsm_conf_hint()}")
        raise TokenNotFound(f"No token is present in module {module.path}: insert the card and "
                            "try again (for SoftHSM: create the token with fusion-keys "
                            "softhsm-init).")
    if not found:
        what = f"token '{uri.token}'" if uri.token else "token"
        if uri.serial:
            what += f" with serial {uri.serial}"
        have = ", ".join(repr(label) for label in labels) or "none"
        hint = f" {softhsm_conf_hint()}" if _is_softhsm(module.path) else ""
        raise TokenNotFound(f"No {what} in module {module.path} (tokens present: {have}); check "
                            f"token= in the URI, or create it (fusion-keys softhsm-init).{hint}")
    if len(found) > 1:
        raise TokenNotFound(f"{len(found)} tokens match the URI ({', '.join(labels)}); add "
                            "token=LABEL or serial=SERIAL to choose one.")
    return found[0]


def resolve_pin(uri: Pkcs11Uri, pin: str | None, prompt: bool, label: str,
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
        import getpass  # here: only a prompt needs it (a PIN given is never prompted for)

        return getpass.getpass(f"PIN for token '{label}': ")
    raise TokenError(f"No PIN given for token '{label}'; add pin-source=FILE (or pin-value) to "
                     "the token URI, set FUSION_PIN, or run the command interactively.")


def ec_public_key(raw: bytes) -> ec.EllipticCurvePublicKey:
    # CKA_EC_POINT is a DER OCTET STRING around the point (some modules return the bare point).
    try:
        point = raw if len(raw) == 65 and raw[0] == 4 else Asn1OctetString.load(raw).native
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except (ValueError, TypeError):
        raise TokenError("The token returned an EC public key that is not a P-256 point; use a "
                         "token that supports P-256.") from None


def read_attribute(obj: Any, attribute: Any, default: Any) -> Any:
    """An attribute some modules do not report (then ``default``)."""
    try:
        return obj[attribute]
    except (p11.PKCS11Error, NotImplementedError):
        return default


def kind_of_token(p11token: Any) -> str:
    manufacturer = (p11token.manufacturer_id or "").strip()
    if manufacturer.startswith("Yubico"):
        return "ykcs11"
    if manufacturer == "piv_II":
        return "opensc-piv"
    return "generic"


def token_kind(uri: str | Pkcs11Uri) -> str:
    """The kind of token a URI names, without logging in (see ``Token.kind``)."""
    parsed = uri if isinstance(uri, Pkcs11Uri) else Pkcs11Uri.parse(uri)
    module = load_module(resolve_module_path(parsed))
    with module.lock, guard("read the token", parsed.token or "(unnamed)"):
        return kind_of_token(find_token(module, parsed))


@contextmanager
def so_session(module: LoadedModule, p11token: Any, so_pin: str, label: str,
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
            raise translate(exc, action, label) from None
        try:
            with guard(action, label):
                yield session
        finally:
            try:
                session.close()  # logs the SO out again
            except p11.PKCS11Error:
                pass


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
    module = load_module(path)
    with module.lock, guard("initialise a token", label):
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
