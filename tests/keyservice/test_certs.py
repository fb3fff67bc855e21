"""Certificates (pure): building, the OAEP-hash extension, loading, validation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from keyservice import certs
from keyservice.errors import CertificateError
from keyservice.identity import OaepHash

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def viewer_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture(scope="module")
def ca_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _ca_cert(key: ec.EllipticCurvePrivateKey, name: str = "Site CA") -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(NOW - timedelta(days=10)).not_valid_after(NOW + timedelta(days=900))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))


def _issue(csr: x509.CertificateSigningRequest, ca: x509.Certificate,
           ca_key: ec.EllipticCurvePrivateKey, *, copy_extensions: bool) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(ca.subject)
               .public_key(csr.public_key()).serial_number(7)
               .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=365)))
    if copy_extensions:
        for ext in csr.extensions:
            builder = builder.add_extension(ext.value, ext.critical)
    else:
        builder = builder.add_extension(certs._viewer_key_usage(), critical=True)
    return builder.sign(ca_key, hashes.SHA256())


def test_viewer_certificate_shape(viewer_key: rsa.RSAPrivateKey) -> None:
    cert = certs.build_viewer_certificate(viewer_key, "alice", oaep_hash=OaepHash.SHA256,
                                          now=NOW, days=30)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    assert cert.issuer == cert.subject
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_encipherment and usage.value.digital_signature
    assert not usage.value.key_cert_sign
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.not_valid_after_utc == NOW + timedelta(days=30)
    assert cert.not_valid_before_utc <= NOW
    cert.verify_directly_issued_by(cert)
    assert certs.read_oaep_hash(cert) is OaepHash.SHA256


@pytest.mark.parametrize(("oaep_hash", "der_hex"), [
    (OaepHash.SHA256, "0609608648016503040201"),   # DER of OID 2.16.840.1.101.3.4.2.1
    (OaepHash.SHA1, "06052b0e03021a"),              # DER of OID 1.3.14.3.2.26
])
def test_oaep_extension_value_is_der_of_the_hash_oid(viewer_key: rsa.RSAPrivateKey,
                                                     oaep_hash: OaepHash, der_hex: str) -> None:
    cert = certs.build_viewer_certificate(viewer_key, "v", oaep_hash=oaep_hash, now=NOW)
    ext = cert.extensions.get_extension_for_oid(certs.OAEP_HASH_OID)
    assert ext.critical is False
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    assert ext.value.value == bytes.fromhex(der_hex)
    assert certs.read_oaep_hash(cert) is oaep_hash


def _with_extension(key: rsa.RSAPrivateKey, value: bytes) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(3)
            .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=1))
            .add_extension(certs._viewer_key_usage(), critical=True)
            .add_extension(x509.UnrecognizedExtension(certs.OAEP_HASH_OID, value),
                           critical=False)
            .sign(key, hashes.SHA256()))


def test_malformed_or_unknown_oaep_extension_is_refused(viewer_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(CertificateError, match="malformed"):
        certs.read_oaep_hash(_with_extension(viewer_key, b"\x06\x01"))
    with pytest.raises(CertificateError, match="unsupported OAEP hash"):
        # id-md5 (1.2.840.113549.2.5)
        certs.read_oaep_hash(_with_extension(viewer_key, bytes.fromhex("06082a864886f70d0205")))


def test_load_certificate_pem_der_and_bad_input(viewer_key: rsa.RSAPrivateKey) -> None:
    cert = certs.build_viewer_certificate(viewer_key, "alice", oaep_hash=OaepHash.SHA1, now=NOW)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    der = cert.public_bytes(serialization.Encoding.DER)
    assert certs.load_certificate(pem) == cert
    assert certs.load_certificate(der) == cert
    with pytest.raises(CertificateError, match=r"not a readable X\.509"):
        certs.load_certificate(b"hello, not a certificate")
    with pytest.raises(CertificateError, match=r"not a readable X\.509"):
        certs.load_certificate(pem[:-80] + b"\n-----END CERTIFICATE-----\n")
    with pytest.raises(CertificateError, match="2 certificates"):
        certs.load_certificate(pem + pem)
    key_pem = viewer_key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
    with pytest.raises(CertificateError, match="private key"):
        certs.load_certificate(pem + key_pem)
    csr = certs.build_viewer_csr(viewer_key, "alice", oaep_hash=OaepHash.SHA1)
    with pytest.raises(CertificateError, match="no certificate"):
        certs.load_certificate(csr.public_bytes(serialization.Encoding.PEM))


def test_validate_accepts_a_good_self_signed_certificate(viewer_key: rsa.RSAPrivateKey) -> None:
    cert = certs.build_viewer_certificate(viewer_key, "alice", oaep_hash=OaepHash.SHA1, now=NOW)
    assert certs.validate_viewer_certificate(cert, now=NOW) is OaepHash.SHA1
    assert certs.validate_viewer_certificate(cert, now=NOW, oaep_hash=OaepHash.SHA1) is \
        OaepHash.SHA1
    with pytest.raises(CertificateError, match="drop the explicit"):
        certs.validate_viewer_certificate(cert, now=NOW, oaep_hash=OaepHash.SHA256)


def test_validate_checks_time(viewer_key: rsa.RSAPrivateKey) -> None:
    cert = certs.build_viewer_certificate(viewer_key, "alice", oaep_hash=OaepHash.SHA1, now=NOW,
                                          days=10)
    with pytest.raises(CertificateError, match="expired"):
        certs.validate_viewer_certificate(cert, now=NOW + timedelta(days=11))
    with pytest.raises(CertificateError, match="not valid before"):
        certs.validate_viewer_certificate(cert, now=NOW - timedelta(days=1))
    # naive datetimes are taken as UTC
    assert certs.validate_viewer_certificate(cert, now=NOW.replace(tzinfo=None)) is OaepHash.SHA1


def test_validate_refuses_weak_and_non_rsa_keys(ca_key: ec.EllipticCurvePrivateKey) -> None:
    weak = rsa.generate_private_key(65537, 1024)
    cert = certs.build_viewer_certificate(weak, "weak", oaep_hash=OaepHash.SHA1, now=NOW)
    with pytest.raises(CertificateError, match="1024 bits"):
        certs.validate_viewer_certificate(cert, now=NOW)
    # An EC signing certificate (no keyAgreement) is no viewer certificate either.
    ec_cert = certs.build_archiver_certificate(ca_key, "archiver", now=NOW)
    with pytest.raises(CertificateError, match="keyAgreement"):
        certs.validate_viewer_certificate(ec_cert, now=NOW)
    p384 = ec.generate_private_key(ec.SECP384R1())
    p384_cert = certs.build_viewer_certificate(p384, "p384", oaep_hash=OaepHash.ECDH_P256, now=NOW)
    with pytest.raises(CertificateError, match="only P-256"):
        certs.validate_viewer_certificate(p384_cert, now=NOW)


def test_ec_p256_viewer_certificates(ca_key: ec.EllipticCurvePrivateKey) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certs.build_viewer_certificate(key, "eve", oaep_hash=OaepHash.ECDH_P256, now=NOW)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_agreement and not usage.key_encipherment
    assert certs.read_oaep_hash(cert) is None  # the scheme is fixed by the key type
    assert certs.validate_viewer_certificate(cert, now=NOW) is OaepHash.ECDH_P256
    with pytest.raises(CertificateError, match="no RSA-OAEP key scheme"):
        certs.validate_viewer_certificate(cert, now=NOW, oaep_hash=OaepHash.SHA256)
    csr = certs.build_viewer_csr(key, "eve", oaep_hash=OaepHash.ECDH_P256)
    assert csr.is_signature_valid


def test_validate_needs_key_encipherment_and_no_ca(viewer_key: rsa.RSAPrivateKey) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    base = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(viewer_key.public_key()).serial_number(5)
            .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=1))
            .add_extension(certs.oaep_hash_extension(OaepHash.SHA1), critical=False))
    with pytest.raises(CertificateError, match="no keyUsage"):
        certs.validate_viewer_certificate(base.sign(viewer_key, hashes.SHA256()), now=NOW)
    sign_only = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    with pytest.raises(CertificateError, match="keyEncipherment"):
        certs.validate_viewer_certificate(
            base.add_extension(sign_only, critical=True).sign(viewer_key, hashes.SHA256()),
            now=NOW)
    ca = (base.add_extension(certs._viewer_key_usage(), critical=True)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True))
    with pytest.raises(CertificateError, match="CA certificate"):
        certs.validate_viewer_certificate(ca.sign(viewer_key, hashes.SHA256()), now=NOW)


def test_validate_detects_an_altered_self_signed_certificate(
        viewer_key: rsa.RSAPrivateKey) -> None:
    cert = certs.build_viewer_certificate(viewer_key, "alice", oaep_hash=OaepHash.SHA1, now=NOW)
    der = bytearray(cert.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    with pytest.raises(CertificateError, match="self-signature does not verify"):
        certs.validate_viewer_certificate(x509.load_der_x509_certificate(bytes(der)), now=NOW)


def test_validate_requires_a_hash_when_none_is_recorded(viewer_key: rsa.RSAPrivateKey,
                                                        ca_key: ec.EllipticCurvePrivateKey
                                                        ) -> None:
    ca = _ca_cert(ca_key)
    csr = certs.build_viewer_csr(viewer_key, "alice", oaep_hash=OaepHash.SHA256)
    cert = _issue(csr, ca, ca_key, copy_extensions=False)
    assert certs.read_oaep_hash(cert) is None
    with pytest.raises(CertificateError, match="give it explicitly"):
        certs.validate_viewer_certificate(cert, now=NOW, site_ca=[ca])
    assert certs.validate_viewer_certificate(cert, now=NOW, site_ca=[ca],
                                             oaep_hash=OaepHash.SHA256) is OaepHash.SHA256


def test_csr_carries_the_requested_extensions(viewer_key: rsa.RSAPrivateKey) -> None:
    csr = certs.build_viewer_csr(viewer_key, "alice", oaep_hash=OaepHash.SHA1)
    assert csr.is_signature_valid
    assert certs.read_oaep_hash(csr) is OaepHash.SHA1
    assert csr.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment
    loaded = certs.load_csr(csr.public_bytes(serialization.Encoding.PEM))
    assert loaded == csr
    with pytest.raises(CertificateError):
        certs.load_csr(b"garbage")


def test_site_ca_chain(viewer_key: rsa.RSAPrivateKey, ca_key: ec.EllipticCurvePrivateKey) -> None:
    ca = _ca_cert(ca_key)
    other_key = ec.generate_private_key(ec.SECP256R1())
    impostor = _ca_cert(other_key)  # same name, different key
    csr = certs.build_viewer_csr(viewer_key, "alice", oaep_hash=OaepHash.SHA256)
    cert = _issue(csr, ca, ca_key, copy_extensions=True)
    assert certs.validate_viewer_certificate(cert, now=NOW, site_ca=[impostor, ca]) is \
        OaepHash.SHA256
    with pytest.raises(CertificateError, match="not issued by the site CA"):
        certs.validate_viewer_certificate(cert, now=NOW, site_ca=[impostor])
    self_signed = certs.build_viewer_certificate(viewer_key, "alice", oaep_hash=OaepHash.SHA1,
                                                 now=NOW)
    with pytest.raises(CertificateError, match="not issued by the site CA"):
        certs.validate_viewer_certificate(self_signed, now=NOW, site_ca=[ca])
    with pytest.raises(CertificateError, match="site CA certificate expired"):
        certs.validate_viewer_certificate(cert, now=NOW + timedelta(days=364), site_ca=[
            _expiring_ca(ca_key)])


def test_certificate_of_an_unknown_issuer_is_refused(viewer_key: rsa.RSAPrivateKey,
                                                     ca_key: ec.EllipticCurvePrivateKey) -> None:
    """Without --site-ca, a certificate that another key issued cannot have its signature
    checked: it is refused (it was accepted with an unverifiable issuer signature), whether
    its signature is genuine or forged; with the issuer as site CA it is verified and accepted."""
    ca = _ca_cert(ca_key)
    csr = certs.build_viewer_csr(viewer_key, "alice", oaep_hash=OaepHash.SHA256)
    genuine = _issue(csr, ca, ca_key, copy_extensions=True)
    forged = _issue(csr, ca, ec.generate_private_key(ec.SECP256R1()), copy_extensions=True)
    for cert in (genuine, forged):
        with pytest.raises(CertificateError, match=r"does not know.*--site-ca"):
            certs.validate_viewer_certificate(cert, now=NOW)
    assert certs.validate_viewer_certificate(genuine, now=NOW, site_ca=[ca]) is OaepHash.SHA256
    with pytest.raises(CertificateError, match="not issued by the site CA"):
        certs.validate_viewer_certificate(forged, now=NOW, site_ca=[ca])
    self_signed = certs.build_viewer_certificate(viewer_key, "alice", oaep_hash=OaepHash.SHA256,
                                                 now=NOW)
    assert certs.validate_viewer_certificate(self_signed, now=NOW) is OaepHash.SHA256


def _expiring_ca(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Site CA")])
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(2)
            .not_valid_before(NOW - timedelta(days=10)).not_valid_after(NOW + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))


def test_archiver_certificate(ca_key: ec.EllipticCurvePrivateKey) -> None:
    cert = certs.build_archiver_certificate(ca_key, "Archiver 1", now=NOW)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_encipherment
    cert.verify_directly_issued_by(cert)
    with pytest.raises(CertificateError, match="P-256"):
        certs.build_archiver_certificate(ec.generate_private_key(ec.SECP384R1()), "a", now=NOW)


def test_build_refuses_bad_names_and_days(viewer_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(CertificateError):
        certs.build_viewer_certificate(viewer_key, "", oaep_hash=OaepHash.SHA1, now=NOW)
    with pytest.raises(CertificateError):
        certs.build_viewer_certificate(viewer_key, "x" * 65, oaep_hash=OaepHash.SHA1, now=NOW)
    with pytest.raises(CertificateError):
        certs.build_viewer_certificate(viewer_key, "a", oaep_hash=OaepHash.SHA1, now=NOW, days=0)


def test_same_public_key(viewer_key: rsa.RSAPrivateKey) -> None:
    other = rsa.generate_private_key(65537, 2048)
    assert certs.same_public_key(viewer_key.public_key(), viewer_key.public_key())
    assert not certs.same_public_key(viewer_key.public_key(), other.public_key())
    assert not certs.same_public_key(viewer_key.public_key(), None)


def test_certificate_round_trips_oaep_wrap(viewer_key: rsa.RSAPrivateKey) -> None:
    # The hash read back from the certificate opens what was wrapped with it.
    cert = certs.build_viewer_certificate(viewer_key, "alice", oaep_hash=OaepHash.SHA256, now=NOW)
    oaep_hash = certs.validate_viewer_certificate(cert, now=NOW)
    algorithm = oaep_hash.algorithm()
    pad = padding.OAEP(padding.MGF1(algorithm), algorithm, None)
    public = cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    assert viewer_key.decrypt(public.encrypt(b"k" * 32, pad), pad) == b"k" * 32
