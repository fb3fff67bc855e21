"""The token layer against real tokens: SoftHSM and a software TPM (swtpm + tpm2-pkcs11).

Checks that must not depend on keyservice.token itself read the token independently: through a
plain python-pkcs11 session, pkcs11-tool and openssl.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, ObjectClass

from keyservice import certs
from keyservice import token as token_module
from keyservice.errors import (
    CertificateError,
    IntegrityError,
    MechanismUnsupported,
    ModuleNotFound,
    ObjectExists,
    ObjectNotFound,
    PinIncorrect,
    TokenError,
    TokenNotFound,
    UsageError,
)
from keyservice.identity import (
    Identity,
    OaepHash,
    Recipient,
    Signer,
    fingerprint,
    verify_signature,
)
from keyservice.pkcs11uri import Pkcs11Uri
from keyservice.token import Token
from tests.fixtures.tokens import TokenHandle, enroll_viewer

_names = itertools.count(1)
# Measured: SoftHSM 2.6 opens RSA-OAEP only with SHA-1; tpm2-pkcs11 with SHA-256.
EXPECTED_OAEP = {"softhsm": OaepHash.SHA1, "tpm": OaepHash.SHA256}


def unique(prefix: str) -> str:
    # The TPM token is shared by the whole session, so names must not repeat.
    return f"{prefix}-{next(_names)}-{secrets.token_hex(2)}"


# The TPM is one per run: its tests share a worker (tests/fixtures/parallel.py).
@pytest.fixture(params=["softhsm", pytest.param("tpm", marks=pytest.mark.xdist_group("tpm"))])
def any_token(request: pytest.FixtureRequest) -> TokenHandle:
    name = "softhsm_token" if request.param == "softhsm" else "tpm_token"
    return request.getfixturevalue(name)


@contextmanager
def raw_session(handle: TokenHandle) -> Iterator[Any]:
    """A plain python-pkcs11 session, independent of keyservice.token's lookups.

    The caller keeps a keyservice Token open: it holds the login (a second C_Login would fail).
    """
    lib = pkcs11.lib(handle.module)  # the same, already initialised library (same real path)
    session = lib.get_token(token_label=handle.label).open()
    try:
        yield session
    finally:
        session.close()


def _private_key(session: Any, label: str) -> Any:
    return session.get_key(ObjectClass.PRIVATE_KEY, label=label)


def _spki(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _needs(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


# --- the main flow ---------------------------------------------------------------------------
def test_enrol_export_selftest(any_token: TokenHandle, tmp_path: Path) -> None:
    name = unique("alice")
    with Token.open(any_token.uri) as tok:
        result = tok.enroll(name, bits=2048)
        assert result.certificate is not None and result.csr is None
        assert result.oaep_hash is EXPECTED_OAEP[any_token.kind]
        pem = tmp_path / "alice.pem"
        pem.write_bytes(result.pem())
        ident = tok.identity(name)
        assert ident.certificate == result.certificate
        assert isinstance(ident, Identity)
        test = tok.selftest(name)
        assert test.oaep_hash is result.oaep_hash
        assert test.key_bits == 2048
        assert test.fingerprint_hex == fingerprint(result.certificate).hex()
        with raw_session(any_token) as session:
            public = session.get_key(ObjectClass.PUBLIC_KEY, label=name)
            numbers = rsa.RSAPublicNumbers(int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
                                           int.from_bytes(public[Attribute.MODULUS], "big"))
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
    # the PEM's public key is the token's public key
    assert _spki(cert.public_key()) == _spki(numbers.public_key())
    # signed by the token key: the certificate verifies against its own public key
    cert.verify_directly_issued_by(cert)
    assert b"PRIVATE" not in pem.read_bytes()


def test_openssl_accepts_the_certificate(softhsm_token: TokenHandle, tmp_path: Path) -> None:
    _needs("openssl")
    pem = enroll_viewer(softhsm_token, unique("carol"))
    text = subprocess.run(["openssl", "x509", "-in", str(pem), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert "Key Encipherment" in text and "Digital Signature" in text
    assert "2.25.100634548127606015957751865592253233119" in text
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(pem), str(pem)],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.strip().endswith(": OK")
    # A different key's certificate does not verify against this one.
    other = enroll_viewer(softhsm_token, unique("dave"))
    wrong = subprocess.run(["openssl", "verify", "-CAfile", str(other), str(pem)],
                           capture_output=True, text=True)
    assert wrong.returncode != 0


def test_private_key_attributes(any_token: TokenHandle) -> None:
    name = unique("attrs")
    with Token.open(any_token.uri) as tok:
        result = tok.enroll(name, bits=2048)
        with raw_session(any_token) as session:
            key = _private_key(session, name)
            assert key[Attribute.SENSITIVE] is True
            assert key[Attribute.ALWAYS_SENSITIVE] is True
            assert key[Attribute.NEVER_EXTRACTABLE] is True
            assert key[Attribute.EXTRACTABLE] is False
            assert key[Attribute.PRIVATE] is True
            assert key[Attribute.TOKEN] is True
            assert key[Attribute.UNWRAP] is False
            assert key[Attribute.DECRYPT] is True
            # the private key's value cannot be read out
            for secret_attribute in (Attribute.VALUE, Attribute.PRIVATE_EXPONENT,
                                     Attribute.PRIME_1):
                with pytest.raises(pkcs11.PKCS11Error):
                    key[secret_attribute]
            key_id = key[Attribute.ID]
            assert key_id == result.key_id and len(key_id) == 16
            ids = {o[Attribute.CLASS]: o[Attribute.ID]
                   for o in session.get_objects({Attribute.LABEL: name})}
            assert ids == {ObjectClass.PRIVATE_KEY: key_id, ObjectClass.PUBLIC_KEY: key_id,
                           ObjectClass.CERTIFICATE: key_id}
            public = session.get_key(ObjectClass.PUBLIC_KEY, label=name)
            assert public[Attribute.PRIVATE] is False  # the public key is readable


def test_ids_are_unique(softhsm_token: TokenHandle) -> None:
    with Token.open(softhsm_token.uri) as tok:
        a = tok.enroll("a", bits=2048)
        b = tok.enroll("b", bits=2048)
    assert a.key_id != b.key_id


def _pkcs11_tool_objects(handle: TokenHandle) -> list[dict[str, str]]:
    out = subprocess.run(
        ["pkcs11-tool", "--module", handle.module, "--token-label", handle.label, "--login",
         "--pin", handle.pin, "--list-objects"],
        capture_output=True, text=True, check=True, timeout=60,
        env={**os.environ, **handle.env}).stdout
    objects: list[dict[str, str]] = []
    for line in out.splitlines():
        if re.match(r"^\S.*Object", line):
            objects.append({"kind": line.split(";")[0].strip()})
        elif objects and ":" in line:
            key, _, value = line.strip().partition(":")
            objects[-1][key.strip()] = value.strip()
    return objects


def test_pkcs11_tool_agrees(any_token: TokenHandle, tmp_path: Path) -> None:
    _needs("pkcs11-tool")
    name = unique("tool")
    with Token.open(any_token.uri) as tok:
        result = tok.enroll(name, bits=2048)
        objects = [o for o in _pkcs11_tool_objects(any_token) if o.get("label") == name]
        kinds = {o["kind"]: o for o in objects}
        assert set(kinds) == {"Private Key Object", "Public Key Object", "Certificate Object"}
        for obj in objects:
            assert obj["ID"] == result.key_id.hex()
        access = [part.strip() for part in kinds["Private Key Object"]["Access"].split(",")]
        assert {"sensitive", "always sensitive", "never extractable"} <= set(access)
        assert "extractable" not in access
        # the public key pkcs11-tool reads off the token equals the certificate's
        der = tmp_path / "pub.der"
        subprocess.run(["pkcs11-tool", "--module", any_token.module, "--token-label",
                        any_token.label, "--read-object", "--type", "pubkey", "--id",
                        result.key_id.hex(), "--output-file", str(der)],
                       capture_output=True, check=True, timeout=60,
                       env={**os.environ, **any_token.env})
        assert result.certificate is not None
        assert der.read_bytes() == _spki(result.certificate.public_key())


# --- decryption ------------------------------------------------------------------------------
def test_decrypt_counts_operations_and_bad_ciphertext_is_integrity_error(
        any_token: TokenHandle) -> None:
    name = unique("dec")
    with Token.open(any_token.uri) as tok:
        oaep_hash = tok.enroll(name, bits=2048).oaep_hash
        ident = tok.identity(name)
        recipient = Recipient(ident.certificate, oaep_hash)
        secret = secrets.token_bytes(32)
        assert ident.rsa_decrypt(recipient.encrypt(secret), oaep_hash) == secret
        corrupt = bytearray(recipient.encrypt(secret))
        corrupt[10] ^= 0x40
        with pytest.raises(IntegrityError):
            ident.rsa_decrypt(bytes(corrupt), oaep_hash)
        with pytest.raises(IntegrityError):
            ident.rsa_decrypt(b"short", oaep_hash)
        # the token still works afterwards (on the TPM: a fresh session replaced the stuck one)
        assert ident.rsa_decrypt(recipient.encrypt(b"again" * 6), oaep_hash) == b"again" * 6
        assert ident.operations == 4


def test_softhsm_cannot_open_oaep_sha256(softhsm_token: TokenHandle) -> None:
    with Token.open(softhsm_token.uri) as tok:
        tok.enroll("s", bits=2048)
        ident = tok.identity("s")
        ciphertext = Recipient(ident.certificate, OaepHash.SHA256).encrypt(b"k" * 32)
        with pytest.raises(MechanismUnsupported, match="SHA-256"):
            ident.rsa_decrypt(ciphertext, OaepHash.SHA256)
        # and the session is fine afterwards
        sha1 = Recipient(ident.certificate, OaepHash.SHA1).encrypt(b"k" * 32)
        assert ident.rsa_decrypt(sha1, OaepHash.SHA1) == b"k" * 32


def test_threads_share_one_token(softhsm_token: TokenHandle) -> None:
    # python-pkcs11 releases the GIL and SoftHSM is not thread-safe without OS locking:
    # without the module lock this crashes the process.
    with Token.open(softhsm_token.uri) as tok:
        tok.enroll("t", bits=2048)
        ident = tok.identity("t")
        recipient = Recipient(ident.certificate, OaepHash.SHA1)
        jobs = [(secrets.token_bytes(32),) for _ in range(60)]
        ciphertexts = [(secret, recipient.encrypt(secret)) for (secret,) in jobs]
        failures: list[BaseException] = []

        def work(chunk: list[tuple[bytes, bytes]]) -> None:
            try:
                for secret, ciphertext in chunk:
                    assert ident.rsa_decrypt(ciphertext, OaepHash.SHA1) == secret
                    tok.identities()
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=work, args=(ciphertexts[i::4],)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures
        assert ident.operations == 60


# --- enrolment rules ---------------------------------------------------------------------------
def test_default_key_size_is_rsa_3072(softhsm_token: TokenHandle) -> None:
    with Token.open(softhsm_token.uri) as tok:
        result = tok.enroll("big")
        assert result.key_bits == 3072
        assert result.certificate is not None
        assert result.certificate.public_key().key_size == 3072
        assert [i.key_bits for i in tok.identities()] == [3072]


def test_duplicate_name_is_refused_and_nothing_changes(any_token: TokenHandle) -> None:
    name = unique("dup")
    with Token.open(any_token.uri) as tok:
        first = tok.enroll(name, bits=2048)
        before = tok.identities()
        with pytest.raises(ObjectExists, match="already has an object named"):
            tok.enroll(name, bits=2048)
        assert tok.identities() == before
        assert tok.identity(name).certificate == first.certificate


def test_failed_enrolment_leaves_nothing_behind(any_token: TokenHandle,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    name = unique("half")

    def broken(*args: object, **kwargs: object) -> x509.Certificate:
        raise CertificateError("injected failure after key generation")

    # Fault injection only: the key pair really is generated on the token first.
    monkeypatch.setattr(certs, "build_viewer_certificate", broken)
    with Token.open(any_token.uri) as tok:
        with pytest.raises(CertificateError, match="injected"):
            tok.enroll(name, bits=2048)
        with raw_session(any_token) as session:
            assert list(session.get_objects({Attribute.LABEL: name})) == []
    monkeypatch.undo()
    with Token.open(any_token.uri) as tok:
        assert tok.enroll(name, bits=2048).certificate is not None  # the name is free again


def test_bad_arguments_are_refused_before_touching_the_token(softhsm_token: TokenHandle) -> None:
    with Token.open(softhsm_token.uri) as tok:
        with pytest.raises(UsageError):
            tok.enroll("x", bits=1024)
        with pytest.raises(UsageError):
            tok.enroll("x", bits=2048, days=0)
        with pytest.raises(UsageError):
            tok.enroll("", bits=2048)
        assert tok.identities() == []


def test_csr_then_import_cert(any_token: TokenHandle) -> None:
    name = unique("csr")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Site CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=99))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    with Token.open(any_token.uri) as tok:
        enrolled = tok.enroll(name, bits=2048, csr=True)
        assert enrolled.csr is not None and enrolled.certificate is None
        assert enrolled.csr.is_signature_valid  # signed by the token key
        assert certs.read_oaep_hash(enrolled.csr) is EXPECTED_OAEP[any_token.kind]
        with pytest.raises(ObjectNotFound, match="import-cert"):
            tok.identity(name)
        # the CA keeps keyUsage but drops the OAEP-hash extension
        issued = (x509.CertificateBuilder().subject_name(enrolled.csr.subject)
                  .issuer_name(ca.subject).public_key(enrolled.csr.public_key()).serial_number(9)
                  .not_valid_before(now - timedelta(minutes=1))
                  .not_valid_after(now + timedelta(days=30))
                  .add_extension(enrolled.csr.extensions.get_extension_for_class(
                      x509.KeyUsage).value, critical=True)
                  .sign(ca_key, hashes.SHA256()))
        imported = tok.import_certificate(issued)
        assert imported.label == name
        assert imported.oaep_hash is EXPECTED_OAEP[any_token.kind]
        assert imported.recorded is False
        assert tok.identity(name).certificate == issued
        assert tok.selftest(name).oaep_hash is imported.oaep_hash
        assert certs.validate_viewer_certificate(issued, now=now, site_ca=[ca],
                                                 oaep_hash=imported.oaep_hash) is \
            imported.oaep_hash
        with pytest.raises(ObjectExists, match="never overwritten"):
            tok.import_certificate(issued)


def test_foreign_certificates_are_refused(softhsm_token: TokenHandle) -> None:
    stranger = rsa.generate_private_key(65537, 2048)
    foreign = certs.build_viewer_certificate(stranger, "mallory", oaep_hash=OaepHash.SHA1,
                                             now=datetime.now(UTC))
    with Token.open(softhsm_token.uri) as tok:
        tok.enroll("x", bits=2048, csr=True)
        with pytest.raises(CertificateError, match="belongs to no key"):
            tok.import_certificate(foreign)
        signer_cert = certs.build_archiver_certificate(ec.generate_private_key(ec.SECP256R1()),
                                                       "a", now=datetime.now(UTC))
        with pytest.raises(CertificateError, match="belongs to no key"):  # EC, not this key's
            tok.import_certificate(signer_cert)
        with pytest.raises(ObjectNotFound):
            tok.identity("x")  # still no certificate stored


# --- opening, PINs, lookups ----------------------------------------------------------------------
def _uri_without_pin(handle: TokenHandle, **extra: str) -> str:
    parsed = Pkcs11Uri.parse(handle.uri)
    return Pkcs11Uri(token=parsed.token, module_path=parsed.module_path, **extra).to_uri()


def test_wrong_pin(softhsm_token: TokenHandle) -> None:
    wrong = _uri_without_pin(softhsm_token, pin_value="00000000x")
    with pytest.raises(PinIncorrect, match="wrong") as info:
        Token.open(wrong)
    assert "00000000x" not in str(info.value)
    assert info.value.exit_code == 21
    # the token reports the failed login (and the right PIN still works)
    lib = pkcs11.lib(softhsm_token.module)
    flags = lib.get_token(token_label=softhsm_token.label).flags
    assert flags & pkcs11.TokenFlag.USER_PIN_COUNT_LOW
    with Token.open(softhsm_token.uri) as tok:
        assert tok.identities() == []


def test_pin_sources_in_order(softhsm_token: TokenHandle, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    bare = _uri_without_pin(softhsm_token)
    monkeypatch.delenv("FUSION_PIN", raising=False)
    with pytest.raises(TokenError, match="No PIN given"):
        Token.open(bare)
    with Token.open(bare, pin=softhsm_token.pin):
        pass
    # the explicit argument wins over a (wrong) pin-value in the URI
    with Token.open(_uri_without_pin(softhsm_token, pin_value="bad-pin"), pin=softhsm_token.pin):
        pass
    pin_file = tmp_path / "pin"
    pin_file.write_text(softhsm_token.pin + "\n")
    with Token.open(_uri_without_pin(softhsm_token, pin_source=f"file:{pin_file}")):
        pass
    with pytest.raises(TokenError, match="Cannot read the PIN file"):
        Token.open(_uri_without_pin(softhsm_token, pin_source=str(tmp_path / "missing")))
    monkeypatch.setenv("FUSION_PIN", softhsm_token.pin)
    with Token.open(bare):
        pass
    monkeypatch.setenv("FUSION_PIN", "99999999z")
    with pytest.raises(PinIncorrect):
        Token.open(bare)


def test_second_open_shares_the_login(softhsm_token: TokenHandle) -> None:
    first = Token.open(softhsm_token.uri)
    second = Token.open(softhsm_token.uri)  # no UserAlreadyLoggedIn
    with pytest.raises(PinIncorrect, match="differs"):
        Token.open(_uri_without_pin(softhsm_token, pin_value="12121212"))
    second.enroll("shared", bits=2048)
    first.close()
    assert second.identity("shared").certificate is not None  # still logged in
    second.close()
    with pytest.raises(TokenError, match="closed"):
        second.identity("shared")


def test_lookup_errors(softhsm_token: TokenHandle, tmp_path: Path) -> None:
    with pytest.raises(TokenNotFound, match=softhsm_token.label):
        Token.open(Pkcs11Uri(token="no-such-token", module_path=softhsm_token.module,
                             pin_value="1").to_uri())
    with pytest.raises(ModuleNotFound, match="does not exist"):
        Token.open(Pkcs11Uri(token="x", module_path=str(tmp_path / "nope.so"),
                             pin_value="1").to_uri())
    fake = tmp_path / "fake.so"
    fake.write_bytes(b"\x7fELF not really")
    with pytest.raises(ModuleNotFound, match="could not be loaded as a PKCS#11 module"):
        Token.open(Pkcs11Uri(token="x", module_path=str(fake), pin_value="1").to_uri())
    with Token.open(softhsm_token.uri) as tok:
        with pytest.raises(ObjectNotFound, match="no private key 'ghost'"):
            tok.identity("ghost")
        with pytest.raises(UsageError, match="names no identity"):
            tok.identity()
        with pytest.raises(ObjectNotFound):
            tok.delete("ghost")


def test_module_from_environment(softhsm_token: TokenHandle,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUSION_PKCS11_MODULE", softhsm_token.module)
    uri = Pkcs11Uri(token=softhsm_token.label, pin_value=softhsm_token.pin)
    with Token.open(uri) as tok:
        assert tok.label == softhsm_token.label
    monkeypatch.setenv("FUSION_PKCS11_MODULE", "/nonexistent/module.so")
    with pytest.raises(ModuleNotFound, match=r"/nonexistent/module\.so"):
        Token.open(uri)


def test_identities_delete_and_uri_object(softhsm_token: TokenHandle) -> None:
    with Token.open(softhsm_token.object_uri("bob")) as tok:
        bob = tok.enroll("bob", bits=2048)
        tok.enroll("amy", bits=2048, csr=True)
        tok.ensure_signer("archiver", "Archiver")
        infos = {i.label: i for i in tok.identities()}
        assert list(infos) == ["amy", "archiver", "bob"]
        assert bob.certificate is not None
        assert infos["bob"].fingerprint_hex == fingerprint(bob.certificate).hex()
        assert (infos["bob"].kind, infos["bob"].key_bits, infos["bob"].oaep_hash) == \
            ("rsa", 2048, OaepHash.SHA1)
        assert infos["bob"].not_after == bob.certificate.not_valid_after_utc
        assert infos["amy"].fingerprint_hex is None  # CSR only, no certificate yet
        assert infos["archiver"].kind == "ec"
        assert tok.identity().label == "bob"  # object= from the URI
        assert tok.delete() == 3  # certificate, private key, public key
        with pytest.raises(ObjectNotFound):
            tok.identity("bob")
        assert [i.label for i in tok.identities()] == ["amy", "archiver"]


def test_init_token_refuses_duplicate_labels(softhsm_token: TokenHandle) -> None:
    with pytest.raises(ObjectExists):
        token_module.init_token(softhsm_token.module, softhsm_token.label, so_pin="12345678",
                                pin="12345678")


# --- the Archiver's signer -----------------------------------------------------------------------
def test_signer_create_load_sign(any_token: TokenHandle) -> None:
    label = unique("archiver")
    with Token.open(any_token.uri) as tok:
        signer = tok.ensure_signer(label, "Archiver 7")
        assert isinstance(signer, Signer)
        cert = signer.certificate
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Archiver 7"
        cert.verify_directly_issued_by(cert)  # signed by the token key itself
        public = cert.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(public.curve, ec.SECP256R1)
        data = b"manifest bytes"
        signature = signer.sign(data)
        public.verify(signature, data, ec.ECDSA(hashes.SHA256()))  # DER, cryptography verifies
        verify_signature(cert, data, signature)
        with pytest.raises(IntegrityError):
            verify_signature(cert, data + b"!", signature)
        again = tok.ensure_signer(label, "ignored when it exists")
        assert again.certificate == cert
        verify_signature(cert, b"x", again.sign(b"x"))
        with raw_session(any_token) as session:
            key = _private_key(session, label)
            assert key[Attribute.SENSITIVE] is True
            assert key[Attribute.EXTRACTABLE] is False
            assert key[Attribute.NEVER_EXTRACTABLE] is True
            with pytest.raises(pkcs11.PKCS11Error):
                key[Attribute.VALUE]


def test_signer_label_clash(softhsm_token: TokenHandle) -> None:
    with Token.open(softhsm_token.uri) as tok:
        tok.enroll("viewer", bits=2048)
        with pytest.raises(ObjectExists, match="not an EC signing key"):
            tok.ensure_signer("viewer", "Archiver")


def test_unload_module_invalidates_open_tokens(softhsm_token: TokenHandle) -> None:
    # In a child process: unloading SoftHSM here would break tokens other tests hold open.
    script = f"""
import sys
from keyservice.errors import TokenError
from keyservice.token import Token, unload_module
uri = {softhsm_token.uri!r}
tok = Token.open(uri)
tok.enroll("u", bits=2048)
unload_module({softhsm_token.module!r})
try:
    tok.identities()
    sys.exit("still usable after unload")
except TokenError:
    pass
tok.close()
with Token.open(uri) as again:   # the module loads again and the key is still there
    print(again.selftest("u").oaep_hash.label)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, env={**os.environ, **softhsm_token.env})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "rsa-oaep-sha1"
