"""Issue 19, finding 3: a key chain never crosses a UTC day, whatever the key period.

With a key period that does not divide 86 400 s (7 s), one period straddles midnight. The
first segments of day D+1 used to be sealed under day D's chain (the minute key of the
straddling period was reused), so retention of day D had to keep D's chain records, and a
backup copy of D's archive file still opened in full with the viewer's token. The archive is
made through the Archiver's real write path with a simulated clock (bench.generate, real
SoftHSM signer), retention runs in a real Archiver process, and the viewer's own SoftHSM token
opens every chain state left anywhere in the data directory (index and key journals).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from keyservice.crypto import (
    ChainDeriver,
    KekRatchet,
    max_ratchet_index,
    open_epoch_opener,
    open_segment,
    split_key_id,
    unwrap_chain_record,
)
from keyservice.errors import FormatError, IntegrityError
from keyservice.format import ChainRecord, EpochOpener, Segment, decode_record
from keyservice.identity import fingerprint
from tests.archiver.conftest import Viewer
from tests.archiver.retention_helpers import DAY_MS, cli, day_name, generate, today_ms
from tests.fixtures.server import ArchiverServer

PERIOD_S = 7  # does not divide a day: 86 400 = 7 x 12 342 + 6
SEGMENTS_PER_SIDE = 90  # 1 s segments on each side of midnight


def _records(path: Path) -> list[bytes]:
    data, pos, out = path.read_bytes(), 0, []
    while pos + 5 <= len(data):
        end = pos + 5 + int.from_bytes(data[pos + 1:pos + 5], "big")
        out.append(data[pos:end])
        pos = end
    return out


def _segments(path: Path) -> list[Segment]:
    found = []
    for raw in _records(path):
        record = decode_record(raw)
        if isinstance(record, Segment):
            found.append(record)
    return found


def _every_chain_left(viewer: Viewer, data_dir: Path) -> list[ChainDeriver]:
    """Every chain state anyone holding the data directory (index and key journals) and the
    viewer's token can open."""
    openers: dict[bytes, EpochOpener] = {}
    records: list[ChainRecord] = []

    def take(raw: bytes) -> None:
        try:
            record = decode_record(raw)
        except FormatError:
            return
        if isinstance(record, EpochOpener):
            openers[record.epoch_id] = record
        elif isinstance(record, ChainRecord):
            records.append(record)

    db = sqlite3.connect(f"file:{data_dir / 'archiver.sqlite3'}?mode=ro", uri=True)
    try:
        for (raw,) in db.execute("SELECT record FROM epochs"):
            take(raw)
        for (raw,) in db.execute("SELECT record FROM chain_records"):
            take(raw)
    finally:
        db.close()
    for journal in (data_dir / "archive").rglob("*.fsk"):
        for raw in _records(journal):
            take(raw)
    own = fingerprint(viewer.identity.certificate)
    keks: dict[bytes, KekRatchet] = {}
    chains = []
    for record in records:
        opener = openers.get(record.epoch_id)
        if opener is None:
            continue
        if record.epoch_id not in keks:
            keks[record.epoch_id] = KekRatchet(record.epoch_id,
                                               open_epoch_opener(viewer.identity, opener))
        seed = unwrap_chain_record(keks[record.epoch_id].kek_at(record.ratchet_index), record, own)
        chains.append(ChainDeriver(record, seed, max_ratchet_index(opener.period_s)))
    return chains


def _opened(chains: list[ChainDeriver], segments: list[Segment]) -> int:
    """How many segments any chain opens (each tried at its step in every chain)."""
    count = 0
    for segment in segments:
        step = split_key_id(segment.key_id)[1]
        for chain in chains:
            if step > chain.max_step:
                continue
            try:
                open_segment(chain.key(step), segment)
            except IntegrityError:
                continue
            count += 1
            break
    return count


def _straddled_midnight() -> int:
    """A midnight (4 to 10 days ago) that is not a 7 s period boundary: one period straddles it."""
    for days in range(4, 11):
        midnight = today_ms() - days * DAY_MS
        if midnight % (PERIOD_S * 1000):
            return midnight
    raise AssertionError("unreachable: midnights fall on a 7 s boundary one day in seven")


def test_a_straddling_key_period_leaves_no_key_of_an_expired_day(
        tmp_path: Path, make_viewer) -> None:
    viewer = make_viewer("alice")
    data = tmp_path / "archiver"
    midnight = _straddled_midnight()
    generate(data, "door", midnight - SEGMENTS_PER_SIDE * 1000, 2 * SEGMENTS_PER_SIDE / 3600, 1,
             2048, [viewer.pem], key_period_s=PERIOD_S)
    expired, kept = day_name(midnight - DAY_MS), day_name(midnight)
    archive = data / "archive" / "door"
    # The red team's backup copy of the day that is about to expire.
    backup = tmp_path / "backup.fsa"
    shutil.copyfile(archive / f"{expired}.fsa", backup)
    expired_segments = _segments(backup)
    kept_segments = _segments(archive / f"{kept}.fsa")
    assert len(expired_segments) == len(kept_segments) == SEGMENTS_PER_SIDE

    # Before retention, the viewer opens both days (the decryption below works).
    before = _every_chain_left(viewer, data)
    assert _opened(before, expired_segments) == SEGMENTS_PER_SIDE

    days = (today_ms() - midnight) // DAY_MS  # the expired day goes, the next one stays
    server = ArchiverServer(data, key_period_s=PERIOD_S,
                            extra_args=("--retention-interval", "0.2")).start()
    try:
        cli("cameras", "retention", "door", str(days), "--url", server.url, "--data", str(data))
        deadline = time.monotonic() + 60
        while (archive / f"{expired}.fsa").exists():
            if time.monotonic() > deadline:
                pytest.fail("retention did not remove the expired day within 60 s")
            time.sleep(0.1)
    finally:
        server.stop()
    assert (archive / f"{kept}.fsa").exists()
    removed = [json.loads(line) for line in (data / "audit.jsonl").read_text().splitlines()]
    assert [e["file"] for e in removed if e.get("action") == "retention.remove"] == [
        f"door/{expired}.fsa"]

    after = _every_chain_left(viewer, data)
    assert _opened(after, expired_segments) == 0  # was 90 of 90 with a 7 s period
    assert _opened(after, kept_segments) == SEGMENTS_PER_SIDE  # the kept day still opens
    # No chain is used on both sides of midnight.
    expired_chains = {split_key_id(s.key_id)[0] for s in expired_segments}
    kept_chains = {split_key_id(s.key_id)[0] for s in kept_segments}
    assert not expired_chains & kept_chains
