"""A camera's token check waits for the site directory off the event loop (found by
bench/site_directory.py: a site Archiver acknowledged up to a quarter fewer MB/s than a
standalone one). With PostgreSQL the check is a network round trip, and a directory that is
slow or away makes it wait up to the pool's 10 s: made on the event loop, that wait froze every
other request of the Archiver (health checks, viewers' streams, other cameras' uploads).

Reproduced with a real PostgreSQL directory whose `cameras` table another session holds
locked: a segment upload's check waits on the lock; meanwhile the Archiver must still answer.
Before the fix: /healthz timed out (the event loop was blocked until the lock went)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg

from fusion_testkit.viewer import login
from tests.archiver.conftest import Viewer
from tests.fixtures.server import ArchiverServer, SiteCa, production_archiver


def _waiting_on_lock(admin: psycopg.Connection, database: str) -> bool:
    row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND "
                        "wait_event_type = 'Lock' AND query ILIKE '%%cameras%%'",
                        (database,)).fetchone()
    return bool(row and row[0])


def _answers_while_cameras_are_locked(server: ArchiverServer, postgres_url: str,
                                      request: Callable[[], int]) -> tuple[int | None, int]:
    """Lock the directory's cameras table, start ``request`` (it waits on the lock), and ask
    /healthz meanwhile: its status (None: no answer in 10 s) and the request's, once the lock
    went."""
    database = postgres_url.rsplit("/", 1)[1]
    statuses: list[int] = []
    with psycopg.connect(postgres_url) as locker, \
            psycopg.connect(postgres_url, autocommit=True) as watcher:
        # Another session holds the table: the request's SELECT on it waits for the lock.
        locker.execute("LOCK TABLE cameras IN ACCESS EXCLUSIVE MODE")
        worker = threading.Thread(target=lambda: statuses.append(request()), daemon=True)
        worker.start()
        deadline = time.monotonic() + 60
        while not _waiting_on_lock(watcher, database):
            assert time.monotonic() < deadline, "the request never reached PostgreSQL"
            time.sleep(0.1)
        # The request is waiting in PostgreSQL now: the rest of the Archiver must answer.
        try:
            health: int | None = httpx.get(f"{server.url}/healthz", verify=server.verify,
                                           timeout=10).status_code
        except httpx.TimeoutException:
            health = None
        locker.rollback()  # the lock goes; the request completes
    worker.join(60)
    assert statuses, "the request did not complete once the lock went"
    return health, statuses[0]


def test_a_live_request_waiting_for_the_directory_does_not_freeze_the_archiver(
        postgres_url: str, tmp_path: Path, make_viewer: Callable[[str], Viewer]) -> None:
    server = production_archiver(SiteCa.create(tmp_path / "site-ca"), tmp_path / "a1",
                                 extra_args=("--directory", postgres_url))
    viewer = make_viewer("lia")
    with server:
        server.add_camera("livecam")
        server.add_viewer(viewer.pem, ["livecam"])
        session = login(server.url, viewer.identity, verify=server.verify)

        def live() -> int:
            return httpx.get(f"{server.url}/v1/cameras/livecam/live", verify=server.verify,
                             params={"nonce": os.urandom(16).hex(), "duration_s": 1},
                             headers={"Authorization": f"Bearer {session}"},
                             timeout=60).status_code

        health, status = _answers_while_cameras_are_locked(server, postgres_url, live)
        assert health == 200, "the Archiver did not answer while a live request waited"
        assert status == 200
    assert "Traceback" not in server.log()


def test_a_slow_directory_does_not_freeze_the_archiver_while_a_camera_token_is_checked(
        postgres_url: str, tmp_path: Path) -> None:
    server = production_archiver(SiteCa.create(tmp_path / "site-ca"), tmp_path / "a1",
                                 extra_args=("--directory", postgres_url))
    with server:
        token = server.add_camera("loopcam")
        assert server.put_segment("loopcam", token, b"first" * 100) == 201
        health, status = _answers_while_cameras_are_locked(
            server, postgres_url, lambda: server.put_segment("loopcam", token, b"second" * 100))
        assert health == 200, "the Archiver did not answer while a token check waited"
        assert status == 201
    assert "Traceback" not in server.log()
