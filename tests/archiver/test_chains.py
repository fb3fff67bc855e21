"""Issue 14, key chains (format v2) on a real Archiver with real SoftHSM viewer tokens: a viewer
added late and a revoked viewer read nothing outside the chains they were given, and each
chain costs one record per viewer.

"Nothing outside" is checked twice: through the Archiver (the late viewer's stream releases
only what was recorded after it was added, and reports the rest as not authorized, from the
signed chain recipients), and against the archive itself: every chain state the Archiver ever
wrapped for the viewer (all its rows, opened with its own token) is tried on every archived
segment, and opens exactly the segments of its own chains.
"""

from __future__ import annotations

import os
import sqlite3
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
from tests.fixtures.server import ArchiverServer
from tests.fixtures.viewer import fetch, login, play

from .conftest import Viewer

PERIOD_S = 2  # the test Archiver's key period


def _put(server: ArchiverServer, token: str, count: int, tag: int) -> list[bytes]:
    sent = []
    for i in range(count):
        data = os.urandom(1500) + bytes([tag, i]) * 500
        assert server.put_segment("cam1", token, data) == 201
        sent.append(data)
    return sent


def _next_period() -> None:
    """Wait into the next key period (so the chain steps: a new minute key, no new record)."""
    period_ms = PERIOD_S * 1000
    now = time.time_ns() // 1_000_000
    time.sleep((period_ms - now % period_ms) / 1000 + 0.05)


def _archived_segments(data_dir: Path) -> list[Segment]:
    segments = []
    for path in sorted((data_dir / "archive" / "cam1").glob("*.fsa")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            end = pos + 5 + int.from_bytes(data[pos + 1:pos + 5], "big")
            record = decode_record(data[pos:end])
            if isinstance(record, Segment):
                segments.append(record)
            pos = end
    return segments


def _everything_wrapped_for(viewer: Viewer, data_dir: Path) -> dict[bytes, ChainDeriver]:
    """Every chain state the Archiver ever wrapped for ``viewer`` (all rows of its index, which
    keeps revoked viewers' key streams unless asked to delete them), opened with its token."""
    fp = fingerprint(viewer.identity.certificate).hex()
    db = sqlite3.connect(f"file:{data_dir / 'archiver.sqlite3'}?mode=ro", uri=True)
    try:
        openers = {row[0]: row[1] for row in db.execute(
            "SELECT epoch_id, record FROM epochs WHERE fingerprint=?", (fp,))}
        records = [row[0] for row in db.execute(
            "SELECT record FROM chain_records WHERE fingerprint=?", (fp,))]
    finally:
        db.close()
    ratchets: dict[bytes, tuple[KekRatchet, EpochOpener]] = {}
    chains = {}
    for raw in records:
        record = decode_record(raw)
        assert isinstance(record, ChainRecord)
        if record.epoch_id not in ratchets:
            opener = decode_record(openers[record.epoch_id])
            assert isinstance(opener, EpochOpener)
            kek0 = open_epoch_opener(viewer.identity, opener)
            ratchets[record.epoch_id] = (KekRatchet(record.epoch_id, kek0), opener)
        ratchet, opener = ratchets[record.epoch_id]
        seed = unwrap_chain_record(ratchet.kek_at(record.ratchet_index), record,
                                   fingerprint(viewer.identity.certificate))
        chains[record.chain_id] = ChainDeriver(record, seed, max_ratchet_index(opener.period_s))
    return chains


def _readable(chains: dict[bytes, ChainDeriver], segments: list[Segment]) -> list[bytes]:
    """The plaintexts of the segments any of ``chains`` opens. Each segment is tried with the
    key of its step in *every* chain (not just the one its key id names): whatever a viewer
    could derive, nothing else opens."""
    opened = []
    for segment in segments:
        step = split_key_id(segment.key_id)[1]
        for deriver in chains.values():
            if step > deriver.max_step:
                continue
            try:
                opened.append(open_segment(deriver.key(step), segment))
            except IntegrityError:
                continue
    return opened


def test_late_and_revoked_viewers_read_nothing_outside_their_chains(
        archiver_server: ArchiverServer, make_viewer: Callable[[str], Viewer]) -> None:
    alice, bob = make_viewer("alice"), make_viewer("bob")
    token = archiver_server.add_camera("cam1")
    alice_fp = archiver_server.add_viewer(alice.pem, ["cam1"])
    _next_period()
    before_bob = _put(archiver_server, token, 2, 1)
    _next_period()  # the same chain steps on: alice still has one record for both periods
    before_bob += _put(archiver_server, token, 2, 2)
    # bob is late: he joins the running chain from its next key period (issue 23)
    archiver_server.add_viewer(bob.pem, ["cam1"])
    _next_period()
    shared = _put(archiver_server, token, 2, 3)
    _next_period()
    shared += _put(archiver_server, token, 2, 4)
    bob_session = login(archiver_server.url, bob.identity)
    # alice is revoked: the camera keeps the current period's key (she holds it already) and
    # starts a chain without her at the next period (prepared meanwhile, issue 23).
    archiver_server.revoke(alice_fp)
    revocation_period = _put(archiver_server, token, 2, 5)
    _next_period()
    after_alice = _put(archiver_server, token, 2, 6)

    # Through the Archiver: bob's stream releases what was recorded from his authorization on,
    # and reports the earlier segments as not authorized (signed chain recipients).
    played = play(bob.identity, fetch(archiver_server.url, bob_session, "cam1").content)
    assert [p.data for p in played.plaintexts] == shared + revocation_period + after_alice
    assert len(played.skipped) == len(before_bob) and played.ended

    archiver_server.stop()
    segments = _archived_segments(archiver_server.data_dir)
    assert len(segments) == 12
    alice_chains = _everything_wrapped_for(alice, archiver_server.data_dir)
    bob_chains = _everything_wrapped_for(bob, archiver_server.data_dir)
    # Records: alice one for the chain that ran until her revocation's key period (bob's join
    # left it running), bob a join record for that chain and one for the chain her revocation
    # switched to at the next period; two chains.
    assert len(alice_chains) == 1 and len(bob_chains) == 2
    assert len({split_key_id(s.key_id)[0] for s in segments}) == 2
    # alice opens exactly the segments sealed under her chain: those before her revocation
    # and, at most, those of the revocation's own key period; nothing from the next one on.
    hers = [s for s in segments if split_key_id(s.key_id)[0] in alice_chains]
    assert sorted(_readable(alice_chains, segments)) == sorted(_readable(alice_chains, hers))
    readable = set(_readable(alice_chains, segments))
    assert set(before_bob + shared) <= readable
    assert readable <= set(before_bob + shared + revocation_period)
    assert not readable & set(after_alice)
    # bob opens nothing from before he was added (his join record gives the step after it)
    assert sorted(_readable(bob_chains, segments)) == sorted(
        shared + revocation_period + after_alice)


def test_a_journal_entry_of_thousands_of_records_is_appended_whole(tmp_path: Path) -> None:
    """A chain start journals one record per viewer (and an opener per new epoch): more
    buffers than one writev takes (IOV_MAX, 1024 on Linux). The ingest benchmark with 1000
    viewers found it (HTTP 503, EINVAL)."""
    from archiver.storage import ArchiveFiles

    files = ArchiveFiles(tmp_path / "archive")
    records = [bytes([i % 251]) * (100 + i % 7) for i in range(5000)]
    offset = files.append("cam1/2026-01-01.fsk", records)
    files.close()
    assert offset == 0
    assert (tmp_path / "archive" / "cam1" / "2026-01-01.fsk").read_bytes() == b"".join(records)
