"""The site directory's schema is defined once (archiver/directory/schema.py) and made by its
Alembic revisions: upgraded from empty, both backends equal the metadata; an index file made by
the legacy SQLite migrations is stamped at the baseline and upgraded, after a backup; a
directory from a newer Archiver is refused; Archivers starting at once migrate once."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, text

from archiver.db import Database
from archiver.directory import Directory, open_directory
from archiver.directory.migrate import BASELINE, HEAD, head_revision
from archiver.directory.schema import metadata
from keyservice.errors import UsageError


def _differences(engine: Engine) -> list[Any]:
    """What Alembic's autogenerate would change to make the database equal the metadata (the
    directory's tables only: the local index shares an SQLite file)."""
    def ours(obj: Any, name: str | None, kind: str, reflected: bool, compare_to: Any) -> bool:
        return kind != "table" or name in metadata.tables

    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={
            "compare_type": True, "compare_server_default": True, "include_object": ours})
        return compare_metadata(context, metadata)


def _revision(directory: Directory) -> str:
    with directory.engine.connect() as conn:
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_upgraded_from_empty_the_directory_equals_the_metadata(
        backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    directory = open_directory(url, tmp_path)
    try:
        assert directory.backend == backend
        assert _revision(directory) == head_revision()
        assert _differences(directory.engine) == []
    finally:
        directory.close()
    assert not list(tmp_path.glob("*.bak"))  # nothing to back up in a new directory


def test_a_directory_at_the_head_revision_opens_without_loading_alembic(tmp_path: Path) -> None:
    assert HEAD == head_revision()  # the constant the fast path compares with
    open_directory(None, tmp_path).close()  # made, at the head
    # A second start (every start but the first after an upgrade): one query, no Alembic.
    probe = ("import sys; from pathlib import Path; from archiver.directory import open_directory; "
             f"open_directory(None, Path({str(tmp_path)!r})).close(); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_a_legacy_index_file_is_stamped_at_the_baseline_and_upgraded_after_a_backup(
        tmp_path: Path) -> None:
    index = Database(tmp_path / "archiver.sqlite3")  # the legacy migrations: version 7
    with sqlite3.connect(tmp_path / "archiver.sqlite3") as conn:
        conn.execute("INSERT INTO cameras (name, token_sha256, rtsp_url, created_ms) "
                     "VALUES ('door', x'01', NULL, 5)")
    directory = open_directory(None, tmp_path)
    try:
        assert _revision(directory) == head_revision() != BASELINE
        assert [c.name for c in directory.cameras()] == ["door"]
        # The legacy tables declared non-integer primary keys without NOT NULL (SQLite
        # allows NULL there); nothing else differs from a directory made by the revisions.
        assert {(d[0][0], d[0][3]) for d in _differences(directory.engine)} <= {
            ("modify_nullable", column) for column in
            ("grant_id", "fingerprint", "name", "hold_id")}
    finally:
        directory.close()
        index.close()
    backups = list(tmp_path.glob(f"archiver.sqlite3.vd{BASELINE}-*.bak"))
    assert len(backups) == 1
    with sqlite3.connect(backups[0]) as old:  # the file as it was before the directory's upgrade
        assert old.execute("SELECT name FROM cameras").fetchall() == [("door",)]
        assert "alembic_version" not in {r[0] for r in old.execute(
            "SELECT name FROM sqlite_master WHERE type='table'")}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_directory_from_a_newer_archiver_is_refused(
        backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    open_directory(url, tmp_path).close()
    directory = open_directory(url, tmp_path)
    with directory.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num='9999'"))
    directory.close()
    with pytest.raises(UsageError, match="schema revision 9999; this Archiver knows up to"):
        open_directory(url, tmp_path)


def test_archivers_starting_at_once_on_an_empty_postgresql_directory_migrate_it_once(
        postgres_url: str, tmp_path: Path) -> None:
    # Without the advisory lock, both would create the tables and one would fail.
    start = threading.Barrier(4)
    opened: list[Directory] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        start.wait(30)
        try:
            opened.append(open_directory(postgres_url, tmp_path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    try:
        assert errors == [] and len(opened) == 4
        assert _revision(opened[0]) == head_revision()
        assert _differences(opened[0].engine) == []
    finally:
        for directory in opened:
            directory.close()
