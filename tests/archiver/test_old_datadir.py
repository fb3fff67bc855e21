"""A data directory written by an older release (issue 21, item 1): ``data/datadir-v6`` was made
by commit 26698b6 (index schema version 6, before the site directory; how:
data/make_old_datadir.py). Opened by this code, its index migrates to version 7, its directory
tables are stamped at the Alembic baseline and upgraded, and everything is there: the camera
(its token, retention and hold), both viewers, the personal admin, the pending access grant,
and the recorded video, which its viewer still plays, with a new segment after it."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from archiver.directory.migrate import BASELINE, head_revision
from archiver.migrations import SCHEMA_VERSION
from fusion_testkit.playback import fetch, play
from fusion_testkit.viewer import login
from keyservice.certs import load_certificate
from keyservice.identity import SoftwareIdentity
from keyservice.softhsm import write_config
from tests.fixtures.server import SiteCa, production_archiver

DATA = Path(__file__).parent / "data"
OLD = json.loads((DATA / "datadir-v6.json").read_text())


def _identity(name: str) -> SoftwareIdentity:
    keys = DATA / "datadir-v6-viewers"
    key = load_pem_private_key((keys / f"TEST-ONLY-{name}.key.pem").read_bytes(), None)
    cert = load_certificate((keys / f"TEST-ONLY-{name}.cert.pem").read_bytes())
    return SoftwareIdentity(cert, key)  # type: ignore[arg-type]


def _segment(i: int) -> bytes:
    return f"old segment {i} ".encode() * 64  # as data/make_old_datadir.py wrote them


def test_a_committed_old_data_directory_opens_with_everything_there_and_playable(
        tmp_path: Path) -> None:
    data = tmp_path / "archiver"
    shutil.copytree(DATA / "datadir-v6", data)
    write_config(data / "token")  # the signing token's configuration names where it is now
    with sqlite3.connect(data / "archiver.sqlite3") as before:
        assert before.execute("PRAGMA user_version").fetchone() == (OLD["schema_version"],)
    camera = OLD["camera"]
    server = production_archiver(SiteCa.create(tmp_path / "site-ca"), data)
    with server:
        cameras = server.admin("GET", "/v1/admin/cameras", expect=200)
        assert [(c["name"], c["retention_days"], c["holds"]) for c in cameras] == [
            (camera, 36500, 1)]
        holds = server.admin("GET", "/v1/admin/holds", expect=200)
        assert holds == [OLD["hold"]]
        viewers = {v["fingerprint"]: v for v in server.admin("GET", "/v1/admin/viewers",
                                                               expect=200)}
        assert set(viewers) == {OLD["viewer_a"], OLD["viewer_b"]}
        assert viewers[OLD["viewer_a"]]["cameras"] == [camera]
        assert [(a["name"], a["fingerprint"]) for a in server.admin(
            "GET", "/v1/admin/admins", expect=200)] == [("carol", OLD["admin"])]
        grants = server.admin("GET", "/v1/admin/grants", expect=200)
        assert [(g["grant_id"], g["state"], g["grantor"], g["grantee"]) for g in grants] == [
            (OLD["grant_id"], "pending", OLD["viewer_a"], OLD["viewer_b"])]
        # The camera's old token still archives; the viewer plays the old video and the new.
        assert server.put_segment(camera, OLD["camera_token"], _segment(3)) == 201
        olga = _identity("olga")
        session = login(server.url, olga, verify=server.verify)
        response = fetch(server.url, session, camera, OLD["from_ms"] - 1000,
                         verify=server.verify)
        assert response.status_code == 200, response.text
        played = play(olga, response.content)
        assert played.ended and not played.skipped
        assert [p.data for p in played.plaintexts] == [_segment(i) for i in range(4)]
        # The grantee sees the grant made for it under the old release.
        otto = login(server.url, _identity("otto"), verify=server.verify)
        mine = httpx.get(f"{server.url}/v1/grants", headers={"Authorization": f"Bearer {otto}"},
                         verify=server.verify, timeout=30).json()
        assert [g["grant_id"] for g in mine] == [OLD["grant_id"]]
    with sqlite3.connect(data / "archiver.sqlite3") as after:
        assert after.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert after.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (head_revision(),)]
    # A backup of each step: the index before migration 7, the file before the directory's.
    assert len(list(data.glob(f"archiver.sqlite3.v{OLD['schema_version']}-*.bak"))) == 1
    assert len(list(data.glob(f"archiver.sqlite3.vd{BASELINE}-*.bak"))) == 1
