"""Camera health survives a restart (issue 19, left open): the index keeps each camera's last
known state, reason and last segment time, and after a restart (SIGKILL or a clean stop) a
camera shows them, marked as from before the restart, not `waiting`. A real Archiver over
HTTPS, restarted on its data directory."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.fixtures.camera import make_source, requires_ffmpeg
from tests.fixtures.rtsp import wait_for
from tests.fixtures.server import ArchiverServer

pytestmark = [requires_ffmpeg]


def _camera(server: ArchiverServer, name: str) -> dict:
    return next(c for c in server.admin("GET", "/v1/admin/cameras", expect=200)
                if c["name"] == name)


def _saved(server: ArchiverServer, camera: str) -> tuple | None:
    conn = sqlite3.connect(f"file:{server.data_dir / 'archiver.sqlite3'}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT state, last_segment_ms FROM camera_health WHERE camera=?",
                            (camera,)).fetchone()
    finally:
        conn.close()


def test_camera_health_is_shown_after_a_restart(https_archiver: ArchiverServer,
                                                tmp_path: Path) -> None:
    server = https_archiver
    token = server.add_camera("door")
    server.add_camera("idle")
    segment = make_source(tmp_path / "seg.ts", 2).read_bytes()
    assert server.put_segment("door", token, segment) == 201
    before = _camera(server, "door")
    assert before["state"] == "receiving" and before["last_segment_ms"] is not None
    # A change of state is saved at once (within a health tick): a crash keeps it.
    wait_for(lambda: _saved(server, "door") == ("receiving", before["last_segment_ms"]), 30,
             "the camera's health in the index")
    server.kill()
    server.start()
    after = _camera(server, "door")
    assert after["state"] != "waiting", after
    assert after["before_restart"] is True
    assert after["last_segment_ms"] == before["last_segment_ms"]
    assert "before the Archiver restarted" in after["message"]
    assert "receiving" in after["message"]
    idle = _camera(server, "idle")  # never heard of: waiting, before and after
    assert idle["state"] == "waiting" and idle["last_segment_ms"] is None
    # Heard of again: live state, no longer "before the restart".
    assert server.put_segment("door", token, segment) == 201
    live = _camera(server, "door")
    assert live["state"] == "receiving" and live["before_restart"] is False
    assert live["last_segment_ms"] > before["last_segment_ms"]
    assert not live["message"]
    # A clean stop saves the newest segment time too (saved every minute while running).
    server.stop()
    server.start()
    again = _camera(server, "door")
    assert again["before_restart"] is True
    assert again["last_segment_ms"] == live["last_segment_ms"]
    assert "Traceback" not in server.log()
