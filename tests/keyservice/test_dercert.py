"""Certificates read as DER bytes and a key (keyservice/dercert.py, issue 23: start-up): they
read exactly what cryptography's X.509 parser reads, refuse what it refuses, and the reader
that now takes them still refuses a stream its header's certificate did not sign and a
certificate that is not the pinned one."""

from __future__ import annotations

import base64
import dataclasses

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from keyservice.crypto.login import LoginChallenge
from keyservice.dercert import DerCertificate, full_certificate, is_certificate, read_certificate
from keyservice.errors import ArchiverFailed, ArchiverMismatch, IntegrityError
from keyservice.format import DataStream
from keyservice.fusion_writer import StreamWriter
from keyservice.identity import SoftwareSigner, fingerprint
from keyservice.keyscheme import KeyScheme, same_public_key
from keyservice.reader import SegmentPlaintext, StreamReader
from tests.keyservice.rig import CAM, Rig, T
from tests.vectors import generate as vectors


@pytest.mark.parametrize("name", ["archiver", "viewer-a"])  # an EC and an RSA certificate
def test_it_reads_what_the_x509_parser_reads(name: str) -> None:
    cert = vectors.load_cert(name)
    der = cert.public_bytes(Encoding.DER)
    pem = cert.public_bytes(Encoding.PEM)
    light = DerCertificate(der)
    assert light.public_bytes(Encoding.DER) == der
    assert light.public_bytes(Encoding.PEM) == pem  # what the login sends, byte for byte
    assert same_public_key(light.public_key(), cert.public_key())
    assert fingerprint(light) == fingerprint(cert) == light.fingerprint
    assert light == cert and cert == light and hash(light) == hash(DerCertificate(der))
    assert light.subject == cert.subject  # anything else: the full parse, on first use
    assert full_certificate(light) == cert and isinstance(full_certificate(light),
                                                          x509.Certificate)
    assert is_certificate(light) and is_certificate(cert) and not is_certificate(der)
    for data in (der, pem, b"\n" + pem.replace(b"\n", b"\r\n") + b"\n"):
        found = read_certificate(data)
        assert isinstance(found, DerCertificate) and found == cert


def test_what_it_does_not_read_simply_goes_to_the_full_loader() -> None:
    """Several certificates, a private key, garbage: read_certificate gives None, and the
    full loader (keyservice.certs.load_certificate) says what is wrong, as it always did."""
    pem = vectors.load_cert("archiver").public_bytes(Encoding.PEM)
    key = vectors.load_signer("archiver").private_key.private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    for data in (pem + pem, key + pem, b"not a certificate", b"-----BEGIN CERTIFICATE-----\n"
                 b"!!!!\n-----END CERTIFICATE-----\n"):
        assert read_certificate(data) is None


def _tampered(der: bytes) -> dict[str, bytes]:
    version = bytes.fromhex("a003020102")  # [0] EXPLICIT INTEGER 2: X.509 v3
    assert der.count(version) == 1
    return {"trailing byte": der + b"\x00", "truncated": der[:-1],
            "version 2": der.replace(version, bytes.fromhex("a003020101")),
            "version 4": der.replace(version, bytes.fromhex("a003020103")),
            "not a certificate": der[4:]}


@pytest.mark.parametrize("case", ["trailing byte", "truncated", "version 2", "version 4",
                                  "not a certificate"])
def test_it_refuses_what_the_x509_parser_refuses(case: str) -> None:
    der = _tampered(vectors.load_cert("archiver").public_bytes(Encoding.DER))[case]
    with pytest.raises((ValueError, x509.InvalidVersion)):
        x509.load_der_x509_certificate(der)
    with pytest.raises(ValueError):
        DerCertificate(der)


def test_the_login_challenge_carries_the_certificate_as_der() -> None:
    """The Archiver's certificate in a login challenge: its DER bytes and key (the login
    context needs its fingerprint); a malformed one is still a malformed challenge."""
    cert = vectors.load_cert("archiver")
    answer = {"archiver_certificate": cert.public_bytes(Encoding.PEM).decode(),
              "challenge_id": "00" * 16, "ciphertext": base64.b64encode(b"x" * 256).decode(),
              "key_scheme": "rsa-oaep-sha256"}
    challenge = LoginChallenge.from_answer(answer)
    assert isinstance(challenge.archiver_certificate, DerCertificate)
    assert fingerprint(challenge.archiver_certificate) == fingerprint(cert)
    assert challenge.key_scheme is KeyScheme.RSA_OAEP_SHA256
    broken = _tampered(cert.public_bytes(Encoding.DER))
    for bad in (b"garbage", broken["version 4"], broken["trailing byte"]):
        pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bad) + \
            b"-----END CERTIFICATE-----\n"
        with pytest.raises(ArchiverFailed, match="malformed"):
            LoginChallenge.from_answer({**answer, "archiver_certificate": pem.decode()})


def _stream(rig: Rig) -> bytes:
    rig.rotate(CAM, DataStream.VIDEO, T)
    rig.segment(CAM, DataStream.VIDEO, T)
    rig.manifest(CAM, T)
    return rig.end()


def test_the_reader_checks_the_header_certificate_it_now_reads_as_der() -> None:
    """The reader's check gets the header's certificate as DER bytes and a key: a stream whose
    header names the Archiver's certificate but whose manifests another key signed releases
    nothing (IntegrityError); a certificate that is not the pinned one is refused before
    anything is opened; the genuine stream still plays."""
    checked: list[object] = []

    def pinned(rig: Rig) -> object:
        def check(cert: x509.Certificate) -> None:
            checked.append(cert)
            rig.pin(cert)
        return check

    rig = Rig()
    genuine = _stream(rig)
    events = rig.reader(request=rig.request(T, T + 600_000)).feed(genuine)  # the control
    assert [e.data for e in events if isinstance(e, SegmentPlaintext)] == rig.plaintexts
    assert checked == []

    forged = Rig()
    # The header carries the Archiver's certificate; everything is signed by another key.
    forged.signer = SoftwareSigner(forged.signer.certificate,
                                   vectors.load_signer("rogue").private_key)
    stream = _stream(forged)
    reader = StreamReader(forged.identity, pinned(forged), request=forged.request(T, T + 600_000))
    with pytest.raises(IntegrityError):
        reader.feed(stream)
    assert len(checked) == 1 and isinstance(checked[0], DerCertificate)
    assert fingerprint(checked[0]) == fingerprint(forged.signer.certificate)  # it was pinned

    impostor = Rig()
    impostor.signer = vectors.load_signer("rogue")  # its own certificate, not the pinned one
    impostor.header = dataclasses.replace(
        impostor.header, archiver_cert_der=impostor.signer.certificate.public_bytes(Encoding.DER))
    impostor.writer = StreamWriter(impostor.header)
    impostor.chunks = [impostor.writer.start()]
    stream = _stream(impostor)
    pin_of_the_archiver = vectors.load_cert("archiver")

    def pin(cert: x509.Certificate) -> None:
        checked.append(cert)
        if fingerprint(cert) != fingerprint(pin_of_the_archiver):
            raise ArchiverMismatch("The Archiver's certificate is not the pinned one.")

    reader = StreamReader(impostor.identity, pin, request=impostor.request(T, T + 600_000))
    with pytest.raises(ArchiverMismatch):
        reader.feed(stream)
    assert isinstance(checked[-1], DerCertificate)
