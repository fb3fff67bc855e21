"""A consolidated part's stream (issue 22, item 4): served by one Archiver, recorded and signed
by another. The header names both; the reader verifies the manifests and chain recipients
against the part's signer and END (this request, its transcript) against the serving
Archiver, and each certificate passes the caller's check."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from keyservice.errors import ArchiverMismatch, FormatError, IntegrityError
from keyservice.format import DataStream, Header, decode_record, encode_record
from keyservice.fusion_writer import StreamWriter
from keyservice.identity import SoftwareSigner, fingerprint
from keyservice.reader import SegmentPlaintext, StreamEnded, StreamReader
from tests.keyservice.rig import CAM, Rig, T


def _signer(name: str) -> SoftwareSigner:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    return SoftwareSigner(cert, key)


def _served(rig: Rig, server: SoftwareSigner, signer_cert: x509.Certificate,
            end_signer: SoftwareSigner | None = None) -> bytes:
    """The rig's camera recorded and signed by rig.signer, served by ``server``."""
    rig.header = replace(rig.header, cameras=(CAM,),
                         archiver_cert_der=server.certificate.public_bytes(Encoding.DER),
                         signer_cert_der=signer_cert.public_bytes(Encoding.DER))
    rig.writer = StreamWriter(rig.header)
    rig.chunks = [rig.writer.start()]
    rig.rotate(CAM, DataStream.VIDEO, T)
    for i in range(3):
        rig.segment(CAM, DataStream.VIDEO, T + 1 + i)
        rig.manifest(CAM, T + 10 + i)
    rig.chunks.append(rig.writer.end(end_signer or server, 1,
                                     [(CAM, rig.chains[CAM].next_seq)]))
    return b"".join(rig.chunks)


def _reader(rig: Rig, trusted: list[x509.Certificate],
            seen: list[x509.Certificate]) -> StreamReader:
    def check(cert: x509.Certificate) -> None:
        seen.append(cert)
        if fingerprint(cert) not in {fingerprint(c) for c in trusted}:
            raise ArchiverMismatch("not a trusted Archiver")
    return StreamReader(rig.identity, check, request=rig.request(T, T + 100))


def test_a_consolidated_part_verifies_against_its_signer_and_its_end_against_the_server(
        ) -> None:
    server = _signer("a1")
    rig = Rig(cameras=(CAM,), range_ms=(T, T + 100))
    recorder = rig.signer.certificate
    data = _served(rig, server, recorder)
    seen: list[x509.Certificate] = []
    events = _reader(rig, [server.certificate, recorder], seen).feed(data)
    assert [e.data for e in events if isinstance(e, SegmentPlaintext)] == rig.plaintexts
    assert isinstance(events[-1], StreamEnded)
    assert seen == [server.certificate, recorder]  # each certificate through the check

    # The part's signer not trusted: refused before anything is decrypted.
    rig = Rig(cameras=(CAM,), range_ms=(T, T + 100))
    with pytest.raises(ArchiverMismatch):
        _reader(rig, [server.certificate], []).feed(_served(rig, server, rig.signer.certificate))
    # END signed by the recorder (it never saw this request): refused.
    rig = Rig(cameras=(CAM,), range_ms=(T, T + 100))
    data = _served(rig, server, rig.signer.certificate, end_signer=rig.signer)
    with pytest.raises(IntegrityError):
        _reader(rig, [server.certificate, rig.signer.certificate], []).feed(data)
    # A header naming a signer that did not sign the manifests (the server passing its own
    # video off as another's, or the reverse): refused.
    rig = Rig(cameras=(CAM,), range_ms=(T, T + 100))
    other = _signer("a2")
    data = _served(rig, server, other.certificate)
    with pytest.raises(IntegrityError):
        _reader(rig, [server.certificate, other.certificate], []).feed(data)


def test_the_signer_field_is_encoded_only_when_set_and_never_empty() -> None:
    server, recorder = _signer("a1"), _signer("a2")
    plain = Header(server.certificate.public_bytes(Encoding.DER), bytes(32), bytes(16), T, 1,
                   T, T + 1, (CAM,), bytes(16))
    served = replace(plain, signer_cert_der=recorder.certificate.public_bytes(Encoding.DER))
    assert decode_record(encode_record(plain)) == plain
    assert decode_record(encode_record(served)) == served
    extra = len(encode_record(served)) - len(encode_record(plain))
    assert extra == 2 + len(served.signer_cert_der)  # nothing added to an ordinary header
    data = encode_record(plain)
    empty = data[:1] + (int.from_bytes(data[1:5], "big") + 2).to_bytes(4, "big") + data[5:] \
        + b"\x00\x00"
    with pytest.raises(FormatError, match="not empty"):
        decode_record(empty)
