"""The crypto core against real `cryptography` primitives and the shipped TEST-ONLY keys."""

from __future__ import annotations

import os
import struct
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyservice.crypto import (
    ChainDeriver,
    Epoch,
    KekRatchet,
    KeyChain,
    PeriodKey,
    answer_login_challenge,
    make_login_challenge,
    max_ratchet_index,
    new_minute_key,
    open_epoch_opener,
    open_segment,
    seal_segment,
    split_key_id,
    unwrap_chain_record,
    verify_login_proof,
)
from keyservice.errors import IntegrityError, NoMatchingIdentity
from keyservice.format import ChainRecord, DataStream, Segment
from keyservice.identity import Recipient, SoftwareIdentity, fingerprint
from keyservice.keyscheme import KeyScheme
from tests.vectors import generate as vectors

T = 1_748_779_200_000


@pytest.fixture(scope="module")
def viewer() -> SoftwareIdentity:
    return vectors.load_identity("viewer-a")


@pytest.fixture(scope="module")
def other_viewer() -> SoftwareIdentity:
    return vectors.load_identity("viewer-b")


def fresh_identity(identity: SoftwareIdentity) -> SoftwareIdentity:
    return SoftwareIdentity(identity.certificate, identity.private_key)


def counter_rng() -> vectors.FixedRng:
    return vectors.FixedRng("test_crypto")


# --- segments -----------------------------------------------------------------------------
def test_seal_open_round_trip_and_independent_layout() -> None:
    key = new_minute_key("cam-1", DataStream.VIDEO, T, counter_rng())
    segment = seal_segment(key, 7, T + 5, b"frame data", flags=1, duration_ms=2000)
    assert open_segment(key.key, segment) == b"frame data"
    # Rebuild the nonce and associated data from the spec, not from the module.
    ad = (b"FSE1 segment" + b"\x00\x02" + b"\x05cam-1" + b"\x00" + struct.pack(">Q", 7)
          + struct.pack(">Q", T + 5) + struct.pack(">I", 2000) + key.key_id + b"\x01")
    nonce = bytes(4) + struct.pack(">Q", 7)
    assert AESGCM(key.key).decrypt(nonce, segment.ciphertext, ad) == b"frame data"
    assert segment.tag == segment.ciphertext[-16:] and len(segment.ciphertext) == 10 + 16


@pytest.mark.parametrize("change", [
    {"camera": "cam-2"}, {"stream": DataStream.AUDIO}, {"seq": 8}, {"capture_ms": T + 6},
    {"duration_ms": 1999}, {"key_id": bytes(16)}, {"flags": 0},
], ids=lambda c: next(iter(c)))
def test_associated_data_binds_every_field(change: dict[str, object]) -> None:
    key = new_minute_key("cam-1", DataStream.VIDEO, T, counter_rng())
    segment = seal_segment(key, 7, T + 5, b"frame data", flags=1, duration_ms=2000)
    with pytest.raises(IntegrityError):
        open_segment(key.key, replace(segment, **change))  # type: ignore[arg-type]


def test_wrong_key_and_flipped_bits_fail_opaquely() -> None:
    key = new_minute_key("cam-1", DataStream.VIDEO, T)
    segment = seal_segment(key, 0, T, os.urandom(1000))
    with pytest.raises(IntegrityError):
        open_segment(os.urandom(32), segment)
    for position in (0, 500, len(segment.ciphertext) - 1):
        tampered = bytearray(segment.ciphertext)
        tampered[position] ^= 0x80
        with pytest.raises(IntegrityError) as info:
            open_segment(key.key, replace(segment, ciphertext=bytes(tampered)))
        assert str(info.value) == str(IntegrityError())  # no hint which check failed


def test_a_minute_key_never_seals_a_sequence_number_twice() -> None:
    key = new_minute_key("cam-1", DataStream.VIDEO, T)
    seal_segment(key, 5, T, b"a")
    with pytest.raises(ValueError, match="nonce"):
        seal_segment(key, 5, T, b"b")  # same nonce, other data: would break GCM
    with pytest.raises(ValueError):
        seal_segment(key, 4, T, b"b")
    seal_segment(key, 9, T, b"c")  # gaps are fine


def test_minute_key_repr_hides_the_key() -> None:
    key = new_minute_key("cam-1", DataStream.VIDEO, T)
    assert key.key.hex() not in repr(key) and repr(key.key) not in repr(key)


def test_key_commitment_is_hmac_of_the_spec_input() -> None:
    import hashlib
    import hmac

    key = PeriodKey("cam-1", DataStream.AUDIO, bytes(range(16)), bytes(range(32)), T)
    expected = hmac.new(bytes(range(32)), b"FSE1 key-commitment\x05cam-1\x01" + bytes(range(16)),
                        hashlib.sha256).digest()
    assert key.commitment == expected


# --- epochs and the KEK ratchet -----------------------------------------------------------
def test_epoch_opens_once_and_ratchets(viewer: SoftwareIdentity) -> None:
    recipient = Recipient(viewer.certificate, KeyScheme.RSA_OAEP_SHA256)
    epoch, opener = Epoch.start(recipient, 60, T + 1234)
    assert opener.start_period == (T + 1234) // 60_000 and opener.period_s == 60
    assert opener.viewer_fingerprint == fingerprint(viewer.certificate)
    identity = fresh_identity(viewer)
    kek0 = open_epoch_opener(identity, opener)
    ratchet = KekRatchet(opener.epoch_id, kek0)
    seeds = []
    for minute in (0, 0, 1, 3, 3, 10):
        now = T + 1234 + minute * 60_000
        chain, seed = KeyChain.start("cam-1", DataStream.VIDEO, 60, now)
        record = epoch.wrap_chain(chain, seed, now)
        assert record.ratchet_index == minute and record.start_period == now // 60_000
        seeds.append((seed, record))
    for seed, record in reversed(seeds):  # the viewer may go back in time
        kek = ratchet.kek_at(record.ratchet_index)
        assert unwrap_chain_record(kek, record, opener.viewer_fingerprint) == seed
    assert identity.operations == 1  # one token operation for the whole epoch


def test_ratchet_is_hkdf_with_the_spec_labels() -> None:
    epoch_id, kek0 = bytes(range(16)), bytes(range(32))
    kek1 = HKDF(hashes.SHA256(), 32, salt=epoch_id, info=b"FSE1 kek-ratchet").derive(kek0)
    kek2 = HKDF(hashes.SHA256(), 32, salt=epoch_id, info=b"FSE1 kek-ratchet").derive(kek1)
    assert KekRatchet(epoch_id, kek0).kek_at(2) == kek2


def test_epoch_forgets_old_keks_and_refuses_to_go_back(viewer: SoftwareIdentity) -> None:
    recipient = Recipient(viewer.certificate, KeyScheme.RSA_OAEP_SHA256)
    epoch, opener = Epoch.start(recipient, 60, T)
    kek0 = open_epoch_opener(fresh_identity(viewer), opener)
    epoch.wrap_chain(*KeyChain.start("cam-1", DataStream.VIDEO, 60, T), T + 2 * 60_000)
    # Forward secrecy: nothing reachable from the epoch object still holds KEK0 or KEK1.
    ratchet = KekRatchet(opener.epoch_id, kek0)
    old = {ratchet.kek_at(0), ratchet.kek_at(1)}
    assert not old & {v for v in vars(epoch).values() if isinstance(v, bytes)}
    with pytest.raises(ValueError, match="clock went back"):
        epoch.wrap_chain(*KeyChain.start("cam-1", DataStream.VIDEO, 60, T), T + 60_000)
    assert epoch.usable_at(T + 3 * 60_000) and not epoch.usable_at(T)


def test_epoch_ends_after_its_day(viewer: SoftwareIdentity) -> None:
    epoch, _ = Epoch.start(Recipient(viewer.certificate, KeyScheme.RSA_OAEP_SHA256), 3600, T)
    chain, seed = KeyChain.start("cam-1", DataStream.VIDEO, 3600, T)
    # A day touches at most 86400 // 3600 + 1 = 25 periods: index 25 is the last one.
    assert max_ratchet_index(3600) == 25
    epoch.wrap_chain(chain, seed, T + 25 * 3600_000)
    with pytest.raises(ValueError, match="day"):
        epoch.wrap_chain(chain, seed, T + 26 * 3600_000)
    assert not epoch.usable_at(T + 26 * 3600_000)


def test_chain_record_binds_viewer_and_position(viewer: SoftwareIdentity) -> None:
    epoch, opener = Epoch.start(Recipient(viewer.certificate, KeyScheme.RSA_OAEP_SHA256), 60, T)
    kek = KekRatchet(opener.epoch_id, open_epoch_opener(fresh_identity(viewer), opener))
    chain, seed = KeyChain.start("cam-1", DataStream.VIDEO, 60, T)
    record = epoch.wrap_chain(chain, seed, T)
    fp = opener.viewer_fingerprint
    assert unwrap_chain_record(kek.kek_at(0), record, fp) == seed
    with pytest.raises(IntegrityError):
        unwrap_chain_record(kek.kek_at(0), record, bytes(32))  # another viewer
    for change in ({"camera": "cam-2"}, {"stream": DataStream.AUDIO}, {"chain_id": bytes(12)},
                   {"start_period": record.start_period + 1}, {"epoch_id": bytes(16)}):
        changed = replace(record, **change)  # type: ignore[arg-type]
        with pytest.raises(IntegrityError):
            unwrap_chain_record(kek.kek_at(0), changed, fp)
    with pytest.raises(IntegrityError):  # claimed at another ratchet step
        unwrap_chain_record(kek.kek_at(1), replace(record, ratchet_index=1), fp)


# --- key chains -----------------------------------------------------------------------------
def test_chain_keys_differ_every_period_and_the_viewer_derives_them(
        viewer: SoftwareIdentity) -> None:
    chain, seed = KeyChain.start("cam-1", DataStream.VIDEO, 60, T + 5)
    epoch, _ = Epoch.start(Recipient(viewer.certificate, KeyScheme.RSA_OAEP_SHA256), 60, T + 5)
    record = epoch.wrap_chain(chain, seed, T + 5)
    keys = [chain.key_at(T + minute * 60_000 + 7) for minute in (0, 1, 2, 5, 30)]
    assert len({k.key for k in keys}) == 5 and len({k.key_id for k in keys}) == 5
    assert all(split_key_id(k.key_id) == (chain.chain_id, step)
               for k, step in zip(keys, (0, 1, 2, 5, 30), strict=True))
    deriver = ChainDeriver(record, seed, max_ratchet_index(60))
    for key in reversed(keys):  # in any order
        assert deriver.key(split_key_id(key.key_id)[1]) == key.key
    with pytest.raises(IntegrityError):  # no honest chain goes beyond its day
        deriver.key(max_ratchet_index(60) + 1)


def test_chain_erases_its_past_states_and_refuses_to_go_back() -> None:
    chain, seed = KeyChain.start("cam-1", DataStream.VIDEO, 60, T)
    record = ChainRecord(bytes(16), 0, "cam-1", DataStream.VIDEO, chain.chain_id,
                         chain.start_period, bytes(12), bytes(48))  # only its ids are used
    deriver = ChainDeriver(record, seed, 1441)
    first = chain.key_at(T)
    chain.key_at(T + 3 * 60_000)
    # Forward secrecy on the Archiver: nothing reachable from the chain holds S_0..S_2 or
    # the keys of steps 0..2 any more.
    held = {v for v in vars(chain).values() if isinstance(v, bytes)}
    assert chain.key_at(T + 3 * 60_000 + 1).key == deriver.key(3)
    past = {deriver.key(0), deriver.key(1), deriver.key(2), first.key, *deriver._states[:3]}
    assert seed in past and not held & past
    assert deriver._states[3] in held  # the current state, and only that
    with pytest.raises(ValueError, match="behind"):
        chain.key_at(T + 60_000)
    assert not chain.usable_at(T + 2 * 60_000) and chain.usable_at(T + 4 * 60_000)
    assert not chain.usable_at(T + (max_ratchet_index(60) + 1) * 60_000)


def test_opener_for_another_viewer(viewer: SoftwareIdentity, other_viewer: SoftwareIdentity
                                   ) -> None:
    _, opener = Epoch.start(Recipient(other_viewer.certificate, KeyScheme.RSA_OAEP_SHA1), 60, T)
    identity = fresh_identity(viewer)
    with pytest.raises(NoMatchingIdentity):
        open_epoch_opener(identity, opener)
    assert identity.operations == 0  # refused before touching the token
    # Relabelled to viewer A's fingerprint: the RSA decryption itself fails.
    with pytest.raises(IntegrityError):
        open_epoch_opener(identity, replace(opener, viewer_fingerprint=fingerprint(
            viewer.certificate)))


def test_opener_moved_to_another_epoch_is_refused(viewer: SoftwareIdentity) -> None:
    _, opener = Epoch.start(Recipient(viewer.certificate, KeyScheme.RSA_OAEP_SHA256), 60, T)
    with pytest.raises(IntegrityError):
        open_epoch_opener(fresh_identity(viewer), replace(opener, epoch_id=bytes(16)))


# --- login challenge ------------------------------------------------------------------------
def test_login_round_trip(viewer: SoftwareIdentity) -> None:
    recipient = Recipient(viewer.certificate, KeyScheme.RSA_OAEP_SHA256)
    ciphertext, secret = make_login_challenge(recipient)
    proof = answer_login_challenge(viewer, ciphertext, KeyScheme.RSA_OAEP_SHA256, b"session 1")
    assert verify_login_proof(secret, b"session 1", proof)
    assert not verify_login_proof(secret, b"session 2", proof)
    assert not verify_login_proof(os.urandom(32), b"session 1", proof)
    assert secret not in proof


def test_login_refuses_to_open_an_epoch_opener(viewer: SoftwareIdentity) -> None:
    # A hostile Archiver sends another Archiver's epoch opener as a "challenge": the viewer's
    # token decrypts it, but the answer is refused, so the KEK never leaks.
    _, opener = Epoch.start(Recipient(viewer.certificate, KeyScheme.RSA_OAEP_SHA256), 60, T)
    with pytest.raises(IntegrityError):
        answer_login_challenge(viewer, opener.ciphertext, KeyScheme.RSA_OAEP_SHA256, b"ctx")


def test_opener_refuses_a_login_challenge(viewer: SoftwareIdentity) -> None:
    recipient = Recipient(viewer.certificate, KeyScheme.RSA_OAEP_SHA256)
    ciphertext, _ = make_login_challenge(recipient)
    _, opener = Epoch.start(recipient, 60, T)
    with pytest.raises(IntegrityError):
        open_epoch_opener(viewer, replace(opener, ciphertext=ciphertext))


def test_segment_type_is_what_seal_returns() -> None:
    key = new_minute_key("cam-1", DataStream.METADATA, T)
    segment = seal_segment(key, 0, T, b"")
    assert isinstance(segment, Segment) and segment.stream is DataStream.METADATA
    assert open_segment(AESGCM(key.key), segment) == b""


def test_login_refuses_a_plaintext_of_the_right_length_without_its_label(
        viewer: SoftwareIdentity) -> None:
    recipient = Recipient(viewer.certificate, KeyScheme.RSA_OAEP_SHA256)
    ciphertext, _ = make_login_challenge(recipient)
    assert len(recipient.encrypt(b"X" * 21 + bytes(32))) == len(ciphertext)
    forged = recipient.encrypt(b"FSE1 login-challengeX" + bytes(32))
    with pytest.raises(IntegrityError):
        answer_login_challenge(viewer, forged, KeyScheme.RSA_OAEP_SHA256, b"ctx")
    genuine = recipient.encrypt(b"FSE1 login-challenge\x00" + bytes(32))
    assert len(answer_login_challenge(viewer, genuine, KeyScheme.RSA_OAEP_SHA256, b"ctx")) == 32


def test_login_context_binds_archiver_viewer_and_challenge(viewer: SoftwareIdentity) -> None:
    from keyservice.crypto import login_context

    recipient = Recipient(viewer.certificate, KeyScheme.RSA_OAEP_SHA256)
    ciphertext, secret = make_login_challenge(recipient)
    a, v, c = bytes(32), fingerprint(viewer.certificate), bytes(range(16))
    context = login_context(a, v, c)
    assert context == b"FSE1 login\x00" + a + v + c
    proof = answer_login_challenge(viewer, ciphertext, KeyScheme.RSA_OAEP_SHA256, context)
    assert verify_login_proof(secret, context, proof)
    for other in (login_context(b"\x01" * 32, v, c), login_context(a, bytes(32), c),
                  login_context(a, v, bytes(16))):
        assert not verify_login_proof(secret, other, proof)


def test_seal_refuses_a_segment_over_the_record_limit_before_encrypting() -> None:
    from keyservice.format import MAX_SEGMENT_BODY

    key = new_minute_key("cam-1", DataStream.VIDEO, T)
    too_big = bytes(MAX_SEGMENT_BODY - 35 - len("cam-1") - 16 + 1)
    with pytest.raises(ValueError, match="64 MiB"):
        seal_segment(key, 0, T, too_big)
    seal_segment(key, 0, T, b"x")  # the refused call did not use up sequence number 0
    with pytest.raises(ValueError):
        seal_segment(key, 1.0, T, b"x")  # type: ignore[arg-type]
