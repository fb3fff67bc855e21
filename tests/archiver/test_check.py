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
# The archive below is made once per worker that runs these tests: keep them on one worker.
pytestmark = pytest.mark.xdist_group("archiver-check")


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
    _index(data, "DELETE FROM chain_recipients WHERE offset>=? AND offset<?", (end_before, end))
    for table in ("segments", "manifests", "chain_recipients"):
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


# --- issue 19, finding 6: a forged tombstone, a symlinked file, a dropped table ----------
def _forge_expiry(data: Path, reason: str = "retention", removed_ms: int | None = None) -> str:
    """The attack: damage a kept day, then hide it as 'removed by retention': a tombstone row
    and no index rows for the file (what retention's first step leaves)."""
    _flip(data)
    rel = f"door/{_file(data).name}"
    for table in ("segments", "manifests", "chain_recipients"):
        _index(data, f"DELETE FROM {table} WHERE file=?", (rel,))
    day = today_ms() - 2 * DAY_MS
    _index(data, "INSERT INTO expired_files (file, camera, from_ms, to_ms, reason, removed_ms,"
           " done) VALUES (?, 'door', ?, ?, ?, ?, 0)",
           (rel, day, day + DAY_MS - 1, reason, removed_ms or today_ms()))
    return rel


@pytest.mark.parametrize(("reason", "removed_ms", "why"), [
    ("retention", None, "within the retention period of 30 day(s)"),
    ("retention", 10 * DAY_MS, "in the future"),
    ("disk space", None, "an evidence hold covers it"),
    ("hidden", None, "not a reason retention removes video for"),
])
def test_a_forged_tombstone_does_not_hide_a_damaged_day(archive: Path, tmp_path: Path, reason: str,
                                                        removed_ms: int | None, why: str) -> None:
    data = _copy(archive, tmp_path)
    if reason == "disk space":  # the watermark would take it, were it not for the hold
        _index(data, "INSERT INTO holds (camera, from_ms, to_ms, reason, created_by, created_ms)"
               " VALUES ('door', ?, ?, 'case 7', 'admin', 0)",
               (today_ms() - 2 * DAY_MS + 3600_000, today_ms() - 2 * DAY_MS + 7200_000))
    rel = _forge_expiry(data, reason, None if removed_ms is None else today_ms() + removed_ms)
    code, report = _check(data)
    assert code == EXIT_DAMAGED and not report["ok"], report
    assert "expiry_unjustified" in _kinds(report)
    assert any(rel in p["message"] and why in p["message"] for p in report["problems"])
    assert "unindexed" in _kinds(report)  # checked as a kept file: its rows are missing


def test_a_removal_retention_would_make_is_still_accepted(archive: Path, tmp_path: Path) -> None:
    """The same rows, where retention's rules agree (a site with a 1-day retention, its pass
    interrupted after step 1), are a removal in progress: a note, not a problem."""
    data = _copy(archive, tmp_path)
    _index(data, "UPDATE cameras SET retention_days=1 WHERE name='door'")
    rel = _forge_expiry(data)
    code, report = _check(data)
    assert code == 0 and report["ok"], report["problems"]
    assert any(rel in note and "being removed" in note for note in report["notes"])


def test_a_symlinked_archive_file_is_refused_by_check_and_reindex(archive: Path,
                                                                 tmp_path: Path) -> None:
    """An archive day replaced by a link to a file outside the data directory (here a
    genuine archive file kept elsewhere) is neither read nor indexed; both commands say so."""
    data = _copy(archive, tmp_path)
    path = _file(data)
    outside = tmp_path / "elsewhere.fsa"
    path.rename(outside)
    path.symlink_to(outside)
    code, report = _check(data)
    assert code == EXIT_DAMAGED and "link" in _kinds(report)
    assert any("symbolic link" in p["message"] for p in report["problems"])
    assert report["segments"] == 0  # nothing was read through the link
    result = cli("reindex", "--data", str(data), "--json", check=False)
    rebuilt = json.loads(result.stdout.splitlines()[0])
    assert rebuilt["segments"] == 0 and rebuilt["files"] == 0
    assert any("symbolic link" in problem for problem in rebuilt["problems"])


def test_a_dropped_table_says_the_index_is_damaged_and_reindex_rebuilds_it(
        archive: Path, tmp_path: Path) -> None:
    data = _copy(archive, tmp_path)
    _index(data, "DROP TABLE segments")
    result = cli("check", "--data", str(data), check=False)
    assert result.returncode == EXIT_DAMAGED
    assert "index archiver.sqlite3 is damaged" in result.stderr
    assert "segments" in result.stderr and "fusion-archiver reindex" in result.stderr
    assert "Unexpected error" not in result.stderr and "Traceback" not in result.stderr
    rebuilt = cli("reindex", "--data", str(data))
    assert "indexed 72 segment(s)" in rebuilt.stdout
    assert "the index lacked the table segments: recreated" in rebuilt.stdout
    code, report = _check(data)
    assert code == 0 and report["ok"], report["problems"]
