"""The site directory's outage path, below the Archiver (issue 22, item 5): the snapshot's
rules (pure), and a Directory on a real PostgreSQL of the test's own that is stopped and
started again: reads of the recording path answered from the last read, at once; what must be
current (a new login, a write) refused with the sentence; the watch bringing it back without
a restart; a multi-host URL (what Patroni gives) reaching the second server when the first is
down."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from archiver.directory import CameraRow, ViewerRow, open_directory
from archiver.directory.snapshot import (
    MISSING,
    DirectoryLink,
    DirectorySnapshot,
    DirectoryUnreachable,
    DirectoryWatch,
)
from fusion_testkit.postgres import PostgresCluster, find_postgres_bin

FP = "ab" * 32


def _viewer(fp: str, revoked_ms: int | None = None, cameras: tuple[str, ...] = ()) -> ViewerRow:
    return ViewerRow(fp, b"cert", "CN=v", 0, not cameras, cameras, 1, revoked_ms, False)


def test_the_snapshot_answers_only_what_it_knows() -> None:
    snap = DirectorySnapshot()
    # Nothing read yet: it cannot say, not even "no such camera".
    assert snap.camera("door") is MISSING and snap.viewer(FP) is MISSING
    assert snap.cameras(False) is MISSING and snap.holds(None) is MISSING
    assert snap.camera_archivers(None) is MISSING
    door = CameraRow("door", b"h" * 32, None, 1, None, None, "a1")
    snap.put_camera("door", door)
    assert snap.camera("door") == door and snap.camera("yard") is MISSING
    # A full read: complete, so that an absent row is a true "none" (a token refused at once).
    snap.load([door], [_viewer(FP)], [], [], [("door", "a1", 1)], 5, {"door": ("a1", "a2")})
    assert snap.camera_archivers("door") == {"door": ("a1", "a2")}
    assert snap.camera("yard") is None and snap.viewer("cd" * 32) is None
    assert snap.placements("door") == [("a1", 1)]
    # A poll's authorizations (no certificates) revoke a known viewer in the snapshot; a
    # viewer the poll shows but whose row was not read is not answered "none".
    snap.put_states({FP: (77, None, False), "cd" * 32: (None, None, False)})
    found = snap.viewer(FP)
    assert isinstance(found, ViewerRow) and found.revoked_ms == 77
    assert snap.viewer("cd" * 32) is MISSING and snap.viewers() is MISSING
    snap.put_viewer("cd" * 32, _viewer("cd" * 32, cameras=("door",)))
    assert snap.viewer_states() == {FP: (77, None, False), "cd" * 32: (None, ("door",), False)}
    # Removed from an active-only list: gone from it.
    snap.put_cameras([], include_removed=False)
    assert snap.camera("door") is None


def test_the_refusal_is_one_sentence_naming_the_directory_and_the_time() -> None:
    link = DirectoryLink("db.site.example:5432", clock=lambda: 1_796_600_000_000)
    assert link.up and link.state().state == "ok"
    refused = link.failed("connection refused")
    assert not link.up and link.state().since_ms == 1_796_600_000_000
    assert refused.message == (
        "The site directory (PostgreSQL at db.site.example:5432) is unreachable since "
        "23:33:20 UTC; this Archiver keeps recording under the authorizations it last read, "
        "but admin changes and new logins need the directory: try again when it is back.")
    link.back()
    assert link.up and link.outages == 1


requires_postgres = pytest.mark.skipif(find_postgres_bin() is None,
                                       reason="PostgreSQL is not installed")


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL of this test's own: stopping it must not take the session's down."""
    made = PostgresCluster.start()
    try:
        yield made
    finally:
        made.stop()


def wait_for(condition: object, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return bool(condition())  # type: ignore[operator]


@requires_postgres
def test_reads_go_on_from_the_snapshot_and_the_watch_brings_it_back(
        cluster: PostgresCluster, tmp_path: Path) -> None:
    directory = open_directory(cluster.create_database(), tmp_path)
    watch = DirectoryWatch(directory)
    try:
        directory.add_camera("door", b"h" * 32, None, 1, archiver="a1", standbys=("a2",),
                             redundant=True)
        directory.add_viewer(FP, b"cert", "CN=v", 0, None, 2)
        # Read once while up (the Archiver's registry re-reads its cameras every 2 s): what
        # the snapshot answers with later.
        assert directory.viewer(FP) is not None and directory.camera("door") is not None
        assert directory.camera_archivers() == {"door": ("a1", "a2")}
        assert directory.reachable
        watch.start()
        cluster.pause()
        # The first query finds the server gone, the next ones do not try it: none waits.
        started = time.monotonic()
        for _ in range(50):
            row = directory.camera("door")
            assert row is not None and row.archiver == "a1"
            assert directory.camera("yard") is None  # complete: an unknown camera is refused
            assert [v.fingerprint for v in directory.viewers()] == [FP]
            # Who records a redundant camera (the registry re-reads it every 2 s).
            assert directory.camera_archivers() == {"door": ("a1", "a2")}
        assert not directory.reachable and directory.link is not None
        assert directory.link.state().state == "unreachable"
        # Before: every segment's token check waited for the pool (10 s) and failed.
        assert time.monotonic() - started < 5, "reads waited on the unreachable server"
        # A new login and a write are refused with the sentence, at once.
        with pytest.raises(DirectoryUnreachable, match=r"^The site directory \(PostgreSQL at "
                           r"127\.0\.0\.1:\d+\) is unreachable since \d\d:\d\d:\d\d UTC; .* "
                           r"try again when it is back\.$"):
            directory.viewer(FP, cached=False)
        with pytest.raises(DirectoryUnreachable):
            directory.revoke_viewer(FP, 3)
        cluster.resume()
        # Back without a restart: the watch renews the pool and reads the snapshot again.
        assert wait_for(lambda: directory.reachable, 60)
        assert wait_for(lambda: watch.reconciled == 1, 30)
        assert directory.revoke_viewer(FP, 3)
        row = directory.viewer(FP)
        assert row is not None and row.revoked_ms == 3
    finally:
        watch.stop()
        directory.close()


@requires_postgres
def test_a_read_only_server_is_not_taken_for_the_directory_back(
        cluster: PostgresCluster, tmp_path: Path) -> None:
    # A leader demoted under the Archiver (Patroni) answers, but takes no write: the link stays
    # down (recording on the snapshot) until a writable server answers.
    url = cluster.create_database()
    database = url.rsplit("/", 1)[1]
    directory = open_directory(url, tmp_path)
    watch = DirectoryWatch(directory)
    try:
        assert directory.camera("door") is None
        watch.start()
        with psycopg.connect(cluster.url(), autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s", (database,))
            with pytest.raises(DirectoryUnreachable):
                directory.add_camera("door", b"h" * 32, None, 1)
            assert directory.link is not None
            tries = directory.link.outages
            probes = watch.failed_probes
            # Three probes find the server read-only: not back.
            assert wait_for(lambda: watch.failed_probes >= probes + 3, 30)
            assert not directory.reachable and directory.link.outages == tries
            admin.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
        assert wait_for(lambda: directory.reachable, 30)
        assert directory.add_camera("door", b"h" * 32, None, 1)
    finally:
        watch.stop()
        directory.close()


@requires_postgres
def test_a_multi_host_url_reaches_the_second_server_when_the_first_is_down(
        cluster: PostgresCluster, tmp_path: Path) -> None:
    # What a Patroni site gives the Archivers: every member in one libpq URL, the writable
    # one chosen (target_session_attrs=read-write). Two servers here, the first one down.
    second = PostgresCluster.start()
    try:
        with psycopg.connect(second.url(), autocommit=True) as conn:
            conn.execute(f"ALTER ROLE fusion PASSWORD '{cluster.password}'")  # one URL, one password
            conn.execute('CREATE DATABASE "site"')
        second.password = cluster.password
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute('CREATE DATABASE "site"')
        base = cluster.url("site")
        url = base.replace(f"127.0.0.1:{cluster.port}/",
                           f"127.0.0.1:{cluster.port},127.0.0.1:{second.port}/")
        url += "?target_session_attrs=read-write"
        cluster.pause()
        directory = open_directory(url, tmp_path)
        try:
            directory.add_camera("door", b"h" * 32, None, 1)
            assert directory.link is not None
            assert directory.link.where == f"127.0.0.1:{cluster.port},127.0.0.1:{second.port}"
        finally:
            directory.close()
        with psycopg.connect(second.url("site")) as conn:
            assert conn.execute("SELECT name FROM cameras").fetchall() == [("door",)]
    finally:
        second.stop()
