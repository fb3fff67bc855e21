"""An Archiver whose site directory is a real PostgreSQL server (issue 21, item 1), in
production mode (HTTPS under a site CA): cameras, viewers, holds and retention go to
PostgreSQL, not to the data directory; a camera's segments are archived and a viewer plays
them; a second Archiver on the same directory (given it through FUSION_DIRECTORY) sees the
same site."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx
import psycopg

from fusion_testkit.playback import fetch, play
from fusion_testkit.server import server_env
from fusion_testkit.viewer import login
from tests.archiver.conftest import Viewer
from tests.fixtures.server import SiteCa, production_archiver


def test_an_archiver_with_a_postgresql_directory_records_and_serves_a_viewer(
        postgres_url: str, tmp_path: Path, make_viewer: Callable[[str], Viewer]) -> None:
    site_ca = SiteCa.create(tmp_path / "site-ca")
    viewer = make_viewer("pia")
    data = tmp_path / "a1"
    server = production_archiver(site_ca, data, extra_args=("--directory", postgres_url))
    with server:
        token = server.add_camera("pgcam")
        fp = server.add_viewer(viewer.pem, ["pgcam"])
        server.admin("POST", "/v1/admin/holds", {"camera": "pgcam", "from_ms": 0,
                                                 "to_ms": 10_000, "reason": "case 21"},
                     expect=201)
        server.admin("PUT", "/v1/admin/cameras/pgcam/retention", {"days": 9}, expect=200)
        chunks = [os.urandom(2000) for _ in range(3)]
        for chunk in chunks:
            assert server.put_segment("pgcam", token, chunk) == 201
        session = login(server.url, viewer.identity, verify=server.verify)
        response = fetch(server.url, session, "pgcam", verify=server.verify)
        assert response.status_code == 200, response.text
        played = play(viewer.identity, response.content)
        assert played.ended and played.data == b"".join(chunks)
        archiver_log = server.log()
    password = unquote(urlsplit(postgres_url).password or "")
    assert password and password not in archiver_log  # a URL's password is never logged
    # The offline check reads the retention and holds from the same directory: sound.
    checked = subprocess.run(
        [sys.executable, "-P", "-m", "archiver", "check", "--data", str(data), "--json"],
        env=server_env({**os.environ, "FUSION_DIRECTORY": postgres_url}), capture_output=True,
        text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["ok"] is True
    # The site's rows are in PostgreSQL...
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT name, retention_days FROM cameras").fetchall() == [
            ("pgcam", 9)]
        assert conn.execute("SELECT fingerprint FROM viewers").fetchall() == [(fp,)]
        assert conn.execute("SELECT camera FROM viewer_cameras").fetchall() == [("pgcam",)]
        assert conn.execute("SELECT reason FROM holds").fetchall() == [("case 21",)]
    # ...and not in the data directory, whose file holds the local index (the segments).
    with sqlite3.connect(data / "archiver.sqlite3") as local:
        for table in ("cameras", "viewers", "viewer_cameras", "holds", "access_grants",
                      "admins"):
            assert local.execute(f"SELECT COUNT(*) FROM {table}").fetchone() == (0,), table
        assert local.execute("SELECT COUNT(*) FROM segments WHERE camera='pgcam'"
                             ).fetchone() == (3,)

    # A second Archiver of the site, its own data directory and token, the directory given in
    # the environment (no password on a command line): it knows the camera, its retention and
    # hold, and the viewer, and the viewer logs in to it.
    second = production_archiver(site_ca, tmp_path / "a2",
                                 env=server_env({"FUSION_DIRECTORY": postgres_url}))
    with second:
        cameras = second.admin("GET", "/v1/admin/cameras", expect=200)
        assert [(c["name"], c["retention_days"]) for c in cameras] == [("pgcam", 9)]
        assert [v["fingerprint"] for v in second.admin("GET", "/v1/admin/viewers",
                                                        expect=200)] == [fp]
        assert [h["reason"] for h in second.admin("GET", "/v1/admin/holds", expect=200)] == [
            "case 21"]
        assert login(second.url, viewer.identity, verify=second.verify)


def test_a_directory_that_goes_away_is_a_503_with_a_sentence_and_the_archiver_recovers(
        postgres_url: str, tmp_path: Path) -> None:
    server = production_archiver(SiteCa.create(tmp_path / "site-ca"), tmp_path / "a1",
                                 extra_args=("--directory", postgres_url))
    database = urlsplit(postgres_url).path.lstrip("/")
    admin_url = urlsplit(postgres_url)._replace(path="/postgres").geturl()
    with server:
        token = server.add_camera("gone")
        assert server.put_segment("gone", token, b"before" * 100) == 201
        with psycopg.connect(admin_url, autocommit=True) as conn:
            # The directory's server refuses this database, and its sessions end.
            conn.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS false')
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s", (database,))
        # A change needs the directory: refused with the sentence (issue 22: before, every
        # request, ingest included, was a 503 "failed: OperationalError").
        response = httpx.post(f"{server.url}/v1/admin/cameras", json={"name": "new"},
                              verify=server.verify, timeout=90,
                              headers={"Authorization": f"Bearer {server.admin_token}"})
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "directory_unreachable"
        assert "The site directory (PostgreSQL at 127.0.0.1:" in response.json()["message"]
        # Recording goes on under the last authorizations read (the camera's token hash).
        assert server.put_segment("gone", token, b"during" * 100) == 201
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS true')
        deadline = time.monotonic() + 90
        while httpx.get(f"{server.url}/healthz", verify=server.verify,
                        timeout=30).json()["status"] != "ok":
            assert time.monotonic() < deadline, "the Archiver did not reconnect to its directory"
            time.sleep(0.2)
        assert server.put_segment("gone", token, b"after" * 100) == 201
        server.admin("POST", "/v1/admin/cameras", {"name": "new"}, expect=201)
        cameras = server.admin("GET", "/v1/admin/cameras", expect=200)
        assert [(c["name"], c["segments"]) for c in cameras] == [("gone", 3), ("new", 0)]
    assert "Traceback" not in server.log()
