"""Access grants, pure: the format, its crypto and the reader's keys from outside the stream
(software keys; the end-to-end tests use SoftHSM tokens and a real Archiver)."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from keyservice.certs import build_viewer_certificate
from keyservice.crypto import Epoch, new_minute_key, open_epoch_opener, seal_segment
from keyservice.errors import FormatError, IntegrityError, NoMatchingIdentity
from keyservice.format import DataStream, EpochOpener, Header, Mode
from keyservice.fusion_writer import ManifestChain, StreamWriter
from keyservice.grants import (
    ENTRY_LEN,
    GRANT_MAGIC,
    MAX_GRANT_KEYS,
    GrantKey,
    decode_grant,
    encode_grant,
    make_grant,
    open_grant,
)
from keyservice.identity import Recipient, SoftwareEcIdentity, fingerprint
from keyservice.keyscheme import KeyScheme
from keyservice.reader import SegmentMissing, SegmentPlaintext, StreamEnded, StreamReader, StreamRequest
from tests.client.streams import T0, software_signer, software_viewer

KEYS = [GrantKey(DataStream.VIDEO, os.urandom(16), os.urandom(32)) for _ in range(3)] + [
    GrantKey(DataStream.AUDIO, os.urandom(16), os.urandom(32))]


def ec_viewer(name: str) -> SoftwareEcIdentity:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build_viewer_certificate(key, name, oaep_hash=KeyScheme.ECDH_P256,
                                    now=dt.datetime.now(dt.UTC))
    return SoftwareEcIdentity(cert, key)


@pytest.fixture(scope="module")
def rsa_pair() -> tuple:
    return software_viewer("investigator"), software_viewer("other")


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_grant_round_trip_one_token_operation(kind: str, rsa_pair: tuple) -> None:
    grantee = rsa_pair[0] if kind == "rsa" else ec_viewer("investigator-ec")
    oaep = KeyScheme.RSA_OAEP_SHA256 if kind == "rsa" else KeyScheme.ECDH_P256
    blob = make_grant(Recipient(grantee.certificate, oaep), "cam1", T0, T0 + 7_200_000, KEYS,
                      T0 + 86_400_000)
    public = decode_grant(blob)
    assert public.camera == "cam1" and (public.from_ms, public.to_ms) == (T0, T0 + 7_200_000)
    assert public.grantee_fingerprint == fingerprint(grantee.certificate)
    assert public.key_ids == {k.key_id for k in KEYS}
    assert not any(k.key in blob for k in KEYS)  # the public part holds no key
    before = grantee.operations
    opened = open_grant(grantee, blob)
    assert grantee.operations - before == 1
    assert opened.keys == {k.key_id: k.key for k in KEYS}
    assert encode_grant(public) == blob  # the encoding is canonical


def test_every_changed_byte_is_refused(rsa_pair: tuple) -> None:
    grantee = rsa_pair[0]
    blob = make_grant(Recipient(grantee.certificate, KeyScheme.RSA_OAEP_SHA256), "cam1", T0, T0 + 60_000,
                      KEYS[:2], T0)
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises((FormatError, IntegrityError, NoMatchingIdentity)):
            open_grant(grantee, bytes(bad))


def test_wrong_grantee_and_relabelled_grant(rsa_pair: tuple) -> None:
    grantee, other = rsa_pair
    blob = make_grant(Recipient(grantee.certificate, KeyScheme.RSA_OAEP_SHA256), "cam1", T0, T0 + 1, KEYS,
                      T0)
    with pytest.raises(NoMatchingIdentity, match="not for yours"):
        open_grant(other, blob)
    # Readdressed to the other viewer: its key cannot open a KEK sealed to the grantee.
    forged = encode_grant(replace(decode_grant(blob),
                                  grantee_fingerprint=fingerprint(other.certificate)))
    with pytest.raises(IntegrityError):
        open_grant(other, forged)
    # Entries moved from one grant into another (same grantee): their AD names the old grant.
    second = decode_grant(make_grant(Recipient(grantee.certificate, KeyScheme.RSA_OAEP_SHA256), "cam1",
                                     T0, T0 + 1, KEYS, T0))
    spliced = replace(second, entries=decode_grant(blob).entries)
    with pytest.raises(IntegrityError):
        open_grant(grantee, encode_grant(spliced))
    # The range widened by whoever stores it: refused.
    with pytest.raises(IntegrityError):
        open_grant(grantee, encode_grant(replace(decode_grant(blob), to_ms=T0 + 86_400_000)))


def test_grant_kek_and_epoch_openers_are_not_interchangeable(rsa_pair: tuple) -> None:
    grantee = rsa_pair[0]
    recipient = Recipient(grantee.certificate, KeyScheme.RSA_OAEP_SHA256)
    _epoch, opener = Epoch.start(recipient, 60, T0)
    grant = decode_grant(make_grant(recipient, "cam1", T0, T0 + 1, KEYS, T0))
    # An epoch opener's ciphertext as a grant's sealed KEK (a hostile Archiver using the token
    # as an oracle): refused, and so is the grant's sealed KEK as an epoch opener.
    with pytest.raises(IntegrityError):
        open_grant(grantee, encode_grant(replace(grant, sealed_kek=opener.ciphertext)))
    with pytest.raises(IntegrityError):
        open_epoch_opener(grantee, EpochOpener(opener.epoch_id, opener.viewer_fingerprint,
                                               opener.key_scheme, 60, opener.start_period,
                                               grant.sealed_kek))


def test_malformed_grants_are_format_errors(rsa_pair: tuple) -> None:
    grantee = rsa_pair[0]
    blob = make_grant(Recipient(grantee.certificate, KeyScheme.RSA_OAEP_SHA256), "cam1", T0, T0 + 1, KEYS,
                      T0)
    grant = decode_grant(blob)
    for bad in (b"", b"XXXXXXXX" + blob[8:], blob[:-1], blob + b"\x00",
                blob[:-ENTRY_LEN], encode_grant(replace(grant, entries=grant.entries[:1] * 2)),
                encode_grant(replace(grant, entries=())),
                encode_grant(replace(grant, from_ms=T0 + 5, to_ms=T0))):
        with pytest.raises(FormatError):
            decode_grant(bad)
    assert blob.startswith(GRANT_MAGIC)
    with pytest.raises(ValueError, match="at most"):
        make_grant(Recipient(grantee.certificate, KeyScheme.RSA_OAEP_SHA256), "cam1", T0, T0, [
            GrantKey(DataStream.VIDEO, os.urandom(16), bytes(32))
            for _ in range(MAX_GRANT_KEYS + 1)], T0)


# --- the reader: keys from outside the stream, checked against the signed commitments ------
def grant_stream(viewer_cert_fp: bytes, signer, plan: list[tuple[int, bytes]], nonce: bytes
                 ) -> tuple[bytes, dict[bytes, bytes]]:
    """A playback stream as served under a grant: segments and manifests, no key material.
    Returns it and the minute keys by key id (what the grant would carry)."""
    writer = StreamWriter(Header(
        archiver_cert_der=signer.certificate.public_bytes(Encoding.DER),
        viewer_fingerprint=viewer_cert_fp, request_id=os.urandom(16), created_ms=T0,
        mode=Mode.PLAYBACK, range_from_ms=T0, range_to_ms=T0 + 600_000, cameras=("cam1",),
        request_nonce=nonce))
    parts, keys = [writer.start()], {}
    chain = ManifestChain("cam1")
    for seq, (capture, data) in enumerate(plan):
        key = new_minute_key("cam1", DataStream.VIDEO, capture)
        keys[key.key_id] = key.key
        segment = seal_segment(key, seq, capture, data, duration_ms=1000)
        _manifest, manifest_bytes = chain.issue([segment], [key], signer, capture)
        parts += [writer.add(segment), writer.add(manifest_bytes)]
    parts.append(writer.end(signer, 1, (("cam1", chain.next_seq),)))
    return b"".join(parts), keys


def test_reader_uses_known_keys_only_when_they_match_the_signed_commitment(rsa_pair: tuple) -> None:
    grantee = rsa_pair[0]
    signer = software_signer()
    nonce = os.urandom(16)
    request = StreamRequest(nonce, ("cam1",), Mode.PLAYBACK, T0, T0 + 600_000)
    plan = [(T0 + i * 1000, f"segment {i}".encode() * 50) for i in range(4)]
    stream, keys = grant_stream(fingerprint(grantee.certificate), signer, plan, nonce)

    def read(known: dict[bytes, bytes] | None) -> tuple[StreamReader, list]:
        reader = StreamReader(grantee, lambda cert: None, request=request, known_keys=known)
        events = reader.feed(stream)
        reader.finish()
        return reader, events

    reader, events = read(keys)
    assert [e.data for e in events if isinstance(e, SegmentPlaintext)] == [d for _, d in plan]
    assert isinstance(events[-1], StreamEnded)
    assert reader.token_operations == 0
    assert {k: v.key for k, v in reader.verified_keys.items()} == keys

    # Without the keys: the segments are there, but nothing decrypts (reported missing).
    _reader, events = read(None)
    assert sum(isinstance(e, SegmentMissing) for e in events) == 4
    # A key that is not the one the Archiver committed to: refused, nothing released.
    wrong = dict(keys)
    wrong[next(iter(keys))] = os.urandom(32)
    reader = StreamReader(grantee, lambda cert: None, request=request, known_keys=wrong)
    with pytest.raises(IntegrityError):
        reader.feed(stream)
    # Only some keys: the others' segments are missing (the player reports it), never opened.
    part = dict(list(keys.items())[:2])
    reader, events = read(part)
    assert len([e for e in events if isinstance(e, SegmentPlaintext)]) == 2
    assert set(reader.verified_keys) == set(part)
