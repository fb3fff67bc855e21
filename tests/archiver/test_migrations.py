"""Schema versions (issue 15, deliverable 2): a data directory made by the unversioned schema
(the one on main before versions, kept as tests/archiver/fixtures/schema_v0.sql) migrates
forward at open, keeps its rows, and leaves a backup of what it was first."""

from __future__ import annotations

import json
import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from archiver.auth import digest
from archiver.db import Database, SegmentRow
from archiver.directory import open_directory
from archiver.migrations import MIGRATIONS, SCHEMA_VERSION, missing_tables
from bench.generate import segment_bytes
from keyservice.certs import load_certificate, read_oaep_hash
from keyservice.errors import UsageError
from keyservice.identity import fingerprint
from keyservice.token import Token
from tests.archiver.conftest import Viewer
from tests.archiver.retention_helpers import (
    DAY_MS,
    cli,
    files_holding,
    generate,
    key_material,
    today_ms,
)
from tests.fixtures.server import ArchiverServer
from tests.fixtures.tokens import TokenHandle, enroll_viewer
from tests.fixtures.viewer import fetch, login, play

FIXTURE = Path(__file__).parent / "fixtures" / "schema_v0.sql"



def _shipped_schema(db_path: Path, version: int) -> sqlite3.Connection:
    """A database brought to ``version`` by the shipped migrations themselves."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    for number, step in enumerate(MIGRATIONS[:version], start=1):
        conn.execute("BEGIN")
        step(conn)
        conn.execute(f"PRAGMA user_version={number}")
        conn.execute("COMMIT")
    return conn

def _old_data_dir(path: Path) -> Path:
    """An index as the old Archiver left it: its schema, a camera, a viewer on one camera, a
    key stream and a segment with its manifest, written with the old column order."""
    path.mkdir()
    db_path = path / "archiver.sqlite3"
    conn = sqlite3.connect(db_path)
    conn.executescript(FIXTURE.read_text())
    conn.execute("INSERT INTO cameras VALUES ('door', ?, NULL, 1000, NULL)", (b"\1" * 32,))
    conn.execute("INSERT INTO clients VALUES ('ab' || ?, ?, 'CN=alice', 2, 0, 2000, NULL, 0)",
                 ("cd" * 31, b"cert"))
    conn.execute("INSERT INTO client_cameras VALUES ('ab' || ?, 'door')", ("cd" * 31,))
    conn.execute("INSERT INTO epochs VALUES (?, 'ab' || ?, 3000, ?)", (b"E" * 16, "cd" * 31, b"op"))
    conn.execute("INSERT INTO key_records VALUES ('ab' || ?, ?, 'door', ?, 3000, ?)",
                 ("cd" * 31, b"K" * 16, b"E" * 16, b"kr"))
    conn.execute("INSERT INTO segments VALUES ('door', 0, 0, 3000, ?, 100, ?, 'door/1970-01-01.fsa',"
                 " 0, 150, 0, 5000)", (b"K" * 16, b"D" * 32))
    conn.execute("INSERT INTO manifests VALUES ('door', 0, 'door/1970-01-01.fsa', 150, 80, ?,"
                 " 3000, 5000)", (b"H" * 32,))
    conn.commit()
    conn.close()
    return db_path


def test_an_old_data_directory_migrates_and_keeps_its_rows(tmp_path: Path) -> None:
    db_path = _old_data_dir(tmp_path / "data")
    db = Database(db_path)
    directory = open_directory(None, db_path.parent)  # stamped and upgraded after the index
    try:
        assert db.migrated_from == 0 and db.schema_version() == SCHEMA_VERSION
        assert [c.name for c in directory.cameras()] == ["door"]
        assert directory.cameras()[0].retention_days is None  # the site default
        viewer = directory.viewer("ab" + "cd" * 31)
        assert viewer is not None and viewer.subject == "CN=alice"
        assert viewer.cameras == ("door",) and viewer.authorized_on("door")
        assert db.chain_record("ab" + "cd" * 31, b"K" * 16) == (b"E" * 16, b"kr")
        assert db.epoch_opener(b"E" * 16) == b"op"
        assert db.segments_of("door", 0) == [SegmentRow(
            "door", 0, 0, 3000, b"K" * 16, 100, b"D" * 32, "door/1970-01-01.fsa", 0, 150, 0, 5000)]
        assert db.recorded_range("door") == (3000, 5000, 1)
        assert directory.holds() == [] and db.expired_files() == []
        tables = {row[0] for row in db._query("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"viewers", "viewer_cameras"} <= tables
        assert not {"clients", "client_cameras"} & tables
    finally:
        directory.close()
        db.close()
    # The backup: the old database as it was, readable, private.
    backups = list(db_path.parent.glob("archiver.sqlite3.v0-*.bak"))
    assert len(backups) == 1 and db.backup == backups[0]
    assert stat.S_IMODE(backups[0].stat().st_mode) == 0o600
    old = sqlite3.connect(backups[0])
    try:
        assert old.execute("PRAGMA user_version").fetchone()[0] == 0
        assert old.execute("SELECT subject FROM clients").fetchall() == [("CN=alice",)]
    finally:
        old.close()
    # Opened again: nothing to migrate, no second backup.
    again = Database(db_path)
    assert again.migrated_from == SCHEMA_VERSION and again.backup is None
    again.close()
    # One backup each: the index's (v0) and the directory's before its upgrade (d0001).
    assert len(list(db_path.parent.glob("*.bak"))) == 2


def test_a_new_database_starts_at_the_current_version_without_a_backup(tmp_path: Path) -> None:
    db = Database(tmp_path / "archiver.sqlite3")
    assert db.schema_version() == SCHEMA_VERSION and db.backup is None
    db.close()
    assert not list(tmp_path.glob("*.bak"))


def test_a_database_from_a_newer_archiver_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "archiver.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(UsageError, match="schema version"):
        Database(path)


def test_a_real_archiver_starts_on_an_old_data_directory_and_carries_on(
        tmp_path: Path, make_viewer: Callable[[str], Viewer]) -> None:
    """The whole Archiver on a version-0 index: it migrates at start, knows its camera and its
    viewer (now in the viewers table), takes a segment on the camera's old token, and the
    viewer plays it."""
    viewer = make_viewer("olga")
    cert = load_certificate(viewer.pem.read_bytes())
    fp = fingerprint(cert).hex()
    data = tmp_path / "archiver"
    data.mkdir()
    conn = sqlite3.connect(data / "archiver.sqlite3")
    conn.executescript(FIXTURE.read_text())
    conn.execute("INSERT INTO cameras VALUES ('door', ?, NULL, 1000, NULL)", (digest("tok"),))
    oaep = read_oaep_hash(cert)  # what the viewer's token opens (SoftHSM: SHA-1)
    assert oaep is not None
    conn.execute("INSERT INTO clients VALUES (?, ?, ?, ?, 1, 2000, NULL, 0)",
                 (fp, cert.public_bytes(Encoding.DER), cert.subject.rfc4514_string(), int(oaep)))
    conn.commit()
    conn.close()
    server = ArchiverServer(data).start()
    try:
        assert [c["name"] for c in server.admin("GET", "/v1/admin/cameras", expect=200)] == [
            "door"]
        assert [v["fingerprint"] for v in server.admin("GET", "/v1/admin/clients",
                                                        expect=200)] == [fp]
        assert server.put_segment("door", "tok", b"old data directory, new segment") == 201
        session = login(server.url, viewer.identity)
        response = fetch(server.url, session, "door")
        assert response.status_code == 200, response.text
        played = play(viewer.identity, response.content)
        assert played.ended and played.data == b"old data directory, new segment"
    finally:
        server.stop()
    assert len(list(data.glob("archiver.sqlite3.v0-*.bak"))) == 1


def _version_6_data_dir(path: Path) -> Path:
    """An index as the Archiver of schema version 6 left it (format-v1 table names on v2 data):
    a viewer's chain record in ``key_records``, a chain's recipients in ``key_grants``, an
    access grant; made by the shipped migrations 1 to 6 themselves."""
    path.mkdir()
    db_path = path / "archiver.sqlite3"
    conn = _shipped_schema(db_path, 6)
    fp = "ab" + "cd" * 31
    conn.execute("INSERT INTO cameras (name, token_sha256, rtsp_url, created_ms) "
                 "VALUES ('door', ?, NULL, 1000)", (b"\1" * 32,))
    conn.execute("INSERT INTO viewers VALUES (?, ?, 'CN=alice', 2, 1, 2000, NULL, 0)",
                 (fp, b"cert"))
    conn.execute("INSERT INTO epochs VALUES (?, ?, 3000, ?)", (b"E" * 16, fp, b"op"))
    conn.execute("INSERT INTO key_records VALUES (?, ?, 'door', ?, 3000, ?)",
                 (fp, b"C" * 12, b"E" * 16, b"chain record"))
    conn.execute("INSERT INTO key_grants VALUES (?, 'door', 'door/1970-01-01.fsk', 7, 99)",
                 (b"C" * 12 + b"\0\0\0\0",))
    conn.execute("INSERT INTO access_grants VALUES ('11' || ?, 'door', 0, 9, ?, 'ef', 1, 5, "
                 "'pending', NULL, NULL, 'case 7', ?)", ("00" * 15, fp, b"blob"))
    conn.close()
    return db_path


def test_migration_7_renames_the_format_v1_names_and_keeps_every_row(tmp_path: Path) -> None:
    db_path = _version_6_data_dir(tmp_path / "data")
    db = Database(db_path)
    directory = open_directory(None, db_path.parent)
    try:
        assert db.migrated_from == 6 and db.schema_version() == SCHEMA_VERSION
        fp = "ab" + "cd" * 31
        # The rows are where the v2 names say, read through the renamed methods.
        assert db.chain_record(fp, b"C" * 12) == (b"E" * 16, b"chain record")
        recipients = db.chain_recipients(b"C" * 12 + b"\0\0\0\0")
        assert recipients is not None and (recipients.file, recipients.offset,
                                           recipients.length) == ("door/1970-01-01.fsk", 7, 99)
        grant = directory.access_grant("11" + "00" * 15)
        assert grant is not None and grant.note == "case 7" and grant.grantor == fp
        assert directory.access_grant_blob("11" + "00" * 15) == b"blob"
        names = {row[0] for row in db._query("SELECT name FROM sqlite_master")}
        assert {"chain_records", "chain_recipients"} <= names  # (its indexes: migration 8)
        assert not {n for n in names if n.startswith(("key_records", "key_grants"))}
        columns = {row[1] for row in db._query("PRAGMA table_info(chain_records)")}
        assert "chain_id" in columns and "key_id" not in columns
        # Shredding works on the renamed table (it names chain_id and chain_records).
        assert db.shred_unused_keys("door", 10_000) == (1, 1)
        assert db.chain_record(fp, b"C" * 12) is None
    finally:
        directory.close()
        db.close()
    # The migrated schema is exactly a new database's (nothing left of the old names).
    with sqlite3.connect(db_path) as conn:
        assert missing_tables(conn) == []
    assert list(db_path.parent.glob("archiver.sqlite3.v6-*.bak"))


def _version_7_index(db_path: Path, chains: int, viewers: int) -> list[tuple]:
    """An index as the Archiver of schema version 7 left it, made by the shipped migrations 1
    to 7: ``chains`` chains of door and gate, each with a record for each of ``viewers``
    viewers under the viewer's epoch, one join record (written later than its chain's start),
    and a segment of the first chain. Returns the chain records as version 7 held them."""
    conn = _shipped_schema(db_path, 7)
    fps = [f"{v:02x}" * 32 for v in range(viewers)]
    for v, fp in enumerate(fps):
        conn.execute("INSERT INTO epochs VALUES (?, ?, 1000, ?)", (bytes([v]) * 16, fp, b"op"))
    for c in range(chains):
        camera = "door" if c % 2 == 0 else "gate"
        for v, fp in enumerate(fps):
            joined = c == 1 and v == viewers - 1
            conn.execute("INSERT INTO chain_records (fingerprint, chain_id, camera, epoch_id,"
                         " valid_from_ms, record) VALUES (?, ?, ?, ?, ?, ?)",
                         (fp, bytes([c]) * 12, camera, bytes([v]) * 16,
                          5000 + c * 100 + (50 if joined else 0), f"r{c}.{v}".encode()))
    conn.execute("INSERT INTO segments (camera, stream, seq, capture_ms, key_id, plaintext_bytes,"
                 " digest, file, offset, length, manifest_seq, end_ms) VALUES ('door', 0, 0, 5000,"
                 " ?, 1, ?, 'door/1970-01-01.fsa', 0, 1, 0, 6000)", (b"\0" * 16, b"D" * 32))
    rows = conn.execute("SELECT fingerprint, chain_id, camera, epoch_id, valid_from_ms, record"
                        " FROM chain_records ORDER BY chain_id, fingerprint").fetchall()
    conn.close()
    return rows


def test_migration_8_keeps_every_chain_record_and_each_query_keeps_an_index(
        tmp_path: Path) -> None:
    """Version 7's chain records (one row each, keyed by fingerprint, with camera and start)
    migrate to version 8's layout (a chain's records together, the chain's facts once in
    ``chains``, each epoch's records counted): every record is read back as before, a chain's
    start is its earliest record's, and retention's shredding, a viewer's key streams'
    deletion and consolidation's reading of a chain work on it, each through an index."""
    db_path = tmp_path / "archiver.sqlite3"
    old = _version_7_index(db_path, chains=4, viewers=3)
    db = Database(db_path)
    try:
        assert db.migrated_from == 7 and db.schema_version() == SCHEMA_VERSION == 8
        assert list(tmp_path.glob("archiver.sqlite3.v7-*.bak"))
        for fp, chain_id, _, epoch_id, _, record in old:
            assert db.chain_record(fp, chain_id) == (epoch_id, record)
        assert db.chain_records_of(bytes([1]) * 12) == [
            (fp, epoch_id, record) for fp, chain_id, _, epoch_id, _, record in old
            if chain_id == bytes([1]) * 12]
        assert db._query("SELECT chain_id, camera, valid_from_ms FROM chains ORDER BY chain_id"
                         ) == [(bytes([c]) * 12, "door" if c % 2 == 0 else "gate", 5000 + c * 100)
                               for c in range(4)]
        assert db._query("SELECT epoch_id, records FROM epoch_uses ORDER BY epoch_id") == [
            (bytes([v]) * 16, 4) for v in range(3)]
        # Every query on the chain records searches an index; none scans the table.
        plans = {
            "record": "SELECT epoch_id, record FROM chain_records WHERE chain_id=? AND"
                      " fingerprint=?",
            "chain": "SELECT fingerprint, epoch_id, record FROM chain_records WHERE chain_id=?"
                     " ORDER BY fingerprint",
            "unused chains": "SELECT chain_id FROM chains WHERE camera=? AND valid_from_ms<?",
            "shred chain": "DELETE FROM chain_records WHERE chain_id=?",
            "shred epochs": "DELETE FROM epochs WHERE created_ms<? AND NOT EXISTS (SELECT 1"
                            " FROM epoch_uses WHERE epoch_uses.epoch_id=epochs.epoch_id)",
            "viewer": "DELETE FROM chain_records WHERE chain_id IN (SELECT chain_id FROM"
                      " chains) AND fingerprint=?",
        }
        expected = {
            "record": "SEARCH chain_records USING PRIMARY KEY (chain_id=? AND fingerprint=?)",
            "chain": "SEARCH chain_records USING PRIMARY KEY (chain_id=?)",
            "unused chains": "SEARCH chains USING COVERING INDEX chains_by_camera",
            "shred chain": "SEARCH chain_records USING PRIMARY KEY (chain_id=?)",
            # The epochs are scanned (as in version 7), each searched in epoch_uses.
            "shred epochs": "SCAN epochs / CORRELATED SCALAR SUBQUERY 1 / SEARCH epoch_uses",
            # A search per chain (chains lists them), not a scan of every record.
            "viewer": "SEARCH chain_records USING PRIMARY KEY (chain_id=? AND fingerprint=?)",
        }
        for name, sql in plans.items():
            plan = " / ".join(row[3] for row in db._query(
                f"EXPLAIN QUERY PLAN {sql}", [b"x"] * sql.count("?")))
            assert "SCAN chain_records" not in plan and "SCAN chains" not in plan, (name, plan)
            assert plan.startswith(expected[name]), (name, plan)
        # Retention's shredding: door's chains from before 5250 that no segment uses (chain 2;
        # chain 0 has a segment), then the openers no record needs (none: gate's hold them).
        assert db.shred_unused_keys("door", 5250) == (3, 0)
        assert db.chain_record("00" * 32, bytes([2]) * 12) is None
        assert db.chain_record("00" * 32, bytes([0]) * 12) is not None
        assert db._query("SELECT records FROM epoch_uses ORDER BY epoch_id") == [(3,)] * 3
        # A viewer's key streams deleted: its records in every chain, its opener.
        db.delete_key_streams("01" * 32)
        assert all(db.chain_record("01" * 32, bytes([c]) * 12) is None for c in range(4))
        assert db.epoch_opener(bytes([1]) * 16) is None
        assert db._query("SELECT epoch_id FROM epoch_uses ORDER BY epoch_id") == [
            (bytes([0]) * 16,), (bytes([2]) * 16,)]
        # Gate's chains go; door's chain 0 stays while its segment is indexed, and with its
        # records the last uses of the remaining openers: they go too.
        assert db.shred_unused_keys("gate", 10_000) == (4, 0)
        assert db.shred_unused_keys("door", 10_000) == (0, 0)
        with db._transaction() as conn:
            conn.execute("DELETE FROM segments")
        assert db.shred_unused_keys("door", 10_000) == (2, 2)
        assert db._query("SELECT COUNT(*) FROM chains") == [(0,)]
        assert db._query("SELECT COUNT(*) FROM epoch_uses") == [(0,)]
    finally:
        db.close()
    # The migrated schema is exactly a new database's (tables, indexes, triggers).
    fresh = sqlite3.connect(tmp_path / "fresh.sqlite3")
    migrated = sqlite3.connect(db_path)
    try:
        query = "SELECT type, name, sql FROM sqlite_master ORDER BY name"
        Database(tmp_path / "fresh.sqlite3").close()
        assert migrated.execute(query).fetchall() == fresh.execute(query).fetchall()
    finally:
        fresh.close()
        migrated.close()


def _back_to_version_7(db_path: Path) -> list[tuple]:
    """Turn a version-8 index back into what the Archiver of version 7 held: its
    ``chain_records`` table and indexes (as migrations 1 to 7 make them), a row per record
    with its chain's camera and start. Returns those rows."""
    reference = sqlite3.connect(":memory:", isolation_level=None)
    for step in MIGRATIONS[:7]:
        step(reference)
    schema = [sql for (sql,) in reference.execute(
        "SELECT sql FROM sqlite_master WHERE tbl_name='chain_records' AND sql IS NOT NULL"
        " ORDER BY type DESC")]  # the table, then its indexes
    reference.close()
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        rows = conn.execute(
            "SELECT fingerprint, chain_id, camera, epoch_id, valid_from_ms, record FROM"
            " chain_records JOIN chains USING (chain_id) ORDER BY chain_id, fingerprint").fetchall()
        for table in ("chain_records", "chains", "epoch_uses"):
            conn.execute(f"DROP TABLE {table}")
        for sql in schema:
            conn.execute(sql)
        conn.executemany("INSERT INTO chain_records (fingerprint, chain_id, camera, epoch_id,"
                         " valid_from_ms, record) VALUES (?, ?, ?, ?, ?, ?)", rows)
        conn.execute("PRAGMA user_version=7")
        conn.execute("COMMIT")
    finally:
        conn.close()
    return rows


def test_a_version_7_archive_migrates_and_plays_checks_shreds_and_reindexes(
        tmp_path: Path, softhsm_token: TokenHandle) -> None:
    """A real archive (two past days, a viewer on a SoftHSM token, made through the Archiver's
    write path) whose index is at version 7 migrates at open with every chain record read
    back, and ``check`` finds it sound; a real Archiver on it plays the kept day to the viewer and
    its retention shreds the expired day's key material from every file (the migrated
    tables); ``reindex`` writes the journals' records back in the new layout."""
    pem = enroll_viewer(softhsm_token, "vera", bits=2048)
    viewer = Viewer("vera", pem, Token.open(softhsm_token.uri).identity("vera"))
    data = tmp_path / "archiver"
    start = today_ms() - 4 * DAY_MS
    generate(data, "door", start, 48, 1800, 2048, [viewer.pem])
    days = [start, start + DAY_MS]
    material = {day: key_material(data, "door", day, day + DAY_MS) for day in days}
    old = _back_to_version_7(data / "archiver.sqlite3")
    assert len(old) >= 2 and all(len(m) >= 2 for m in material.values())

    # The checker reads and never writes: it asks for the Archiver's start, which migrates.
    refused = cli("check", "--data", str(data), check=False)
    assert refused.returncode != 0 and "schema version 7" in refused.stderr
    assert "Traceback" not in refused.stderr
    db = Database(data / "archiver.sqlite3")  # what the Archiver's start does first
    try:
        assert db.migrated_from == 7 and db.schema_version() == SCHEMA_VERSION
        backup = db.backup
        assert backup is not None and backup.name.startswith("archiver.sqlite3.v7-")
        for fp, chain_id, camera, epoch_id, valid_from_ms, record in old:
            assert db.chain_record(fp, chain_id) == (epoch_id, record)
            assert db._query("SELECT camera, valid_from_ms FROM chains WHERE chain_id=?",
                             (chain_id,)) == [(camera, valid_from_ms)]
    finally:
        db.close()
    report = json.loads(cli("check", "--data", str(data), "--json").stdout.splitlines()[0])
    assert report["ok"] and report["segments"] == 96, report

    server = ArchiverServer(data, extra_args=("--retention-interval", "0.2")).start()
    try:
        session = login(server.url, viewer.identity)
        response = fetch(server.url, session, "door", days[1], days[1] + DAY_MS - 1)
        assert response.status_code == 200, response.text
        played = play(viewer.identity, response.content)
        assert played.ended and not played.skipped
        assert [p.data for p in played.plaintexts] == [
            segment_bytes("door", 48 + i, 2048) for i in range(48)]
        cli("cameras", "retention", "door", "3", "--url", server.url, "--data", str(data))
        # Every file but the migration's fresh backup (it goes once older than the retention
        # period: archiver/retention.py _remove_old_backups).
        deadline = time.monotonic() + 60
        while set(files_holding(data, material[days[0]])) - {backup.name}:
            assert time.monotonic() < deadline, files_holding(data, material[days[0]])
            time.sleep(0.1)
        assert len(files_holding(data, material[days[1]])) >= 2  # index and journal
    finally:
        server.stop()

    rebuilt = json.loads(cli("reindex", "--data", str(data), "--json").stdout.splitlines()[0])
    assert rebuilt["segments"] == 48 and rebuilt["key_records"] >= 1, rebuilt
    db = Database(data / "archiver.sqlite3")
    try:
        kept = [row for row in old if days[1] <= row[4] < days[1] + DAY_MS]
        assert kept and all(db.chain_record(fp, chain_id) == (epoch_id, record)
                            for fp, chain_id, _, epoch_id, _, record in kept)
        assert db._query("SELECT SUM(records) FROM epoch_uses") == db._query(
            "SELECT COUNT(*) FROM chain_records")
    finally:
        db.close()
    assert json.loads(cli("check", "--data", str(data), "--json").stdout.splitlines()[0])["ok"]


def test_a_lost_count_table_or_records_table_is_counted_again(tmp_path: Path) -> None:
    """``epoch_uses`` is what keeps an epoch opener from shredding: restored empty it would let
    every opener go while records still need them; restored after the records were lost it
    would keep openers nothing needs. Both are counted again from the records left."""
    db_path = tmp_path / "archiver.sqlite3"
    _version_7_index(db_path, chains=2, viewers=2)
    Database(db_path).close()
    counts = "SELECT epoch_id, records FROM epoch_uses ORDER BY epoch_id"
    # Gate's chain 1 is unused: its records go, and the openers only once no record is left.
    for dropped, expected, shredded in (
            ("epoch_uses", [(bytes([v]) * 16, 2) for v in range(2)], (2, 0)),
            ("chain_records", [], (0, 2))):
        with sqlite3.connect(db_path) as conn:
            conn.execute(f"DROP TABLE {dropped}")
        db = Database(db_path)
        try:
            assert db.restore_missing_tables() == [dropped]
            assert db._query(counts) == expected
            triggers = {row[0] for row in db._query(
                "SELECT name FROM sqlite_master WHERE type='trigger'")}
            assert {"chain_records_uncounted", "chain_records_recounted"} <= triggers
            assert db.shred_unused_keys("gate", 10_000) == shredded
        finally:
            db.close()
