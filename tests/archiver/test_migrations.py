"""Schema versions (issue 15, deliverable 2): a data directory made by the unversioned schema
(the one on main before versions, kept as tests/archiver/fixtures/schema_v0.sql) migrates
forward at open, keeps its rows, and leaves a backup of what it was first."""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from archiver.auth import digest
from archiver.db import Database, SegmentRow
from archiver.directory import open_directory
from archiver.migrations import MIGRATIONS, SCHEMA_VERSION, missing_tables
from keyservice.certs import load_certificate, read_oaep_hash
from keyservice.errors import UsageError
from keyservice.identity import fingerprint
from tests.archiver.conftest import Viewer
from tests.fixtures.server import ArchiverServer
from tests.fixtures.viewer import fetch, login, play

FIXTURE = Path(__file__).parent / "fixtures" / "schema_v0.sql"


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
    conn = sqlite3.connect(db_path, isolation_level=None)
    for number, step in enumerate(MIGRATIONS[:6], start=1):
        conn.execute("BEGIN")
        step(conn)
        conn.execute(f"PRAGMA user_version={number}")
        conn.execute("COMMIT")
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
        assert db.migrated_from == 6 and db.schema_version() == SCHEMA_VERSION == 7
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
        assert {"chain_records", "chain_recipients", "chain_records_by_camera",
                "chain_records_by_epoch"} <= names
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
