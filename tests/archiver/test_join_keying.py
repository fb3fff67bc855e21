"""Issue 23 item 1 in process: KeyManager joins a viewer authorized while a chain runs (a join
record for that viewer only, and a signed join statement) instead of restarting the chain; a
revocation, a camera removed, a UTC day still start a new chain.

Viewer certificates and keys are the test-only software ones of tests/vectors/keys (the
Archiver side only ever handles public certificates; the viewer side opens the records with
the private key here, as its token would).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from archiver.db import Database
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
from keyservice.keyscheme import KeyScheme
from keyservice.labels import LABEL_CHAIN_JOIN
from tests.archiver.keying_helpers import Index
from tests.fixtures.procfs import pipe_pending, stop_process
from tests.vectors import generate as vectors

DAY_MS = 86_400_000
PERIOD_S = 60
T = 40 * DAY_MS  # a UTC day's start
VIDEO = DataStream.VIDEO


def _add(db: Index, name: str, cameras: list[str] | None, now_ms: int = 0) -> str:
    cert = vectors.load_cert(name)
    fp = fingerprint(cert).hex()
    scheme = KeyScheme.ECDH_P256 if name == "viewer-c" else OaepHash.SHA256  # its EC key
    db.directory.add_viewer(fp, cert.public_bytes(Encoding.DER), name, int(scheme), cameras, now_ms)
    return fp


def _setup(tmp_path: Path) -> tuple[KeyManager, Index, str]:
    db = Index(tmp_path)
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
    db = Index(tmp_path)
    _add(db, "viewer-a", ["cam"])
    keys = KeyManager(db, PERIOD_S, directory=db.directory)
    keys.key_for("cam", VIDEO, T + 10)
    bob = _add(db, "viewer-b", ["cam"])
    keys.authorization_changed(bob, None)
    keys.key_for("cam", VIDEO, T + 20)
    assert keys.chains_started == 2 and keys.joins == 0


def test_joins_are_prepared_off_the_ingest_path_and_open_exactly_from_the_join(
        tmp_path: Path) -> None:
    """Issue 23 item 2: viewers authorized while chains run are joined by the preparing thread
    and the chain preparation process (archiver.chain_worker), not by the cameras' next
    segments: at the next key period the cameras only step. The joining viewer's record opens
    from its join step exactly (the first step no segment was sealed under), not the step
    before, and the join statement is queued before that step's first segment."""
    db = Index(tmp_path)
    alice = _add(db, "viewer-a", None)
    clock = [T + 1000]
    journaled: list[tuple[str, str]] = []

    def journal(camera: str, now_ms: int, records: list[bytes]) -> None:
        journaled.append((threading.current_thread().name, camera))

    keys = KeyManager(db, PERIOD_S, signer=vectors.load_signer("archiver"), journal=journal,
                      clock=lambda: clock[0], directory=db.directory)
    cameras = ["cam0", "cam1"]
    first = {c: keys.key_for(c, VIDEO, T + 1000) for c in cameras}
    for camera in cameras:
        keys.take_recipients(split_key_id(first[camera].key_id)[0])  # archived with it
    clock[0] = T + 20_000
    bob = _add(db, "viewer-b", None, T + 20_000)
    journaled.clear()
    keys.authorization_changed(bob, None)
    deadline = time.monotonic() + 60
    while keys.joins_prepared < len(cameras):
        assert time.monotonic() < deadline, "the joins were not prepared"
        time.sleep(0.05)
    assert {name for name, _ in journaled} == {"fusion-chain-prepare"}
    journaled.clear()
    after = {c: keys.key_for(c, VIDEO, T + PERIOD_S * 1000 + 100) for c in cameras}
    assert not journaled  # nothing wrapped on the ingest path at the switch
    assert keys.joins == keys.joins_prepared == len(cameras) and keys.chains_started == 2
    for camera in cameras:
        chain_id, step = split_key_id(after[camera].key_id)
        assert chain_id == split_key_id(first[camera].key_id)[0] and step == 1
        deriver = _deriver(db, "viewer-b", chain_id)
        assert deriver.key(1) == after[camera].key
        with pytest.raises(Exception):
            deriver.key(0)
        assert _deriver(db, "viewer-a", chain_id).key(0) == first[camera].key
        statements = [decode_record(raw) for raw in keys.take_recipients(chain_id)]
        assert [(s.part, s.parts, s.join_step, s.viewers) for s in statements
                if isinstance(s, ChainRecipients)] == [(1, 1, 1, (bytes.fromhex(bob),))]
    assert alice != bob
    keys.close()


def _poll(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_join_prepared_too_late_is_dropped_and_the_ingest_path_joins_the_viewer(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The preparation process is stopped while it holds a viewer's join; the camera's next
    key period comes first and joins that viewer on the ingest path (as before issue 23 item
    2). The late answer is dropped, not stored: the viewer has one record, from the step the
    ingest path gave it, and nothing fails."""
    db = Index(tmp_path)
    _add(db, "viewer-a", None)
    clock = [T + 1000]
    keys = KeyManager(db, PERIOD_S, signer=vectors.load_signer("archiver"),
                      clock=lambda: clock[0], directory=db.directory)
    first = keys.key_for("cam", VIDEO, T + 1000)
    chain_id = split_key_id(first.key_id)[0]
    clock[0] = T + 20_000
    keys.authorization_changed(_add(db, "viewer-b", None, T + 20_000), None)
    _poll(lambda: keys.joins_prepared == 1, "the first join (it starts the process)")
    assert keys.chain_worker is not None and keys.chain_worker.pid is not None
    worker = keys.chain_worker.pid
    stop_process(worker)
    try:
        clock[0] = T + 30_000
        carol = _add(db, "viewer-c", None, T + 30_000)
        keys.authorization_changed(carol, None)
        _poll(lambda: pipe_pending(worker) > 0, "the second join's request")
        key = keys.key_for("cam", VIDEO, T + PERIOD_S * 1000 + 100)  # joins carol itself
        assert keys.joins == 2 and keys.joins_prepared == 1
    finally:
        os.kill(worker, signal.SIGCONT)
    _poll(lambda: not any(t.name == "fusion-chain-prepare" for t in threading.enumerate()),
          "the late answer to be handled")
    assert keys.joins == 2 and keys.joins_prepared == 1
    deriver = _deriver(db, "viewer-c", chain_id)
    assert deriver.first_step == 1 and deriver.key(1) == key.key
    assert not [r for r in caplog.records if "could not prepare" in r.getMessage()]
    keys.close()
