"""``fusion-archiver check`` (issue 15, deliverable 3): it finds each injected fault — a
flipped byte, a truncated file, a missing index row, a broken chain — says what it is in plain
words and with --json, exits non-zero; and --rebuild-index repairs an index from sound files."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.archiver.retention_helpers import DAY_MS, cli, generate, today_ms

EXIT_DAMAGED = 3


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("check") / "archiver"
    generate(data, "door", today_ms() - 2 * DAY_MS, 6, 300, 4096, [])
    return data


def _copy(archive: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "archiver"
    shutil.copytree(archive, copy)
    return copy


def _file(data: Path) -> Path:
    return next((data / "archive" / "door").glob("*.fsa"))


def _check(data: Path, *extra: str) -> tuple[int, dict]:
    result = cli("check", "--data", str(data), "--json", *extra, check=False)
    return result.returncode, json.loads(result.stdout.splitlines()[0])


def _kinds(report: dict) -> set[str]:
    return {p["kind"] for p in report["problems"]}


def _index(data: Path, sql: str, args: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(data / "archiver.sqlite3")
    try:
        rows = conn.execute(sql, args).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def test_a_sound_archive_passes(archive: Path) -> None:
    code, report = _check(archive)
    assert code == 0 and report["ok"] and report["problems"] == []
    assert report["segments"] == report["manifests"] == 72
    human = cli("check", "--data", str(archive))
    assert "the archive is sound" in human.stdout


def _flip(data: Path) -> None:
    path = _file(data)
    offset, length = _index(data, "SELECT offset, length FROM segments WHERE seq=20")[0]
    raw = bytearray(path.read_bytes())
    raw[offset + length // 2] ^= 0x01  # in the middle of a segment's ciphertext
    path.write_bytes(bytes(raw))


def _truncate(data: Path) -> None:
    path = _file(data)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 100)


def _drop_row(data: Path) -> None:
    _index(data, "DELETE FROM segments WHERE seq=30")


def _break_chain(data: Path) -> None:
    """Cut one whole group (grant, segment, manifest) out of the file and out of the index,
    shifting what follows, so that files and index agree except for the chain's link."""
    path = _file(data)
    rel = f"door/{path.name}"
    (end_before,) = _index(data, "SELECT offset + length FROM manifests WHERE manifest_seq=39")[0]
    (end,) = _index(data, "SELECT offset + length FROM manifests WHERE manifest_seq=40")[0]
    cut = end - end_before
    raw = path.read_bytes()
    path.write_bytes(raw[:end_before] + raw[end:])
    _index(data, "DELETE FROM segments WHERE manifest_seq=40")
    _index(data, "DELETE FROM manifests WHERE manifest_seq=40")
    _index(data, "DELETE FROM key_grants WHERE offset>=? AND offset<?", (end_before, end))
    for table in ("segments", "manifests", "key_grants"):
        _index(data, f"UPDATE {table} SET offset=offset-? WHERE file=? AND offset>=?",
               (cut, rel, end))


@pytest.mark.parametrize(("inject", "kind", "words"), [
    (_flip, "index_mismatch", "differs from its index row"),
    (_truncate, "truncated", "cut short"),
    (_drop_row, "unindexed", "is not in the index"),
    (_break_chain, "chain_broken", "chain breaks between manifests 39 and 41"),
])
def test_each_injected_fault_is_found(archive: Path, tmp_path: Path,
                                      inject: Callable[[Path], None], kind: str,
                                      words: str) -> None:
    data = _copy(archive, tmp_path)
    inject(data)
    code, report = _check(data)
    assert code == EXIT_DAMAGED and not report["ok"]
    assert kind in _kinds(report), report["problems"]
    assert any(words in p["message"] for p in report["problems"]), report["problems"]
    if inject is _break_chain:
        assert _kinds(report) == {"chain_broken"}  # files and index agree otherwise
    human = cli("check", "--data", str(data), check=False)
    assert human.returncode == EXIT_DAMAGED and "PROBLEM: " in human.stdout
    assert "Traceback" not in human.stdout + human.stderr


def test_rebuild_index_repairs_an_index_from_sound_files(archive: Path, tmp_path: Path) -> None:
    data = _copy(archive, tmp_path)
    _drop_row(data)
    result = cli("check", "--data", str(data), "--rebuild-index", check=False)
    assert result.returncode == EXIT_DAMAGED  # what it found before the rebuild
    assert "indexed 72 segment(s)" in result.stdout
    code, report = _check(data)
    assert code == 0 and report["ok"]


def test_not_a_data_directory_is_a_clear_error(tmp_path: Path) -> None:
    result = cli("check", "--data", str(tmp_path), check=False)
    assert result.returncode == 2 and "not an Archiver data directory" in result.stderr
    assert "Traceback" not in result.stderr
