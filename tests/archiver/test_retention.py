"""Retention, evidence holds and crypto-shredding (issue 15, deliverable 1), on a real
Archiver process over an archive of past days made through the real write path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from bench.generate import segment_bytes
from keyservice.token import Token
from tests.archiver.conftest import Viewer
from tests.archiver.retention_helpers import (
    DAY_MS,
    cli,
    day_name,
    files_holding,
    generate,
    key_material,
    today_ms,
)
from tests.fixtures.server import REPO_ROOT, ArchiverServer
from tests.fixtures.tokens import TokenHandle, enroll_viewer
from tests.fixtures.viewer import fetch, login, play

SEGMENT_S = 1800  # 48 segments a day
SIZE = 4096


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _audit(data_dir: Path, action: str) -> list[dict]:
    lines = (data_dir / "audit.jsonl").read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if entry.get("action") == action]


def test_retention_destroys_expired_video_and_its_keys_and_keeps_held_video(
        tmp_path: Path, softhsm_token: TokenHandle) -> None:
    pem = enroll_viewer(softhsm_token, "alice", bits=2048)
    viewer = Viewer("alice", pem, Token.open(softhsm_token.uri).identity("alice"))
    data = tmp_path / "archiver"
    start = today_ms() - 5 * DAY_MS  # three full days: d0, d1, d2 (5, 4 and 3 days ago)
    generate(data, "door", start, 72, SEGMENT_S, SIZE, [viewer.pem])
    days = [start + i * DAY_MS for i in range(3)]
    material = {day: key_material(data, "door", day, day + DAY_MS) for day in days}
    assert all(len(m) >= 2 for m in material.values())  # the day's chain record, its opener
    # Before: every day's key material is in the index and in its key journal.
    for day in days:
        found = files_holding(data, material[day])
        assert f"archive/door/{day_name(day)}.fsk" in found

    server = ArchiverServer(data, extra_args=("--retention-interval", "0.2")).start()
    try:
        # The default (30 days) keeps everything; a hold on d1, then a 2-day period for door.
        url = ["--url", server.url, "--data", str(data)]
        held = cli("holds", "add", "door", "--from", _iso(days[1] + 3600_000),
                   "--to", _iso(days[1] + 7200_000), "--reason", "case 2026-114", "--json", *url)
        hold = json.loads(held.stdout)
        listed = json.loads(cli("cameras", "list", "--json", *url).stdout)
        assert listed["cameras"][0]["retention_days"] == 30
        assert listed["storage"]["free_bytes"] > 0
        cli("cameras", "retention", "door", "2", *url)
        _wait(lambda: len(_audit(data, "retention.remove")) == 2, 30, "two days removed")

        archive = data / "archive" / "door"
        assert sorted(p.name for p in archive.iterdir()) == [
            f"{day_name(days[1])}.fsa", f"{day_name(days[1])}.fsk"]
        # Crypto-shredding: no file of the data directory (index, WAL, journals, archive)
        # holds any key record or epoch opener of the expired days any more, once the pass
        # ends (each day's audit line comes first; the WAL is checkpointed at the pass's end).
        _wait(lambda: all(files_holding(data, material[day]) == {} for day in (days[0], days[2])),
              30, "the expired days' keys shredded from every file")
        # The held day keeps all of its keys, and a real viewer plays it.
        assert len(files_holding(data, material[days[1]])) >= 2  # index and journal
        session = login(server.url, viewer.identity)
        response = fetch(server.url, session, "door", days[1], days[1] + DAY_MS - 1)
        assert response.status_code == 200, response.text
        played = play(viewer.identity, response.content)
        assert played.ended and not played.skipped
        first = (days[1] - start) // (SEGMENT_S * 1000)
        assert [p.data for p in played.plaintexts] == [
            segment_bytes("door", first + i, SIZE) for i in range(48)]
        # A viewer asking for an expired range is told so.
        expired = fetch(server.url, session, "door", days[0], days[0] + 3600_000)
        assert expired.status_code == 410 and expired.json()["error"] == "expired"
        assert "expired" in expired.json()["message"]
        # The viewer program says so too, with its own exit code.
        env = {k: v for k, v in os.environ.items() if k not in ("FUSION_PIN", "FUSION_TOKEN")}
        env["FUSION_CLIENT_HOME"] = str(tmp_path / "client-home")
        out = tmp_path / "expired.ts"
        played_cli = subprocess.run(
            [sys.executable, "-m", "client", "play", "--archiver", server.url, "--token",
             softhsm_token.object_uri("alice"), "--camera", "door", "--from", _iso(days[0]),
             "--to", _iso(days[0] + 3600_000), "-o", str(out)],
            capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120,
            stdin=subprocess.DEVNULL, check=False)
        assert played_cli.returncode == 54, played_cli.stderr
        assert "has expired" in played_cli.stderr and "Traceback" not in played_cli.stderr
        assert not out.exists()
        # The camera listing shows it; the removal and the hold are audited.
        camera = json.loads(cli("cameras", "list", "--json", *url).stdout)["cameras"][0]
        assert (camera["retention_days"], camera["holds"]) == (2, 1)
        assert camera["first_ms"] >= days[1] and camera["expired_until_ms"] >= days[2]
        assert [e["reason"] for e in _audit(data, "retention.remove")] == ["retention"] * 2
        assert _audit(data, "hold.add")[0]["reason"] == "case 2026-114"
        metrics = httpx.get(f"{server.url}/metrics", timeout=10,
                            headers={"Authorization": f"Bearer {server.admin_token}"}).text
        assert "fusion_retention_files_removed_total 2.0" in metrics
        assert 'fusion_camera_retention_days{camera="door"} 2.0' in metrics

        # A hold id beyond SQLite's integers is refused as such, not a 500 (schemathesis).
        server.admin("DELETE", f"/v1/admin/holds/{2**84}", expect=422)
        # Released: the held day goes at the next pass, its keys too.
        cli("holds", "remove", str(hold["hold_id"]), *url)
        _wait(lambda: len(_audit(data, "retention.remove")) == 3, 30, "the released day removed")
        # The audit line comes before the shredding ends (as above): waited for, not assumed.
        _wait(lambda: files_holding(data, material[days[1]]) == {}, 30,
              "the released day's keys shredded from every file")
        assert list(archive.iterdir()) == []
        assert _audit(data, "hold.remove")[0]["hold_id"] == hold["hold_id"]
    finally:
        server.stop()
    result = cli("check", "--data", str(data), "--json")
    assert json.loads(result.stdout)["ok"]


def test_sigkill_during_retention_leaves_a_consistent_archive(
        tmp_path: Path, make_viewer: Callable[[str], Viewer]) -> None:
    viewer = make_viewer("bob")
    data = tmp_path / "archiver"
    start = today_ms() - 8 * DAY_MS
    for camera in ("a", "b", "c", "d"):  # 6 days each to remove
        generate(data, camera, start, 6 * 24, 600, SIZE, [viewer.pem])
    expired = key_material(data, "a", start, start + 6 * DAY_MS)
    server = ArchiverServer(data, extra_args=("--retention-days", "1",
                                              "--retention-interval", "0.1"))
    log = tmp_path / "kills.log"
    interrupted = 0
    for delay in (0.0, 0.002, 0.005, 0.01):
        # Killed while a pass is at work: just after it announced the removal of a day.
        before = log.read_text().count("removing ") if log.exists() else 0
        env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "FUSION_PIN")}
        with open(log, "ab") as out:
            process = subprocess.Popen(server.command(), stdout=out, stderr=subprocess.STDOUT,
                                       env=env, cwd=REPO_ROOT)
        try:
            deadline = time.monotonic() + 60
            while log.read_text().count("removing ") <= before:  # polled closely: a day
                assert time.monotonic() < deadline, "no retention pass started"  # takes ms
                time.sleep(0.001)
            time.sleep(delay)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        # Consistent at every kill: the checker passes (a removal in progress is a note, once
        # the checker knows the site's retention period: it holds a tombstone to it).
        result = cli("check", "--data", str(data), "--json", "--retention-days", "1",
                     check=False)
        report = json.loads(result.stdout)
        assert result.returncode == 0 and report["ok"], report["problems"]
        interrupted += any("being removed" in note for note in report["notes"])
    assert _day_files(data), "every kill came after the work was done"
    server.start()
    try:
        _wait(lambda: not _day_files(data), 60, "every expired day removed")
    finally:
        server.stop()
    assert files_holding(data, expired) == {}
    assert json.loads(cli("check", "--data", str(data), "--json", "--retention-days", "1")
                      .stdout)["ok"]
    print(f"{interrupted} of 4 kills left a removal half done; the next start finished it")


def _day_files(data: Path) -> set[str]:
    return {p.name for p in (data / "archive").glob("*/*.fs?")}


def _iso(ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat()


@pytest.mark.parametrize(("args", "words"), [
    (("holds", "add", "door", "--from", "yesterday", "--to", "2026-01-01T00:00Z",
      "--reason", "x"), "Cannot read the time 'yesterday'"),
    # The one time parser of the three CLIs (keyservice/timespec.py): UTC unless an offset is
    # given, relative times, and a range that must not end before it starts.
    (("holds", "add", "door", "--from", "-1h", "--to", "-2h", "--reason", "x"),
     "before it starts"),
    (("cameras", "retention", "door", "0"), "at least 1 day"),
    (("cameras", "retention", "door", "forever"), "not a number of days"),
])
def test_bad_retention_and_hold_arguments_are_refused_before_any_request(
        args: tuple[str, ...], words: str) -> None:
    # The URL points nowhere: the refusal must come before any connection.
    result = cli(*args, "--url", "http://127.0.0.1:9", "--admin-token", "x", check=False)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_camera_whose_whole_archive_expired_continues_its_chain(
        tmp_path: Path, softhsm_token: TokenHandle) -> None:
    """In process (the Archiver's write path and SoftHSM signer, an injected clock): every day
    of a camera expires, then it records again. Its chain goes on from the manifest kept at
    the edge (it does not restart at 0), its segment numbers too, and the checker agrees."""
    from archiver.archive import Archive
    from archiver.auth import digest, new_secret
    from archiver.settings import Settings
    from archiver.signing import open_signer

    data = tmp_path / "archiver"
    settings = Settings(data_dir=data, signer_token_uri=softhsm_token.uri, retention_days=1,
                        min_free_bytes=0, reserve_bytes=0)
    start = today_ms() - 5 * DAY_MS
    now = [start]
    archive = Archive(settings, open_signer(settings), clock=lambda: now[0])
    try:
        archive.directory.add_camera("gate", digest(new_secret()), None, start)
        for index in range(3):
            now[0] = start + index * 60_000
            archive.ingest_segment("gate", b"before %d" % index, now_ms=now[0])
        tail_before = archive.db.chain_tail("gate")
        assert tail_before is not None and tail_before[0] == 2
        now[0] = today_ms() + 3600_000
        archive.retention.run()
        assert archive.db.recorded_range("gate") is None  # everything expired
        archive._cameras.clear()  # as after a restart: the chain is read from the index
        row = archive.ingest_segment("gate", b"after", now_ms=now[0])
        assert row.manifest_seq == 3 and row.seq == 3
        manifest = archive.db.last_manifest("gate")
        assert manifest is not None
        stored = (data / "archive" / manifest.file).read_bytes()
        from keyservice.format import Manifest, decode_record
        issued = decode_record(stored[manifest.offset:manifest.offset + manifest.length])
        assert isinstance(issued, Manifest) and issued.prev_hash == tail_before[1]
        key = archive.signer.certificate.public_key()
    finally:
        archive.close()
    from archiver.check import check_archive

    report = check_archive(data, key)
    # Anchors 0 and 2 (the removed day's first and last) and manifest 3 in the new file.
    assert report.ok and report.cameras == {"gate": 3}, report.problems
