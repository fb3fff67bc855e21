"""The crypto core of fusion stream format v2, one module per protocol:

- ``keyservice.crypto.segments``: period keys (``PeriodKey``), sealing and opening segments, key commitments;
- ``keyservice.crypto.chains``: key chains (the Archiver's ``KeyChain``, the viewer's
  ``ChainDeriver``) and the one-day bound on ratchets;
- ``keyservice.crypto.ratchet``: the per-viewer KEK ratchet, epoch openers and chain records;
- ``keyservice.crypto.login``: login challenges and proofs of possession;
- the key wrap per scheme (RSA-OAEP, ECDH-P256) is ``keyservice.keyscheme``, and every label
  is in ``keyservice.labels``.

Built from ``cryptography`` primitives only (AES-256-GCM, HKDF-SHA256, HMAC-SHA256, key wrap
through ``Recipient``/``Identity``). Clocks are millisecond integers passed in and randomness
is an injectable ``rng(n) -> bytes`` (``os.urandom`` by default), so tests and test vectors are
deterministic. Every decryption or verification failure is the opaque ``IntegrityError``.
Pure: no I/O, no ``pkcs11``.

Deprecated: importing from ``keyservice.crypto`` itself. This package re-exports every name it
had as one module (before issue 24), so old imports keep working; new code imports from the
submodule that owns the name (and labels from ``keyservice.labels``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below, for type checkers; at run time each loads on first use
    from keyservice.crypto.chains import (
        EPOCH_MAX_SECONDS,
        ChainDeriver,
        KeyChain,
        chain_key_id,
        chain_minute_key,
        chain_step,
        max_ratchet_index,
        split_key_id,
    )
    from keyservice.crypto.login import (
        SECRET_LEN,
        LoginChallenge,
        admin_login_context,
        answer_login_challenge,
        login_context,
        make_login_challenge,
        verify_login_proof,
    )
    from keyservice.crypto.ratchet import (
        Epoch,
        KekRatchet,
        chain_record_ad,
        open_epoch_opener,
        ratchet_kek,
        unwrap_chain_record,
    )
    from keyservice.crypto.segments import (
        PeriodKey,
        Rng,
        key_commitment,
        new_minute_key,
        open_segment,
        seal_segment,
        segment_ad,
        segment_nonce,
    )
    from keyservice.keyscheme import EC_POINT_LEN, ec_open, ec_seal
    from keyservice.labels import (
        LABEL_ADMIN_LOGIN_CONTEXT,
        LABEL_CHAIN_KEY,
        LABEL_CHAIN_RECORD,
        LABEL_CHAIN_STEP,
        LABEL_EC_EPOCH_OPENER,
        LABEL_EC_LOGIN_CHALLENGE,
        LABEL_EC_SALT,
        LABEL_EPOCH_OPENER,
        LABEL_KEK_RATCHET,
        LABEL_KEY_COMMITMENT,
        LABEL_LOGIN_CHALLENGE,
        LABEL_LOGIN_CONTEXT,
        LABEL_LOGIN_PROOF,
        LABEL_SEGMENT,
    )

    MinuteKey = PeriodKey

# Which module owns each re-exported name: imported on first use (issue 23), so that importing
# one submodule (keyservice.crypto.segments) does not load the package's every protocol.
_OWNERS: dict[str, tuple[str, ...]] = {
    "keyservice.crypto.chains": (
        "ChainDeriver", "EPOCH_MAX_SECONDS", "KeyChain", "chain_key_id", "chain_minute_key", "chain_step",
        "max_ratchet_index", "split_key_id",
    ),
    "keyservice.crypto.login": (
        "LoginChallenge", "SECRET_LEN", "admin_login_context", "answer_login_challenge", "login_context",
        "make_login_challenge", "verify_login_proof",
    ),
    "keyservice.crypto.ratchet": (
        "Epoch", "KekRatchet", "chain_record_ad", "open_epoch_opener", "ratchet_kek",
        "unwrap_chain_record",
    ),
    "keyservice.crypto.segments": (
        "PeriodKey", "Rng", "key_commitment", "new_minute_key", "open_segment", "seal_segment",
        "segment_ad", "segment_nonce",
    ),
    "keyservice.keyscheme": (
        "EC_POINT_LEN", "ec_open", "ec_seal",
    ),
    "keyservice.labels": (
        "LABEL_ADMIN_LOGIN_CONTEXT", "LABEL_CHAIN_KEY", "LABEL_CHAIN_RECORD", "LABEL_CHAIN_STEP",
        "LABEL_EC_EPOCH_OPENER", "LABEL_EC_LOGIN_CHALLENGE", "LABEL_EC_SALT", "LABEL_EPOCH_OPENER",
        "LABEL_KEK_RATCHET", "LABEL_KEY_COMMITMENT", "LABEL_LOGIN_CHALLENGE", "LABEL_LOGIN_CONTEXT",
        "LABEL_LOGIN_PROOF", "LABEL_SEGMENT",
    ),
}
_WHERE = {name: module for module, names in _OWNERS.items() for name in names}

# Deprecated name (issue 24's glossary): a period key was called a minute key, from the 60 s
# default key period.
_ALIASES = {"MinuteKey": "PeriodKey"}

__all__ = [
    "EC_POINT_LEN", "EPOCH_MAX_SECONDS", "LABEL_ADMIN_LOGIN_CONTEXT", "LABEL_CHAIN_KEY",
    "LABEL_CHAIN_RECORD", "LABEL_CHAIN_STEP", "LABEL_EC_EPOCH_OPENER", "LABEL_EC_LOGIN_CHALLENGE",
    "LABEL_EC_SALT", "LABEL_EPOCH_OPENER", "LABEL_KEK_RATCHET", "LABEL_KEY_COMMITMENT",
    "LABEL_LOGIN_CHALLENGE", "LABEL_LOGIN_CONTEXT", "LABEL_LOGIN_PROOF", "LABEL_SEGMENT",
    "SECRET_LEN", "ChainDeriver", "Epoch", "KekRatchet", "KeyChain", "LoginChallenge",
    "MinuteKey", "PeriodKey", "Rng", "admin_login_context", "answer_login_challenge", "chain_key_id",
    "chain_minute_key", "chain_record_ad", "chain_step", "ec_open", "ec_seal", "key_commitment",
    "login_context", "make_login_challenge", "max_ratchet_index", "new_minute_key",
    "open_epoch_opener", "open_segment", "ratchet_kek", "seal_segment", "segment_ad",
    "segment_nonce", "split_key_id", "unwrap_chain_record", "verify_login_proof",
]


def __getattr__(name: str) -> Any:
    owner = _WHERE.get(_ALIASES.get(name, name))
    if owner is None:
        raise AttributeError(f"module 'keyservice.crypto' has no attribute {name!r}")
    value = getattr(importlib.import_module(owner), _ALIASES.get(name, name))
    globals()[name] = value  # once: the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
