"""Issue 23, item 2, through a real Archiver (HTTPS, production mode) with SoftHSM viewers:
after a revocation on every camera the cameras keep the current key period's key while their
next chains are prepared off the ingest path, in the Archiver's chain preparation process
(archiver.chain_worker). The revoked viewer can derive no key of any segment from the next key
period on (every chain state ever wrapped for it, opened with its own token, is tried on every
archived segment); the viewer kept opens everything; and a kill of the Archiver right after
the revocation, or while the preparation process holds a batch, while segments keep arriving,
loses no acknowledged segment's key material and leaves an archive ``check`` finds consistent.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from keyservice.crypto import (
    ChainDeriver,
    KekRatchet,
    max_ratchet_index,
    open_epoch_opener,
    open_segment,
    split_key_id,
    unwrap_chain_record,
)
from keyservice.errors import IntegrityError
from keyservice.format import ChainRecord, EpochOpener, Segment, decode_record
from keyservice.identity import fingerprint
from tests.archiver.retention_helpers import cli
from tests.fixtures.procfs import pipe_pending, stop_process
from tests.fixtures.server import ArchiverServer
from tests.fixtures.viewer import fetch, login, play

from .conftest import Viewer

CAMERAS = ["rev1", "rev2", "rev3"]


def _period_ms(server: ArchiverServer) -> int:
    return server.key_period_s * 1000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _sleep_until(t_ms: int) -> None:
    while (left := t_ms - _now_ms()) > 0:
        time.sleep(left / 1000)


def _put_all(server: ArchiverServer, tokens: dict[str, str], tag: int) -> dict[str, bytes]:
    sent = {}
    for camera, token in tokens.items():
        data = os.urandom(1500) + bytes([tag]) * 1000
        assert server.put_segment(camera, token, data) == 201
        sent[camera] = data
    return sent


def _segments(data_dir: Path) -> list[Segment]:
    segments = []
    for path in sorted((data_dir / "archive").glob("*/*.fsa")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            end = pos + 5 + int.from_bytes(data[pos + 1:pos + 5], "big")
            record = decode_record(data[pos:end])
            if isinstance(record, Segment):
                segments.append(record)
            pos = end
    return segments


def _derivable(viewer: Viewer, data_dir: Path) -> list[ChainDeriver]:
    """Every chain state the Archiver ever wrapped for ``viewer``, opened with its token."""
    fp = fingerprint(viewer.identity.certificate).hex()
    db = sqlite3.connect(f"file:{data_dir / 'archiver.sqlite3'}?mode=ro", uri=True)
    try:
        openers = dict(db.execute("SELECT epoch_id, record FROM epochs WHERE fingerprint=?",
                                  (fp,)).fetchall())
        records = [row[0] for row in db.execute(
            "SELECT record FROM chain_records WHERE fingerprint=?", (fp,))]
    finally:
        db.close()
    ratchets: dict[bytes, tuple[KekRatchet, EpochOpener]] = {}
    chains = []
    for raw in records:
        record = decode_record(raw)
        assert isinstance(record, ChainRecord)
        if record.epoch_id not in ratchets:
            opener = decode_record(openers[record.epoch_id])
            assert isinstance(opener, EpochOpener)
            ratchets[record.epoch_id] = (KekRatchet(
                record.epoch_id, open_epoch_opener(viewer.identity, opener)), opener)
        ratchet, opener = ratchets[record.epoch_id]
        seed = unwrap_chain_record(ratchet.kek_at(record.ratchet_index), record,
                                   fingerprint(viewer.identity.certificate))
        chains.append(ChainDeriver(record, seed, max_ratchet_index(opener.period_s)))
    return chains


def _readable(chains: list[ChainDeriver], segments: list[Segment]) -> set[bytes]:
    """What any of ``chains`` opens, each segment tried with its step's key in every chain."""
    opened = set()
    for segment in segments:
        step = split_key_id(segment.key_id)[1]
        for deriver in chains:
            if step <= deriver.max_step:
                try:
                    opened.add(open_segment(deriver.key(step), segment))
                except IntegrityError:
                    continue
    return opened


def _played(server: ArchiverServer, viewer: Viewer, camera: str) -> list[bytes]:
    session = login(server.url, viewer.identity, verify=server.verify)
    response = fetch(server.url, session, camera, verify=server.verify)
    assert response.status_code == 200, response.text
    played = play(viewer.identity, response.content)
    assert played.ended and not played.skipped
    return [p.data for p in played.plaintexts]


def test_a_revoked_viewer_opens_nothing_from_the_next_key_period_and_the_kept_one_everything(
        https_archiver: ArchiverServer, make_viewer: Callable[[str], Viewer]) -> None:
    server = https_archiver
    alice, bob = make_viewer("alice"), make_viewer("bob")
    tokens = {camera: server.add_camera(camera) for camera in CAMERAS}
    alice_fp = server.add_viewer(alice.pem)  # all cameras
    server.add_viewer(bob.pem)
    sent: dict[str, list[bytes]] = {camera: [] for camera in CAMERAS}
    for tag in (1, 2):
        for camera, data in _put_all(server, tokens, tag).items():
            sent[camera].append(data)
    server.revoke(alice_fp)
    # The Archiver took the revocation at or before now: its key period is at most this one.
    revoked_period = _now_ms() // _period_ms(server)
    for camera, data in _put_all(server, tokens, 3).items():  # maybe still that period
        sent[camera].append(data)
    _sleep_until((revoked_period + 1) * _period_ms(server) + 20)
    after: set[bytes] = set()
    for tag in (4, 5):
        for camera, data in _put_all(server, tokens, tag).items():
            sent[camera].append(data)
            after.add(data)

    for camera in CAMERAS:  # the viewer kept opens everything, in order, on every camera
        assert _played(server, bob, camera) == sent[camera]
    server.stop()
    segments = _segments(server.data_dir)
    assert len(segments) == 5 * len(CAMERAS)
    alice_reads = _readable(_derivable(alice, server.data_dir), segments)
    assert not alice_reads & after  # nothing from the next key period on
    assert {d for c in CAMERAS for d in sent[c][:2]} <= alice_reads
    assert _readable(_derivable(bob, server.data_dir), segments) == {
        d for c in CAMERAS for d in sent[c]}


class _Uploader(threading.Thread):
    """One camera pushing segments back to back; remembers what was acknowledged (201)."""

    def __init__(self, server: ArchiverServer, camera: str, token: str) -> None:
        super().__init__(daemon=True)
        self.server, self.camera, self.token = server, camera, token
        self.acknowledged: list[bytes] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            data = os.urandom(2000) + self.camera.encode() * 100
            try:
                status = self.server.put_segment(self.camera, self.token, data)
            except Exception:  # the Archiver was killed under the request: not acknowledged
                return
            if status == 201:
                self.acknowledged.append(data)


def test_a_kill_right_after_a_revocation_loses_no_acknowledged_segments_keys(
        https_archiver: ArchiverServer, make_viewer: Callable[[str], Viewer]) -> None:
    server = https_archiver
    alice, bob = make_viewer("alice"), make_viewer("bob")
    cameras = [f"kill{i}" for i in range(6)]
    tokens = {camera: server.add_camera(camera) for camera in cameras}
    alice_fp = server.add_viewer(alice.pem)
    server.add_viewer(bob.pem)
    uploaders = [_Uploader(server, c, t) for c, t in tokens.items()]
    for uploader in uploaders:
        uploader.start()
    deadline = time.monotonic() + 60
    while not all(u.acknowledged for u in uploaders):
        assert time.monotonic() < deadline, "the cameras' first segments were not archived"
        time.sleep(0.05)
    server.revoke(alice_fp)
    revoked_period = _now_ms() // _period_ms(server)
    # Killed once every camera has had a segment acknowledged in the next key period (its
    # chain switched), with uploads in flight. Each camera has one upload in flight at most:
    # the second acknowledged after the boundary was sent after it.
    _sleep_until((revoked_period + 1) * _period_ms(server) + 20)
    counts = [len(u.acknowledged) for u in uploaders]
    deadline = time.monotonic() + 60
    while any(len(u.acknowledged) < n + 2 for u, n in zip(uploaders, counts, strict=True)):
        assert time.monotonic() < deadline, "no segment was archived after the revocation"
        time.sleep(0.01)
    server.kill()
    for uploader in uploaders:
        uploader.stop.set()
        uploader.join(60)
    server.process = None
    server.start()
    for uploader in uploaders:  # every acknowledged segment is still served, and opens
        played = _played(server, bob, uploader.camera)
        assert played[:len(uploader.acknowledged)] == uploader.acknowledged
    server.stop()
    alice_reads = _readable(_derivable(alice, server.data_dir), _segments(server.data_dir))
    bob_reads = _readable(_derivable(bob, server.data_dir), _segments(server.data_dir))
    for uploader in uploaders:
        assert set(uploader.acknowledged) <= bob_reads
        assert uploader.acknowledged[-1] not in alice_reads  # sent in a later key period


def _chain_worker(server: ArchiverServer) -> int | None:
    """The pid of the Archiver's chain preparation process, if it runs."""
    assert server.process is not None
    for task in Path(f"/proc/{server.process.pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"archiver.chain_worker" in command:
                return int(child)
    return None


def _poll(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_an_archiver_killed_while_its_chains_are_prepared_keeps_a_consistent_archive(
        https_archiver: ArchiverServer, make_viewer: Callable[[str], Viewer]) -> None:
    """The first revocation's chains are prepared in the chain preparation process; then it is
    stopped (SIGSTOP) and the Archiver killed (SIGKILL) while the second revocation's request
    waits in its pipe, after the cameras got more segments acknowledged meanwhile (ingest does
    not wait for the process). Restarted: ``check`` finds the archive consistent, the viewer
    kept plays every acknowledged segment, and neither revoked viewer opens any segment
    recorded after the restart (a new chain, wrapped without them)."""
    server = https_archiver
    alice, carol, bob = make_viewer("alice"), make_viewer("carol"), make_viewer("bob")
    tokens = {camera: server.add_camera(camera) for camera in ("mid1", "mid2", "mid3")}
    alice_fp = server.add_viewer(alice.pem)
    carol_fp = server.add_viewer(carol.pem)
    server.add_viewer(bob.pem)
    sent: dict[str, list[bytes]] = {camera: [] for camera in tokens}
    for camera, data in _put_all(server, tokens, 1).items():
        sent[camera].append(data)
    started = server.metric("fusion_key_chains_started_total")
    server.revoke(alice_fp)
    _poll(lambda: server.metric("fusion_key_chains_started_total") >= started + len(tokens),
          "the first revocation's chains to be prepared")
    worker = _chain_worker(server)
    assert worker is not None  # they were made in the preparation process
    stop_process(worker)
    try:
        server.revoke(carol_fp)
        _poll(lambda: pipe_pending(worker) > 0, "the second revocation's request")
        for camera, data in _put_all(server, tokens, 2).items():
            sent[camera].append(data)
        server.kill()
    finally:
        os.kill(worker, signal.SIGKILL)
    server.process = None
    server.start()
    after = _put_all(server, tokens, 3)
    for camera, data in after.items():
        sent[camera].append(data)
    for camera in tokens:
        assert _played(server, bob, camera) == sent[camera]
    server.stop()
    report = json.loads(cli("check", "--data", str(server.data_dir), "--json").stdout)
    assert report["ok"], report
    segments = _segments(server.data_dir)
    assert len(segments) == 3 * len(tokens)
    alice_reads = _readable(_derivable(alice, server.data_dir), segments)
    assert {sent[c][0] for c in tokens} <= alice_reads  # what it was given, it opens
    assert not alice_reads & set(after.values())
    assert not _readable(_derivable(carol, server.data_dir), segments) & set(after.values())
