"""Every domain-separation label of the fusion stream format, in one place.

Each derivation, AEAD, signature and wrapped key carries its own label, so a value made for
one purpose is never accepted for another (an epoch opener is not a login challenge, a
manifest signature is not an expiry statement). The byte values are part of the format
(docs/spec/fusion-stream-v2.md, "All labels") and of the test vectors: never change one;
a new purpose gets a new label.

``WrapContext`` names what a wrapped key is for. The two key schemes spell it differently
(``keyservice.keyscheme``): RSA-OAEP puts it in front of the key inside the OAEP plaintext,
ECDH-P256 uses it as the HKDF info of the wrapping key. Both spellings are fixed by the format,
so a context carries both.

Pure data: no I/O, no imports from the rest of the package.
"""

from __future__ import annotations

from dataclasses import dataclass

from keyservice.records import FrozenRecord

# --- key chains, segments, the KEK ratchet (keyservice.chains, .segments, .ratchet) --------
LABEL_CHAIN_RECORD = b"FSE2 chain-record"
LABEL_CHAIN_KEY = b"FSE2 chain-minute-key\x00"
LABEL_CHAIN_STEP = b"FSE2 chain-step\x00"
LABEL_KEK_RATCHET = b"FSE1 kek-ratchet"
LABEL_SEGMENT = b"FSE1 segment"
LABEL_KEY_COMMITMENT = b"FSE1 key-commitment"

# --- signed records and the transcript (keyservice.format, keyservice.framing) ------------
LABEL_MANIFEST = b"FSE1 manifest\x00"
LABEL_END = b"FSE1 end\x00"
LABEL_CHAIN_RECIPIENTS = b"FSE2 chain-recipients\x00"
# A join statement: a viewer given a running chain from a later step (issue 23).
LABEL_CHAIN_JOIN = b"FSE2 chain-join\x00"
LABEL_TRANSCRIPT = b"FSE1 transcript\x00"
# The Archiver's signed statement that a range has expired (keyservice.expiry).
LABEL_EXPIRY_STATEMENT = b"FSE1 expired\x00"
# An evidence package of several parts (a range across a change of Archiver): each part's
# request nonce is derived from the package, so each Archiver's signed header binds its part's
# place in it (keyservice.evidence.parts).
LABEL_EVIDENCE_PART = b"FSE1 evidence-part\x00"
# One Archiver's signed ask for another's records of a range (archiver/consolidation.py).
LABEL_CONSOLIDATION_REQUEST = b"FSE2 consolidation-request\x00"

# --- wrapped keys: RSA-OAEP plaintext prefixes --------------------------------------------
LABEL_EPOCH_OPENER = b"FSE1 epoch-opener\x00"
LABEL_LOGIN_CHALLENGE = b"FSE1 login-challenge\x00"
LABEL_GRANT_KEK = b"FSE1 grant-kek\x00"
# Evidence packages use one label for both schemes (the ECDH info appends the fingerprint).
LABEL_EVIDENCE_KEY = b"FSE1 evidence-key\x00"

# --- wrapped keys: ECDH-P256 HKDF infos and salt ------------------------------------------
LABEL_EC_EPOCH_OPENER = b"FSE1 ec-epoch-opener\x00"
LABEL_EC_LOGIN_CHALLENGE = b"FSE1 ec-login-challenge\x00"
LABEL_EC_GRANT_KEK = b"FSE1 ec-grant-kek\x00"
LABEL_EC_TOKEN_PROBE = b"FSE1 ec-token-probe\x00"  # self-test and probe seals on a token
LABEL_EC_SALT = b"FSE1 ec-p256"

# --- AEAD associated data of grants and evidence -----------------------------------------
LABEL_GRANT_KEY = b"FSE1 grant-key"
LABEL_EVIDENCE_KEYS_AD = b"FSE1 evidence-keys"

# --- login ---------------------------------------------------------------------------------
LABEL_LOGIN_PROOF = b"FSE1 login-proof"
LABEL_LOGIN_CONTEXT = b"FSE1 login\x00"
LABEL_ADMIN_LOGIN_CONTEXT = b"FSE1 admin login\x00"


@dataclass(eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class WrapContext(FrozenRecord):
    """What a wrapped key is for, as each key scheme binds it.

    ``oaep_prefix``: RSA-OAEP wraps ``oaep_prefix || key``; unwrapping checks the prefix.
    ``ecdh_info``: ECDH-P256 derives the AES key-wrap key with this HKDF info, so a key wrapped
    for another purpose derives another key and fails to unwrap.
    """

    oaep_prefix: bytes
    ecdh_info: bytes


def epoch_opener_context(epoch_id: bytes) -> WrapContext:
    """KEK0 of one epoch: the epoch id stops an opener from being moved to another epoch."""
    return WrapContext(LABEL_EPOCH_OPENER + epoch_id, LABEL_EC_EPOCH_OPENER + epoch_id)


# The login challenge's secret (bound to nothing else: the proof binds the session).
LOGIN_CHALLENGE_CONTEXT = WrapContext(LABEL_LOGIN_CHALLENGE, LABEL_EC_LOGIN_CHALLENGE)


def grant_kek_context(grant_id: bytes) -> WrapContext:
    """The KEK of one access grant, bound to its grant id."""
    return WrapContext(LABEL_GRANT_KEK + grant_id, LABEL_EC_GRANT_KEK + grant_id)


def evidence_key_context(recipient_fingerprint: bytes) -> WrapContext:
    """The package key of an evidence export (the ECDH info also names the recipient)."""
    return WrapContext(LABEL_EVIDENCE_KEY, LABEL_EVIDENCE_KEY + recipient_fingerprint)


# A token's self-test and scheme probe: RSA-OAEP wraps the bare secret (the probe measures
# which OAEP hash the token opens, nothing else is ever wrapped without a label).
TOKEN_PROBE_CONTEXT = WrapContext(b"", LABEL_EC_TOKEN_PROBE)
