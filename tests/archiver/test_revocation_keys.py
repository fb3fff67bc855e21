"""Issue 23, item 2: a revocation on every camera no longer stops ingest. The cameras keep the
current key period's key (the revoked viewer holds it already) while a background thread
prepares their next chains; from the next key period on, the revoked viewer can derive no key.

In process: the Archiver's KeyManager with a real SQLite index and an injected clock; viewer
certificates are the test-only ones of tests/vectors/keys (the Archiver handles only public
certificates). tests/archiver/test_revocation_e2e.py does the same through a real Archiver with
SoftHSM viewers.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from archiver import keying
from archiver.keying import KeyManager
from keyservice.crypto import (
    ChainDeriver,
    KekRatchet,
    KeyChain,
    max_ratchet_index,
    open_epoch_opener,
    split_key_id,
    unwrap_chain_record,
)
from keyservice.crypto.ratchet import Epoch
from keyservice.format import (
    ChainRecipients,
    ChainRecord,
    DataStream,
    EpochOpener,
    decode_record,
    encode_record,
)
from keyservice.identity import fingerprint
from keyservice.keyscheme import KeyScheme, Recipient
from tests.archiver.keying_helpers import (
    CAMERAS,
    KEYS,
    PERIOD_MS,
    PREPARE_THREAD,
    T0,
    Index,
    add_viewers,
    chain_of,
    manager,
    opens,
    wait_until,
)
from tests.fixtures.procfs import pipe_pending, stop_process
from tests.vectors import generate as vectors


def test_the_current_period_keeps_its_key_and_the_next_one_switches_to_prepared_chains(
        tmp_path: Path) -> None:
    clock = [T0 + 1000]
    keys, db, revoked, kept = manager(tmp_path, clock)
    first = {c: keys.key_for(c, DataStream.VIDEO, T0 + 1000) for c in CAMERAS}
    change = T0 + 5 * PERIOD_MS + 20_000
    for camera in CAMERAS:  # the chains stepped into the change's period
        keys.key_for(camera, DataStream.VIDEO, change - 10_000)
    clock[0] = change
    db.directory.revoke_viewer(revoked, change)
    keys.access_removed(revoked, None, change)
    # The rest of the period: the same keys (no chain restart on the ingest path).
    during = {c: keys.key_for(c, DataStream.VIDEO, change + 30_000) for c in CAMERAS}
    assert {chain_of(k.key_id) for k in during.values()} == {
        chain_of(k.key_id) for k in first.values()}
    wait_until(lambda: keys.chains_prepared == len(CAMERAS), "the chains to be prepared")
    assert keys.pending_chains() == len(CAMERAS)
    after = {c: keys.key_for(c, DataStream.VIDEO, change + 45_000) for c in CAMERAS}
    assert keys.pending_chains() == 0
    for camera in CAMERAS:
        chain_id, step = split_key_id(after[camera].key_id)
        assert chain_id != chain_of(first[camera].key_id)
        assert step == 1  # prepared in the change's period, first used in the next one
        assert db.chain_record(kept, chain_id) is not None
        assert db.chain_record(revoked, chain_id) is None
        # Committed before it served any key (and before this camera asked for one).
        assert db.chain_record(kept, chain_id) is not None
    assert keys.chains_started == 2 * len(CAMERAS) and keys.chains_prepared == len(CAMERAS)


def test_a_late_preparation_makes_the_next_period_wait_never_use_the_old_chain(
        tmp_path: Path) -> None:
    """The background thread is held inside its journal write past the period boundary: the
    camera's first segment of the next period waits for it, and gets a chain without the
    revoked viewer."""
    release, inside = threading.Event(), threading.Event()

    def journal(camera: str, now_ms: int, records: list[bytes]) -> None:
        # The revocation's chain, not cam0's first (the same thread starts it)
        if threading.current_thread().name == PREPARE_THREAD and keys.chains_started:
            inside.set()
            assert release.wait(60)

    clock = [T0 + 1000]
    keys, db, revoked, kept = manager(tmp_path, clock, journal)
    old = keys.key_for("cam0", DataStream.VIDEO, T0 + 1000)
    change = T0 + 10_000
    clock[0] = change
    db.directory.revoke_viewer(revoked, change)
    keys.access_removed(revoked, None, change)
    assert inside.wait(60)
    got: list[bytes] = []
    segment = threading.Thread(target=lambda: got.append(
        keys.key_for("cam0", DataStream.VIDEO, T0 + PERIOD_MS + 100).key_id))
    segment.start()
    segment.join(1.0)
    assert segment.is_alive() and not got  # it waits: no key of the next period yet
    release.set()
    segment.join(60)
    assert len(got) == 1
    chain_id = chain_of(got[0])
    assert chain_id != chain_of(old.key_id)
    assert db.chain_record(kept, chain_id) is not None
    assert db.chain_record(revoked, chain_id) is None


def test_a_failed_preparation_leaves_the_chain_to_the_cameras_next_segment(
        tmp_path: Path) -> None:
    failures = []

    def journal(camera: str, now_ms: int, records: list[bytes]) -> None:
        if threading.current_thread().name == PREPARE_THREAD:
            failures.append(camera)
            raise OSError("disk full")

    clock = [T0 + 1000]
    keys, db, revoked, kept = manager(tmp_path, clock, journal)
    old = {c: keys.key_for(c, DataStream.VIDEO, T0 + 1000) for c in CAMERAS}
    change = T0 + 10_000
    clock[0] = change
    db.directory.revoke_viewer(revoked, change)
    keys.access_removed(revoked, None, change)
    wait_until(lambda: bool(failures) and keys.pending_chains() == len(CAMERAS)
          and not keys.chains_prepared, "the preparation to fail")
    for camera in CAMERAS:
        key = keys.key_for(camera, DataStream.VIDEO, T0 + PERIOD_MS + 100)
        chain_id = chain_of(key.key_id)
        assert chain_id != chain_of(old[camera].key_id)
        assert db.chain_record(kept, chain_id) is not None
        assert db.chain_record(revoked, chain_id) is None
    assert keys.pending_chains() == 0 and keys.chains_prepared == 0


def test_a_change_during_preparation_is_not_served_a_chain_wrapped_before_it(
        tmp_path: Path) -> None:
    """Two revocations: chains prepared for the first (wrapped for the second viewer too) are
    not used once the second has happened."""
    release, inside = threading.Event(), threading.Event()

    def journal(camera: str, now_ms: int, records: list[bytes]) -> None:
        # The revocation's chain, not cam0's first (the same thread starts it, for its
        # segment): held until the second revocation is under way.
        if (threading.current_thread().name == PREPARE_THREAD and keys.chains_started
                and not release.is_set()):
            inside.set()
            assert release.wait(60)

    clock = [T0 + 1000]
    keys, db, first, second = manager(tmp_path, clock, journal)
    keys.key_for("cam0", DataStream.VIDEO, T0 + 1000)
    clock[0] = T0 + 10_000
    db.directory.revoke_viewer(first, T0 + 10_000)
    keys.access_removed(first, None, T0 + 10_000)
    assert inside.wait(60)
    # The second revocation waits for the chain being prepared (the lock it takes), so
    # it is made from another thread; then the preparation goes on.
    second_done = threading.Thread(target=lambda: (
        db.directory.revoke_viewer(second, T0 + 11_000),
        keys.access_removed(second, None, T0 + 11_000)))
    second_done.start()
    release.set()
    second_done.join(60)
    wait_until(lambda: keys.chains_prepared == 2 or keys.chains_started == 3,
          "the second preparation")
    key = keys.key_for("cam0", DataStream.VIDEO, T0 + PERIOD_MS + 100)
    chain_id = chain_of(key.key_id)
    assert db.chain_record(first, chain_id) is None
    assert db.chain_record(second, chain_id) is None


def test_an_added_viewer_joins_the_running_chain_and_the_prepared_one_at_the_switch(
        tmp_path: Path) -> None:
    """Adds join (issue 23 item 1), removals switch at the next period (item 2): a viewer
    added while a camera's chain is retiring restarts nothing; it joins the chain prepared
    without the revoked viewer when the camera switches to it (its members, installed at the
    switch, carry the pending join), from the first step that chain seals under."""
    clock = [T0 + 1000]
    db = Index(tmp_path)
    revoked, kept = add_viewers(db)
    keys = KeyManager(db, 60, signer=vectors.load_signer("archiver"), clock=lambda: clock[0],
                      directory=db.directory)
    old = chain_of(keys.key_for("cam0", DataStream.VIDEO, T0 + 1000).key_id)
    keys.take_recipients(old)  # the start statement, archived with the first segment
    change = T0 + 10_000
    clock[0] = change
    db.directory.revoke_viewer(revoked, change)
    keys.access_removed(revoked, None, change)
    wait_until(lambda: keys.chains_prepared == 1, "the chain to be prepared")
    cert = vectors.load_cert("viewer-c")
    added = fingerprint(cert).hex()
    db.directory.add_viewer(added, cert.public_bytes(Encoding.DER), "viewer-c", int(KeyScheme.ECDH_P256),
                  None, change + 1000)
    keys.authorization_changed(added, None)
    # The rest of the revocation's period: the same chain (an add restarts nothing).
    assert chain_of(keys.key_for("cam0", DataStream.VIDEO, change + 30_000).key_id) == old
    key = keys.key_for("cam0", DataStream.VIDEO, T0 + PERIOD_MS + 100)
    new, step = split_key_id(key.key_id)
    assert new != old and step == 1
    assert keys.chains_started == 2 and keys.chains_prepared == 1 and keys.joins == 1
    assert db.chain_record(revoked, new) is None
    assert db.chain_record(kept, new) is not None
    # The added viewer's join record on the prepared chain opens exactly from step 1.
    identity = vectors.load_identity("viewer-c")
    found = db.chain_record(added, new)
    assert found is not None
    record = decode_record(found[1])
    opener = decode_record(db.epoch_opener(found[0]) or b"")
    assert isinstance(record, ChainRecord) and isinstance(opener, EpochOpener)
    assert record.first_step == 1
    kek = KekRatchet(found[0], open_epoch_opener(identity, opener)).kek_at(record.ratchet_index)
    deriver = ChainDeriver(record, unwrap_chain_record(kek, record, bytes.fromhex(added)),
                           max_ratchet_index(60))
    assert deriver.key(1) == key.key
    # The prepared chain's statements: its own start part, then the join, numbered after it.
    statements = [decode_record(raw) for raw in keys.take_recipients(new)]
    assert all(isinstance(s, ChainRecipients) for s in statements)
    assert [(s.part, s.parts, s.join_step) for s in statements] == [(0, 1, 0), (1, 1, 1)]
    assert statements[1].viewers == (bytes.fromhex(added),)


def test_a_change_that_also_removes_a_camera_restarts_it_at_once_even_while_retiring(
        tmp_path: Path) -> None:
    """A change that adds and removes cameras goes through authorization_changed: the removed
    camera's chain, retiring after a revocation, restarts at its next segment (in the same
    key period), without the viewer that lost it; the chain prepared for it (wrapped for that
    viewer too) is never used."""
    clock = [T0 + 1000]
    db = Index(tmp_path)
    revoked, kept = add_viewers(db)
    keys = KeyManager(db, 60, signer=vectors.load_signer("archiver"), clock=lambda: clock[0],
                      directory=db.directory)
    old = chain_of(keys.key_for("cam0", DataStream.VIDEO, T0 + 1000).key_id)
    clock[0] = T0 + 10_000
    db.directory.revoke_viewer(revoked, T0 + 10_000)
    keys.access_removed(revoked, None, T0 + 10_000)
    wait_until(lambda: keys.chains_prepared == 1, "the chain to be prepared")
    db.directory.set_viewer_cameras(kept, ["cam1"])  # cam0 taken away, cam1 given: one change
    keys.authorization_changed(kept, None)
    now = chain_of(keys.key_for("cam0", DataStream.VIDEO, T0 + 20_000).key_id)
    assert now != old and keys.pending_chains() == 0
    later = chain_of(keys.key_for("cam0", DataStream.VIDEO, T0 + PERIOD_MS + 100).key_id)
    assert later == now  # not the prepared chain: it was wrapped for the viewer that lost cam0
    assert db.chain_record(kept, now) is None and db.chain_record(revoked, now) is None


def test_a_killed_preparation_process_leaves_its_camera_to_start_its_own_chain(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chains are wrapped in the chain preparation process (archiver.chain_worker), here one
    camera per batch. The process is stopped once the first camera's chain is made, and
    killed while the second camera's request waits in its pipe: that camera starts its chain
    at its own next segment, without the revoked viewer; the third camera's batch starts a new
    process. Every chain of the next period opens for the viewer kept (its own key), none has
    a record for the revoked one, and the killed process is reaped."""
    monkeypatch.setattr(keying, "PREPARE_BATCH_RECORDS", 1)
    stopped: list[int] = []

    def journal(camera: str, now_ms: int, records: list[bytes]) -> None:
        # A revocation's chain, not the cameras' first (the same thread starts them)
        if (threading.current_thread().name == PREPARE_THREAD
                and keys.chains_started >= len(CAMERAS) and not stopped):
            assert keys.chain_worker is not None and keys.chain_worker.pid is not None
            stopped.append(keys.chain_worker.pid)
            stop_process(stopped[0])

    clock = [T0 + 1000]
    keys, db, revoked, kept = manager(tmp_path, clock, journal)
    assert keys.chain_worker is not None
    old = {c: chain_of(keys.key_for(c, DataStream.VIDEO, T0 + 1000).key_id) for c in CAMERAS}
    change = T0 + 10_000
    clock[0] = change
    db.directory.revoke_viewer(revoked, change)
    keys.access_removed(revoked, None, change)
    wait_until(lambda: bool(stopped) and pipe_pending(stopped[0]) > 0,
          "the second camera's request to wait in the stopped process's pipe")
    os.kill(stopped[0], signal.SIGKILL)
    wait_until(lambda: keys.chains_prepared == 2 and keys.chain_worker is not None
          and keys.chain_worker.starts == 2, "the third camera's chain from a new process")
    assert not Path(f"/proc/{stopped[0]}").exists()  # killed and reaped, not a zombie
    # The rest of the change's period: the old chains still serve (no restart on ingest).
    for camera in CAMERAS:
        assert chain_of(keys.key_for(camera, DataStream.VIDEO, change + 30_000).key_id) == (
            old[camera])
    after = {c: keys.key_for(c, DataStream.VIDEO, T0 + PERIOD_MS + 100) for c in CAMERAS}
    steps = {c: split_key_id(k.key_id)[1] for c, k in after.items()}
    assert steps == {"cam0": 1, "cam1": 0, "cam2": 1}  # cam1 started its own at the period
    assert keys.chains_started == 6 and keys.chains_prepared == 2
    for camera, key in after.items():
        assert chain_of(key.key_id) != old[camera]
        assert db.chain_record(revoked, chain_of(key.key_id)) is None
        assert opens(db, "viewer-b", kept, key.key_id, key.key)
    second = keys.chain_worker.pid
    assert second is not None and second != stopped[0]
    keys.close()
    assert not Path(f"/proc/{second}").exists()  # ended with the KeyManager


def test_a_chain_record_encoded_directly_is_the_record_wrap_chain_builds() -> None:
    cert = x509.load_pem_x509_certificate((KEYS / "TEST-ONLY-viewer-a.cert.pem").read_bytes())
    recipient = Recipient(cert, KeyScheme.RSA_OAEP_SHA256)
    counter = [0]

    def rng(n: int) -> bytes:  # deterministic, and different for every call
        counter[0] += 1
        return counter[0].to_bytes(4, "big") * (n // 4) + bytes(n % 4)

    def made(encoded: bool) -> list[bytes]:
        counter[0] = 0
        epoch, _ = Epoch.start(recipient, 60, T0 + 5 * PERIOD_MS, rng)
        out = []
        for minute, camera in ((5, "cam0"), (5, "a-much-longer-camera-name"), (9, "cam0")):
            chain, seed = KeyChain.start(camera, DataStream.AUDIO, 60, T0 + minute * PERIOD_MS,
                                         rng)
            now = T0 + minute * PERIOD_MS + 1
            for first_step in (0, 1, 7):  # a start record, and join records (issue 23)
                out.append(
                    epoch.wrap_chain_encoded(chain, seed, now, rng, first_step=first_step)
                    if encoded else encode_record(
                        epoch.wrap_chain(chain, seed, now, rng, first_step=first_step)))
        return out

    assert made(True) == made(False)
    assert len({len(record) for record in made(True)}) > 1  # join records carry their step
