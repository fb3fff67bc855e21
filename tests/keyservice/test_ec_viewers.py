"""EC P-256 viewers: the ECDH epoch opener and login challenge in pure code, and on real tokens
(SoftHSM, the software TPM); the PIV card is in test_card.py and client/test_card_e2e.py."""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fusion_testkit.commands import fusion_keys
from keyservice import certs
from keyservice.crypto import (
    Epoch,
    answer_login_challenge,
    ec_open,
    ec_seal,
    make_login_challenge,
    open_epoch_opener,
    verify_login_proof,
)
from keyservice.errors import IntegrityError, MechanismUnsupported, NoMatchingIdentity
from keyservice.identity import Recipient, SoftwareEcIdentity
from keyservice.keyscheme import KeyScheme
from keyservice.token import Token
from tests.fixtures.tokens import TokenHandle

T = 1_748_779_200_000
NOW = datetime.fromtimestamp(T / 1000, UTC)


def ec_identity(name: str = "eve") -> SoftwareEcIdentity:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certs.build_viewer_certificate(key, name, oaep_hash=KeyScheme.ECDH_P256, now=NOW)
    return SoftwareEcIdentity(cert, key)


def recipient(identity: SoftwareEcIdentity) -> Recipient:
    return Recipient(identity.certificate, KeyScheme.ECDH_P256)


def test_ec_opener_round_trip_with_one_ecdh() -> None:
    eve = ec_identity()
    epoch, opener = Epoch.start(recipient(eve), 60, T)
    assert opener.key_scheme == KeyScheme.ECDH_P256 and epoch.epoch_id == opener.epoch_id
    assert len(opener.ciphertext) == 65 + 40  # ephemeral point + AES-KW(KEK0)
    kek0 = open_epoch_opener(eve, opener)
    assert eve.operations == 1
    assert len(kek0) == 32


def test_ec_opener_follows_the_spec_construction() -> None:
    """Recompute KEK0 from the spec's description, with cryptography's primitives only."""
    eve = ec_identity()
    _, opener = Epoch.start(recipient(eve), 60, T)
    enc, wrapped = opener.ciphertext[:65], opener.ciphertext[65:]
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), enc)
    shared = eve.private_key.exchange(ec.ECDH(), peer)
    point = eve.private_key.public_key().public_bytes(Encoding.X962,
                                                      PublicFormat.UncompressedPoint)
    key = HKDF(hashes.SHA256(), 32, salt=b"FSE1 ec-p256" + enc + point,
               info=b"FSE1 ec-epoch-opener\x00" + opener.epoch_id).derive(shared)
    assert aes_key_unwrap(key, wrapped) == open_epoch_opener(eve, opener)


def test_ec_opener_for_another_viewer_or_epoch_or_altered_is_refused() -> None:
    eve, mallory = ec_identity("eve"), ec_identity("mallory")
    _, opener = Epoch.start(recipient(eve), 60, T)
    with pytest.raises(NoMatchingIdentity):
        open_epoch_opener(mallory, opener)
    # Moved to another epoch: the HKDF info carries the epoch id.
    with pytest.raises(IntegrityError):
        open_epoch_opener(eve, replace(opener, epoch_id=os.urandom(16)))
    for offset in (0, 1, 40, 64, 65, 80, 104):  # point and wrapped key, every part
        flipped = bytearray(opener.ciphertext)
        flipped[offset] ^= 1
        with pytest.raises(IntegrityError):
            open_epoch_opener(eve, replace(opener, ciphertext=bytes(flipped)))
    with pytest.raises(IntegrityError):  # truncated
        open_epoch_opener(eve, replace(opener, ciphertext=opener.ciphertext[:-1]))


def test_ec_login_round_trip_and_domain_separation() -> None:
    eve = ec_identity()
    ciphertext, secret = make_login_challenge(recipient(eve))
    proof = answer_login_challenge(eve, ciphertext, KeyScheme.ECDH_P256, b"context")
    assert verify_login_proof(secret, b"context", proof)
    # A hostile Archiver sends an epoch opener as a login challenge: the token does the ECDH,
    # but the login key differs (HKDF info), so nothing about KEK0 comes back.
    _, opener = Epoch.start(recipient(eve), 60, T)
    with pytest.raises(IntegrityError):
        answer_login_challenge(eve, opener.ciphertext, KeyScheme.ECDH_P256, b"context")
    # ... and a login challenge is no epoch opener.
    with pytest.raises(IntegrityError):
        open_epoch_opener(eve, replace(opener, ciphertext=ciphertext))


def test_ec_seal_refuses_points_off_the_curve() -> None:
    eve = ec_identity()
    sealed = ec_seal(recipient(eve), b"info", os.urandom(32))
    off_curve = b"\x04" + b"\x01" * 64
    with pytest.raises(IntegrityError):
        ec_open(eve, b"info", off_curve + sealed[65:])
    assert eve.operations == 0  # refused before the token is asked


def test_rsa_and_ec_openers_do_not_mix() -> None:
    eve = ec_identity()
    _, opener = Epoch.start(recipient(eve), 60, T)
    with pytest.raises(IntegrityError):  # an "RSA" opener to an EC certificate
        open_epoch_opener(eve, replace(opener, key_scheme=KeyScheme.RSA_OAEP_SHA256))


# --- on tokens ----------------------------------------------------------------------------
def test_enroll_ec_on_softhsm_is_the_default_and_opens_openers(softhsm_token: TokenHandle,
                                                               tmp_path) -> None:
    pem = tmp_path / "eve.pem"
    enrolled = fusion_keys("enroll", "--token", softhsm_token.object_uri("eve"), "--out", str(pem))
    assert enrolled.returncode == 0, enrolled.stderr
    assert "EC P-256, ECDH epoch openers" in enrolled.stdout
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    assert certs.validate_viewer_certificate(cert, now=datetime.now(UTC)) is (
        KeyScheme.ECDH_P256)
    selftest = fusion_keys("selftest", "--token", softhsm_token.object_uri("eve"))
    assert selftest.returncode == 0, selftest.stderr
    assert "EC P-256, ECDH" in selftest.stdout
    listed = fusion_keys("list", "--token", softhsm_token.uri)
    row = next(line for line in listed.stdout.splitlines() if line.startswith("eve"))
    assert row.split()[1:3] == ["EC-P256", "ecdh-p256"]
    with Token.open(softhsm_token.uri) as tok:
        ident = tok.identity("eve")
        _, opener = Epoch.start(Recipient(ident.certificate, KeyScheme.ECDH_P256), 60, T)
        assert len(open_epoch_opener(ident, opener)) == 32
        assert ident.operations == 1


def test_rsa_stays_available_on_request(softhsm_token: TokenHandle, tmp_path) -> None:
    made = fusion_keys("enroll", "--token", softhsm_token.object_uri("rita"), "--out",
                       str(tmp_path / "rita.pem"), "--key-type", "rsa")
    assert made.returncode == 0, made.stderr
    assert "RSA-3072" in made.stdout
    clash = fusion_keys("enroll", "--token", softhsm_token.object_uri("x"), "--out",
                        str(tmp_path / "x.pem"), "--key-type", "ec", "--key", "rsa2048")
    assert clash.returncode == 2 and "drop it" in clash.stderr


@pytest.mark.tpm
def test_ec_viewer_on_the_tpm_or_a_clear_refusal(tpm_token: TokenHandle) -> None:
    """tpm2-pkcs11 1.9: ECDH1_DERIVE works (then the viewer works), or enrolment refuses."""
    with Token.open(tpm_token.uri) as tok:
        if not tok.supports_ec_viewers():
            with pytest.raises(MechanismUnsupported, match="lacks ECDH1_DERIVE") as refused:
                tok.enroll("tpm-eve", key_type="ec")
            assert "use another token" in str(refused.value)
            return
        result = tok.enroll("tpm-eve", key_type="ec")
        ident = tok.identity("tpm-eve")
        _, opener = Epoch.start(Recipient(ident.certificate, KeyScheme.ECDH_P256), 60, T)
        assert len(open_epoch_opener(ident, opener)) == 32
        assert result.oaep_hash is KeyScheme.ECDH_P256


def test_ec_csr_signed_by_a_site_ca_is_imported(softhsm_token: TokenHandle) -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = certs.build_archiver_certificate(ca_key, "Site CA", now=datetime.now(UTC))
    with Token.open(softhsm_token.uri) as tok:
        request = tok.enroll("fay", key_type="ec", csr=True).csr
        assert request is not None and request.is_signature_valid
        now = datetime.now(UTC)
        cert = (x509.CertificateBuilder().subject_name(request.subject)
                .issuer_name(ca_cert.subject).public_key(request.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(minutes=1))
                .not_valid_after(now + timedelta(days=30))
                .add_extension(request.extensions.get_extension_for_class(x509.KeyUsage).value,
                               critical=True)
                .sign(ca_key, hashes.SHA256()))
        result = tok.import_certificate(cert, "fay")
        assert result.oaep_hash is KeyScheme.ECDH_P256 and result.recorded
        assert tok.identity("fay").certificate == cert
