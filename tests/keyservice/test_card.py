"""PIV smartcards through the real stack: pcscd + vpcd + OpenSC / ykcs11 + the emulated card."""

from __future__ import annotations

import subprocess

import pkcs11
import pytest
from pkcs11 import Attribute, ObjectClass

from keyservice.identity import OaepHash
from keyservice.token import Token
from tests.fixtures.piv.stack import CardHandle, SiteCa

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
    piv_card.provision_site_identity(site_ca, "alice")
    for module in (piv_card.opensc_module, piv_card.ykcs11_module):
        listing = subprocess.run(
            ["pkcs11-tool", "--module", module, "--login", "--pin", piv_card.pin,
             "--list-objects", "--type", "privkey"], capture_output=True, text=True, check=True,
            timeout=60).stdout
        access = _access(listing)
        assert access, listing
        for flags in access:
            assert {"sensitive", "always sensitive", "never extractable"} <= flags, listing
            assert "extractable" not in flags
        # And the secret parts cannot be read as attributes (python-pkcs11 on the same module).
        with Token.open(piv_card.uri(module)):
            lib = pkcs11.lib(module)
            session = lib.get_token().open()
            try:
                key = session.get_key(ObjectClass.PRIVATE_KEY, id=b"\x03")
                assert key[Attribute.EXTRACTABLE] is False
                for secret in (Attribute.VALUE, Attribute.PRIVATE_EXPONENT, Attribute.PRIME_1):
                    with pytest.raises(pkcs11.PKCS11Error):
                        key[secret]
            finally:
                session.close()
