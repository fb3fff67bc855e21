"""PIV smartcards through the real stack: pcscd + vpcd + OpenSC / ykcs11 + the emulated card."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import Attribute, ObjectClass

from fusion_testkit.commands import assert_clean_failure, fusion_keys
from fusion_testkit.pki import SiteCa
from keyservice import certs
from keyservice.identity import OaepHash, fingerprint
from keyservice.token import Token
from tests.fixtures.piv.stack import CardHandle

KEY_MAN = "KEY MAN key"  # OpenSC's label for the slot-9D private key


def test_opensc_opens_a_site_issued_key_in_9d(piv_card: CardHandle, site_ca: SiteCa) -> None:
    cert = piv_card.provision_site_identity(site_ca, "alice")
    with Token.open(piv_card.uri(piv_card.opensc_module, obj=KEY_MAN)) as token:
        ident = token.identity()
        assert ident.certificate == cert
        result = token.selftest()
    assert result.oaep_hash is OaepHash.SHA256  # OpenSC pads on the host: SHA-256 works


def _access(listing: str) -> list[set[str]]:
    return [{part.strip() for part in line.split(":", 1)[1].split(",")}
            for line in listing.splitlines() if line.strip().startswith("Access:")]


def test_card_keys_are_not_extractable(piv_card: CardHandle, site_ca: SiteCa) -> None:
    piv_card.provision_site_identity(site_ca, "alice")  # RSA in 9D
    piv_card.provision_site_identity(site_ca, "alice-ec", slot="9e", algorithm="ECCP256")
    for module in (piv_card.opensc_module, piv_card.ykcs11_module):
        listing = subprocess.run(
            ["pkcs11-tool", "--module", module, "--login", "--pin", piv_card.pin,
             "--list-objects", "--type", "privkey"], capture_output=True, text=True, check=True,
            timeout=60).stdout
        access = _access(listing)
        assert len(access) == 2, listing  # both keys, RSA and EC
        for flags in access:
            assert {"sensitive", "always sensitive", "never extractable"} <= flags, listing
            assert "extractable" not in flags
        # And the secret parts cannot be read as attributes (python-pkcs11 on the same module).
        with Token.open(piv_card.uri(module)):
            lib = pkcs11.lib(module)
            session = lib.get_token().open()
            try:
                for key_id in (b"\x03", b"\x04"):  # slots 9D and 9E
                    key = session.get_key(ObjectClass.PRIVATE_KEY, id=key_id)
                    assert key[Attribute.EXTRACTABLE] is False
                    for secret in (Attribute.VALUE, Attribute.PRIVATE_EXPONENT,
                                   Attribute.PRIME_1):
                        with pytest.raises(pkcs11.PKCS11Error):
                            key[secret]
            finally:
                session.close()


# --- fusion-keys on a card (real processes) ----------------------------------------------------
def _card_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FUSION_PIN", "FUSION_SO_PIN")}
    return {**env, **extra}


def test_list_through_opensc_shows_whose_card_it_is(piv_card: CardHandle,
                                                    site_ca: SiteCa) -> None:
    cert = piv_card.provision_site_identity(site_ca, "alice")
    listed = fusion_keys("list", "--token", piv_card.uri(piv_card.opensc_module), env=_card_env())
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    row = next(line for line in lines if line.startswith(KEY_MAN))
    # key type, OAEP hashes measured on the card (the site certificate records none), expiry
    assert row.split()[3:6] == ["RSA-2048", "sha256,sha1", f"{cert.not_valid_after_utc:%Y-%m-%d}"]
    assert row.split()[6] == fingerprint(cert).hex()
    detail = lines[lines.index(row) + 1]
    assert "id 03" in detail
    assert "subject: CN=alice,O=Example Site" in detail
    assert "issuer: CN=Site CA,O=Example Site" in detail


def test_adopt_checks_the_site_identity_and_says_which_oaep_hash(
        piv_card: CardHandle, site_ca: SiteCa, tmp_path: Path) -> None:
    cert = piv_card.provision_site_identity(site_ca, "alice")
    out = tmp_path / "alice.pem"
    adopted = fusion_keys("adopt", "--token", piv_card.uri(piv_card.opensc_module), "--out",
                          str(out), "--site-ca", str(site_ca.path), env=_card_env())
    assert adopted.returncode == 0, adopted.stderr
    assert x509.load_pem_x509_certificate(out.read_bytes()) == cert
    assert f"Adopted '{KEY_MAN}' (id 03)" in adopted.stdout
    assert "CN=alice,O=Example Site" in adopted.stdout
    assert f"fusion-archiver viewers add {out} --key-scheme rsa-oaep-sha256 --cameras" in adopted.stdout
    # A certificate from another CA is refused (the Archiver would refuse it too).
    (tmp_path / "other").mkdir()
    other_ca = SiteCa.create(tmp_path / "other", "Other CA")
    refused = fusion_keys("adopt", "--token", piv_card.uri(piv_card.opensc_module), "--out",
                          str(tmp_path / "x.pem"), "--site-ca", str(other_ca.path), env=_card_env())
    assert_clean_failure(refused, 30, "not issued by the site CA")
    assert not (tmp_path / "x.pem").exists()


def test_adopt_refuses_a_card_whose_certificate_is_for_another_key(
        piv_card: CardHandle, site_ca: SiteCa, tmp_path: Path) -> None:
    piv_card.provision_site_identity(site_ca, "alice")
    stranger = rsa.generate_private_key(65537, 2048).public_key()
    wrong = tmp_path / "wrong.pem"
    wrong.write_bytes(site_ca.issue(stranger, "mallory").public_bytes(serialization.Encoding.PEM))
    piv_card.piv_tool("-a", "import-certificate", "-s", "9d", "-i", str(wrong))
    refused = fusion_keys("adopt", "--token", piv_card.uri(piv_card.opensc_module), "--out",
                          str(tmp_path / "x.pem"), env=_card_env())
    assert_clean_failure(refused, 30, "the certificate belongs to another key")


def test_enroll_through_opensc_points_to_adopt(piv_card: CardHandle, tmp_path: Path) -> None:
    result = fusion_keys("enroll", "--token", piv_card.uri(piv_card.opensc_module, obj="bob"),
                         "--out", str(tmp_path / "bob.pem"), "--key", "rsa2048", env=_card_env())
    assert_clean_failure(result, 26, "fusion-keys adopt")
    assert "cannot generate keys" in result.stderr
    assert not (tmp_path / "bob.pem").exists()


def test_enroll_through_ykcs11_generates_in_9d_and_writes_the_certificate(
        piv_card: CardHandle, tmp_path: Path) -> None:
    out = tmp_path / "bob.pem"
    uri = piv_card.uri(piv_card.ykcs11_module, obj="bob")
    # Without the management key: a clear refusal, nothing generated.
    no_so = fusion_keys("enroll", "--token", uri, "--out", str(out), "--key", "rsa2048",
                        env=_card_env())
    assert_clean_failure(no_so, 2, "FUSION_SO_PIN")
    wrong_so = fusion_keys("enroll", "--token", uri, "--out", str(out), "--key", "rsa2048",
                           env=_card_env(FUSION_SO_PIN="00" * 24))
    assert_clean_failure(wrong_so, 21, "management key")
    enrolled = fusion_keys("enroll", "--token", uri, "--out", str(out), "--key", "rsa2048",
                           env=_card_env(FUSION_SO_PIN=piv_card.mgmt_key_hex))
    assert enrolled.returncode == 0, enrolled.stderr
    assert "slot 9D" in enrolled.stdout and "SHA-256" in enrolled.stdout
    assert "pkcs11:id=%03" in enrolled.stdout
    cert = x509.load_pem_x509_certificate(out.read_bytes())
    assert cert.subject.rfc4514_string() == "CN=bob"
    assert certs.read_oaep_hash(cert) is OaepHash.SHA256
    # The certificate is on the card (ykcs11's placeholder replaced): OpenSC reads it back,
    # and the key decrypts through OpenSC as well.
    with Token.open(piv_card.uri(piv_card.opensc_module, obj=KEY_MAN)) as token:
        assert token.identity().certificate == cert
        assert token.selftest().oaep_hash is OaepHash.SHA256
    # A second enrolment never replaces the key in the slot.
    again = fusion_keys("enroll", "--token", uri, "--out", str(tmp_path / "again.pem"),
                        "--key", "rsa2048", env=_card_env(FUSION_SO_PIN=piv_card.mgmt_key_hex))
    assert_clean_failure(again, 25, "already holds a key")


def test_adopt_an_ec_site_identity_needs_no_oaep_hash(piv_card: CardHandle, site_ca: SiteCa,
                                                       tmp_path: Path) -> None:
    cert = piv_card.provision_site_identity(site_ca, "erin", algorithm="ECCP256")
    listed = fusion_keys("list", "--token", piv_card.uri(piv_card.opensc_module), env=_card_env())
    row = next(line for line in listed.stdout.splitlines() if line.startswith(KEY_MAN))
    assert row.split()[3:5] == ["EC-P256", "ecdh-p256"]  # ECDH measured on the card
    out = tmp_path / "erin.pem"
    adopted = fusion_keys("adopt", "--token", piv_card.uri(piv_card.opensc_module), "--out",
                          str(out), "--site-ca", str(site_ca.path), env=_card_env())
    assert adopted.returncode == 0, adopted.stderr
    assert x509.load_pem_x509_certificate(out.read_bytes()) == cert
    assert "EC-P256" in adopted.stdout
    assert f"fusion-archiver viewers add {out} --cameras CAMERAS" in adopted.stdout
