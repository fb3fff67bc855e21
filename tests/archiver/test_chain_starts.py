"""Issue 23: chain starts off the Archiver's interpreter, at a day's start and at a restart.

Every chain and every viewer epoch ends at midnight UTC, and an Archiver that restarts has no
chain. At 10 000 viewers on 100 cameras either is a million chain records; wrapped by each
camera's first segment in the Archiver's process they took ingest to 0.22 of its baseline.

* In the last ``NEXT_DAY_LEAD_MS`` of a day the preparing thread has the preparation process
  wrap the next day's chains of the active cameras, under that day's epochs, and commits them;
  each camera's first segment after midnight only switches.
* A chain that must start on the ingest path anyway (a restart, a camera not prepared for) is
  wrapped by the preparation process too; the Archiver wraps it itself only if the process
  fails, or if an authorization changed while it wrapped.

In process, as tests/archiver/test_revocation_keys.py: the Archiver's KeyManager with a real
SQLite index, the real preparation process and an injected clock; each viewer's own private
key (the vectors') opens the chains that serve.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from archiver.chain_worker import ChainWorkerFailed, PrepareRequest, PrepareResult
from archiver.keying import NEXT_DAY_LEAD_MS, KeyManager
from keyservice.crypto import split_key_id
from keyservice.format import ChainRecipients, ChainRecord, DataStream, decode_record
from keyservice.identity import fingerprint
from keyservice.keyscheme import KeyScheme
from tests.archiver.keying_helpers import (
    CAMERAS,
    DAY_MS,
    PERIOD_MS,
    T0,
    Index,
    add_viewers,
    chain_of,
    manager,
    opens,
    wait_until,
)
from tests.vectors import generate as vectors

MIDNIGHT = T0 + DAY_MS


def _wrapped_here(*_: object) -> None:
    raise AssertionError("a chain was wrapped in the Archiver's interpreter")


def _rotate_all(keys: KeyManager, clock: list[int], now_ms: int,
                cameras: list[str] = CAMERAS) -> dict[str, bytes]:
    clock[0] = now_ms
    return {c: keys.key_for(c, DataStream.VIDEO, now_ms).key_id for c in cameras}


def test_the_next_days_chains_are_prepared_before_midnight_and_serve_from_it(
        tmp_path: Path) -> None:
    """Outside the lead nothing is prepared; inside it every camera active in the last key
    periods gets the next day's chain, journaled in that day's key journal; after midnight the
    cameras switch to them without wrapping anything, and each viewer's own key opens them. A
    camera that went quiet is not prepared for: it starts its chain at its next segment."""
    journaled: list[tuple[str, int]] = []
    clock = [MIDNIGHT - NEXT_DAY_LEAD_MS - 2 * PERIOD_MS]
    keys, db, first, second = manager(
        tmp_path, clock, lambda camera, now_ms, records: journaled.append((camera, now_ms)))
    try:
        today = _rotate_all(keys, clock, clock[0])
        assert keys.chains_started == len(CAMERAS) and not keys.pending_chains()
        active = CAMERAS[:2]  # the last camera sends nothing from here until after midnight
        _rotate_all(keys, clock, MIDNIGHT - NEXT_DAY_LEAD_MS - PERIOD_MS, active)
        assert keys.chains_prepared == 0  # not inside the lead yet
        journaled.clear()
        _rotate_all(keys, clock, MIDNIGHT - NEXT_DAY_LEAD_MS + 5_000, active)
        wait_until(lambda: keys.chains_prepared == len(active), "the next day's chains")
        assert {camera for camera, _ in journaled} <= set(CAMERAS)
        assert {now_ms for _, now_ms in journaled} == {MIDNIGHT}  # the new day's journals
        openers = keys.epochs_started
        # The rest of the day: still today's chains.
        late = _rotate_all(keys, clock, MIDNIGHT - 1_000, active)
        assert {c: chain_of(k) for c, k in late.items()} == {
            c: chain_of(today[c]) for c in active}
        started = keys.chains_started
        clock[0] = MIDNIGHT + 700
        after = {c: keys.key_for(c, DataStream.VIDEO, MIDNIGHT + 700) for c in CAMERAS}
        # The active cameras switched (no chain started, no epoch opened); the quiet one
        # started its own chain at its segment, under the epochs started ahead.
        assert keys.chains_started == started + 1 and keys.chains_prepared == len(active)
        assert keys.epochs_started == openers
        for camera, key in after.items():
            chain_id, step = split_key_id(key.key_id)
            assert chain_id != chain_of(today[camera]) and step == 0
            for name, fp in (("viewer-a", first), ("viewer-b", second)):
                assert opens(db, name, fp, key.key_id, key.key)
            found = db.chain_record(first, chain_id)
            assert found is not None
            record = decode_record(found[1])
            assert isinstance(record, ChainRecord)
            assert record.start_period == MIDNIGHT // PERIOD_MS
    finally:
        keys.close()
        db.close()


def test_a_removal_before_midnight_drops_the_next_days_chains_and_they_are_made_again(
        tmp_path: Path) -> None:
    """The next day's chains are wrapped for the viewers of the moment. A revocation after
    they were made drops them: the retiring chains are prepared first, then the next day's
    again, without the revoked viewer, who gets no record of any chain serving after
    midnight."""
    clock = [MIDNIGHT - NEXT_DAY_LEAD_MS + 5_000]
    keys, db, revoked, kept = manager(tmp_path, clock)
    try:
        _rotate_all(keys, clock, clock[0])
        _rotate_all(keys, clock, clock[0] + PERIOD_MS)
        wait_until(lambda: keys.chains_prepared == len(CAMERAS), "the next day's chains")
        change = MIDNIGHT - 3 * PERIOD_MS + 10_000
        _rotate_all(keys, clock, change - 5_000)
        db.directory.revoke_viewer(revoked, change)
        keys.access_removed(revoked, None, change)
        wait_until(lambda: keys.chains_prepared == 2 * len(CAMERAS), "the retiring chains")
        # The next period switches to them, which makes the cameras due for the next day's.
        _rotate_all(keys, clock, change + PERIOD_MS)
        wait_until(lambda: keys.chains_prepared == 3 * len(CAMERAS), "the next day's chains again")
        started = keys.chains_started
        after = _rotate_all(keys, clock, MIDNIGHT + 300)
        assert keys.chains_started == started  # all prepared
        for key_id in after.values():
            assert split_key_id(key_id)[1] == 0
            assert db.chain_record(revoked, chain_of(key_id)) is None
            assert db.chain_record(kept, chain_of(key_id)) is not None
    finally:
        keys.close()
        db.close()


def test_a_viewer_added_before_midnight_gets_the_next_days_chains_from_their_start(
        tmp_path: Path) -> None:
    """An add restarts no running chain (the viewer joins it), but the next day's chains are
    made again with the viewer in them: a join would open them only from their second step,
    and they serve from midnight. The viewer's record opens the day's first step, and the
    chain's one signed start statement lists it."""
    clock = [MIDNIGHT - NEXT_DAY_LEAD_MS + 5_000]
    db = Index(tmp_path)
    add_viewers(db)
    keys = KeyManager(db, 60, signer=vectors.load_signer("archiver"), clock=lambda: clock[0],
                      directory=db.directory)
    try:
        for key_id in _rotate_all(keys, clock, clock[0], ["cam0"]).values():
            keys.take_recipients(chain_of(key_id))
        _rotate_all(keys, clock, clock[0] + PERIOD_MS, ["cam0"])
        wait_until(lambda: keys.chains_prepared == 1, "the next day's chain")
        cert = vectors.load_cert("viewer-c")
        added = fingerprint(cert).hex()
        clock[0] += 1000
        db.directory.add_viewer(added, cert.public_bytes(Encoding.DER), "viewer-c",
                                int(KeyScheme.ECDH_P256), None, clock[0])
        keys.authorization_changed(added, None)
        wait_until(lambda: keys.chains_prepared == 2, "the next day's chain, made again")
        key = keys.key_for("cam0", DataStream.VIDEO, MIDNIGHT + 300)
        chain_id, step = split_key_id(key.key_id)
        assert step == 0 and keys.chains_started == 3
        assert keys.joins == 1  # today's running chain, joined before midnight
        found = db.chain_record(added, chain_id)
        assert found is not None
        record = decode_record(found[1])
        assert isinstance(record, ChainRecord) and record.first_step == 0
        statements = [decode_record(raw) for raw in keys.take_recipients(chain_id)]
        assert all(isinstance(s, ChainRecipients) for s in statements)
        assert [(s.part, s.parts, s.join_step) for s in statements] == [(0, 1, 0)]
        assert bytes.fromhex(added) in statements[0].viewers
    finally:
        keys.close()
        db.close()


def test_a_chain_started_on_the_ingest_path_is_wrapped_by_the_preparation_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A camera's first segment (a fresh Archiver) has its chain wrapped by the preparation
    process; if the process fails, the Archiver wraps it itself, and the segment still gets
    its key. Every viewer's own key opens both chains."""
    clock = [T0 + 1000]
    keys, db, first, second = manager(tmp_path, clock)
    try:
        worker = keys.chain_worker
        assert worker is not None
        asked: list[int] = []
        real = worker.prepare

        def prepare(request: PrepareRequest) -> PrepareResult:
            asked.append(len(request.chains))
            if len(asked) > 1:
                raise ChainWorkerFailed("the chain preparation process stopped (EOFError)")
            return real(request)

        monkeypatch.setattr(worker, "prepare", prepare)
        started = {c: keys.key_for(c, DataStream.VIDEO, T0 + 1000) for c in CAMERAS[:2]}
        assert asked == [1, 1] and worker.starts == 1
        assert keys.chains_started == 2 and keys.chains_prepared == 0
        for key in started.values():
            for name, fp in (("viewer-a", first), ("viewer-b", second)):
                assert opens(db, name, fp, key.key_id, key.key)
    finally:
        keys.close()
        db.close()


def test_cameras_waiting_for_their_first_chain_are_wrapped_in_one_batch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart: while the process wraps the first camera's chain, the other cameras'
    segments arrive and wait; the preparing thread wraps their chains in one batch (the
    viewers' KEKs cross the pipe once, not once a camera), and nothing is wrapped in the
    Archiver's interpreter."""
    clock = [T0 + 1000]
    keys, db, first, second = manager(tmp_path, clock)
    try:
        worker = keys.chain_worker
        assert worker is not None
        asked: list[int] = []
        others_wait = threading.Event()
        real = worker.prepare

        def prepare(request: PrepareRequest) -> PrepareResult:
            asked.append(len(request.chains))
            if len(asked) == 1:
                assert others_wait.wait(30)
            return real(request)

        monkeypatch.setattr(worker, "prepare", prepare)
        monkeypatch.setattr(keys, "_wrap", _wrapped_here)
        keys_of: dict[str, bytes] = {}

        def segment(camera: str) -> None:
            key = keys.key_for(camera, DataStream.VIDEO, T0 + 1000)
            assert opens(db, "viewer-a", first, key.key_id, key.key)
            assert opens(db, "viewer-b", second, key.key_id, key.key)
            keys_of[camera] = key.key_id  # only if both viewers open it

        threads = [threading.Thread(target=segment, args=(c,)) for c in CAMERAS]
        threads[0].start()
        wait_until(lambda: bool(asked), "the first camera's chain in the process")
        for thread in threads[1:]:
            thread.start()
        wait_until(lambda: len(keys._start_requests) == len(CAMERAS), "every camera to wait")
        others_wait.set()
        for thread in threads:
            thread.join(60)
        assert asked == [1, len(CAMERAS) - 1]
        assert sorted(keys_of) == CAMERAS and keys.chains_started == len(CAMERAS)
    finally:
        keys.close()
        db.close()


def test_a_removal_while_the_process_wraps_a_starting_chain_is_not_missed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rotation lock is let go while the process wraps a camera's first chain. A viewer
    revoked meanwhile is in what the process wrapped: that chain is not used, the preparing
    thread wraps another without the viewer, and the camera's segment waits for it."""
    clock = [T0 + 1000]
    keys, db, revoked, kept = manager(tmp_path, clock)
    try:
        worker = keys.chain_worker
        assert worker is not None
        real = worker.prepare
        asked: list[set[str]] = []

        def prepare(request: PrepareRequest) -> PrepareResult:
            answer = real(request)
            asked.append({v.fingerprint for v in request.viewers})
            if len(asked) == 1:
                db.directory.revoke_viewer(revoked, T0 + 1000)
                keys.access_removed(revoked, None, T0 + 1000)
            return answer

        monkeypatch.setattr(worker, "prepare", prepare)
        monkeypatch.setattr(keys, "_wrap", _wrapped_here)
        key = keys.key_for("cam0", DataStream.VIDEO, T0 + 1000)
        assert asked == [{revoked, kept}, {kept}] and keys.chains_started == 1
        assert db.chain_record(revoked, chain_of(key.key_id)) is None
        assert opens(db, "viewer-b", kept, key.key_id, key.key)
    finally:
        keys.close()
        db.close()
