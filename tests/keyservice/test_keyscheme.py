"""One key interface (issue 24, item 1): a Recipient wraps, an Identity unwraps, for RSA-OAEP
and ECDH-P256 alike, on a token or in memory; any failure to unwrap is one opaque error; only
the scheme module tells RSA from EC; every label lives in keyservice/labels.py."""

from __future__ import annotations

import ast
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keyservice import certs, labels
from keyservice.crypto import Epoch, answer_login_challenge, make_login_challenge, open_epoch_opener
from keyservice.errors import IntegrityError
from keyservice.grants import GrantKey, make_grant, open_grant
from keyservice.identity import OaepHash, SoftwareEcIdentity, SoftwareIdentity
from keyservice.keyscheme import (
    Identity,
    IncorrectIdentity,
    KeyScheme,
    Recipient,
    WrappedKey,
)
from keyservice.token import Token
from tests.fixtures.tokens import TokenHandle

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime.now(UTC)
T = 1_750_000_000_000


def rsa_identity(name: str = "rita") -> SoftwareIdentity:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = certs.build_viewer_certificate(key, name, oaep_hash=KeyScheme.RSA_OAEP_SHA256, now=NOW)
    return SoftwareIdentity(cert, key)


def ec_identity(name: str = "eve") -> SoftwareEcIdentity:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certs.build_viewer_certificate(key, name, oaep_hash=KeyScheme.ECDH_P256, now=NOW)
    return SoftwareEcIdentity(cert, key)


def scheme_of(identity: SoftwareIdentity | SoftwareEcIdentity) -> KeyScheme:
    return KeyScheme.of_certificate(identity.certificate, KeyScheme.RSA_OAEP_SHA256)


# --- the one interface --------------------------------------------------------------------
@pytest.mark.parametrize("make", [rsa_identity, ec_identity], ids=["rsa-oaep", "ecdh-p256"])
def test_recipient_wraps_and_identity_unwraps_for_both_schemes(
        make: Callable[[], SoftwareIdentity | SoftwareEcIdentity]) -> None:
    identity = make()
    assert isinstance(identity, Identity)
    recipient = Recipient(identity.certificate, scheme_of(identity))
    key = os.urandom(32)
    context = labels.grant_kek_context(os.urandom(16))
    wrapped = recipient.wrap(key, context)
    assert wrapped.scheme is recipient.scheme
    assert identity.unwrap(wrapped, context) == key
    assert identity.operations == 1  # one private-key operation per unwrap


def _refusals(identity: SoftwareIdentity | SoftwareEcIdentity,
              stranger: SoftwareIdentity | SoftwareEcIdentity,
              other_kind: SoftwareIdentity | SoftwareEcIdentity) -> dict[str, Callable[[], bytes]]:
    """Every way an unwrap can be wrong, for ``identity``."""
    context = labels.epoch_opener_context(b"e" * 16)
    mine = Recipient(identity.certificate, scheme_of(identity)).wrap(os.urandom(32), context)
    theirs = Recipient(stranger.certificate, scheme_of(stranger)).wrap(os.urandom(32), context)
    other = Recipient(other_kind.certificate, scheme_of(other_kind)).wrap(os.urandom(32),
                                                                          context)
    flipped = bytearray(mine.body)
    flipped[-3] ^= 0x01
    return {
        "another purpose": lambda: identity.unwrap(mine, labels.LOGIN_CHALLENGE_CONTEXT),
        "another epoch": lambda: identity.unwrap(mine, labels.epoch_opener_context(b"f" * 16)),
        "another key, same scheme": lambda: identity.unwrap(theirs, context),
        "another scheme's key": lambda: identity.unwrap(other, context),
        "relabelled scheme": lambda: identity.unwrap(WrappedKey(other.scheme, mine.body), context),
        "altered bytes": lambda: identity.unwrap(WrappedKey(mine.scheme, bytes(flipped)), context),
        "truncated": lambda: identity.unwrap(WrappedKey(mine.scheme, mine.body[:-1]), context),
        "empty": lambda: identity.unwrap(WrappedKey(mine.scheme, b""), context),
    }


@pytest.mark.parametrize("kind", ["rsa-oaep", "ecdh-p256"])
def test_every_wrong_unwrap_is_one_opaque_error(kind: str) -> None:
    rsa_a, rsa_b, ec_a, ec_b = rsa_identity("a"), rsa_identity("b"), ec_identity("c"), ec_identity("d")
    identity, stranger, other = (rsa_a, rsa_b, ec_a) if kind == "rsa-oaep" else (ec_a, ec_b, rsa_a)
    messages = set()
    for why, attempt in _refusals(identity, stranger, other).items():
        with pytest.raises(IncorrectIdentity) as refused:
            attempt()
        assert type(refused.value) is IncorrectIdentity, why
        messages.add(str(refused.value))
    assert len(messages) == 1  # nothing tells one failure from another
    assert issubclass(IncorrectIdentity, IntegrityError)  # every caller's opaque failure


def test_token_identities_unwrap_and_refuse_alike(softhsm_token: TokenHandle) -> None:
    """The same protocol on a real SoftHSM token: an RSA key (SHA-1 OAEP, SoftHSM's only) and an
    EC P-256 key; each refuses the other's wrapped key and another purpose with IncorrectIdentity."""
    with Token.open(softhsm_token.uri) as tok:
        rsa_scheme = tok.enroll("tok-rsa", key_type="rsa", bits=2048).oaep_hash
        tok.enroll("tok-ec", key_type="ec")
        rsa_ident, ec_ident = tok.identity("tok-rsa"), tok.identity("tok-ec")
        context = labels.grant_kek_context(b"g" * 16)
        for ident, scheme in ((rsa_ident, rsa_scheme), (ec_ident, KeyScheme.ECDH_P256)):
            assert isinstance(ident, Identity)
            key = os.urandom(32)
            wrapped = Recipient(ident.certificate, scheme).wrap(key, context)
            assert ident.unwrap(wrapped, context) == key
            with pytest.raises(IncorrectIdentity):
                ident.unwrap(wrapped, labels.LOGIN_CHALLENGE_CONTEXT)
        to_rsa = Recipient(rsa_ident.certificate, rsa_scheme).wrap(os.urandom(32), context)
        to_ec = Recipient(ec_ident.certificate, KeyScheme.ECDH_P256).wrap(os.urandom(32), context)
        with pytest.raises(IncorrectIdentity):
            ec_ident.unwrap(to_rsa, context)
        with pytest.raises(IncorrectIdentity):
            rsa_ident.unwrap(to_ec, context)
        assert tok.identity("tok-rsa").unwrap(to_rsa, context)  # the token still works


@pytest.mark.parametrize("make", [rsa_identity, ec_identity], ids=["rsa-oaep", "ecdh-p256"])
def test_openers_challenges_and_grants_use_the_interface(
        make: Callable[[], SoftwareIdentity | SoftwareEcIdentity]) -> None:
    identity = make()
    recipient = Recipient(identity.certificate, scheme_of(identity))
    _, opener = Epoch.start(recipient, 60, T)
    assert opener.key_scheme is recipient.scheme
    assert len(open_epoch_opener(identity, opener)) == 32
    ciphertext, _ = make_login_challenge(recipient)
    assert len(answer_login_challenge(identity, ciphertext, recipient.scheme, b"ctx")) == 32
    with pytest.raises(IncorrectIdentity):  # an opener is no challenge
        answer_login_challenge(identity, opener.ciphertext, recipient.scheme, b"ctx")
    blob = make_grant(recipient, "cam1", T, T + 1, [GrantKey(1, b"k" * 16, b"K" * 32)], T)
    assert open_grant(identity, blob).keys == {b"k" * 16: b"K" * 32}


# --- the scheme names -----------------------------------------------------------------------
def test_key_scheme_keeps_the_wire_byte_and_reads_every_spelling() -> None:
    assert [int(s) for s in KeyScheme] == [1, 2, 16]
    for spelling, scheme in [("rsa-oaep-sha256", KeyScheme.RSA_OAEP_SHA256),
                             ("sha256", KeyScheme.RSA_OAEP_SHA256),
                             ("SHA-256", KeyScheme.RSA_OAEP_SHA256),
                             ("rsa-oaep-sha1", KeyScheme.RSA_OAEP_SHA1),
                             ("sha1", KeyScheme.RSA_OAEP_SHA1),
                             ("ecdh-p256", KeyScheme.ECDH_P256)]:
        assert KeyScheme.from_label(spelling) is scheme
        assert KeyScheme.from_label(scheme.label) is scheme
        assert KeyScheme.from_label(scheme.legacy_label) is scheme
    assert OaepHash is KeyScheme and OaepHash.SHA1 is KeyScheme.RSA_OAEP_SHA1  # deprecated name


# --- structure: the scheme module alone tells RSA from EC; labels in one module ----------
_KEY_TYPES = {"RSAPublicKey", "RSAPrivateKey", "EllipticCurvePublicKey", "EllipticCurvePrivateKey",
              "Identity", "EcIdentity", "EcdhKey", "RsaOaepKey", "Recipient", "SoftwareIdentity",
              "SoftwareEcIdentity", "TokenIdentity"}
# Where key types may be inspected, and why.
_ALLOWED = (
    "keyservice/keyscheme.py",  # the scheme module
    "keyservice/certs.py",      # X.509 validation: decides which scheme a certificate can have
    "keyservice/token/",        # PKCS#11: the mechanism depends on the token key's type
    # The Archiver's ECDSA signing key (not a viewer key scheme); the reader is being split by
    # another change: it can call keyscheme.signing_public_key once that lands.
    "keyservice/reader",
    "archiver/reindex.py",
)


def _key_type_isinstance(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "isinstance" and len(node.args) == 2):
            names = {n.attr if isinstance(n, ast.Attribute) else n.id
                     for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute | ast.Name)}
            if names & _KEY_TYPES:
                lines.append(node.lineno)
    return lines


def _modules() -> list[tuple[str, ast.AST]]:
    out = []
    for package in ("keyservice", "archiver", "client"):
        for path in sorted((ROOT / package).rglob("*.py")):
            out.append((path.relative_to(ROOT).as_posix(), ast.parse(path.read_text())))
    return out


def test_no_isinstance_on_key_types_outside_the_scheme_module() -> None:
    offenders = [f"{name}:{line}" for name, tree in _modules()
                 if not name.startswith(_ALLOWED) for line in _key_type_isinstance(tree)]
    assert offenders == [], ("isinstance on a key type outside keyservice/keyscheme.py; wrap "
                             "with Recipient.wrap and unwrap with Identity.unwrap instead")


def test_the_scan_finds_what_it_looks_for() -> None:
    caught = ast.parse("if isinstance(identity, EcIdentity) or isinstance(k, rsa.RSAPublicKey):"
                       " pass\nisinstance(x, int)")
    assert _key_type_isinstance(caught) == [1, 1]


def test_every_label_lives_in_the_labels_module() -> None:
    """No byte string starting with a format label prefix is written anywhere else."""
    found = []
    for name, tree in _modules():
        if name == "keyservice/labels.py":
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, bytes)
                    and node.value.startswith((b"FSE1 ", b"FSE2 "))):
                found.append(f"{name}:{node.lineno}")
    assert found == []
    values = [v for k, v in vars(labels).items() if k.startswith("LABEL_")]
    assert len(values) == len(set(values))  # one label, one purpose


# Every public name of keyservice/crypto.py before it was split (issue 24).
_OLD_CRYPTO_NAMES = (
    "ChainDeriver", "EC_POINT_LEN", "EPOCH_MAX_SECONDS", "Epoch", "KekRatchet", "KeyChain",
    "LABEL_ADMIN_LOGIN_CONTEXT", "LABEL_CHAIN_KEY", "LABEL_CHAIN_RECORD", "LABEL_CHAIN_STEP",
    "LABEL_EC_EPOCH_OPENER", "LABEL_EC_LOGIN_CHALLENGE", "LABEL_EC_SALT", "LABEL_EPOCH_OPENER",
    "LABEL_KEK_RATCHET", "LABEL_KEY_COMMITMENT", "LABEL_LOGIN_CHALLENGE", "LABEL_LOGIN_CONTEXT",
    "LABEL_LOGIN_PROOF", "LABEL_SEGMENT", "LoginChallenge", "MinuteKey", "PeriodKey", "Rng", "SECRET_LEN",
    "admin_login_context", "answer_login_challenge", "chain_key_id", "chain_minute_key",
    "chain_record_ad", "chain_step", "ec_open", "ec_seal", "key_commitment", "login_context",
    "make_login_challenge", "max_ratchet_index", "new_minute_key", "open_epoch_opener",
    "open_segment", "ratchet_kek", "seal_segment", "segment_ad", "segment_nonce", "split_key_id",
    "unwrap_chain_record", "verify_login_proof")


def test_old_crypto_names_stay_importable() -> None:
    import keyservice.crypto as old

    assert [name for name in _OLD_CRYPTO_NAMES if not hasattr(old, name)] == []
    assert sorted(old.__all__) == sorted(_OLD_CRYPTO_NAMES)
    # The deprecated ECDH helpers still round-trip (same bytes as Recipient.wrap would make).
    eve = ec_identity()
    sealed = old.ec_seal(Recipient(eve.certificate, KeyScheme.ECDH_P256), b"info", b"s" * 32)
    assert old.ec_open(eve, b"info", sealed) == b"s" * 32
    with pytest.raises(IncorrectIdentity):
        old.ec_open(eve, b"other info", sealed)
