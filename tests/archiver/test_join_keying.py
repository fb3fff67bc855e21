"""Issue 23 item 1 in process: KeyManager joins a viewer authorized while a chain runs (a join
record for that viewer only, and a signed join statement) instead of restarting the chain; a
revocation, a camera removed, a UTC day still start a new chain.

Viewer certificates and keys are the test-only software ones of tests/vectors/keys (the
Archiver side only ever handles public certificates; the viewer side opens the records with
the private key here, as its token would).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from archiver.db import Database
from archiver.directory import open_directory
from archiver.keying import KeyManager
from keyservice.crypto import (
    ChainDeriver,
    KekRatchet,
    max_ratchet_index,
    open_epoch_opener,
    split_key_id,
    unwrap_chain_record,
)
from keyservice.errors import IntegrityError
from keyservice.format import ChainRecipients, ChainRecord, DataStream, EpochOpener, decode_record
from keyservice.identity import OaepHash, fingerprint
from keyservice.labels import LABEL_CHAIN_JOIN
from tests.vectors import generate as vectors

DAY_MS = 86_400_000
PERIOD_S = 60
T = 40 * DAY_MS  # a UTC day's start
VIDEO = DataStream.VIDEO


class _Index(Database):
    """The index and the site directory on one file, as an Archiver without --directory has
    them: key material in one, the viewers in the other."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir / "archiver.sqlite3")
        self.directory = open_directory(None, data_dir)

    def close(self) -> None:
        self.directory.close()
        super().close()


def _add(db: _Index, name: str, cameras: list[str] | None, now_ms: int = 0) -> str:
    cert = vectors.load_cert(name)
    fp = fingerprint(cert).hex()
    db.directory.add_viewer(fp, cert.public_bytes(Encoding.DER), name, int(OaepHash.SHA256), cameras, now_ms)
    return fp


def _setup(tmp_path: Path) -> tuple[KeyManager, _Index, str]:
    db = _Index(tmp_path)
    alice = _add(db, "viewer-a", ["cam"])
    return KeyManager(db, PERIOD_S, signer=vectors.load_signer("archiver"), directory=db.directory), db, alice


def _deriver(db: Database, name: str, chain_id: bytes) -> ChainDeriver:
    """What the viewer ``name`` derives from its record of a chain, opened with its key."""
    identity = vectors.load_identity(name)
    found = db.chain_record(fingerprint(identity.certificate).hex(), chain_id)
    assert found is not None
    epoch_id, raw = found
    record, opener = decode_record(raw), decode_record(db.epoch_opener(epoch_id) or b"")
    assert isinstance(record, ChainRecord) and isinstance(opener, EpochOpener)
    kek = KekRatchet(epoch_id, open_epoch_opener(identity, opener)).kek_at(record.ratchet_index)
    state = unwrap_chain_record(kek, record, fingerprint(identity.certificate))
    return ChainDeriver(record, state, max_ratchet_index(PERIOD_S))


def test_a_viewer_added_mid_period_joins_from_the_next_step_and_nothing_restarts(
        tmp_path: Path) -> None:
    keys, db, _alice = _setup(tmp_path)
    first = keys.key_for("cam", VIDEO, T + 10)
    chain_id = split_key_id(first.key_id)[0]
    keys.take_recipients(chain_id)  # the start statement, archived with the first segment
    at_3 = keys.key_for("cam", VIDEO, T + 3 * 60_000 + 10)  # step 3's key seals segments now
    bob = _add(db, "viewer-b", ["cam"], T + 3 * 60_000 + 20)
    keys.authorization_changed(bob, None)
    same = keys.key_for("cam", VIDEO, T + 3 * 60_000 + 30)
    assert same is at_3  # the current period's key runs on: no rotation, no join yet
    later = [keys.key_for("cam", VIDEO, T + minute * 60_000 + 10) for minute in (4, 5)]

    # One chain, one start, two records in all: alice's start record and bob's join record.
    assert {split_key_id(k.key_id)[0] for k in later} == {chain_id}
    assert keys.chains_started == 1 and keys.key_records_written == 2 and keys.joins == 1
    # The join statement, signed, naming bob and step 4 (the first step that sealed nothing
    # recorded before his authorization), numbered after the start statement's one part.
    (raw,) = keys.take_recipients(chain_id)
    statement = decode_record(raw)
    assert isinstance(statement, ChainRecipients)
    assert (statement.part, statement.parts, statement.join_step) == (1, 1, 4)
    assert statement.viewers == (bytes.fromhex(bob),)
    signer = vectors.load_signer("archiver")
    public_key = signer.certificate.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert statement.signed_bytes().startswith(LABEL_CHAIN_JOIN)
    public_key.verify(statement.signature, statement.signed_bytes(), ec.ECDSA(hashes.SHA256()))

    # Bob derives exactly the keys from step 4 on; alice all of them; step 3 is not bob's.
    bob_chain, alice_chain = _deriver(db, "viewer-b", chain_id), _deriver(db, "viewer-a", chain_id)
    assert bob_chain.first_step == 4 and alice_chain.first_step == 0
    for key in later:
        step = split_key_id(key.key_id)[1]
        assert bob_chain.key(step) == alice_chain.key(step) == key.key
    assert alice_chain.key(3) == at_3.key
    for step in (0, 1, 2, 3):
        with pytest.raises(IntegrityError):
            bob_chain.key(step)


def test_a_viewer_added_before_the_period_s_first_segment_gets_that_period(
        tmp_path: Path) -> None:
    keys, db, _alice = _setup(tmp_path)
    chain_id = split_key_id(keys.key_for("cam", VIDEO, T + 10).key_id)[0]
    bob = _add(db, "viewer-b", ["cam"])
    keys.authorization_changed(bob, ["cam"])
    # Nothing was sealed in period 2 before bob was added: he is given step 2.
    key = keys.key_for("cam", VIDEO, T + 2 * 60_000 + 10)
    assert _deriver(db, "viewer-b", chain_id).key(2) == key.key
    assert keys.chains_started == 1


def test_only_losing_a_camera_starts_a_new_chain(tmp_path: Path) -> None:
    keys, db, alice = _setup(tmp_path)
    bob = _add(db, "viewer-b", ["cam", "cam2"])
    for camera in ("cam", "cam2"):
        keys.key_for(camera, VIDEO, T + 10)
    assert keys.chains_started == 2

    # Re-authorized with the same cameras, or given one more: no chain restarts.
    keys.authorization_changed(bob, None)
    db.directory.set_viewer_cameras(alice, ["cam", "cam2"])
    keys.authorization_changed(alice, None)
    for camera in ("cam", "cam2"):
        keys.key_for(camera, VIDEO, T + 60_000 + 10)
    assert keys.chains_started == 2 and keys.joins == 1  # alice joined cam2's chain

    # A camera removed from bob: that camera's chain starts anew, without him.
    db.directory.set_viewer_cameras(bob, ["cam"])
    keys.authorization_changed(bob, None)
    fresh = keys.key_for("cam2", VIDEO, T + 60_000 + 20)
    assert keys.chains_started == 3
    assert db.chain_record(bob, split_key_id(fresh.key_id)[0]) is None
    keys.key_for("cam", VIDEO, T + 60_000 + 30)
    assert keys.chains_started == 3  # bob keeps cam: its chain runs on

    # Revoked: every chain it holds starts anew.
    db.directory.revoke_viewer(alice, T + 60_000 + 40)
    keys.authorization_changed(alice, None)
    for camera in ("cam", "cam2"):
        key = keys.key_for(camera, VIDEO, T + 60_000 + 50)
        assert db.chain_record(alice, split_key_id(key.key_id)[0]) is None
    assert keys.chains_started == 5


def test_a_viewer_revoked_before_its_join_gets_nothing(tmp_path: Path) -> None:
    keys, db, _alice = _setup(tmp_path)
    chain_id = split_key_id(keys.key_for("cam", VIDEO, T + 10).key_id)[0]
    bob = _add(db, "viewer-b", ["cam"])
    keys.authorization_changed(bob, None)
    db.directory.revoke_viewer(bob, T + 20)
    keys.authorization_changed(bob, None)  # not a holder yet: nothing to restart
    key = keys.key_for("cam", VIDEO, T + 60_000 + 10)
    assert split_key_id(key.key_id)[0] == chain_id and keys.chains_started == 1
    assert db.chain_record(bob, chain_id) is None and keys.joins == 0


def test_without_a_signer_a_change_restarts_as_before(tmp_path: Path) -> None:
    """A join counts only under a signed statement: a KeyManager that signs none (tests of the
    key schedule alone) restarts the chain instead."""
    db = _Index(tmp_path)
    _add(db, "viewer-a", ["cam"])
    keys = KeyManager(db, PERIOD_S, directory=db.directory)
    keys.key_for("cam", VIDEO, T + 10)
    bob = _add(db, "viewer-b", ["cam"])
    keys.authorization_changed(bob, None)
    keys.key_for("cam", VIDEO, T + 20)
    assert keys.chains_started == 2 and keys.joins == 0
