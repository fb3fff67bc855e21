"""The PKCS#11 token layer: the only package that imports ``pkcs11`` (tests/test_lint.py checks it).

Viewer private keys are generated inside a token (smartcard, TPM, HSM; SoftHSM for development)
and never leave it: this layer asks the token to RSA-decrypt epoch openers (or do ECDH) and to
sign, nothing more. It also holds the Archiver's own ECDSA signing key.

- ``session``: modules, slots, sessions, the per-module lock, PIN resolution, error mapping;
- ``runtime``: ``RuntimeToken`` (open, identity, decrypt, ECDH, sign), ``TokenIdentity``,
  ``TokenSigner`` (the one-method ``Identity`` of ``keyservice.keyscheme`` / ``Signer``);
- ``provisioning``: ``Token`` = the runtime path plus enrol, import, adopt, delete, self-test and
  the Archiver's signer set-up; ``keys``: token-backed keys for certificate builders;
- ``piv``: enrolment into the fixed key slots of a PIV card (ykcs11).
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below, for type checkers; at run time each loads on first use
    from keyservice.token.keys import TokenEcKey
    from keyservice.token.piv import PIV_SLOT_IDS, enroll_piv
    from keyservice.token.provisioning import (
        DEFAULT_RSA_BITS,
        RSA_SIZES,
        Adoption,
        Enrollment,
        ImportResult,
        SelftestResult,
        Token,
    )
    from keyservice.token.runtime import IdentityInfo, RuntimeToken, TokenIdentity, TokenSigner
    from keyservice.token.session import (
        init_token,
        pin_tries_note,
        resolve_module_path,
        token_kind,
        unload_module,
    )

# Which module owns each re-exported name: imported on first use (issue 23), so that a
# program importing one submodule does not load every other.
_OWNERS: dict[str, tuple[str, ...]] = {
    "keyservice.token.keys": (
        "TokenEcKey",
    ),
    "keyservice.token.piv": (
        "PIV_SLOT_IDS", "enroll_piv",
    ),
    "keyservice.token.provisioning": (
        "Adoption", "DEFAULT_RSA_BITS", "Enrollment", "ImportResult", "RSA_SIZES", "SelftestResult",
        "Token",
    ),
    "keyservice.token.runtime": (
        "IdentityInfo", "RuntimeToken", "TokenIdentity", "TokenSigner",
    ),
    "keyservice.token.session": (
        "init_token", "pin_tries_note", "resolve_module_path", "token_kind", "unload_module",
    ),
}
_WHERE = {name: module for module, names in _OWNERS.items() for name in names}

__all__ = [
    "DEFAULT_RSA_BITS",
    "PIV_SLOT_IDS",
    "RSA_SIZES",
    "Adoption",
    "Enrollment",
    "IdentityInfo",
    "ImportResult",
    "RuntimeToken",
    "SelftestResult",
    "Token",
    "TokenEcKey",
    "TokenIdentity",
    "TokenSigner",
    "enroll_piv",
    "init_token",
    "pin_tries_note",
    "resolve_module_path",
    "token_kind",
    "unload_module",
]


def __getattr__(name: str) -> Any:
    owner = _WHERE.get(name)
    if owner is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(owner), name)
    globals()[name] = value  # once: the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
